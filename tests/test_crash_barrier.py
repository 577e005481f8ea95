"""The crash barrier with real crashes: segfault, abort, exit codes and kill -9 with calls in flight.

One pool serves the whole module (a pool start imports torch once in its template); each test
crashes its workers for real and checks that the host survives, the calls in flight get a classified
`WorkerCrashed` or (idempotent) succeed on another worker, the dead worker's memory is unlinked, and
the pool is back to full strength.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any, Iterator

import numpy as np
import pytest

from sidecar.dataplane import reaper
from sidecar.errors import ShapeMismatch, UnknownOp, WorkerCrashed
from sidecar.host.events import PoolEvent
from sidecar.host.pool import PoisonCall, Pool, WorkerState
from tests.workers import long_lived_pool, wait_until  # noqa: F401

N = 2


@pytest.fixture(scope="module")
def pool() -> Iterator[Pool]:
    yield from long_lived_pool(Pool(N, debug_ops=True))  # the defaults: health checks and breakers on


@pytest.fixture
def events(pool: Pool) -> Iterator[list[PoolEvent]]:
    seen: list[PoolEvent] = []
    unsubscribe = pool.subscribe(seen.append)
    yield seen
    unsubscribe()


def _back_to_full_strength(pool: Pool, old_pids: set[int]) -> None:
    assert pool.wait_ready(15), pool.status()
    rows = pool.status()
    assert len(rows) == N and all(r.state is WorkerState.READY for r in rows)
    assert pool.call("add", np.ones(3), np.ones(3)).tolist() == [2, 2, 2]


def _streaming_telemetry(pool: Pool, pids: set[int]) -> Any:
    """The pool's merged telemetry, once the stream of every worker in `pids` delivers spans."""
    telemetry = pool.watch_telemetry()
    seen: set[int] = set()

    def streaming() -> bool:
        pool.call("debug.pid")
        while (ev := telemetry.get(timeout=0.05)) is not None:
            if ev["type"] == "span":
                seen.add(ev["pid"])
        return pids <= seen
    wait_until(streaming)
    return telemetry


def _pids(pool: Pool) -> set[int]:
    return {r.pid for r in pool.status() if r.pid is not None}


def test_segfault_is_classified_with_the_crash_site(pool: Pool, events: list[PoolEvent]) -> None:
    pool.wait_ready(15)
    before = _pids(pool)
    with pytest.raises(WorkerCrashed) as err:
        pool.call("debug.segfault")
    e = err.value
    assert e.classification == "segfault" and e.signal == signal.SIGSEGV and e.exit_code is None
    assert e.pid in before and e.op == "debug.segfault"
    assert any("Fatal Python error: Segmentation fault" in line for line in e.stderr_tail)
    assert "debug_ops.py" in e.message  # the frame that crashed, from faulthandler's stack
    _back_to_full_strength(pool, before)
    assert e.pid not in _pids(pool)
    crash = next(ev for ev in events if ev.event == "crash")
    assert crash.metadata["classification"] == "segfault" and crash.metadata["pid"] == e.pid
    assert any(ev.event == "restart" for ev in events)
    row = next(r for r in pool.status() if r.last_exit is not None and r.last_exit.signal == signal.SIGSEGV)
    assert row.crashes >= 1 and row.restarts >= 1


@pytest.mark.parametrize("op,attrs,classification,exit_code,signum", [
    ("debug.abort", {}, "abort", None, signal.SIGABRT),
    ("debug.fpe", {}, "fpe", None, signal.SIGFPE),
    ("debug.exit", {"code": 70}, "tainted", 70, None),
    ("debug.exit", {"code": 1}, "python_error", 1, None),
])
def test_other_deaths_are_classified(pool: Pool, op: str, attrs: dict[str, Any], classification: str,
                                     exit_code: int | None, signum: int | None) -> None:
    pool.wait_ready(15)
    before = _pids(pool)
    with pytest.raises(WorkerCrashed) as err:
        pool.call(op, **attrs)
    assert err.value.classification == classification
    assert err.value.exit_code == exit_code and err.value.signal == signum
    _back_to_full_strength(pool, before)


def test_kill9_with_calls_in_flight(pool: Pool, events: list[PoolEvent]) -> None:
    """Both workers die under six running calls: idempotent ones finish elsewhere, the rest report it."""
    pool.wait_ready(15)
    before = _pids(pool)
    results: dict[int, Any] = {}

    def run(i: int, idempotent: bool) -> None:
        x = np.full(1000, float(i))
        try:
            results[i] = pool.call("debug.sleep", x, seconds=1.0, idempotent=idempotent, timeout=60)
        except Exception as exc:  # noqa: BLE001 - recorded and checked below
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i, i % 2 == 0)) for i in range(6)]
    with _streaming_telemetry(pool, before) as telemetry:
        for t in threads:
            t.start()
        started: set[str] = set()  # calls a worker has begun (one that never got there is retried)

        def all_started() -> bool:
            while (ev := telemetry.get(timeout=0.05)) is not None:
                if ev["type"] == "span" and ev["phase"] == "start" and ev["op"] == "debug.sleep":
                    started.add(ev["request_id"])
            return len(started) == 6
        wait_until(all_started)
    for pid in before:
        os.kill(pid, signal.SIGKILL)
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)  # nothing hung
    for i, res in results.items():
        if i % 2 == 0:  # idempotent: retried on a replacement, same answer
            assert isinstance(res, np.ndarray), res
            assert res.shape == (1000,) and (res == i).all()
        else:
            assert isinstance(res, WorkerCrashed), res
            assert res.classification == "killed" and res.signal == signal.SIGKILL
            assert res.pid in before
    assert len(results) == 6
    assert sum(ev.event == "retry" for ev in events) >= 3
    _back_to_full_strength(pool, before)
    assert not (_pids(pool) & before)


