"""`Supervisor`: the pool's one state machine, the only owner of slot state.

A slot is a place a worker lives: `workers` serving slots (what calls are routed to) and `spares`
spare slots (a ready worker there serves nothing until it takes a dead worker's place). Spares are
slots like the others: the same inputs, the same policy, the same events.

Inputs (each one a method; the caller holds the pool's lock, the machine itself has no lock, no
thread and no process, and reads time only from its clock):

    start()                         the first workers of every slot
    launched(slot, worker, ...)     a worker is ready (spawned, connected, handshake done)
    launch_failed(slot, failure)    a worker could not start
    exited(worker, exit, tail)      a worker's exit status is known
    health(worker, status)          one health check's answer (None: no answer)
    acquire(op, excluded) / finished(worker, token, ...)   a call takes a ready worker, and ends
    tick()                          time passed: backoffs, probes and grace periods that are due
    close() / closed()

Each returns the effects for the pool's shell to carry out once the lock is released, in order:
start a launch (`Launch`), deliver an event (`Publish`), signal a process (`Signal`), forget a
worker (`Dispose`: close its connection, unlink its memory once no call reads it), attach the
telemetry watchers to a new serving worker (`Attach`), watch a new worker's exit (`Watch`).
What each death means and when a slot restarts is decided by `sidecar.host.policy`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Union

from sidecar.host import events
from sidecar.host.crash import Classification, ExitInfo
from sidecar.host.events import PoolEvent
from sidecar.host.liveness import BUSY
from sidecar.host.policy import Death, SupervisionPolicy, Verdict

log = logging.getLogger(__name__)

__all__ = ["Supervisor", "Slot", "Role", "Worker", "WorkerState", "WorkerStatus", "StartFailure",
           "Launch", "Publish", "Signal", "Dispose", "Attach", "Watch", "Effect"]


class WorkerState(str, Enum):
    STARTING = "starting"        # being spawned (first start)
    READY = "ready"              # serving calls
    RESTARTING = "restarting"    # died; a replacement is (or will be, after backoff/breaker) started
    STOPPING = "stopping"        # the pool is closing it
    STOPPED = "stopped"          # gone for good (pool closed)
    SPARE = "spare"              # a warm spare: started, serving nothing until it replaces a worker


@dataclass(frozen=True)
class WorkerStatus:
    """One row of `Pool.status()`: a worker slot (or a spare) and its history."""

    slot: int                 # -1 for a spare
    pid: int | None
    state: WorkerState
    calls: int                # calls completed by this slot (all its processes)
    crashes: int              # unexpected exits, failed starts included
    restarts: int             # replacements started
    last_exit: ExitInfo | None
    inflight: int = 0
    address: str | None = None
    gpu: str | None = None    # CUDA_VISIBLE_DEVICES given to it, when the pool places workers
    health: str = ""          # last health check: SERVING, BUSY (computing, GIL held), NO_ANSWER, ...


class Role(str, Enum):
    SERVING = "serving"
    SPARE = "spare"


@dataclass(eq=False)
class Worker:
    """One live worker as the machine sees it; `proc` and `client` are the shell's (never used here)."""

    pid: int
    via: str = "template"           # how it was started: template, cold
    address: str | None = None
    gpu: str | None = None
    proc: Any = None
    client: Any = None
    slot: Slot | None = None        # where it lives now (a spare moves to a serving slot)
    ready_at: float = 0.0
    inflight: int = 0
    running: dict[int, str] = field(default_factory=dict)  # call token -> op (crash attribution)
    served: bool = False            # completed a call: a working configuration, not a crash loop
    abandoned: int = 0              # calls given up at their deadline while it still ran them
    unlink_when_idle: bool = False  # dead: unlink its segments once no call still reads its outputs
    retiring: bool = False          # recycled: no calls, SIGTERM, SIGKILL at kill_at
    kill_at: float | None = None
    oom_kills: int | None = None    # the shell's: the cgroup's OOM-kill count when it started


@dataclass(eq=False)
class Slot:
    index: int                      # serving: 0..n-1; spares count on their own
    role: Role
    gpu: str | None
    worker: Worker | None = None
    state: WorkerState = WorkerState.STARTING
    calls: int = 0
    crashes: int = 0
    restarts: int = 0
    last_exit: ExitInfo | None = None
    streak: int = 0                 # crashes in a row before a worker of the slot proved itself
    started_once: bool = False
    health_failures: int = 0
    health: str = ""          # the last health check's outcome (SERVING, BUSY, NO_ANSWER, ...)
    died_at: float = 0.0
    launching: bool = False         # a launch is scheduled (launch_at) or running
    launch_at: float | None = None

    @property
    def label(self) -> int:
        """What events and status call the slot (-1 for a spare)."""
        return self.index if self.role is Role.SERVING else -1


