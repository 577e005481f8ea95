"""Circuit breakers: the state machines on a fake clock, then real pools (with the defaults) whose
workers crash at start, crash running an op, or are killed from outside."""
from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sidecar.errors import CircuitOpen
from sidecar.host.breaker import Admission, BreakerState, CircuitBreaker, OpBreakers
from sidecar.host.events import PoolEvent
from sidecar.host.pool import Pool, WorkerState
from sidecar.worker.debug_ops import CRASH_FILE_ENV
from tests.workers import wait_until


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_threshold_within_window() -> None:
    clock = FakeClock()
    b = CircuitBreaker(threshold=3, window_s=10, cooldown_s=5, clock=clock)
    assert b.record_failure() is None
    clock.now += 4
    assert b.record_failure() is None
    clock.now += 4
    assert b.record_failure() is BreakerState.OPEN
    assert b.state is BreakerState.OPEN
    assert b.retry_after() == pytest.approx(5)


def test_old_failures_leave_the_window() -> None:
    clock = FakeClock()
    b = CircuitBreaker(threshold=3, window_s=10, cooldown_s=5, clock=clock)
    b.record_failure()
    b.record_failure()
    clock.now += 11  # both fall out of the window
    assert b.record_failure() is None
    assert b.recent_failures() == 1
    assert b.state is BreakerState.CLOSED


def test_half_open_probe_closes_on_success_and_reopens_on_failure() -> None:
    clock = FakeClock()
    b = CircuitBreaker(threshold=1, window_s=10, cooldown_s=5, clock=clock)
    assert b.record_failure() is BreakerState.OPEN
    assert not b.try_probe()            # still cooling down
    clock.now += 5
    assert b.try_probe()                # the one probe
    assert b.state is BreakerState.HALF_OPEN
    assert not b.try_probe()            # nobody else
    assert b.record_failure() is BreakerState.OPEN  # the probe crashed: open again, new cool-down
    assert b.retry_after() == pytest.approx(5)
    clock.now += 5
    assert b.try_probe()
    assert b.record_success() is BreakerState.CLOSED
    assert b.recent_failures() == 0     # a closed breaker starts counting afresh
    assert b.record_success() is None   # success while closed changes nothing
    assert b.opened_count == 2


def test_an_abandoned_probe_lets_the_next_caller_probe() -> None:
    clock = FakeClock()
    b = CircuitBreaker(threshold=1, window_s=10, cooldown_s=5, clock=clock)
    b.record_failure()
    clock.now += 5
    assert b.try_probe()
    b.abandon_probe()  # its worker was killed from outside: no verdict
    assert b.state is BreakerState.OPEN and b.retry_after() == 0
    assert b.try_probe()


def test_op_breakers_are_per_op_and_probe_with_one_call() -> None:
    clock = FakeClock()
    ops = OpBreakers(threshold=2, window_s=10, cooldown_s=5, clock=clock)
    assert ops.admit("bad") is Admission.RUN and ops.get("bad") is None  # nothing kept for healthy ops
    assert ops.record_crash("bad") is None
    assert ops.record_crash("bad") is BreakerState.OPEN
    assert ops.admit("bad") is Admission.REFUSE
    assert ops.admit("good") is Admission.RUN and ops.state("good") is BreakerState.CLOSED
    assert ops.open_ops() == ["bad"]
    clock.now += 5
    assert ops.admit("bad") is Admission.PROBE
    assert ops.admit("bad") is Admission.REFUSE  # one probe at a time
    assert ops.probe_done("bad", crashed_nothing=False) is None  # killed from outside: try again
    assert ops.admit("bad") is Admission.PROBE
    assert ops.record_crash("bad") is BreakerState.OPEN  # the probe crashed its worker too
    assert ops.probe_done("bad", crashed_nothing=False) is None and ops.state("bad") is BreakerState.OPEN
    clock.now += 5
    assert ops.admit("bad") is Admission.PROBE
    assert ops.probe_done("bad", crashed_nothing=True) is BreakerState.CLOSED
    assert ops.admit("bad") is Admission.RUN and ops.open_ops() == []


