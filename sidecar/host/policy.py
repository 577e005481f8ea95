"""`SupervisionPolicy`: what a worker's death is evidence of, and when its slot starts the next one.

Pure decisions: no threads, no processes, no I/O; the clock is injected. The pool's state machine
(`sidecar.host.supervisor`) tells it the facts of each death and each probe, and does what it says.

- Streak: a slot's crashes in a row before one of its workers proved itself (served a call, or lived
  `stable_after_s`). The first crash restarts at once; each further one waits
  initial x 2^(streak - 2), capped (`restart_backoff`). A death from outside (SIGKILL without a
  counted OOM kill, SIGTERM) starts the streak over: it is no evidence of a crash loop.
- Blame: a worker that crashed by itself (`ExitInfo.blames_work`) while running calls blames those
  ops (one failure for each op's breaker); one that crashed by itself before it served a call, or
  could not start at all, is a start-up failure (the start-up breaker). Kills from outside, the pool's
  own kills of a starting worker that was killed from outside, and lost statuses blame nothing.
- Start-up breaker open: no worker starts (calls still run on ready ones); after the cool-down one
  probe worker starts; ready and healthy, it closes the breaker. A probe that fails by itself opens
  it again for another cool-down; one killed from outside gives no verdict, and the next probe may
  start at once.
- A ready spare may take a dead worker's place only after a first crash (a slot in a crash loop
  waits out its backoff instead of eating the spares).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from enum import Enum
from typing import Callable

from sidecar.host.breaker import BreakerState, CircuitBreaker, OpBreakers
from sidecar.host.crash import Classification, ExitInfo

__all__ = ["Blame", "Death", "Verdict", "Evidence", "SupervisionPolicy"]

_FROM_OUTSIDE = (Classification.KILLED, Classification.TERMINATED)


class Blame(str, Enum):
    OPS = "ops"          # the calls it was running (their ops' breakers)
    START_UP = "start"   # the worker cannot get going (the start-up breaker)
    NOTHING = "nothing"  # done to it from outside, or unknown


@dataclass(frozen=True)
class Death:
    """The facts of one worker's end, as the state machine knows them."""

    exit: ExitInfo
    started: bool = True           # it had become ready (False: it failed to start)
    served: bool = False           # it completed a call
    uptime_s: float = 0.0
    ops: tuple[str, ...] = ()      # the ops of the calls it was running
    probe: bool = False            # it was the start-up breaker's probe


@dataclass(frozen=True)
class Verdict:
    blame: Blame
    streak: int                     # the slot's streak after this death
    delay_s: float                  # when its next worker starts (if it may start at all)
    may_use_spare: bool             # a ready spare may take the place at once
    breaker_opened: bool = False    # the start-up breaker opened: nothing starts until its probe
    opened_ops: tuple[str, ...] = ()  # ops whose breaker this death opened


@dataclass(frozen=True)
class Evidence:
    """The last death a breaker counted, for the CircuitOpen error that names it."""

    exit: ExitInfo
    pid: int | None
    stderr_tail: tuple[str, ...]


class SupervisionPolicy:
    def __init__(self, *, restart_backoff: tuple[float, float] = (0.1, 5.0), stable_after_s: float = 5.0,
                 breaker_threshold: int = 5, breaker_window_s: float = 30.0, breaker_cooldown_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.restart_backoff = restart_backoff
        self.stable_after_s = stable_after_s
        self.clock = clock
        self.start_breaker = CircuitBreaker(breaker_threshold, breaker_window_s, breaker_cooldown_s, clock)
        self.op_breakers = OpBreakers(breaker_threshold, breaker_window_s, breaker_cooldown_s, clock)
        self.probe_at: float | None = None  # when the start-up breaker's next probe is due
        self.start_evidence: Evidence | None = None
        self.op_evidence: dict[str, Evidence] = {}

    # -- deaths --------------------------------------------------------------------------------------

    def restart_delay(self, streak: int) -> float:
        if streak <= 1:
            return 0.0
        first, cap = self.restart_backoff
        return min(cap, first * 2.0 ** (streak - 2))

    def on_death(self, streak: int, death: Death, pid: int | None = None,
                 stderr_tail: tuple[str, ...] = ()) -> Verdict:
        """A worker of a slot whose streak was `streak` ended (or failed to start) unexpectedly."""
        info = death.exit
        evidence = Evidence(info, pid, tuple(stderr_tail))
        if not death.started:
            streak += 1
            blame = Blame.NOTHING if info.classification in _FROM_OUTSIDE else Blame.START_UP
        else:
            proven = death.served or death.uptime_s >= self.stable_after_s
            # Back off only for a worker that keeps crashing by itself before it proved itself.
            streak = streak + 1 if info.blames_work and not proven else 1
            if info.blames_work and death.ops:
                blame = Blame.OPS
            elif info.blames_work and not death.served:
                blame = Blame.START_UP
            else:
                blame = Blame.NOTHING
        opened_ops: list[str] = []
        opened = False
        if blame is Blame.OPS:
            for op in death.ops:
                self.op_evidence[op] = evidence
                if self.op_breakers.record_crash(op) is BreakerState.OPEN:
                    opened_ops.append(op)
        elif blame is Blame.START_UP:
            self.start_evidence = evidence
            opened = self.start_breaker.record_failure() is BreakerState.OPEN
            if opened:
                self.probe_at = self.clock() + self.start_breaker.cooldown_s
        elif death.probe:
            # The probe was killed from outside: no verdict; the next probe may start at once.
            self.start_breaker.abandon_probe()
            self.probe_at = self.clock()
        return Verdict(blame=blame, streak=streak, delay_s=self.restart_delay(streak), may_use_spare=streak <= 1,
                       breaker_opened=opened, opened_ops=tuple(opened_ops))

    # -- the start-up breaker ------------------------------------------------------------------------

    def may_start(self) -> bool:
        """Workers other than the probe may start (the start-up breaker is closed)."""
        return self.start_breaker.state is BreakerState.CLOSED

    def begin_probe(self) -> bool:
        """At `probe_at`: True when the breaker went half-open and one probe worker is to start;
        False when it is still cooling down (then `probe_at` says when to ask again)."""
        self.probe_at = None
        if self.start_breaker.try_probe():
            return True
        if self.start_breaker.state is BreakerState.OPEN:
            self.probe_at = self.clock() + max(0.01, self.start_breaker.retry_after())
        return False

    def probe_succeeded(self) -> bool:
        """The probe worker is ready and healthy (or nothing needed a probe): True when this closed it."""
        return self.start_breaker.record_success() is BreakerState.CLOSED
