"""The memory profiler: bounded history rings per worker and device, threshold and steady-growth
(leak) events on the pool's event bus, queryable with `pool.memory_history()`.

The pool tests use real workers whose memory really grows: the host keeps the outputs of calls,
so the worker's arena (shared memory it maps, counted in its RSS) holds one more block per call.
"""
from __future__ import annotations

import os
import signal
import time
from typing import Any

import numpy as np
import pytest

from sidecar.host.pool import Pool
from sidecar.observe.history import MemoryHistory, MemoryProfile, linear_fit
from tests.workers import wait_until

MB = 1 << 20


def sample(pid: int, t_s: float, rss: int, gpus: list[dict[str, int]] | None = None) -> dict[str, Any]:
    return {"type": "memory", "pid": pid, "time_unix_ns": int(t_s * 1e9), "rss_bytes": rss,
            "arena_reserved_bytes": 0, "arena_in_use_bytes": 0, "leases": 0, "gpus": gpus or []}


def test_linear_fit_slope_and_straightness() -> None:
    slope, r2 = linear_fit([(0, 10), (1, 12), (2, 14), (3, 16)])
    assert slope == pytest.approx(2.0) and r2 == pytest.approx(1.0)
    slope, r2 = linear_fit([(0, 5), (1, 5), (2, 5)])
    assert slope == 0 and r2 == 0
    assert linear_fit([(1, 1), (1, 2)]) == (0.0, 0.0)


def test_growth_threshold_and_ring_bounds_on_constructed_samples() -> None:
    published: list[tuple[str, dict[str, Any]]] = []
    profile = MemoryProfile(interval_s=1, length=30, threshold_bytes=500 * MB, leak_window=10,
                            leak_min_growth_bytes=50 * MB, leak_min_r2=0.9)
    h = MemoryHistory(profile, publish=lambda name, **meta: published.append((name, meta)))
    # Flat with noise: neither signal.
    for i in range(20):
        h.add(sample(7, i, 300 * MB + (i % 3) * MB), slot=0)
    assert published == []
    # Steady growth of 10 MB/s: one memory_growth (not one per sample), then over 500 MB one threshold.
    for i in range(20, 50):
        h.add(sample(7, i, 300 * MB + (i - 20) * 10 * MB), slot=0)
    names = [n for n, _ in published]
    assert names.count("memory_growth") == 1 and names.count("memory_threshold") == 1
    growth = next(m for n, m in published if n == "memory_growth")
    assert growth["pid"] == 7 and growth["slot"] == 0 and growth["device"] == "cpu"
    # Raised as soon as the window's fit says so (the window may still hold flat samples then).
    assert growth["growth_bytes"] >= 50 * MB and growth["r2"] >= 0.9
    assert 5 * MB < growth["bytes_per_s"] <= 10 * MB
    # Back below the threshold and flat: both re-arm; crossing again signals again.
    for i in range(50, 65):
        h.add(sample(7, i, 100 * MB), slot=0)
    h.add(sample(7, 65, 600 * MB), slot=0)
    assert [n for n, _ in published].count("memory_threshold") == 2
    (series,) = h.series(pid=7)
    assert len(series.samples) == 30 and series.samples[-1].used_bytes == 600 * MB  # bounded ring


def test_gpu_samples_get_their_own_series_and_ratio_threshold() -> None:
    published: list[str] = []
    h = MemoryHistory(MemoryProfile(gpu_threshold_ratio=0.5), publish=lambda name, **m: published.append(name))
    gpu = {"index": 0, "allocated": 10 * MB, "reserved": 60 * MB, "free": 40 * MB, "total": 100 * MB}
    h.add(sample(9, 1, 200 * MB, [gpu]), slot=1)
    assert sorted(s.device for s in h.series()) == ["cpu", "cuda:0"]
    (cuda,) = h.series(device="cuda:0")
    assert cuda.samples[-1].used_bytes == 10 * MB and cuda.samples[-1].figures["reserved_bytes"] == 60 * MB
    assert published == ["memory_threshold"]  # reserved 60 of 100 >= 0.5
    h.add({**sample(9, 2, 0), "error": "psutil failed"})  # a failed measurement is no point
    assert len(h.series(pid=9, device="cpu")[0].samples) == 1