def test_rejects_nonsense_settings() -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(threshold=0)
    with pytest.raises(ValueError):
        CircuitBreaker(window_s=0)
    with pytest.raises(ValueError):
        OpBreakers(threshold=0)


def test_pool_breaker_opens_on_crash_loop_and_closes_when_it_stops(tmp_path: Path) -> None:
    """Workers that die at every start open the breaker (fast CircuitOpen); fixing it closes it."""
    crash_file = tmp_path / "crash-at-start"
    env = {**os.environ, CRASH_FILE_ENV: str(crash_file)}
    events: list[str] = []
    with Pool(1, debug_ops=True, env=env, breaker_threshold=3, breaker_window_s=30, breaker_cooldown_s=0.5,
              restart_backoff=(0.05, 0.2), health_interval_s=0) as pool:
        pool.subscribe(lambda ev: events.append(ev.event))
        assert pool.call("debug.pid") == pool.status()[0].pid
        crash_file.write_text("3")
        os.kill(pool.status()[0].pid, 9)  # its replacements now exit 3 at start-up

        wait_until(lambda: "breaker_open" in events, 20)
        assert events.count("crash") >= 3

        # No worker is ready and none is started: it fails at once (waiting would end in Cancelled).
        with pytest.raises(CircuitOpen) as err:
            pool.call("add", np.ones(2), np.ones(2))
        assert err.value.classification == "other" and err.value.exit_code == 3
        assert any(CRASH_FILE_ENV in line for line in err.value.stderr_tail)
        row = pool.status()[0]
        assert row.state is WorkerState.RESTARTING and row.last_exit is not None
        assert row.last_exit.exit_code == 3

        crash_file.unlink()  # the cause is fixed: the next probe succeeds
        wait_until(lambda: "breaker_close" in events, 20)
        assert "breaker_half_open" in events
        assert pool.breaker.state is BreakerState.CLOSED
        assert pool.wait_ready(10)
        assert (pool.call("add", np.ones(2), np.ones(2)) == 2).all()


def _events(pool: Pool) -> list[PoolEvent]:
    seen: list[PoolEvent] = []
    pool.subscribe(seen.append)
    return seen


def test_kills_from_outside_never_open_a_breaker() -> None:
    """Seven SIGKILLs of serving workers within seconds: restarts, no breaker, every call served."""
    with Pool(2, debug_ops=True) as pool:
        events = _events(pool)
        for k in range(7):
            assert pool.wait_ready(30)
            assert pool.call("add", np.ones(4), np.ones(4)).tolist() == [2, 2, 2, 2]
            os.kill(pool.status()[k % 2].pid, signal.SIGKILL)
            wait_until(lambda n=k + 1: sum(e.event == "restart" for e in events) >= n, 30)
        assert pool.wait_ready(30)
        assert pool.call("add", np.ones(4), np.ones(4)).tolist() == [2, 2, 2, 2]
        crashes = [e for e in events if e.event == "crash"]
        assert len(crashes) == 7 and {e.metadata["classification"] for e in crashes} == {"killed"}
        assert not [e for e in events if e.event.startswith("breaker")]
        assert pool.breaker.state is BreakerState.CLOSED and pool.op_breakers.open_ops() == []


def test_a_start_up_crash_loop_in_one_slot_does_not_block_the_ready_worker(tmp_path: Path) -> None:
    crash_file = tmp_path / "crash-at-start"
    env = {**os.environ, CRASH_FILE_ENV: str(crash_file)}
    with Pool(2, debug_ops=True, env=env) as pool:
        events = _events(pool)
        healthy, doomed = (r.pid for r in pool.status())
        crash_file.write_text("3")
        os.kill(doomed, signal.SIGKILL)  # its replacements exit 3 at start-up, five times: open
        wait_until(lambda: any(e.event == "breaker_open" for e in events), 60)
        assert pool.breaker.state is not BreakerState.CLOSED
        # The healthy worker still serves every call; only starts are stopped.
        for _ in range(20):
            assert pool.call("debug.pid") == healthy
        crash_file.unlink()  # fixed: the next probe starts a worker that stays up
        wait_until(lambda: any(e.event == "breaker_close" for e in events), 60)
        assert pool.wait_ready(30)
        assert {pool.call("debug.pid") for _ in range(20)} == {r.pid for r in pool.status()}
        opened = next(e for e in events if e.event == "breaker_open")
        assert opened.metadata["scope"] == "start" and opened.metadata["classification"] == "other"


