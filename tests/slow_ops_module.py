"""Ops for transport tests: a slow op that honours cancellation, and counters to prove what ran.

Loaded into real workers with `--ops tests.slow_ops_module`.
"""
from __future__ import annotations

import threading
import time
from typing import Any

import sidecar

_lock = threading.Lock()
_finished = 0
_running = 0
_peak = 0


@sidecar.op("slow", idempotent=False)
def slow(x: Any, *, seconds: float = 1.0, ctx: Any = None) -> Any:
    """Returns x after `seconds`, stopping early (with the input) once the caller has gone."""
    global _finished, _running, _peak
    with _lock:
        _running += 1
        _peak = max(_peak, _running)
    try:
        deadline = time.monotonic() + float(seconds)
        while time.monotonic() < deadline:
            if ctx is not None and ctx.is_cancelled():
                break
            time.sleep(0.01)
    finally:
        with _lock:
            _running -= 1
            _finished += 1
    return x


@sidecar.op("finished_count", min_inputs=0, max_inputs=0)
def finished_count() -> int:
    """How many `slow` calls ended (ran out or noticed cancellation) in this worker."""
    with _lock:
        return _finished


@sidecar.op("peak_concurrency", min_inputs=0, max_inputs=0, idempotent=False)
def peak_concurrency(*, reset: bool = False) -> int:
    """The most `slow` calls that ran at the same time (since start or the last reset)."""
    global _peak
    with _lock:
        peak = _peak
        if reset:
            _peak = _running
    return peak


@sidecar.op("num_threads", min_inputs=0, max_inputs=0)
def num_threads() -> dict:
    """torch's intra-op thread count and the OpenMP variable the worker runs with."""
    import os

    import torch

    return {"torch": torch.get_num_threads(), "omp": os.environ.get("OMP_NUM_THREADS", "")}


@sidecar.op("boom")
def boom(*, message: str = "boom") -> None:
    """Raises a KeyError from user code (OP_FAILED keeps the type and traceback)."""
    raise KeyError(message)


@sidecar.op("taint_self", min_inputs=0, max_inputs=0, idempotent=False)
def taint_self(*, ctx: Any = None) -> str:
    """Marks the worker's device as unusable, as a sticky CUDA error would (the worker then exits 70)."""
    ctx.runtime.dispatcher._taint("taint_self test op")
    return "tainted"
