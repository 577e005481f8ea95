"""Streaming ops for the stream tests (loaded with `--ops tests.stream_ops_module`)."""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

import sidecar

_lock = threading.Lock()
_closed = 0     # generators that were closed before they ran out (GeneratorExit)
_finished = 0   # generators that ran out
_produced = 0   # chunks produced, all streams


@sidecar.op("count_up", min_inputs=0, max_inputs=0, idempotent=True)
def count_up(*, n: int = 10, nbytes: int = 0) -> Iterator[Any]:
    """Yields n chunks: (i, an array of nbytes bytes filled with i % 251) or just i."""
    global _closed, _finished, _produced
    try:
        for i in range(int(n)):
            with _lock:
                _produced += 1
            if nbytes:
                yield i, np.full(int(nbytes), i % 251, dtype=np.uint8)
            else:
                yield i
    except GeneratorExit:
        with _lock:
            _closed += 1
        raise
    with _lock:
        _finished += 1


@sidecar.op("big_value_at", min_inputs=0, max_inputs=0)
def big_value_at(*, at: int = 2, n: int = 10, size: int = 5_000_000, nbytes: int = 0) -> Iterator[Any]:
    """`count_up`'s chunks, but chunk `at` is a plain string of `size` bytes (bigger than a message)."""
    chunks = count_up(n=n, nbytes=nbytes)
    try:
        for i, chunk in enumerate(chunks):
            yield "x" * int(size) if i == at else chunk
    finally:
        chunks.close()  # counted as closed when the stream stops before its end


@sidecar.op("ticks", min_inputs=0, max_inputs=0, idempotent=False)
def ticks(*, n: int = 10, every_s: float = 0.0, crash_at: int = -1, fail_at: int = -1) -> Iterator[int]:
    """Yields 0..n-1, sleeping every_s between; SIGKILLs its own worker at crash_at (after that many
    chunks), raises ValueError at fail_at."""
    for i in range(int(n)):
        if i == crash_at:
            os.kill(os.getpid(), 9)
        if i == fail_at:
            raise ValueError(f"tick {i} failed on purpose")
        yield i
        if every_s:
            time.sleep(float(every_s))


@sidecar.op("iterates", min_inputs=1, max_inputs=1)
def iterates(x: Any) -> Iterator[Any]:
    """Returns an iterator (not a generator) over the rows of x."""
    return iter(list(x))


@sidecar.op("stream_stats", min_inputs=0, max_inputs=0, idempotent=False)
def stream_stats() -> dict[str, int]:
    with _lock:
        return {"closed": _closed, "finished": _finished, "produced": _produced}


@sidecar.op("crash_once", min_inputs=0, max_inputs=0, idempotent=True)
def crash_once(*, marker: str, n: int = 5) -> Iterator[int]:
    """SIGKILLs its worker before the first chunk unless `marker` exists (it creates it first), so
    the first worker that runs it dies and the next one streams 0..n-1."""
    if not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), 9)
    yield from range(int(n))


@sidecar.op("worker_state", min_inputs=0, max_inputs=0, idempotent=False)
def worker_state(*, ctx: Any = None) -> dict[str, int]:
    """What the worker holds now: leases, calls running besides this one, arena bytes, RSS."""
    import psutil

    rt = ctx.runtime
    stats = rt.arena.stats()
    with _lock:
        produced = _produced
    return {"leases": rt.leases.count, "running": rt.dispatcher.running - 1,
            "arena_reserved": stats.reserved_bytes, "arena_in_use": stats.in_use_bytes,
            "rss": psutil.Process().memory_info().rss, "produced": produced}


@sidecar.op("chunk_at", min_inputs=0, max_inputs=0, idempotent=True)
def chunk_at(*, i: int = 0, nbytes: int = 0) -> Any:
    """What count_up yields as chunk i, as one unary call (the benchmark's call-per-chunk baseline)."""
    return (i, np.full(int(nbytes), i % 251, dtype=np.uint8)) if nbytes else i
