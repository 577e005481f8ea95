"""The pool's restart/backoff/breaker decisions on their own: no processes, no threads, a fake clock."""
from __future__ import annotations

import signal

import pytest

from sidecar.host.breaker import BreakerState
from sidecar.host.crash import Classification, ExitInfo
from sidecar.host.policy import Blame, Death, SupervisionPolicy

SEGFAULT = ExitInfo(Classification.SEGFAULT, signal=signal.SIGSEGV)
KILLED = ExitInfo(Classification.KILLED, signal=signal.SIGKILL)
EXIT_3 = ExitInfo(Classification.OTHER, exit_code=3)
TIMED_OUT = ExitInfo(Classification.START_TIMEOUT)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def policy(clock: Clock) -> SupervisionPolicy:
    return SupervisionPolicy(restart_backoff=(0.1, 1.0), stable_after_s=5.0, breaker_threshold=3,
                             breaker_window_s=30.0, breaker_cooldown_s=2.0, clock=clock)


def test_a_crash_loop_backs_off_and_a_proven_worker_starts_over(policy: SupervisionPolicy) -> None:
    streak, delays = 0, []
    for _ in range(6):  # workers that segfault before they served anything
        v = policy.on_death(streak, Death(SEGFAULT, uptime_s=0.5, ops=()))
        streak = v.streak
        delays.append(v.delay_s)
    assert delays == [0.0, 0.1, 0.2, 0.4, 0.8, 1.0]  # the first at once, then doubling, capped
    assert policy.on_death(streak, Death(SEGFAULT, served=True, uptime_s=0.5)).streak == 1
    assert policy.on_death(streak, Death(SEGFAULT, uptime_s=5.0)).delay_s == 0.0  # lived stable_after_s
    # only a first crash may hand the slot a ready spare
    assert [policy.on_death(k, Death(SEGFAULT)).may_use_spare for k in (0, 1, 2)] == [True, False, False]


def test_kills_from_outside_are_evidence_of_nothing(policy: SupervisionPolicy) -> None:
    for _ in range(10):
        v = policy.on_death(4, Death(KILLED, ops=("add",)))
        assert (v.blame, v.streak, v.delay_s, v.breaker_opened, v.opened_ops) == (Blame.NOTHING, 1, 0.0, False, ())
        v = policy.on_death(0, Death(KILLED, started=False))  # killed while it started
        assert v.blame is Blame.NOTHING and not v.breaker_opened
    assert policy.start_breaker.state is BreakerState.CLOSED and policy.op_breakers.open_ops() == []
    assert policy.start_evidence is None and policy.op_evidence == {}


def test_crashes_while_running_calls_blame_their_ops(policy: SupervisionPolicy) -> None:
    verdicts = [policy.on_death(0, Death(SEGFAULT, served=True, ops=("bad", "add")), pid=40 + i,
                                stderr_tail=("Fatal Python error: Segmentation fault",)) for i in range(3)]
    assert [v.blame for v in verdicts] == [Blame.OPS] * 3
    assert [v.opened_ops for v in verdicts] == [(), (), ("bad", "add")]  # the third within the window
    assert policy.op_breakers.open_ops() == ["add", "bad"] and policy.may_start()  # workers still start
    assert policy.op_evidence["bad"].pid == 42 and policy.op_evidence["bad"].exit is SEGFAULT


def test_start_up_failures_open_the_breaker_and_its_probe_closes_it(clock: Clock,
                                                                     policy: SupervisionPolicy) -> None:
    v = policy.on_death(0, Death(SEGFAULT, served=False))  # crashed by itself before serving anything
    assert v.blame is Blame.START_UP and not v.breaker_opened
    assert policy.on_death(1, Death(TIMED_OUT, started=False)).blame is Blame.START_UP
    v = policy.on_death(2, Death(EXIT_3, started=False), pid=77, stderr_tail=("exit 3",))
    assert v.breaker_opened and not policy.may_start() and v.streak == 3
    assert policy.probe_at == clock.now + 2.0 and policy.start_evidence is not None
    assert policy.start_evidence.pid == 77

    clock.now += 1.0
    assert not policy.begin_probe()  # still cooling down: ask again when it is over
    assert policy.probe_at == pytest.approx(clock.now + 1.0)
    clock.now += 1.0
    assert policy.begin_probe() and policy.start_breaker.state is BreakerState.HALF_OPEN
    assert policy.probe_succeeded() and policy.may_start()


def test_a_failed_probe_reopens_and_a_killed_probe_is_tried_again_at_once(clock: Clock,
                                                                          policy: SupervisionPolicy) -> None:
    for k in range(3):
        policy.on_death(k, Death(EXIT_3, started=False))
    clock.now += 2.0
    assert policy.begin_probe()
    v = policy.on_death(3, Death(EXIT_3, started=False, probe=True))  # the probe failed by itself
    assert v.breaker_opened and policy.start_breaker.state is BreakerState.OPEN
    assert policy.probe_at == clock.now + 2.0

    clock.now += 2.0
    assert policy.begin_probe()
    v = policy.on_death(4, Death(KILLED, started=False, probe=True))  # killed from outside: no verdict
    assert v.blame is Blame.NOTHING and not v.breaker_opened
    assert policy.start_breaker.state is BreakerState.OPEN and policy.probe_at == clock.now
    assert policy.begin_probe()  # the next probe may start at once
    assert policy.probe_succeeded()
