"""Ops for the pool's supervision tests (`--ops tests.pool_ops_module`): one that ignores
cancellation, one that crashes its worker for as long as a file exists."""
from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Iterator

import sidecar


@sidecar.op("hang", min_inputs=0, max_inputs=0, idempotent=False)
def hang(*, seconds: float = 600.0) -> float:
    """Sleeps `seconds` without ever looking at cancellation (a blocking call in a native library)."""
    time.sleep(float(seconds))
    return float(seconds)


@sidecar.op("crash_while", min_inputs=0, max_inputs=0)
def crash_while(*, path: str) -> str:
    """Segfaults while `path` exists (a bug that is later fixed); else returns "fine". Idempotent."""
    if os.path.exists(path):
        ctypes.memset(0, 1, 1)
    return "fine"


@sidecar.op("stream_crash_while", min_inputs=0, max_inputs=0)
def stream_crash_while(*, path: str) -> Iterator[str]:
    """A streaming `crash_while`: segfaults before its first chunk while `path` exists."""
    if os.path.exists(path):
        ctypes.memset(0, 1, 1)
    yield "fine"
