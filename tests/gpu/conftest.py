"""tests/gpu/ runs only where CUDA works: torch sees a GPU and the driver's libcuda.so.1 loads.

Elsewhere every test here is skipped, with the reason (the missing piece) in pytest's summary.
"""
from __future__ import annotations

import functools

import pytest


@functools.lru_cache(maxsize=1)
def why_no_gpu() -> str | None:
    try:
        import torch
    except ImportError as err:
        return f"torch is not importable: {err}"
    if not torch.version.cuda:
        return f"CUDA is absent: torch {torch.__version__} is a CPU-only build"
    if not torch.cuda.is_available():
        return "CUDA is absent: torch sees no CUDA device"
    from sidecar.dataplane import cuda_ipc

    reason = cuda_ipc.unavailable_reason()
    return f"CUDA IPC is unavailable: {reason}" if reason else None


@pytest.fixture(autouse=True, scope="session")
def _require_gpu() -> None:
    # Session-scoped and autouse: it runs before any module fixture starts a worker.
    reason = why_no_gpu()
    if reason:
        pytest.skip(reason)
