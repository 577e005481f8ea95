"""Circuit breakers for worker crashes: pure state machines (no threads, injectable clock), driven by
the pool and tested on their own.

`CircuitBreaker`, one state machine:
CLOSED: failures are counted in a sliding window; `threshold` of them within `window_s` open it.
OPEN: for `cooldown_s` nothing it guards may run.
HALF_OPEN: after the cool-down one probe is allowed; its success closes the breaker (and clears the
window), its failure opens it again for another cool-down; a probe that ends without a verdict (its
worker was killed from outside) is abandoned: the breaker is open again, ready for the next probe.

What the pool feeds them (see `guides/crash-barrier.md`), so that unrelated worker deaths never turn
into an outage:
- the start-up breaker (`Pool.breaker`) counts start-up failures: a worker that could not start, or
  that crashed by itself (`ExitInfo.blames_work`) before it served a call. While it is open no
  worker is started; calls still run on the workers that are ready, and fail fast with CIRCUIT_OPEN
  only when none is.
- `OpBreakers` keeps one breaker per op for crashes caused by calls: a worker that crashed by itself
  while running calls counts once against each op it was running. An open op breaker fails calls of
  that op fast; other ops are not affected. Its probe is one call of the op.
- External kills (SIGKILL without a counted OOM kill, SIGTERM), the pool's own kills and lost exit
  statuses count nowhere.
"""
from __future__ import annotations

import collections
import threading
import time
from enum import Enum
from typing import Callable


class BreakerState(str, Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    def __init__(self, threshold: int = 5, window_s: float = 30.0, cooldown_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if threshold < 1:
            raise ValueError(f"breaker threshold must be >= 1, got {threshold}")
        if window_s <= 0 or cooldown_s < 0:
            raise ValueError("breaker window must be > 0 and cool-down >= 0")
        self.threshold = threshold
        self.window_s = window_s
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._lock = threading.Lock()
        self._failures: collections.deque[float] = collections.deque()
        self._state = BreakerState.CLOSED
        self._opened_at = 0.0
        self.opened_count = 0  # how many times it opened (statistics)

    @property
    def state(self) -> BreakerState:
        return self._state

    def recent_failures(self) -> int:
        with self._lock:
            self._trim(self._clock())
            return len(self._failures)

    def _trim(self, now: float) -> None:
        while self._failures and self._failures[0] <= now - self.window_s:
            self._failures.popleft()

    def record_failure(self) -> BreakerState | None:
        """Counts a failure; returns the new state when this changed it (OPEN), else None."""
        with self._lock:
            now = self._clock()
            self._failures.append(now)
            self._trim(now)
            if self._state is BreakerState.HALF_OPEN:
                return self._open(now)
            if self._state is BreakerState.CLOSED and len(self._failures) >= self.threshold:
                return self._open(now)
            return None

    def _open(self, now: float) -> BreakerState:
        self._state = BreakerState.OPEN
        self._opened_at = now
        self.opened_count += 1
        return self._state

    def record_success(self) -> BreakerState | None:
        """A probe succeeded; closes a half-open breaker. Returns CLOSED when it did."""
        with self._lock:
            if self._state is BreakerState.HALF_OPEN:
                self._state = BreakerState.CLOSED
                self._failures.clear()
                return self._state
            return None

    def abandon_probe(self) -> None:
        """The probe ended without a verdict: open again, with the next probe allowed at once."""
        with self._lock:
            if self._state is BreakerState.HALF_OPEN:
                self._state = BreakerState.OPEN
                self._opened_at = self._clock() - self.cooldown_s

    def retry_after(self) -> float:
        """Seconds until a probe may run (0 when not open)."""
        with self._lock:
            if self._state is not BreakerState.OPEN:
                return 0.0
            return max(0.0, self._opened_at + self.cooldown_s - self._clock())

    def try_probe(self) -> bool:
        """OPEN and cooled down -> HALF_OPEN, and True for the one caller that may run the probe."""
        with self._lock:
            now = self._clock()
            if self._state is BreakerState.OPEN and now >= self._opened_at + self.cooldown_s:
                self._state = BreakerState.HALF_OPEN
                return True
            return False

    def __repr__(self) -> str:
        return (f"<CircuitBreaker {self._state.value} failures={self.recent_failures()}/{self.threshold} "
                f"in {self.window_s:g}s cooldown={self.cooldown_s:g}s>")


class Admission(str, Enum):
    """What an op's breaker says about one call of it."""

    RUN = "run"        # closed: run it
    PROBE = "probe"    # half-open: this call is the probe; end it with `OpBreakers.probe_done`
    REFUSE = "refuse"  # open (or another call is probing): fail fast with CIRCUIT_OPEN


class OpBreakers:
    """One `CircuitBreaker` per op, made at the op's first crash (ops that never crash cost nothing)."""

    def __init__(self, threshold: int = 5, window_s: float = 30.0, cooldown_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        CircuitBreaker(threshold, window_s, cooldown_s, clock)  # validates the settings once
        self._settings = (threshold, window_s, cooldown_s, clock)
        self._lock = threading.Lock()
        self._by_op: dict[str, CircuitBreaker] = {}

    def get(self, op: str) -> CircuitBreaker | None:
        return self._by_op.get(op)

    def state(self, op: str) -> BreakerState:
        b = self._by_op.get(op)
        return BreakerState.CLOSED if b is None else b.state

    def open_ops(self) -> list[str]:
        """Ops whose breaker is not closed."""
        with self._lock:
            return sorted(op for op, b in self._by_op.items() if b.state is not BreakerState.CLOSED)

    def admit(self, op: str) -> Admission:
        b = self._by_op.get(op)  # the hot path: a dict lookup, no lock, for ops that never crashed
        if b is None or b.state is BreakerState.CLOSED:
            return Admission.RUN
        return Admission.PROBE if b.try_probe() else Admission.REFUSE

    def record_crash(self, op: str) -> BreakerState | None:
        """A worker crashed while running a call of `op`; returns OPEN when this opened its breaker."""
        with self._lock:
            b = self._by_op.get(op)
            if b is None:
                b = self._by_op[op] = CircuitBreaker(*self._settings)
        return b.record_failure()

    def probe_done(self, op: str, crashed_nothing: bool) -> BreakerState | None:
        """The probe call of `op` ended. If it crashed a worker, `record_crash` has opened the breaker
        again already; if it ended otherwise, True closes the breaker (returns CLOSED) and False (its
        worker was killed from outside: no verdict) lets the next call probe."""
        b = self._by_op.get(op)
        if b is None:
            return None
        if crashed_nothing:
            return b.record_success()
        b.abandon_probe()
        return None
