"""A circuit breaker for worker crashes.

CLOSED: crashes are counted in a sliding window; `threshold` of them within `window_s` open it.
OPEN: the pool fails calls fast with CIRCUIT_OPEN and starts no worker, for `cooldown_s`.
HALF_OPEN: after the cool-down one probe (a single worker start) is allowed; its success closes the
breaker (and clears the window), its failure opens it again for another cool-down.

Pure state machine (no threads, injectable clock) so it is tested on its own; the pool drives it.
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
        self._probing = False
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
        """Counts a crash; returns the new state when this changed it (OPEN), else None."""
        with self._lock:
            now = self._clock()
            self._failures.append(now)
            self._trim(now)
            if self._state is BreakerState.HALF_OPEN:
                self._probing = False
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
        """A probe (or any start) succeeded; closes a half-open breaker. Returns CLOSED when it did."""
        with self._lock:
            if self._state is BreakerState.HALF_OPEN:
                self._state = BreakerState.CLOSED
                self._probing = False
                self._failures.clear()
                return self._state
            return None

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
                self._probing = True
                return True
            return False

    def __repr__(self) -> str:
        return (f"<CircuitBreaker {self._state.value} failures={self.recent_failures()}/{self.threshold} "
                f"in {self.window_s:g}s cooldown={self.cooldown_s:g}s>")