def test_ops_idempotency_comes_from_listops(pool: Pool) -> None:
    """debug.sleep declares itself idempotent, debug.segfault does not; calls follow that unless told."""
    assert pool.is_idempotent("debug.sleep") and pool.is_idempotent("add")
    assert not pool.is_idempotent("debug.segfault") and not pool.is_idempotent("no.such.op")
    pool.wait_ready(15)
    before = _pids(pool)
    box: dict[str, Any] = {}

    def run() -> None:
        box["out"] = pool.call("debug.sleep", seconds=0.8)

    t = threading.Thread(target=run)
    t.start()
    wait_until(lambda: sum(r.inflight for r in pool.status()) >= 1)
    busy = next(r.pid for r in pool.status() if r.inflight)
    os.kill(busy, signal.SIGKILL)
    t.join(30)
    assert box["out"] == 0.8  # retried without being told
    _back_to_full_strength(pool, before)


def test_dead_workers_segments_are_unlinked_once_it_is_gone(pool: Pool) -> None:
    pool.wait_ready(15)
    x = np.arange(1 << 18, dtype=np.float32)  # 1 MiB: the output travels through the worker's arena
    y = pool.call("identity", x, placement="shm")
    owners = {s.pid for s in reaper.list_segments(pool.run_id)} & _pids(pool)
    assert owners, "the output should sit in a segment owned by a worker"
    victim = owners.pop()
    os.kill(victim, signal.SIGKILL)
    t0 = time.monotonic()
    wait_until(lambda: not any(s.pid == victim for s in reaper.list_segments(pool.run_id)))
    print(f"segments of the dead worker unlinked {(time.monotonic() - t0) * 1000:.0f} ms after its SIGKILL")
    assert (y == x).all()  # what the host already received stays readable: unlink does not unmap
    assert pool.wait_ready(15)


def test_ordinary_errors_are_not_crashes(pool: Pool, events: list[PoolEvent]) -> None:
    pool.wait_ready(15)
    before = _pids(pool)
    with pytest.raises(ShapeMismatch):
        pool.call("add", np.ones((2, 3)), np.ones((4, 5)))
    with pytest.raises(UnknownOp):
        pool.call("no.such.op")
    assert _pids(pool) == before
    assert not [ev for ev in events if ev.event in ("crash", "retry")]


def test_a_poison_call_crashes_two_workers_at_most(pool: Pool, events: list[PoolEvent]) -> None:
    """An idempotent call that crashes its worker by itself is retried once; when the retry crashes too
    it fails naming both crashes, and is never sent to a third worker."""
    pool.wait_ready(15)
    before = _pids(pool)
    with pytest.raises(PoisonCall) as err:
        pool.call("debug.segfault", idempotent=True)
    e = err.value
    assert isinstance(e, WorkerCrashed) and e.kind.value == "WORKER_CRASHED" and e.classification == "segfault"
    assert [c["classification"] for c in e.crashes] == ["segfault", "segfault"]
    assert {c["pid"] for c in e.crashes} == before  # one worker, then the other
    for c in e.crashes:
        assert f"pid {c['pid']} (segfault, SIGSEGV)" in e.message
    _back_to_full_strength(pool, before)
    assert [ev.metadata["pid"] for ev in events if ev.event == "crash"] == [c["pid"] for c in e.crashes]
    assert sum(ev.event == "retry" for ev in events) == 1


def test_a_crash_error_says_whether_the_call_had_reached_the_worker(pool: Pool) -> None:
    pool.wait_ready(15)
    before = _pids(pool)
    with pytest.raises(WorkerCrashed) as err:
        pool.call("debug.abort")  # not idempotent: not retried
    assert err.value.call_started is None  # sent, and the worker died before answering: it may have run
    assert "the call had been sent to the worker, which may have started it" in err.value.message
    _back_to_full_strength(pool, before)


def test_a_sigterm_from_outside_is_terminated(pool: Pool, events: list[PoolEvent]) -> None:
    """The worker drains and exits 0, but nobody in the pool asked it to stop: `terminated`, replaced."""
    pool.wait_ready(15)
    before = _pids(pool)
    victim = min(before)
    os.kill(victim, signal.SIGTERM)
    wait_until(lambda: any(ev.event == "crash" and ev.metadata["pid"] == victim for ev in events), 30)
    crash = next(ev for ev in events if ev.event == "crash")
    assert crash.metadata["classification"] == "terminated" and crash.metadata["exit_code"] == 0
    _back_to_full_strength(pool, before)
    assert not any(ev.event.startswith("breaker") for ev in events)
