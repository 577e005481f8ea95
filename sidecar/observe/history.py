"""The memory profiler: a history ring of memory samples per worker and device, and the two signals
an operator wants from it.

Samples are the workers' own telemetry memory samples (`Pool.watch_telemetry(memory_interval_s)`):
each one gives one point to the worker's "cpu" series (RSS, arena, leases) and one to a "cuda:N"
series per GPU the worker uses (torch's allocated/reserved, the device's free/total). A CPU worker
has no GPU series; nothing is made up for it.

Signals, published as pool events by the caller-supplied `publish`:
  memory_threshold  a series crossed its threshold (CPU: RSS >= `threshold_bytes`; GPU: reserved >=
                    `gpu_threshold_ratio` x total). Once per crossing: re-armed when it falls below.
  memory_growth     steady growth, the shape of a leak: over the last `leak_window` samples a
                    least-squares line fits well (r^2 >= `leak_min_r2`) and rises by at least
                    `leak_min_growth_bytes`. Re-armed once the growth over the window halves.
"""
from __future__ import annotations

import collections
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

__all__ = ["MemoryProfile", "MemorySample", "MemorySeries", "MemoryHistory", "linear_fit"]

CPU = "cpu"


@dataclass(frozen=True)
class MemoryProfile:
    """How the profiler samples and when it speaks up."""

    interval_s: float = 1.0                 # seconds between a worker's samples
    length: int = 600                       # samples kept per series (10 minutes at 1 s)
    threshold_bytes: int | None = None      # RSS of one worker that raises memory_threshold (None: off)
    gpu_threshold_ratio: float = 0.9        # reserved / total of a GPU that raises memory_threshold
    leak_window: int = 60                   # samples the growth fit looks at
    leak_min_growth_bytes: int = 64 << 20   # growth across the window that counts as a leak signal
    leak_min_r2: float = 0.9                # how straight the rise must be (1 = a perfect line)
    max_series: int = 64                    # series kept (those of dead workers go first)

    def __post_init__(self) -> None:
        if not self.interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {self.interval_s!r}")
        if self.length < 2 or self.leak_window < 3:
            raise ValueError("length must be >= 2 and leak_window >= 3")
        if not 0 < self.gpu_threshold_ratio <= 1:
            raise ValueError(f"gpu_threshold_ratio must be in (0, 1], got {self.gpu_threshold_ratio!r}")


@dataclass(frozen=True)
class MemorySample:
    time_unix_ns: int
    used_bytes: int                  # cpu: RSS; cuda: bytes torch has allocated
    figures: dict[str, int]          # cpu: rss/arena_reserved/arena_in_use bytes, leases;
                                     # cuda: allocated/reserved/free/total bytes


