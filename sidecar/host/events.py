"""Pool events for subscribers, and the catalogue of them: each event is made by one function here,
with one key set (a key that does not apply is None), and published by the pool's shell only.

    worker_started  slot, pid, via, start_ms
    restart         slot, pid, via (template/cold/spare), start_ms, since_crash_ms
    crash           slot (-1 for a spare), pid, phase (running/start/spare/recycled), classification,
                    exit_code, signal, description, uptime_s, inflight, ops, stderr_tail, message
    recycle         slot, pid, inflight, abandoned, classification
    retry           op, attempt, pid, classification, delay_ms
    breaker_open    scope (start/op), op, crashes, window_s, cooldown_s, classification
    breaker_half_open, breaker_close   scope, op
    template_restart  pid, dead_pid, workers
    resource_loaded   name, loader, workers, pids, load_ms (the slowest worker's), host_bytes,
                      device_bytes (summed over the workers)
    resource_unloaded name, workers, host_bytes_freed, device_bytes_freed
    resource_restored slot (-1 for a spare), pid, via, resources, restore_ms, since_start_ms
    restore_failed    slot, pid, via, resource, kind, message
    session_lost      session_id, pid, classification, restored (a restore hook rebuilt it), restore_ms

Callbacks run synchronously on the pool's thread that raised the event, so they must be quick (hand
work to a queue). `EventBus.stream()` gives a blocking iterator fed by its own queue instead. Events
convert to the `sidecar.v1.TelemetryEvent` shape (`PoolEvent`) so a host sees pool events and worker
telemetry in one stream. (The memory profiler, `sidecar.observe`, publishes its own memory_* events.)
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

from sidecar.host.crash import ExitInfo

log = logging.getLogger(__name__)

__all__ = ["PoolEvent", "EventBus", "EventStream", "worker_started", "restart", "crash", "recycle", "retry",
           "breaker_open", "breaker_half_open", "breaker_close", "template_restart",
           "resource_loaded", "resource_unloaded", "resource_restored", "restore_failed", "session_lost"]


@dataclass(frozen=True)
class PoolEvent:
    event: str
    metadata: dict[str, Any] = field(default_factory=dict)
    time_unix_ns: int = field(default_factory=time.time_ns)

    def string_metadata(self) -> dict[str, str]:
        """The metadata as the proto carries it: strings, lists joined by newlines, None left out."""
        return {k: "\n".join(map(str, v)) if isinstance(v, list) else str(v)
                for k, v in self.metadata.items() if v is not None}


# ---------------------------------------------------------------------------------------------------
# the catalogue


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def worker_started(slot: int, pid: int, via: str, start_s: float) -> PoolEvent:
    return PoolEvent("worker_started", {"slot": slot, "pid": pid, "via": via, "start_ms": _ms(start_s)})


def restart(slot: int, pid: int, via: str, start_s: float | None, since_crash_s: float | None) -> PoolEvent:
    return PoolEvent("restart", {"slot": slot, "pid": pid, "via": via, "start_ms": _ms(start_s),
                                 "since_crash_ms": _ms(since_crash_s)})


def crash(slot: int, pid: int | None, phase: str, exit: ExitInfo, *, uptime_s: float | None = None,
          inflight: int = 0, ops: Sequence[str] = (), stderr_tail: Sequence[str] = (),
          message: str | None = None) -> PoolEvent:
    """A worker that ended unexpectedly, failed to start (phase start; spare for a spare), or was
    recycled and has now exited (phase recycled)."""
    return PoolEvent("crash", {
        "slot": slot, "pid": pid, "phase": phase, "classification": exit.classification.value,
        "exit_code": exit.exit_code, "signal": exit.signal, "description": exit.describe(),
        "uptime_s": None if uptime_s is None else round(uptime_s, 3), "inflight": inflight, "ops": list(ops),
        "stderr_tail": list(stderr_tail), "message": message})


def recycle(slot: int, pid: int, inflight: int, abandoned: int, classification: str | None) -> PoolEvent:
    return PoolEvent("recycle", {"slot": slot, "pid": pid, "inflight": inflight, "abandoned": abandoned,
                                 "classification": classification})


def retry(op: str, attempt: int, pid: int | None, classification: str | None, delay_s: float) -> PoolEvent:
    return PoolEvent("retry", {"op": op, "attempt": attempt, "pid": pid, "classification": classification,
                               "delay_ms": _ms(delay_s)})


def breaker_open(scope: str, op: str | None, crashes: int, window_s: float, cooldown_s: float,
                 classification: str | None) -> PoolEvent:
    return PoolEvent("breaker_open", {"scope": scope, "op": op, "crashes": crashes, "window_s": window_s,
                                      "cooldown_s": cooldown_s, "classification": classification})


def breaker_half_open(scope: str, op: str | None = None) -> PoolEvent:
    return PoolEvent("breaker_half_open", {"scope": scope, "op": op})


def breaker_close(scope: str, op: str | None = None) -> PoolEvent:
    return PoolEvent("breaker_close", {"scope": scope, "op": op})


def template_restart(pid: int | None, dead_pid: int | None, workers: int) -> PoolEvent:
    return PoolEvent("template_restart", {"pid": pid, "dead_pid": dead_pid, "workers": workers})


def resource_loaded(name: str, loader: str, pids: list[int], load_s: float, host_bytes: int,
                    device_bytes: int) -> PoolEvent:
    return PoolEvent("resource_loaded", {"name": name, "loader": loader, "workers": len(pids), "pids": pids,
                                         "load_ms": _ms(load_s), "host_bytes": host_bytes,
                                         "device_bytes": device_bytes})


def resource_unloaded(name: str, workers: int, host_bytes_freed: int, device_bytes_freed: int) -> PoolEvent:
    return PoolEvent("resource_unloaded", {"name": name, "workers": workers, "host_bytes_freed": host_bytes_freed,
                                           "device_bytes_freed": device_bytes_freed})


def resource_restored(slot: int, pid: int, via: str, resources: list[str], restore_s: float,
                      since_start_s: float) -> PoolEvent:
    return PoolEvent("resource_restored", {"slot": slot, "pid": pid, "via": via, "resources": resources,
                                           "restore_ms": _ms(restore_s), "since_start_ms": _ms(since_start_s)})


def restore_failed(slot: int, pid: int, via: str, resource: str, kind: str, message: str) -> PoolEvent:
    return PoolEvent("restore_failed", {"slot": slot, "pid": pid, "via": via, "resource": resource, "kind": kind,
                                        "message": message})


def session_lost(session_id: str, pid: int, classification: str | None, restored: bool,
                 restore_s: float | None) -> PoolEvent:
    return PoolEvent("session_lost", {"session_id": session_id, "pid": pid, "classification": classification,
                                      "restored": restored, "restore_ms": _ms(restore_s)})


# ---------------------------------------------------------------------------------------------------
# delivery


class EventStream:
    """Blocking iterator over the events published after it was opened, until closed."""

    _END = object()

    def __init__(self, bus: EventBus, maxsize: int) -> None:
        self._bus = bus
        self._queue: queue.Queue[PoolEvent | object] = queue.Queue(maxsize)  # events, then _END
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
        assert isinstance(item, PoolEvent)
        return item

    def __iter__(self) -> Iterator[PoolEvent]:
        while True:
            item = self._queue.get()
            if item is self._END:
                self._queue.put_nowait(self._END)
                return
            assert isinstance(item, PoolEvent)
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
        """Makes and delivers an event (the memory profiler's; the pool's come from the catalogue)."""
        return self.emit(PoolEvent(event, metadata))

    def emit(self, ev: PoolEvent) -> PoolEvent:
        """Delivers `ev` to every subscriber and stream."""
        event = ev.event
        metadata = ev.metadata
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
