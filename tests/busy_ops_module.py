"""Ops that keep a worker busy for a while, in the three ways an op can (`--ops tests.busy_ops_module`):
Python bytecode (holds the GIL, but lets other threads in every switch interval), torch kernels
(release the GIL), and one C call that holds the GIL throughout (a backtracking regex: `re` never
releases it)."""
from __future__ import annotations

import re
import time
from typing import Any

import torch

import sidecar

_BACKTRACK = re.compile(r"(a+)+b")


@sidecar.op("spin", min_inputs=0, max_inputs=0)
def spin(*, seconds: float = 1.0, ctx: Any = None) -> int:
    """Pure-Python arithmetic for `seconds` (stops early once cancelled); returns the loop count."""
    deadline = time.monotonic() + float(seconds)
    n = 0
    while time.monotonic() < deadline and not (ctx is not None and ctx.is_cancelled()):
        for _ in range(1000):
            n += 1
    return n


@sidecar.op("matmuls", min_inputs=0, max_inputs=0)
def matmuls(*, seconds: float = 1.0, size: int = 256, ctx: Any = None) -> int:
    """torch matmuls (GIL released inside each) for `seconds` (stops early once cancelled); returns how many."""
    a = torch.randn(int(size), int(size))
    deadline = time.monotonic() + float(seconds)
    n = 0
    while time.monotonic() < deadline and not (ctx is not None and ctx.is_cancelled()):
        torch.mm(a, a)
        n += 1
    return n


def _backtrack_length(seconds: float) -> int:
    """The subject length whose one match takes about `seconds` here (each extra 'a' doubles it)."""
    n, took = 16, 0.0
    while took < seconds / 2 ** 3:
        n += 1
        t = time.perf_counter()
        _BACKTRACK.match("a" * n)
        took = time.perf_counter() - t
    return n + 3


@sidecar.op("hold_gil", min_inputs=0, max_inputs=0)
def hold_gil(*, seconds: float = 1.0) -> float:
    """One C call that holds the GIL for about `seconds` (at least): returns how long it took."""
    subject = "a" * _backtrack_length(float(seconds))
    t = time.perf_counter()
    _BACKTRACK.match(subject)
    return time.perf_counter() - t
