"""`PoolTelemetry`: one stream of a pool's telemetry: every serving worker's (call spans, memory
samples, as `Client.watch_telemetry` yields them) and the pool's events, in the same shape
(`{"type": "pool", "event", "metadata", "pid": <host pid>, "time_unix_ns"}`, i.e. `sidecar.v1.PoolEvent`).
The pool attaches each new serving worker (a replacement, a spare that took over) to every open stream.
"""
from __future__ import annotations

import os
import queue
import threading
from typing import Any, Callable, Iterator

from sidecar.errors import SidecarError
from sidecar.host.events import PoolEvent
from sidecar.host.supervisor import Worker

__all__ = ["PoolTelemetry"]


class PoolTelemetry:
    """Merged telemetry of a pool: worker events (dicts as `Client.watch_telemetry` yields them, with
    `slot`-independent `pid`) and pool events ({"type": "pool", "event", "metadata", ...})."""

    _END = object()

    def __init__(self, subscribe: Callable[[Callable[[PoolEvent], None]], Callable[[], None]],
                 memory_interval_s: float, forget: Callable[[PoolTelemetry], None]) -> None:
        self._interval = memory_interval_s
        self._forget = forget
        self._queue: queue.Queue[Any] = queue.Queue(10_000)
        self._watches: list[Any] = []
        self._lock = threading.Lock()
        self._closed = False
        self._unsubscribe = subscribe(lambda ev: self._put(_pool_event_dict(ev)))

    def _put(self, item: Any) -> None:
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            pass

    def attach(self, worker: Worker) -> None:
        with self._lock:
            if self._closed:
                return
            try:
                watch = worker.client.watch_telemetry(self._interval)
            except SidecarError:
                return
            self._watches.append(watch)

        def pump() -> None:
            try:
                for ev in watch:
                    self._put(ev)
            except SidecarError:
                pass  # the worker went away; its replacement gets its own pump
        threading.Thread(target=pump, name=f"sidecar-pool-telemetry-{worker.pid}", daemon=True).start()

    def get(self, timeout: float | None = None) -> dict[str, Any] | None:
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            return None
        return None if item is self._END else item

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            item = self._queue.get()
            if item is self._END:
                return
            yield item

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            watches, self._watches = self._watches, []
        self._forget(self)  # by the pool, or every watch ever opened would stay listed
        self._unsubscribe()
        for w in watches:
            try:
                w.close()
            except Exception:  # noqa: BLE001
                pass
        self._put(self._END)

    def __enter__(self) -> PoolTelemetry:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _pool_event_dict(ev: PoolEvent) -> dict[str, Any]:
    return {"type": "pool", "time_unix_ns": ev.time_unix_ns, "pid": os.getpid(), "event": ev.event,
            "metadata": ev.string_metadata()}
