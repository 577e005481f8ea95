"""Ops for the GPU tests, loaded into real CUDA workers with `--ops tests.gpu.gpu_ops_module`.

They report what only the worker can see (its CUDA memory, its CUDA IPC handle cache) and provoke
the GPU failures the worker must survive (out of memory) or be replaced after (an illegal address).
"""
from __future__ import annotations

import gc
from typing import Any

import torch

import sidecar
from sidecar import _cudaipc
from sidecar.dataplane import cuda_ipc

_held: list[torch.Tensor] = []


@sidecar.op("gpu.negate")
def negate(x: torch.Tensor) -> torch.Tensor:
    """-x in fresh worker memory: proves the worker read the input and the host reads the output."""
    return torch.neg(x)


@sidecar.op("gpu.same")
def same(x: torch.Tensor) -> torch.Tensor:
    """Returns the input tensor object itself (its memory is the caller's, mapped by IPC)."""
    return x


@sidecar.op("gpu.checksum")
def checksum(x: torch.Tensor) -> list[float]:
    """[sum in float64, device, data_ptr] of the input, as the worker sees it."""
    return [float(x.double().sum().item()), str(x.device), int(x.data_ptr())]


@sidecar.op("gpu.fill", min_inputs=0, max_inputs=0)
def fill(*, nbytes: int, value: float = 1.0, ctx: Any = None) -> torch.Tensor:
    """A new float32 tensor of `nbytes` bytes filled with `value`, on the worker's device."""
    return torch.full((int(nbytes) // 4,), float(value), dtype=torch.float32, device=ctx.device)


@sidecar.op("gpu.memory", min_inputs=0, max_inputs=0)
def memory(ctx: Any = None) -> dict[str, int]:
    """torch.cuda's figures for the worker's device, after a garbage collection."""
    gc.collect()
    torch.cuda.synchronize(ctx.device)
    return {"allocated": int(torch.cuda.memory_allocated(ctx.device)),
            "reserved": int(torch.cuda.memory_reserved(ctx.device))}


@sidecar.op("gpu.ipc_stats", min_inputs=0, max_inputs=0)
def ipc_stats() -> dict[str, int]:
    """This worker's CUDA IPC handle cache counters (sidecar.dataplane.cuda_ipc.cache_stats)."""
    gc.collect()
    return cuda_ipc.cache_stats()


@sidecar.op("gpu.hold")
def hold(x: torch.Tensor) -> int:
    """Keeps the input alive in the worker (its mapping stays open) until gpu.drop."""
    _held.append(x)
    return len(_held)


@sidecar.op("gpu.drop", min_inputs=0, max_inputs=0)
def drop() -> int:
    n = len(_held)
    _held.clear()
    gc.collect()
    return n


@sidecar.op("gpu.alloc", min_inputs=0, max_inputs=0, idempotent=False)
def alloc(*, nbytes: int, ctx: Any = None) -> int:
    """Allocates `nbytes` on the device and frees it (an oversized request is a CUDA OOM)."""
    t = torch.empty(int(nbytes), dtype=torch.uint8, device=ctx.device)
    return int(t.numel())


@sidecar.op("gpu.illegal_address", min_inputs=0, max_inputs=0, idempotent=False)
def illegal_address(ctx: Any = None) -> float:
    """Writes through a device pointer that maps nothing: a sticky 'illegal memory access' error."""
    bogus = 0x1000  # the first pages of the address space: mapped by nothing, on the host or the GPU
    capsule = _cudaipc.dlpack(bogus, ctx.device.index or 0, 2, 32, [1 << 20], [1], lambda: None)
    t = torch.utils.dlpack.from_dlpack(capsule)
    t.fill_(1.0)
    torch.cuda.synchronize(ctx.device)
    return float(t.sum().item())