@dataclass(frozen=True)
class StartFailure:
    """Why a launch failed: the exit (or what stands for it), and what the worker said."""

    exit: ExitInfo
    pid: int | None = None
    stderr_tail: tuple[str, ...] = ()
    message: str = ""


# -- effects -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Launch:
    slot: Slot
    probe: bool = False  # the start-up breaker's probe: it must also answer a health check


@dataclass(frozen=True)
class Publish:
    event: PoolEvent


@dataclass(frozen=True)
class Signal:
    worker: Worker
    kill: bool                               # SIGKILL; else SIGTERM (it drains)
    classification: Classification | None = None  # what its exit is to be called (the pool's own kill)


@dataclass(frozen=True)
class Dispose:
    worker: Worker
    kill: bool = False


@dataclass(frozen=True)
class Attach:
    worker: Worker


@dataclass(frozen=True)
class Watch:
    worker: Worker


Effect = Union[Launch, Publish, Signal, Dispose, Attach, Watch]


class Supervisor:
    def __init__(self, policy: SupervisionPolicy, workers: int, spares: int = 0, *,
                 gpu_of_worker: Callable[[int], str | None] = lambda i: None,
                 gpu_of_spare: Callable[[int], str | None] = lambda i: None,
                 health_failures: int = 3, grace_s: float = 5.0, run_id: str = "") -> None:
        self.policy = policy
        self.clock = policy.clock
        self.health_limit = health_failures
        self.grace_s = grace_s
        self.run_id = run_id
        self.serving = [Slot(i, Role.SERVING, gpu_of_worker(i)) for i in range(workers)]
        self.spares = [Slot(i, Role.SPARE, gpu_of_spare(i)) for i in range(spares)]
        self.retiring: list[Worker] = []
        self.closing = False
        self._rr = 0
        self._tokens = 0

    # ---------------------------------------------------------------------------------------------
    # queries

    def rows(self) -> list[WorkerStatus]:
        rows = [WorkerStatus(s.index, s.worker.pid if s.worker else None, s.state, s.calls, s.crashes,
                             s.restarts, s.last_exit, s.worker.inflight if s.worker else 0,
                             s.worker.address if s.worker else None, s.gpu, s.health) for s in self.serving]
        rows += [WorkerStatus(-1, s.worker.pid, WorkerState.SPARE, 0, 0, 0, None, 0, s.worker.address, s.gpu)
                 for s in self.spares if s.worker is not None]
        return rows

    def ready_count(self) -> int:
        return sum(1 for s in self.serving if s.state is WorkerState.READY)

    def all_ready(self, spares: bool = False) -> bool:
        done = all(s.state is WorkerState.READY for s in self.serving)
        return done and (not spares or all(s.worker is not None for s in self.spares))

    def live_workers(self) -> list[Worker]:
        slots = self.serving + self.spares
        return [s.worker for s in slots if s.worker is not None] + list(self.retiring)

    def serving_workers(self) -> list[Worker]:
        """Ready workers that calls go to (what health checks look at)."""
        return [s.worker for s in self.serving if s.state is WorkerState.READY and s.worker is not None]

    def next_due(self) -> float | None:
        """When `tick` has something to do next (None: nothing is scheduled)."""
        times = [s.launch_at for s in self.serving + self.spares if s.launch_at is not None]
        times += [w.kill_at for w in self.retiring if w.kill_at is not None]
        if self.policy.probe_at is not None:
            times.append(self.policy.probe_at)
        return min(times) if times else None

    # ---------------------------------------------------------------------------------------------
    # starting

    def start(self) -> list[Effect]:
        """The first launch of every slot (serving ones first)."""
        effects: list[Effect] = []
        for slot in self.serving + self.spares:
            effects += self._schedule(slot, 0.0)
        return effects

    def launched(self, slot: Slot, worker: Worker, start_s: float, probe: bool = False) -> list[Effect]:
        slot.launching = False
        if self.closing:
            return [Dispose(worker, kill=True)]
        now = self.clock()
        worker.slot = slot
        worker.ready_at = now
        slot.worker = worker
        effects: list[Effect] = [Watch(worker)]
        if slot.role is Role.SPARE:
            slot.state = WorkerState.SPARE
            slot.streak = 0  # a spare proves itself by becoming ready: it serves nothing
        else:
            restarted = slot.started_once
            slot.started_once = True
            if restarted:
                slot.restarts += 1
            slot.state = WorkerState.READY
            slot.health_failures = 0
            since = now - slot.died_at if restarted and slot.died_at else None
            effects.append(Publish(events.restart(slot.index, worker.pid, worker.via, start_s, since) if restarted
                                   else events.worker_started(slot.index, worker.pid, worker.via, start_s)))
            effects.append(Attach(worker))
        if probe and self.policy.probe_succeeded():
            effects += self._breaker_closed()
        return effects

    def launch_failed(self, slot: Slot, failure: StartFailure, probe: bool = False) -> list[Effect]:
        slot.launching = False
        if self.closing:  # killed by close() while starting: not a crash
            return []
        info = failure.exit
        slot.crashes += 1
        slot.last_exit = info
        slot.state = WorkerState.RESTARTING
        slot.died_at = self.clock()
        log.warning("pool %s: %s failed to start: %s", self.run_id,
                    f"slot {slot.index}" if slot.role is Role.SERVING else "a spare", failure.message)
        effects: list[Effect] = [Publish(events.crash(
            slot.label, failure.pid, "start" if slot.role is Role.SERVING else "spare", info,
            stderr_tail=failure.stderr_tail, message=failure.message))]
        verdict = self.policy.on_death(slot.streak, Death(info, started=False, probe=probe), failure.pid,
                                       failure.stderr_tail)
        slot.streak = verdict.streak
        return effects + self._after_death(slot, verdict)

    # ---------------------------------------------------------------------------------------------
    # deaths

    def exited(self, worker: Worker, info: ExitInfo, tail: tuple[str, ...] = ()) -> list[Effect]:
        """`info` is the worker's classified exit (an OOM kill already confirmed by the shell)."""
        slot = worker.slot
        ops = sorted(set(worker.running.values()))
        if worker.retiring:  # recycled: its slot has a replacement already; only its exit is news
            if worker in self.retiring:
                self.retiring.remove(worker)
            if slot is not None:
                slot.last_exit = info
            effects: list[Effect] = [] if self.closing else [Publish(events.crash(
                -1 if slot is None else slot.label, worker.pid, "recycled", info, inflight=worker.inflight,
                ops=ops, stderr_tail=tail))]
            return effects + [Dispose(worker)]
        if slot is None or slot.worker is not worker:
            return [Dispose(worker)]  # replaced already (or never installed): nothing to restart
        expected = self.closing or slot.state is WorkerState.STOPPING
        if not expected and info.classification is Classification.CLEAN:
            # Nobody in the pool asked it to stop: a SIGTERM/SIGINT from outside, drained to exit 0.
            info = ExitInfo(Classification.TERMINATED, exit_code=info.exit_code)
        now = self.clock()
        slot.worker = None
        slot.last_exit = info
        slot.died_at = now
        if expected:
            slot.state = WorkerState.STOPPED
            return [Dispose(worker)]
        slot.state = WorkerState.RESTARTING
        slot.crashes += 1
        uptime = now - worker.ready_at
        log.warning("pool %s: worker pid %d %s", self.run_id, worker.pid, info.describe())
        effects = [Publish(events.crash(slot.label, worker.pid, "running", info, uptime_s=uptime,
                                        inflight=worker.inflight, ops=ops, stderr_tail=tail))]
        verdict = self.policy.on_death(slot.streak, Death(info, served=worker.served, uptime_s=uptime,
                                                          ops=tuple(ops)), worker.pid, tail)
        slot.streak = verdict.streak
        for op in verdict.opened_ops:
            breaker = self.policy.op_breakers.get(op)
            assert breaker is not None
            log.warning("pool %s: circuit breaker of op %r open (%d crashes within %g s)", self.run_id, op,
                        breaker.recent_failures(), breaker.window_s)
            effects.append(Publish(events.breaker_open("op", op, breaker.recent_failures(), breaker.window_s,
                                                       breaker.cooldown_s, info.classification.value)))
        # Replacement first (it has the most latency to hide), then the clean-up of the dead one.
        return effects + self._after_death(slot, verdict) + [Dispose(worker)]

    def _after_death(self, slot: Slot, verdict: Verdict) -> list[Effect]:
        if verdict.breaker_opened:
            return self._breaker_opened()
        if not self.policy.may_start() or self.closing:
            return []  # the breaker's probe (or nothing, when closing) restarts it
        if slot.role is Role.SERVING and verdict.may_use_spare and not slot.launching:
            spare = next((s for s in self.spares if s.worker is not None
                          and (slot.gpu is None or s.gpu == slot.gpu)), None)
            if spare is not None:
                return self._take_over(slot, spare)
        return self._schedule(slot, verdict.delay_s)

    def _take_over(self, slot: Slot, spare: Slot) -> list[Effect]:
        worker = spare.worker
        assert worker is not None
        spare.worker = None
        spare.state = WorkerState.STARTING
        worker.slot = slot
        slot.worker = worker
        slot.state = WorkerState.READY
        slot.restarts += 1
        slot.started_once = True
        slot.health_failures = 0
        since = self.clock() - slot.died_at
        effects: list[Effect] = [Publish(events.restart(slot.index, worker.pid, "spare", None, since)),
                                 Attach(worker)]  # watchers follow the slot, as they do a started one
        return effects + self._schedule(spare, 0.0)  # and a new spare behind it

    # ---------------------------------------------------------------------------------------------
    # launches, the start-up breaker

    def _schedule(self, slot: Slot, delay: float) -> list[Effect]:
        if slot.launching or self.closing:
            return []
        slot.launching = True
        if delay > 0:
            slot.launch_at = self.clock() + delay
            return []
        return self._launch_now(slot)

    def _launch_now(self, slot: Slot, probe: bool = False) -> list[Effect]:
        slot.launch_at = None
        if not probe and not self.policy.may_start():
            slot.launching = False  # the breaker opened meanwhile: its probe restarts this slot
            return []
        return [Launch(slot, probe)]

    def _breaker_opened(self) -> list[Effect]:
        b = self.policy.start_breaker
        last = self.policy.start_evidence
        log.warning("pool %s: start-up circuit breaker open (%d start-up failures within %g s); probing in %g s",
                    self.run_id, b.recent_failures(), b.window_s, b.cooldown_s)
        for s in self.serving + self.spares:
            if s.launch_at is not None:  # a restart waiting out its backoff now waits for the probe
                s.launch_at = None
                s.launching = False
        return [Publish(events.breaker_open("start", None, b.recent_failures(), b.window_s, b.cooldown_s,
                                            last.exit.classification.value if last else None))]

    def _probe(self) -> list[Effect]:
        if not self.policy.begin_probe():
            return []
        effects: list[Effect] = [Publish(events.breaker_half_open("start"))]
        slot = next((s for s in self.serving if s.state is WorkerState.RESTARTING and not s.launching), None)
        if slot is None:  # every serving slot has a live worker: nothing to probe, the pool works
            if self.policy.probe_succeeded():
                effects += self._breaker_closed()
            return effects
        slot.launching = True
        return effects + self._launch_now(slot, probe=True)

    def _breaker_closed(self) -> list[Effect]:
        log.info("pool %s: start-up circuit breaker closed", self.run_id)
        effects: list[Effect] = [Publish(events.breaker_close("start"))]
        for s in self.serving + self.spares:
            if s.worker is None and not s.launching:
                s.streak = 0
                effects += self._schedule(s, 0.0)
        return effects

    def tick(self) -> list[Effect]:
        now = self.clock()
        effects: list[Effect] = []
        for slot in self.serving + self.spares:
            if slot.launch_at is not None and slot.launch_at <= now and not self.closing:
                effects += self._launch_now(slot)
        probe_at = self.policy.probe_at
        if probe_at is not None and probe_at <= now and not self.closing:
            effects += self._probe()
        for worker in self.retiring:
            if worker.kill_at is not None and worker.kill_at <= now:
                worker.kill_at = None
                effects.append(Signal(worker, kill=True))
        return effects

    # ---------------------------------------------------------------------------------------------
    # health

    def health(self, worker: Worker, status: str | None) -> list[Effect]:
        """One health check of a serving worker: "SERVING", "NOT_SERVING", "BUSY", another status, or
        None (no answer). NOT_SERVING recycles it; `health_failures` failures in a row kill it."""
        slot = worker.slot
        if self.closing or slot is None or slot.worker is not worker or slot.role is not Role.SERVING:
            return []
        slot.health = status or "NO_ANSWER"
        if status == "NOT_SERVING":
            return self._recycle(slot, worker)
        # BUSY: no answer, but its CPU time advanced meanwhile (an op holding the GIL in C,
        # sidecar.host.liveness): alive and working, so it counts as an answer.
        slot.health_failures = 0 if status in ("SERVING", BUSY) else slot.health_failures + 1
        if slot.health_failures < self.health_limit:
            return []
        log.warning("pool %s: worker pid %d failed %d health checks; killing it", self.run_id, worker.pid,
                    self.health_limit)
        return [Signal(worker, kill=True, classification=Classification.UNRESPONSIVE)]

    def _recycle(self, slot: Slot, worker: Worker) -> list[Effect]:
        """A worker that says NOT_SERVING (a cancelled call of it is stuck, or it is draining after a
        SIGTERM from outside) gets no more calls; a replacement starts at once; the worker gets SIGTERM
        (its other calls drain) and SIGKILL after grace_s."""
        now = self.clock()
        slot.worker = None
        slot.state = WorkerState.RESTARTING
        slot.died_at = now
        worker.retiring = True
        worker.kill_at = now + self.grace_s
        self.retiring.append(worker)
        stuck = worker.abandoned > 0  # calls we gave up on at their deadline are still running in it
        log.warning("pool %s: worker pid %d reports NOT_SERVING%s; recycling it", self.run_id, worker.pid,
                    f" with {worker.abandoned} cancelled call(s) still running" if stuck else "")
        effects: list[Effect] = [Publish(events.recycle(slot.index, worker.pid, worker.inflight, worker.abandoned,
                                                        Classification.STUCK.value if stuck else None))]
        effects += self._schedule(slot, 0.0)
        return effects + [Signal(worker, kill=False, classification=Classification.STUCK if stuck else None)]

    # ---------------------------------------------------------------------------------------------
    # calls (the hot path: no effects, no allocation beyond the token)

    def acquire(self, op: str, excluded: set[int] | frozenset[int] = frozenset()) -> tuple[Worker, int] | None:
        """The least busy ready serving worker (not in `excluded`) and a token for `finished`."""
        best: Worker | None = None
        slots = self.serving
        n = len(slots)
        start = self._rr % n
        self._rr += 1
        for i in range(n):
            s = slots[(start + i) % n]
            w = s.worker
            if s.state is WorkerState.READY and w is not None and w.pid not in excluded \
                    and (best is None or w.inflight < best.inflight):
                best = w
        if best is None:
            return None
        best.inflight += 1
        self._tokens += 1
        best.running[self._tokens] = op
        return best, self._tokens

    def acquire_worker(self, worker: Worker, op: str) -> int | None:
        """A token on this very worker (a pinned call: a session's, `pool.workers()`), or None when it
        no longer serves (dead, replaced, recycled, or the pool is closing)."""
        if not self.serves(worker):
            return None
        worker.inflight += 1
        self._tokens += 1
        worker.running[self._tokens] = op
        return self._tokens

    def serves(self, worker: Worker) -> bool:
        """The worker is the ready worker of a serving slot (calls may be pinned to it)."""
        slot = worker.slot
        return not self.closing and not worker.retiring and slot is not None and slot.worker is worker \
            and slot.role is Role.SERVING and slot.state is WorkerState.READY

    def finished(self, worker: Worker, token: int, ok: bool, abandoned: bool = False) -> bool:
        """A call ended; True when the worker is dead and this was the last call reading its memory
        (the shell then unlinks its segments)."""
        worker.inflight -= 1
        worker.running.pop(token, None)
        if abandoned:
            worker.abandoned += 1
        if ok:
            worker.served = True
            slot = worker.slot
            if slot is not None:
                slot.calls += 1
                if slot.worker is worker:
                    slot.streak = 0
        if worker.unlink_when_idle and worker.inflight == 0:
            worker.unlink_when_idle = False
            return True
        return False

    def unlink_later(self, worker: Worker) -> bool:
        """A dead worker was disposed of: True to unlink its segments now, False when calls still read
        its outputs (then `finished` says when)."""
        worker.unlink_when_idle = worker.inflight > 0
        return not worker.unlink_when_idle

    # ---------------------------------------------------------------------------------------------
    # closing

    def close(self) -> list[Worker]:
        """No more launches or calls; every live worker, for the shell to stop."""
        self.closing = True
        workers = self.live_workers()
        for s in self.serving:
            s.state = WorkerState.STOPPING if s.worker is not None else WorkerState.STOPPED
        for s in self.serving + self.spares:
            s.launch_at = None
        self.policy.probe_at = None
        return workers

    def closed(self) -> None:
        for s in self.serving + self.spares:
            s.state = WorkerState.STOPPED
            s.worker = None
        self.retiring.clear()
