"""How many compute threads a worker uses, and the environment that caps BLAS/OpenMP to it.

Both sides apply it: a worker before it imports torch, and the pool's template (host side) before
it preloads the libraries its forked workers inherit, since BLAS reads its thread count when it is
loaded. Nothing here imports anything heavy.
"""
from __future__ import annotations

import os

THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "BLIS_NUM_THREADS",
              "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_threads() -> int:
    """Compute threads per worker: $SIDECAR_THREADS, else half the usable CPUs capped at 8.

    Several workers usually share a machine; each running a full-width OpenMP pool makes them
    oversubscribe the cores and all slow down. A pool that knows its size passes --threads.
    """
    env = os.environ.get("SIDECAR_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, min(8, cpu_count() // 2))


def cap_thread_env(threads: int) -> None:
    """Set the BLAS/OpenMP thread variables (only those the user has not set) before torch is imported."""
    for name in THREAD_ENV:
        os.environ.setdefault(name, str(threads))
