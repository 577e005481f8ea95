"""Ops that crash, hang or allocate on purpose, to test the crash barrier. Never loaded by default.

The worker imports this module only with `sidecar serve --debug-ops`; importing it is what declares
the ops. Each crash is real (a NULL write, abort(), a signal, `_exit`), so the pool sees exactly what a
broken native library would produce.

`SIDECAR_DEBUG_CRASH_FILE=<path>`: while that file exists, a worker started with --debug-ops exits
during start-up with the code written in the file (default 3): a crash loop the host can switch on
and off, used to test the circuit breaker.
"""
from __future__ import annotations

import ctypes
import os
import signal
import time
from typing import Any

from sidecar.worker.registry import op

CRASH_FILE_ENV = "SIDECAR_DEBUG_CRASH_FILE"
_SLEEP_STEP_S = 0.05  # how often a sleeping op looks for cancellation


def _crash_at_start() -> None:
    path = os.environ.get(CRASH_FILE_ENV)
    if not path or not os.path.exists(path):
        return
    try:
        with open(path) as f:
            code = int(f.read().strip() or 3)
    except (OSError, ValueError):
        code = 3
    os.write(2, f"debug_ops: {CRASH_FILE_ENV}={path} exists: exiting with {code} at start-up\n".encode())
    os._exit(code)


_crash_at_start()


@op("debug.segfault", idempotent=False)
def segfault() -> None:
    """Writes to address 0: SIGSEGV."""
    ctypes.memset(0, 1, 1)


@op("debug.abort", idempotent=False)
def abort() -> None:
    """Calls abort(): SIGABRT."""
    os.abort()


@op("debug.fpe", idempotent=False)
def fpe() -> None:
    """Raises SIGFPE in the worker (what an integer division by zero in C does)."""
    signal.raise_signal(signal.SIGFPE)


@op("debug.exit", idempotent=False)
def exit_(*, code: int = 1) -> None:
    """Exits at once with `code` (70 = tainted), skipping every cleanup."""
    os._exit(int(code))


@op("debug.sleep", idempotent=True)
def sleep(*inputs: Any, seconds: float = 0.0, ctx: Any = None) -> Any:
    """Sleeps `seconds` (stops early when the call is cancelled); returns its inputs, or `seconds`."""
    deadline = time.monotonic() + float(seconds)
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or (ctx is not None and ctx.is_cancelled()):
            break
        time.sleep(min(left, _SLEEP_STEP_S))
    if not inputs:
        return float(seconds)
    return inputs[0] if len(inputs) == 1 else tuple(inputs)


@op("debug.alloc", idempotent=True)
def alloc(*, nbytes: int, touch: bool = True) -> int:
    """Allocates `nbytes` of host memory (every page touched unless touch=False); returns nbytes."""
    n = int(nbytes)
    buf = bytearray(n)  # zero-filled by calloc: pages are not touched yet
    if touch and n:
        view = memoryview(buf)
        for i in range(0, n, 4096):
            view[i] = 1
    del buf
    return n


@op("debug.getenv", idempotent=True)
def getenv(*, name: str) -> str | None:
    """The worker's value of environment variable `name` (None when unset): shows GPU placement."""
    return os.environ.get(str(name))


@op("debug.pid", idempotent=True)
def pid() -> int:
    """The worker's process id (tells which worker served a call)."""
    return os.getpid()
