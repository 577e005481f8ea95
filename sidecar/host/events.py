"""Pool events (crash, restart, retry, recycle, breaker_*, template_restart, ...) for subscribers.

Callbacks run synchronously on the pool's thread that raised the event, so they must be quick (hand
work to a queue). `EventBus.stream()` gives a blocking iterator fed by its own queue instead. Events
convert to the `sidecar.v1.TelemetryEvent` shape (`PoolEvent`) so a host sees pool events and worker
telemetry in one stream.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

log = logging.getLogger(__name__)

__all__ = ["PoolEvent", "EventBus", "EventStream", "EVENTS"]

EVENTS = ("crash", "restart", "retry", "recycle", "breaker_open", "breaker_half_open", "breaker_close",
          "worker_started", "template_restart")


@dataclass(frozen=True)
class PoolEvent:
    event: str
    metadata: dict[str, Any] = field(default_factory=dict)
    time_unix_ns: int = field(default_factory=time.time_ns)

    def to_proto(self) -> Any:
        """As a `sidecar.v1.TelemetryEvent` with its `pool` field set (metadata as strings)."""
        from sidecar.v1 import sidecar_pb2 as pb

        return pb.TelemetryEvent(time_unix_ns=self.time_unix_ns, pid=os.getpid(),
                                 pool=pb.PoolEvent(event=self.event, metadata=self.string_metadata()))

    def string_metadata(self) -> dict[str, str]:
        """The metadata as the proto carries it: strings, lists joined by newlines, None left out."""
        return {k: "\n".join(map(str, v)) if isinstance(v, list) else str(v)
                for k, v in self.metadata.items() if v is not None}


class EventStream:
    """Blocking iterator over the events published after it was opened, until closed."""

    _END = object()

    def __init__(self, bus: EventBus, maxsize: int) -> None:
        self._bus = bus
        self._queue: queue.Queue[Any] = queue.Queue(maxsize)
        self.dropped = 0

    def _put(self, event: PoolEvent) -> None:
        try:
            self._queue.put_nowait(event)
        except queue.Full:  # a reader that stopped reading must not stall the pool
            self.dropped += 1

    def get(self, timeout: float | None = None) -> PoolEvent | None:
        """The next event, or None on timeout / after close."""
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            return None
        if item is self._END:
            self._queue.put_nowait(self._END)
            return None
        return item

    def __iter__(self) -> Iterator[PoolEvent]:
        while True:
            item = self._queue.get()
            if item is self._END:
                self._queue.put_nowait(self._END)
                return
            yield item

    def close(self) -> None:
        self._bus._remove_stream(self)
        try:
            self._queue.put_nowait(self._END)
        except queue.Full:
            self._queue.get_nowait()
            self._queue.put_nowait(self._END)

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EventBus:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[PoolEvent], None]] = []
        self._streams: list[EventStream] = []
        self.counts: dict[str, int] = {}

    def subscribe(self, callback: Callable[[PoolEvent], None]) -> Callable[[], None]:
        """Calls `callback(event)` for every event; returns a function that unsubscribes."""
        with self._lock:
            self._callbacks.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._callbacks:
                    self._callbacks.remove(callback)
        return unsubscribe

    def stream(self, maxsize: int = 10_000) -> EventStream:
        s = EventStream(self, maxsize)
        with self._lock:
            self._streams.append(s)
        return s

    def _remove_stream(self, s: EventStream) -> None:
        with self._lock:
            if s in self._streams:
                self._streams.remove(s)

    def publish(self, event: str, **metadata: Any) -> PoolEvent:
        ev = PoolEvent(event, metadata)
        with self._lock:
            self.counts[event] = self.counts.get(event, 0) + 1
            callbacks = list(self._callbacks)
            streams = list(self._streams)
        log.debug("pool event %s %s", event, metadata)
        for cb in callbacks:
            try:
                cb(ev)
            except Exception:  # one broken subscriber must not break the pool or the others
                log.exception("pool event subscriber %r failed", cb)
        for s in streams:
            s._put(ev)
        return ev

    def close(self) -> None:
        with self._lock:
            streams, self._streams = self._streams, []
            self._callbacks.clear()
        for s in streams:
            try:
                s._queue.put_nowait(EventStream._END)
            except queue.Full:
                pass