@dataclass
class MemorySeries:
    """One worker's history on one device."""

    pid: int
    device: str                      # "cpu" or "cuda:N" (N as the worker sees it)
    slot: int | None = None
    samples: collections.deque[MemorySample] = field(default_factory=collections.deque)
    alive: bool = True
    # detector state
    above_threshold: bool = False
    growing: bool = False

    def snapshot(self) -> MemorySeries:
        return MemorySeries(self.pid, self.device, self.slot, collections.deque(self.samples),
                            self.alive, self.above_threshold, self.growing)

    def to_dict(self) -> dict[str, Any]:
        return {"pid": self.pid, "device": self.device, "slot": self.slot, "alive": self.alive,
                "above_threshold": self.above_threshold, "growing": self.growing,
                "points": [[s.time_unix_ns // 1_000_000, s.used_bytes] for s in self.samples],
                "last": dict(self.samples[-1].figures) if self.samples else {}}


def linear_fit(points: Iterable[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares slope (y per x) and r^2 of the points; (0, 0) if x does not vary."""
    pts = list(points)
    n = len(pts)
    if n < 2:
        return 0.0, 0.0
    mx = sum(x for x, _ in pts) / n
    my = sum(y for _, y in pts) / n
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    syy = sum((y - my) ** 2 for _, y in pts)
    sxy = sum((x - mx) * (y - my) for x, y in pts)
    if sxx == 0:
        return 0.0, 0.0
    slope = sxy / sxx
    r2 = (sxy * sxy) / (sxx * syy) if syy else 0.0
    return slope, r2


Publish = Callable[..., Any]


class MemoryHistory:
    """The rings of every (pid, device), fed with telemetry memory samples (dicts)."""

    def __init__(self, profile: MemoryProfile, publish: Publish | None = None) -> None:
        self.profile = profile
        self._publish = publish
        self._lock = threading.Lock()
        self._series: dict[tuple[int, str], MemorySeries] = {}

    # -- feeding -------------------------------------------------------------------------------------

    def add(self, sample: dict[str, Any], slot: int | None = None) -> None:
        """Adds one telemetry memory sample (`{"type": "memory", "pid", "time_unix_ns", ...}`)."""
        if sample.get("error"):
            return  # the worker could not measure itself this time: no point rather than a false one
        pid = int(sample.get("pid") or 0)
        t = int(sample.get("time_unix_ns") or 0)
        cpu = {k: int(sample.get(k) or 0) for k in
               ("rss_bytes", "arena_reserved_bytes", "arena_in_use_bytes", "leases")}
        self._add(pid, CPU, slot, MemorySample(t, cpu["rss_bytes"], cpu))
        for g in sample.get("gpus") or ():
            figures = {"allocated_bytes": int(g.get("allocated", 0)), "reserved_bytes": int(g.get("reserved", 0)),
                       "free_bytes": int(g.get("free", 0)), "total_bytes": int(g.get("total", 0))}
            self._add(pid, f"cuda:{int(g.get('index', 0))}", slot,
                      MemorySample(t, figures["allocated_bytes"], figures))

    def _add(self, pid: int, device: str, slot: int | None, sample: MemorySample) -> None:
        with self._lock:
            series = self._series.get((pid, device))
            if series is None:
                self._evict()
                series = MemorySeries(pid, device, slot, collections.deque(maxlen=self.profile.length))
                self._series[(pid, device)] = series
            if slot is not None:
                series.slot = slot
            series.samples.append(sample)
            events = self._detect(series)
        for name, meta in events:  # outside the lock: subscribers may call back into the history
            if self._publish is not None:
                self._publish(name, **meta)

    def _evict(self) -> None:
        if len(self._series) < self.profile.max_series:
            return
        # Dead workers' series first, then the one that was updated longest ago.
        def age(item: tuple[tuple[int, str], MemorySeries]) -> tuple[bool, int]:
            s = item[1]
            return s.alive, s.samples[-1].time_unix_ns if s.samples else 0
        key, _ = min(self._series.items(), key=age)
        del self._series[key]

    def mark_dead(self, pid: int) -> None:
        """The worker is gone: its series stay (they show what led up to the crash) but stop growing."""
        with self._lock:
            for (p, _), s in self._series.items():
                if p == pid:
                    s.alive = False

    # -- signals -------------------------------------------------------------------------------------

    def _detect(self, s: MemorySeries) -> list[tuple[str, dict[str, Any]]]:
        p = self.profile
        last = s.samples[-1]
        meta = {"pid": s.pid, "slot": s.slot, "device": s.device}
        events: list[tuple[str, dict[str, Any]]] = []
        if s.device == CPU:
            limit = p.threshold_bytes
            value = last.figures["rss_bytes"]
        else:
            total = last.figures.get("total_bytes", 0)
            limit = int(total * p.gpu_threshold_ratio) if total else None
            value = last.figures.get("reserved_bytes", 0)
        if limit is not None:
            if value >= limit and not s.above_threshold:
                s.above_threshold = True
                events.append(("memory_threshold", {**meta, "bytes": value, "threshold_bytes": limit}))
            elif value < limit:
                s.above_threshold = False
        if len(s.samples) >= p.leak_window:
            window = list(s.samples)[-p.leak_window:]
            t0 = window[0].time_unix_ns
            slope, r2 = linear_fit(((x.time_unix_ns - t0) / 1e9, float(x.used_bytes)) for x in window)
            span_s = (window[-1].time_unix_ns - t0) / 1e9
            growth = slope * span_s
            if not s.growing and growth >= p.leak_min_growth_bytes and r2 >= p.leak_min_r2:
                s.growing = True
                events.append(("memory_growth", {**meta, "bytes": last.used_bytes,
                                                 "growth_bytes": int(growth), "window_s": round(span_s, 3),
                                                 "bytes_per_s": int(slope), "r2": round(r2, 4)}))
            elif s.growing and growth < p.leak_min_growth_bytes / 2:
                s.growing = False
        return events

    # -- queries -------------------------------------------------------------------------------------

    def series(self, pid: int | None = None, device: str | None = None) -> list[MemorySeries]:
        """Copies of the matching series, ordered by slot, pid and device."""
        with self._lock:
            found = [s.snapshot() for (p, d), s in self._series.items()
                     if (pid is None or p == pid) and (device is None or d == device)]
        return sorted(found, key=lambda s: (s.slot if s.slot is not None else 1 << 30, s.pid, s.device))

    def latest(self) -> dict[int, dict[str, Any]]:
        """The newest figures of each live worker, by pid: {"cpu": {...}, "cuda:0": {...}}."""
        out: dict[int, dict[str, Any]] = {}
        with self._lock:
            for (pid, device), s in self._series.items():
                if s.alive and s.samples:
                    out.setdefault(pid, {})[device] = dict(s.samples[-1].figures)
        return out
