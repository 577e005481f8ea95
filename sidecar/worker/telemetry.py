"""The telemetry hub: call spans and memory samples for any number of watchers.

Calls must not pay for telemetry nobody reads: `active` is a plain attribute that is False while
there are no subscribers, and every emitting method returns at once then. A slow watcher never
blocks a call either: each subscription has a bounded queue that drops its oldest event when full.
Memory samples come from a sampler thread that exists only while someone watches.
"""
from __future__ import annotations

import collections
import os
import threading
import time
from typing import Any, Callable, Iterator

MemorySource = Callable[[], dict[str, Any]]


def rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def gpu_memory(indices: list[int] | None = None) -> list[dict[str, int]]:
    """Figures of the given GPUs (default: the current one), only where this process already uses
    CUDA: sampling must not initialise it, nor open a context on a GPU the worker does not use."""
    try:
        import torch

        if not torch.cuda.is_initialized():  # type: ignore[no-untyped-call]  # (unannotated in torch)
            return []
        out = []
        for i in (indices if indices is not None else [torch.cuda.current_device()]):
            free, total = torch.cuda.mem_get_info(i)
            out.append({"index": i, "allocated": int(torch.cuda.memory_allocated(i)),
                        "reserved": int(torch.cuda.memory_reserved(i)), "free": int(free), "total": int(total)})
        return out
    except Exception:
        return []


def default_memory_source() -> dict[str, Any]:
    return {"rss_bytes": rss_bytes(), "arena_reserved_bytes": 0, "arena_in_use_bytes": 0, "leases": 0,
            "gpus": gpu_memory()}


class Subscription:
    """One watcher's stream of event dicts. Iterate it (blocks until an event or close), or poll `get`."""

    def __init__(self, hub: "Telemetry", memory_interval_s: float, max_events: int) -> None:
        self._hub = hub
        self.memory_interval_s = memory_interval_s
        self.next_memory = 0.0  # monotonic time of the next memory sample (0 = right away)
        self._events: collections.deque[dict[str, Any]] = collections.deque(maxlen=max_events)
        self._cond = threading.Condition()
        self.closed = False
        self.dropped = 0  # events lost because this watcher was slow

    def _put(self, event: dict[str, Any]) -> None:
        with self._cond:
            if self.closed:
                return
            if len(self._events) == self._events.maxlen:
                self.dropped += 1  # deque(maxlen) drops the oldest on append
            self._events.append(event)
            self._cond.notify()

    def get(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The next event, or None after `timeout` seconds or once closed and drained."""
        with self._cond:
            if not self._events and not self.closed:
                self._cond.wait_for(lambda: self._events or self.closed, timeout)
            return self._events.popleft() if self._events else None

    def wait(self, timeout: float | None = None) -> bool:
        """Blocks until an event is queued (without taking it) or the watch is closed; True when an
        event is there. For a consumer that takes events under a lock of its own."""
        with self._cond:
            self._cond.wait_for(lambda: self._events or self.closed, timeout)
            return bool(self._events)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            event = self.get()
            if event is None:
                return
            yield event

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()
        self._hub._unsubscribe(self)

    def __enter__(self) -> "Subscription":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Telemetry:
    def __init__(self, memory_source: MemorySource | None = None, max_events: int = 4096) -> None:
        self.memory_source = memory_source or default_memory_source
        self.max_events = max_events
        self.pid = os.getpid()
        self.active = False  # read without a lock on the hot path; a stale False only skips one span
        self._subs: list[Subscription] = []
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._sampler: threading.Thread | None = None
        self._closed = False

    # -- watchers ------------------------------------------------------------------------------------

    def subscribe(self, memory_interval_s: float = 1.0) -> Subscription:
        """A new watcher; memory samples every `memory_interval_s` seconds (<= 0: the 1 s default)."""
        interval = memory_interval_s if memory_interval_s and memory_interval_s > 0 else 1.0
        sub = Subscription(self, max(interval, 0.01), self.max_events)
        with self._lock:
            if self._closed:
                sub.closed = True
                return sub
            self._subs.append(sub)
            self.active = True
            if self._sampler is None or not self._sampler.is_alive():
                self._sampler = threading.Thread(target=self._sample_loop, name="sidecar-telemetry",
                                                 daemon=True)
                self._sampler.start()
            self._wake.notify_all()
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            if sub in self._subs:
                self._subs.remove(sub)
            self.active = bool(self._subs)
            self._wake.notify_all()

    @property
    def watchers(self) -> int:
        return len(self._subs)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            subs = list(self._subs)
        for sub in subs:
            sub.close()
        sampler = self._sampler
        if sampler is not None and sampler is not threading.current_thread():
            sampler.join(timeout=2)

    # -- events --------------------------------------------------------------------------------------

    def emit(self, event: dict[str, Any]) -> None:
        """Deliver a ready-made event dict to every watcher (time and pid are added)."""
        if not self.active:
            return
        event.setdefault("time_unix_ns", time.time_ns())
        event.setdefault("pid", self.pid)
        for sub in list(self._subs):
            sub._put(event)

    def span_start(self, op: str, request_id: str, bytes_in: int = 0) -> None:
        if not self.active:
            return
        self.emit({"type": "span", "phase": "start", "op": op, "request_id": request_id, "duration_ns": 0,
                   "bytes_in": int(bytes_in), "bytes_out": 0, "outcome": "", "timing": {}})

    def span_stop(self, op: str, request_id: str, duration_ns: int = 0, bytes_in: int = 0, bytes_out: int = 0,
                  timing: dict[str, int] | None = None, outcome: str = "ok") -> None:
        if not self.active:
            return
        self.emit({"type": "span", "phase": "stop", "op": op, "request_id": request_id,
                   "duration_ns": int(duration_ns), "bytes_in": int(bytes_in), "bytes_out": int(bytes_out),
                   "outcome": outcome, "timing": dict(timing or {})})

    def span_exception(self, op: str, request_id: str, duration_ns: int = 0, bytes_in: int = 0,
                       outcome: str = "OP_FAILED", timing: dict[str, int] | None = None,
                       message: str = "") -> None:
        if not self.active:
            return
        self.emit({"type": "span", "phase": "exception", "op": op, "request_id": request_id,
                   "duration_ns": int(duration_ns), "bytes_in": int(bytes_in), "bytes_out": 0,
                   "outcome": outcome, "timing": dict(timing or {}), "message": message})

    def memory_sample(self) -> dict[str, Any]:
        sample = {"type": "memory", "rss_bytes": 0, "arena_reserved_bytes": 0, "arena_in_use_bytes": 0,
                  "leases": 0, "gpus": []}
        try:
            sample.update(self.memory_source())
        except Exception as exc:  # a sampling failure must not kill the stream
            sample["error"] = f"{type(exc).__name__}: {exc}"
        sample["type"] = "memory"
        return sample

    # -- sampler thread ------------------------------------------------------------------------------

    def _sample_loop(self) -> None:
        while True:
            with self._lock:
                if not self._subs or self._closed:
                    self._sampler = None
                    return
                now = time.monotonic()
                due = [s for s in self._subs if s.next_memory <= now]
                if not due:
                    wait = min(s.next_memory for s in self._subs) - now
                    self._wake.wait(timeout=wait)
                    continue
                for s in due:
                    s.next_memory = now + s.memory_interval_s
            sample = self.memory_sample()  # outside the lock: psutil/CUDA queries can take a while
            sample["time_unix_ns"] = time.time_ns()
            sample["pid"] = self.pid
            for s in due:
                s._put(dict(sample))
