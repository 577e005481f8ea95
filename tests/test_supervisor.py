"""The pool's state machine on its own: inputs in, effects out; workers are records (no process is
started), time is a fake clock. The same machine runs inside every Pool (tests/test_pool*.py)."""
from __future__ import annotations

import itertools
import signal
from typing import Any

import pytest

from sidecar.host.crash import Classification, ExitInfo
from sidecar.host.policy import SupervisionPolicy
from sidecar.host.supervisor import (Attach, Dispose, Effect, Launch, Publish, Role, Signal, StartFailure,
                                     Supervisor, Watch, Worker, WorkerState)

SEGFAULT = ExitInfo(Classification.SEGFAULT, signal=signal.SIGSEGV)
KILLED = ExitInfo(Classification.KILLED, signal=signal.SIGKILL)
EXIT_3 = ExitInfo(Classification.OTHER, exit_code=3)
CRASH_KEYS = {"slot", "pid", "phase", "classification", "exit_code", "signal", "description", "uptime_s", "inflight",
              "ops", "stderr_tail", "message"}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Machine:
    """A Supervisor and what it said, with helpers that play the shell's part."""

    def __init__(self, workers: int = 2, spares: int = 0, **policy: Any) -> None:
        self.clock = Clock()
        settings = {"restart_backoff": (0.1, 1.0), "stable_after_s": 5.0, "breaker_threshold": 3,
                    "breaker_window_s": 30.0, "breaker_cooldown_s": 2.0, **policy}
        self.policy = SupervisionPolicy(clock=self.clock, **settings)
        self.sup = Supervisor(self.policy, workers, spares, health_failures=2, grace_s=5.0)
        self.pids = itertools.count(1000)
        self.events: list[Any] = []

    def note(self, effects: list[Effect]) -> list[Effect]:
        self.events += [e.event for e in effects if isinstance(e, Publish)]
        return effects

    def start_all(self) -> list[Worker]:
        effects = self.note(self.sup.start())
        launches = self.launches(effects)
        assert len(launches) == len(effects)  # nothing but launches
        return [self.ready(e.slot) for e in launches]

    def ready(self, slot: Any, probe: bool = False) -> Worker:
        worker = Worker(pid=next(self.pids), address="unix:/w.sock")
        effects = self.note(self.sup.launched(slot, worker, 0.05, probe))
        assert Watch(worker) in effects
        return worker

    def launches(self, effects: list[Effect]) -> list[Launch]:
        return [e for e in effects if isinstance(e, Launch)]

    def named(self, event: str) -> list[Any]:
        return [e for e in self.events if e.event == event]


def test_first_start_launches_every_slot_and_spares_are_slots_too() -> None:
    m = Machine(workers=2, spares=1)
    launches = m.launches(m.sup.start())
    assert [(e.slot.role, e.slot.index) for e in launches] == [(Role.SERVING, 0), (Role.SERVING, 1),
                                                                (Role.SPARE, 0)]
    workers = [m.ready(e.slot) for e in launches]
    rows = m.sup.rows()
    assert [(r.slot, r.pid, r.state) for r in rows] == [(0, workers[0].pid, WorkerState.READY),
                                                        (1, workers[1].pid, WorkerState.READY),
                                                        (-1, workers[2].pid, WorkerState.SPARE)]
    assert [e.event for e in m.events] == ["worker_started", "worker_started"]  # a spare serves nothing yet
    assert m.sup.all_ready(spares=True)


def test_a_crash_is_one_event_with_one_key_set_whatever_the_phase() -> None:
    m = Machine(workers=1, spares=1)
    serving, spare = m.start_all()
    m.note(m.sup.launch_failed(m.sup.spares[0], StartFailure(EXIT_3, 7, ("boom",), "exited 3")))  # phase spare
    m.note(m.sup.exited(serving, SEGFAULT, ("Fatal Python error: Segmentation fault",)))  # phase running
    replacement = m.sup.serving[0].worker
    assert replacement is spare  # the spare took over
    m.note(m.sup.health(replacement, "NOT_SERVING"))
    m.note(m.sup.exited(replacement, ExitInfo(Classification.CLEAN, exit_code=0)))  # phase recycled
    m.note(m.sup.launch_failed(m.sup.serving[0], StartFailure(EXIT_3, 8, (), "exited 3")))  # phase start
    crashes = m.named("crash")
    assert [c.metadata["phase"] for c in crashes] == ["spare", "running", "recycled", "start"]
    assert all(set(c.metadata) == CRASH_KEYS for c in crashes)
    assert crashes[1].metadata["classification"] == "segfault" and crashes[1].metadata["slot"] == 0


def test_a_spare_takes_a_first_crash_and_is_refilled() -> None:
    m = Machine(workers=1, spares=1)
    serving, spare = m.start_all()
    m.clock.now += 1.0
    effects = m.note(m.sup.exited(serving, KILLED))
    assert m.sup.serving[0].worker is spare and m.sup.serving[0].state is WorkerState.READY
    restart = m.named("restart")[0]
    assert (restart.metadata["via"], restart.metadata["pid"]) == ("spare", spare.pid)
    assert Attach(spare) in effects and Dispose(serving) in effects
    assert [e.slot.role for e in m.launches(effects)] == [Role.SPARE]  # only the spare slot starts a worker
    assert m.sup.rows()[0].restarts == 1 and m.sup.rows()[0].crashes == 1
    assert not m.sup.all_ready(spares=True)
    m.ready(m.sup.spares[0])
    assert m.sup.all_ready(spares=True)