def test_an_op_that_keeps_crashing_workers_is_refused_and_other_ops_run(tmp_path: Path) -> None:
    bug = tmp_path / "bug"
    bug.write_text("")
    with Pool(2, ops=["tests.pool_ops_module"], device="cpu") as pool:
        events = _events(pool)
        for _ in range(5):  # the default threshold: 5 crashes within 30 s
            assert pool.wait_ready(30)
            with pytest.raises(Exception) as err:
                pool.call("crash_while", path=str(bug), idempotent=False)
            assert err.value.classification == "segfault"
        calls_before = sum(r.calls + r.inflight for r in pool.status())
        with pytest.raises(CircuitOpen) as refused:
            pool.call("crash_while", path=str(bug))
        assert sum(r.calls + r.inflight for r in pool.status()) == calls_before  # no worker was asked
        e: Any = refused.value
        assert e.op == "crash_while" and e.classification == "segfault" and "crash_while" in e.message
        assert pool.wait_ready(30)
        assert pool.call("add", np.ones(2), np.ones(2)).tolist() == [2, 2]  # other ops are not affected
        assert pool.breaker.state is BreakerState.CLOSED  # the workers start fine: no start-up breaker
        bug.unlink()  # fixed: after the cool-down one call probes, and succeeds
        breaker = pool.op_breakers.get("crash_while")
        assert breaker is not None
        wait_until(lambda: breaker.retry_after() == 0, 30)  # the cool-down (5 s) is over
        assert pool.call("crash_while", path=str(bug)) == "fine"
        assert pool.op_breakers.state("crash_while") is BreakerState.CLOSED
        kinds = [(e.event, e.metadata.get("scope")) for e in events if e.event.startswith("breaker")]
        assert kinds == [("breaker_open", "op"), ("breaker_half_open", "op"), ("breaker_close", "op")], kinds


def test_a_stream_that_probes_an_op_breaker_closes_it(tmp_path: Path) -> None:
    """A stream is admitted by the op breaker like a call: when it is the half-open probe and ends
    without crashing a worker, the breaker closes (it once stayed half-open for good)."""
    bug = tmp_path / "bug"
    bug.write_text("")
    with Pool(2, ops=["tests.pool_ops_module"], device="cpu") as pool:
        events = _events(pool)
        for _ in range(5):  # the default threshold
            assert pool.wait_ready(30)
            with pytest.raises(Exception) as err:
                list(pool.stream("stream_crash_while", path=str(bug), idempotent=False))
            assert err.value.classification == "segfault"
        with pytest.raises(CircuitOpen):
            list(pool.stream("stream_crash_while", path=str(bug)))
        bug.unlink()
        breaker = pool.op_breakers.get("stream_crash_while")
        assert breaker is not None
        wait_until(lambda: breaker.retry_after() == 0, 30)
        assert pool.wait_ready(30)
        assert list(pool.stream("stream_crash_while", path=str(bug))) == ["fine"]
        assert pool.op_breakers.state("stream_crash_while") is BreakerState.CLOSED
        assert list(pool.stream("stream_crash_while", path=str(bug))) == ["fine"]  # admitted again
        kinds = [(e.event, e.metadata.get("scope")) for e in events if e.event.startswith("breaker")]
        assert kinds == [("breaker_open", "op"), ("breaker_half_open", "op"), ("breaker_close", "op")], kinds
