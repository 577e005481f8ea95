"""Ops for the data-plane safety tests (tests/test_dataplane_safety.py): careless ops that write into
their inputs, outputs of chosen sizes, an op that truncates its own input's segment.

Loaded into real workers with `--ops tests.dataplane_ops_module`. Ops that meet each other wait on
files (conditions), never on fixed sleeps.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

import sidecar

_WAIT_S = 30.0  # a deadline that only stops a broken test, never a synchronisation


def _wait_for(path: Path) -> None:
    deadline = time.monotonic() + _WAIT_S
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear")
        time.sleep(0.002)


@sidecar.op("dp.mul2_inplace")
def mul2_inplace(x: torch.Tensor) -> torch.Tensor:
    """The careless op: doubles its input in place and returns it."""
    return x.mul_(2)


@sidecar.op("dp.write_then_wait")
def write_then_wait(x: torch.Tensor, *, sync_dir: str) -> float:
    """Writes -1 into every element of its input, says so (file `written`), waits for `read`, then
    returns the sum it sees (its own writes)."""
    d = Path(sync_dir)
    x.fill_(-1)
    (d / "written").touch()
    _wait_for(d / "read")
    return float(x.sum())


@sidecar.op("dp.sum_after_write")
def sum_after_write(x: torch.Tensor, *, sync_dir: str) -> float:
    """Waits until the concurrent `dp.write_then_wait` has written its input, sums the same segment,
    then lets the writer finish."""
    d = Path(sync_dir)
    _wait_for(d / "written")
    total = float(x.sum())
    (d / "read").touch()
    return total


@sidecar.op("dp.fill")
def fill(*, n: int, value: int) -> torch.Tensor:
    """`n` bytes of `value` (uint8)."""
    return torch.full((int(n),), int(value), dtype=torch.uint8)


@sidecar.op("dp.broadcast")
def broadcast(*, n: int) -> torch.Tensor:
    """A float32 tensor of `n` zeros that takes 4 bytes of memory (a stride-0 view): encoding it needs
    an arena block of 4*n bytes."""
    return torch.zeros(1).expand(int(n))


@sidecar.op("dp.truncate_then_sum", idempotent=False)
def truncate_then_sum(x: torch.Tensor, *, size: int) -> float:
    """Truncates the segment its input lies in to `size` bytes, then reads all of the input: what a
    host that truncates a segment during an op does to the worker (SIGBUS)."""
    os.truncate(mapped_file(x.data_ptr()), int(size))
    return float(x.sum())


def mapped_file(address: int) -> str:
    """The file this process maps at `address` (from /proc/self/maps), e.g. /dev/shm/sc-..."""
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            lo, hi = (int(v, 16) for v in parts[0].split("-"))
            if lo <= address < hi and len(parts) >= 6:
                return parts[5]
    raise LookupError(f"{address:#x} is not in a file mapping")