def test_a_crash_loop_waits_out_its_backoff_and_keeps_the_spare() -> None:
    m = Machine(workers=1, spares=1, breaker_threshold=100)
    serving, spare = m.start_all()
    slot = m.sup.serving[0]
    m.sup.exited(serving, SEGFAULT)  # first crash: the spare takes over at once
    assert slot.worker is spare
    effects = m.sup.exited(spare, SEGFAULT)  # it crashes too, before serving anything: a streak of 2
    assert m.launches(effects) == [] and slot.worker is None
    assert m.sup.spares[0].launching  # the spare slot is refilling, and keeps its spare for later
    assert m.sup.next_due() == pytest.approx(m.clock.now + 0.1)
    m.clock.now += 0.05
    assert m.launches(m.sup.tick()) == []
    m.clock.now += 0.05
    assert [e.slot for e in m.launches(m.sup.tick())] == [slot]
    worker = m.ready(slot)
    m.sup.finished(worker, m.sup.acquire("add")[1], ok=True)  # it served: the streak is over
    assert slot.streak == 0 and slot.calls == 1


def test_the_start_up_breaker_holds_restarts_and_its_probe_restarts_the_pool() -> None:
    m = Machine(workers=2)
    a, b = m.start_all()
    m.note(m.sup.exited(b, KILLED))  # from outside: restarts at once, counts nowhere
    slot_b = m.sup.serving[1]
    for pid in (1, 2, 3):  # then its replacements exit 3 at start-up
        effects = m.note(m.sup.launch_failed(slot_b, StartFailure(EXIT_3, pid, (), "exited 3")))
    assert m.launches(effects) == [] and not m.policy.may_start()
    opened = m.named("breaker_open")[0]
    assert opened.metadata["scope"] == "start" and opened.metadata["classification"] == "other"
    assert m.sup.acquire("add") is not None  # the ready worker still serves
    assert m.sup.next_due() == pytest.approx(m.clock.now + 2.0)

    m.clock.now += 2.0
    effects = m.note(m.sup.tick())
    probe = m.launches(effects)
    assert [(e.slot, e.probe) for e in probe] == [(slot_b, True)]
    assert [e.event for e in m.events[-1:]] == ["breaker_half_open"]
    m.ready(slot_b, probe=True)
    assert m.policy.may_start() and m.named("breaker_close")
    assert m.sup.all_ready()


def test_a_probe_killed_from_outside_is_followed_by_another_probe() -> None:
    m = Machine(workers=1)
    (w,) = m.start_all()
    slot = m.sup.serving[0]
    m.sup.exited(w, KILLED)
    for pid in (1, 2, 3):
        m.sup.launch_failed(slot, StartFailure(EXIT_3, pid))
    m.clock.now += 2.0
    (probe,) = m.launches(m.sup.tick())
    m.sup.launch_failed(slot, StartFailure(KILLED, 9), probe=True)  # someone SIGKILLed the probe
    assert m.sup.next_due() == m.clock.now  # no verdict: the next probe is due now, not never
    (again,) = m.launches(m.sup.tick())
    assert again.probe and again.slot is slot


def test_recycling_a_not_serving_worker_and_killing_it_after_the_grace_period() -> None:
    m = Machine(workers=1)
    (w,) = m.start_all()
    got = m.sup.acquire("hold")
    assert got is not None and got[0] is w
    m.sup.finished(w, got[1], ok=False, abandoned=True)  # a call given up at its deadline, still running
    effects = m.note(m.sup.health(w, "NOT_SERVING"))
    recycle = m.named("recycle")[0]
    assert recycle.metadata["classification"] == "stuck" and recycle.metadata["abandoned"] == 1
    assert Signal(w, kill=False, classification=Classification.STUCK) in effects
    assert m.launches(effects)[0].slot is m.sup.serving[0] and m.sup.acquire("add") is None
    m.clock.now += 5.0
    assert Signal(w, kill=True) in m.sup.tick()


def test_failed_health_checks_kill_a_worker_as_unresponsive() -> None:
    m = Machine(workers=1)
    (w,) = m.start_all()
    assert m.sup.health(w, None) == []
    assert m.sup.health(w, "SERVING") == []  # a good answer starts the count over
    assert m.sup.health(w, None) == []
    assert m.sup.health(w, None) == [Signal(w, kill=True, classification=Classification.UNRESPONSIVE)]


def test_routing_and_a_dead_workers_memory_outliving_its_last_call() -> None:
    m = Machine(workers=2)
    a, b = m.start_all()
    first = m.sup.acquire("x")
    second = m.sup.acquire("x")
    assert first is not None and second is not None and {first[0], second[0]} == {a, b}  # least busy
    third = m.sup.acquire("x", excluded={a.pid})
    assert third is not None and third[0] is b
    effects = m.sup.exited(b, KILLED)  # two calls still read its outputs
    assert Dispose(b) in effects
    assert not m.sup.unlink_later(b)
    assert not m.sup.finished(b, second[1] if second[0] is b else first[1], ok=False)
    assert m.sup.finished(b, third[1], ok=False)  # the last one out: now unlink its segments


def test_nothing_starts_once_closing() -> None:
    m = Machine(workers=1, spares=1)
    serving, _spare = m.start_all()
    m.sup.exited(serving, KILLED)
    launching = m.sup.spares[0]
    assert len(m.sup.close()) == 1  # the spare now serving
    late = Worker(pid=4242)
    assert m.sup.launched(launching, late, 0.1) == [Dispose(late, kill=True)]
    assert m.sup.launch_failed(launching, StartFailure(EXIT_3)) == []
    assert m.sup.tick() == [] and m.sup.acquire("add") is None  # its slot is stopping: no more calls
    assert [r.state for r in m.sup.rows()] == [WorkerState.STOPPING]  # the spare slot never got a new one