def test_pool_memory_history_rings_and_leak_signal() -> None:
    keep: list[Any] = []
    with Pool(1) as pool:
        pid = pool.status()[0].pid
        with pool.events() as events:
            baseline = _rss_now(pool, pid)
            # 8 MB more held per call, one call per sample (at worst one per two samples): a
            # 10-sample window sees >= 40 MB of steady growth; 24 MB is the signal.
            pool.observer.profile_memory(interval_s=0.05, length=40, leak_window=10,
                                         leak_min_growth_bytes=24 * MB, leak_min_r2=0.8,
                                         threshold_bytes=baseline + 60 * MB)
            big = np.ones(2 * MB, np.float32)
            for _ in range(14):
                keep.append(pool.call("add", big, big))  # the host holds it: the worker's arena keeps it
                done = time.time_ns()
                wait_until(lambda done=done: _latest_ns(pool, pid) > done, 30)  # a sample that includes it
            got = {}
            while set(got) != {"memory_growth", "memory_threshold"}:
                ev = events.get(timeout=30)
                assert ev is not None, f"no memory events; history: {pool.memory_history(pid)}"
                if ev.event.startswith("memory_"):
                    got[ev.event] = ev.metadata
        growth = got["memory_growth"]
        assert growth["pid"] == pid and growth["slot"] == 0 and growth["device"] == "cpu"
        assert growth["growth_bytes"] >= 24 * MB and growth["r2"] >= 0.8
        assert got["memory_threshold"]["bytes"] >= baseline + 60 * MB
        wait_until(lambda: _sample_count(pool, pid) == 40, 30)  # 20 samples/s fill the ring...
        (series,) = pool.memory_history(pid=pid)
        assert series.device == "cpu" and series.slot == 0 and series.alive
        assert len(series.samples) == 40  # ...which stays bounded
        assert series.samples[-1].figures["leases"] == 14 and series.samples[-1].figures["arena_in_use_bytes"] >= 14 * 8 * MB
        assert not pool.memory_history(device="cuda:0")  # a CPU worker has no GPU series
        assert pool.observer.registry.get_sample_value("sidecar_memory_events_total",
                                                       {"event": "memory_growth", "device": "cpu"}) == 1
        keep.clear()


def test_memory_history_follows_a_spare_that_takes_over() -> None:
    with Pool(1, spares=1) as pool:
        assert pool.wait_ready(60, spares=True)
        pool.observer.profile_memory(interval_s=0.05)
        old = pool.status()[0].pid
        wait_until(lambda: _sample_count(pool, old) > 0, 30)
        os.kill(old, signal.SIGKILL)
        wait_until(lambda: pool.status()[0].pid not in (None, old), 30)
        new = pool.status()[0].pid
        wait_until(lambda: _sample_count(pool, new) >= 3, 30)
        dead = pool.memory_history(pid=old)[0]
        assert not dead.alive and dead.samples  # kept: what led up to the crash


def test_watch_telemetry_follows_a_spare_that_takes_over() -> None:
    """A warm spare that replaces a crashed worker gets the open watchers too (it did not: they were
    attached only to workers started for the slot, so a GPU pool's stream went silent)."""
    with Pool(1, spares=1) as pool:
        assert pool.wait_ready(60, spares=True)
        old = pool.status()[0].pid
        with pool.watch_telemetry(memory_interval_s=0.05) as watch:
            os.kill(old, signal.SIGKILL)
            wait_until(lambda: pool.status()[0].pid not in (None, old), 30)
            new = pool.status()[0].pid
            while True:
                ev = watch.get(timeout=10)
                assert ev is not None, f"no memory sample of the spare pid {new} that took over"
                if ev.get("type") == "memory" and ev["pid"] == new:
                    break


def test_closed_telemetry_watches_are_forgotten_by_the_pool() -> None:
    """The profiler opens a watch per sampling round: closed ones must not pile up in the pool (they
    did, one per watch ever opened, each also visited on every restart)."""
    with Pool(1) as pool:
        for _ in range(5):
            with pool.watch_telemetry(memory_interval_s=0.05) as watch:
                assert watch.get(timeout=10) is not None
        assert pool._telemetry == []  # the pool's list of open watches


def _sample_count(pool: Pool, pid: int | None) -> int:
    found = pool.memory_history(pid=pid, device="cpu") if pid is not None else []
    return len(found[0].samples) if found else 0


def _latest_ns(pool: Pool, pid: int) -> int:
    found = pool.memory_history(pid=pid, device="cpu")
    return found[0].samples[-1].time_unix_ns if found and found[0].samples else 0


def _rss_now(pool: Pool, pid: int) -> int:
    import psutil

    return int(psutil.Process(pid).memory_info().rss)
