"""The timing loop every benchmark here shares (the scripts import it as a sibling module)."""
from __future__ import annotations

import gc
import time
from typing import Any, Callable


def sample_us(fn: Callable[[], Any], repeat: int, warmup: int = 2, *, quiet_gc: bool = False) -> list[float]:
    """Microseconds per call of `fn`, `repeat` samples after `warmup` untimed calls.

    With `quiet_gc` the collector is off while a sample is timed and runs (generation 0) between
    samples, so a collection never lands inside a sub-millisecond sample.
    """
    for _ in range(warmup):
        fn()
    out: list[float] = []
    if quiet_gc:
        gc.disable()
    try:
        for _ in range(repeat):
            t0 = time.perf_counter_ns()
            fn()
            out.append((time.perf_counter_ns() - t0) / 1e3)
            if quiet_gc:
                gc.collect(0)
    finally:
        if quiet_gc:
            gc.enable()
    return out
