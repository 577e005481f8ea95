"""Whether a worker that did not answer its health check is computing or hung, asked of the kernel.

A worker's health service, ListOps and telemetry are Python threads: while an op holds the GIL in C
(a regular expression that backtracks, `bytes.count` over a GiB, an extension that never releases
the GIL), none of them can answer, however the server is built; the answer comes when the C call
returns (guides/streaming.md has the figures). What the pool must not do is take such a worker for
a dead one and kill it. The kernel's accounting needs no GIL: a process whose CPU time advanced
while its health check went unanswered is BUSY (computing), one whose CPU time stood still is
unresponsive (deadlocked, stopped, stuck in a blocking call). An op that computes for ever is not
this module's concern: its call's deadline and the worker's cancel grace period recycle it
(guides/crash-barrier.md, "stuck").
"""
from __future__ import annotations

import psutil

__all__ = ["BUSY", "MIN_BUSY_CPU_SHARE", "cpu_seconds", "was_busy"]

BUSY = "BUSY"  # the health status the pool records for a worker that computes instead of answering
# The share of one core the worker must have used during the unanswered check to count as busy.
MIN_BUSY_CPU_SHARE = 0.2


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of the process (all its threads); None when it is gone."""
    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return None
    return float(t.user + t.system)


def was_busy(before: float | None, after: float | None, waited_s: float) -> bool:
    """Whether the CPU time sampled around an unanswered check of `waited_s` seconds says busy."""
    if before is None or after is None or waited_s <= 0:
        return False
    return after - before >= MIN_BUSY_CPU_SHARE * waited_s
