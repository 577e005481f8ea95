"""Circuit breaker: the state machine on a fake clock, then a real pool whose workers crash at start."""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from sidecar.errors import CircuitOpen
from sidecar.host.breaker import BreakerState, CircuitBreaker
from sidecar.host.pool import Pool, WorkerState
from sidecar.worker.debug_ops import CRASH_FILE_ENV


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


def test_rejects_nonsense_settings() -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(threshold=0)
    with pytest.raises(ValueError):
        CircuitBreaker(window_s=0)


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

        deadline = time.monotonic() + 20
        while "breaker_open" not in events and time.monotonic() < deadline:
            time.sleep(0.02)
        assert "breaker_open" in events
        assert events.count("crash") >= 3

        t0 = time.monotonic()
        with pytest.raises(CircuitOpen) as err:
            pool.call("add", np.ones(2), np.ones(2))
        assert time.monotonic() - t0 < 1.0  # fails fast, does not wait for a worker
        assert err.value.classification == "other" and err.value.exit_code == 3
        assert any(CRASH_FILE_ENV in line for line in err.value.stderr_tail)
        row = pool.status()[0]
        assert row.state is WorkerState.RESTARTING and row.last_exit is not None
        assert row.last_exit.exit_code == 3

        crash_file.unlink()  # the cause is fixed: the next probe succeeds
        deadline = time.monotonic() + 20
        while "breaker_close" not in events and time.monotonic() < deadline:
            time.sleep(0.02)
        assert "breaker_close" in events
        assert "breaker_half_open" in events
        assert pool.breaker.state is BreakerState.CLOSED
        assert pool.wait_ready(10)
        assert (pool.call("add", np.ones(2), np.ones(2)) == 2).all()
