"""Arena: reuse of warm segments, statistics, find(), thread safety, no page faults when warm."""
from __future__ import annotations

import gc
import os
import random
import resource

import numpy as np
import pytest

from sidecar import _native
from sidecar.dataplane import reaper
from sidecar.dataplane.arena import MIN_CLASS, Arena, size_class
from sidecar.dataplane.names import make_name, parse_name
from sidecar.dataplane.segments import segment_path
from sidecar.errors import OutOfMemory
from sidecar.protocol.refs import ShmStorage
from tests.workers import session_run

MiB = 1 << 20


@pytest.fixture
def arena():
    a = Arena(session_run("tarena"), max_cached_bytes=64 * MiB)
    yield a
    a.close()


def test_size_classes():
    assert size_class(0) == size_class(1) == size_class(MIN_CLASS) == MIN_CLASS
    prev = 0
    for n in [MIN_CLASS + 1, 100_000, MiB - 1, MiB, MiB + 1, 5 * MiB + 3, 1 << 30, (1 << 33) + 7]:
        c = size_class(n)
        assert n <= c <= n * 1.25 + 1 and c % 4096 == 0 and c >= prev
        prev = c
    assert size_class(MiB + 1) == MiB + MiB // 4
    assert len({size_class(n) for n in range(MiB + 1, 2 * MiB + 1, 4096)}) == 4  # (1, 2] MiB


def test_alloc_write_release_reuse(arena):
    b = arena.alloc(MiB + 10)
    assert (b.nbytes, b.capacity, b.offset) == (MiB + 10, size_class(MiB + 10), 0)
    assert parse_name(b.name).pid == os.getpid() and parse_name(b.name).run == session_run("tarena")
    assert b.inode == os.stat(segment_path(b.name)).st_ino
    mv = b.buffer()
    assert len(mv) == b.nbytes and not mv.readonly
    mv[:3] = b"abc"
    arr = b.ndarray(np.float32, (16, 4))
    assert arr.ctypes.data == b.address and arr.shape == (16, 4)
    assert b.storage() == ShmStorage(b.name, 0, MiB + 10, b.inode)
    with pytest.raises(ValueError):
        b.ndarray(np.float64, (MiB,))
    s = arena.stats()
    assert (s.in_use_bytes, s.cached_bytes, s.reserved_bytes, s.hits, s.misses, s.segments) == \
        (b.capacity, 0, b.capacity, 0, 1, 1)
    del mv, arr
    b.release()
    b.release()  # idempotent
    assert b.released
    with pytest.raises(ValueError, match="released"):
        b.buffer()
    s = arena.stats()
    assert (s.in_use_bytes, s.cached_bytes, s.segments) == (0, b.capacity, 1)
    assert segment_path(b.name).exists()  # kept warm, not unlinked

    c = arena.alloc(MiB + 100)  # same class: the same warm segment
    assert c.name == b.name and c.nbytes == MiB + 100
    assert bytes(c.buffer()[:3]) == b"abc"  # reused memory is not cleared (callers overwrite it)
    d = arena.alloc(MiB + 100)  # the cached one is taken: a new segment
    assert d.name != c.name
    s = arena.stats()
    assert (s.hits, s.misses, s.segments, s.in_use_bytes, s.cached_bytes) == (1, 2, 2, 2 * c.capacity, 0)
    with c:
        pass
    assert c.released
    d.release()


def test_find(arena):
    a, b = arena.alloc(200_000), arena.alloc(3 * MiB)
    arr = b.ndarray(np.int64, (3 * MiB // 8,))
    assert arena.find(b.address, b.nbytes) == (b, 0)
    part = arr[1000:2000]
    assert arena.find(part.ctypes.data, part.nbytes) == (b, 8000)
    assert arena.find(a.address + 5, 10) == (a, 5)
    assert arena.find(a.address + a.capacity - 4, 8) is None  # runs off the end
    assert arena.find(a.address - 1, 1) is None or arena.find(a.address - 1, 1)[0] is not a
    other = np.zeros(1000)
    assert arena.find(other.ctypes.data, other.nbytes) is None
    assert arena.find(0, 0) is None
    del arr, part
    b.release()
    assert arena.find(b.address, 10) is None  # cached blocks are not live
    a.release()


def test_eviction_trim_and_close_unlink(arena):
    small = Arena(session_run("tarena"), max_cached_bytes=300_000)
    try:
        blocks = [small.alloc(128 << 10) for _ in range(3)]
        names = [b.name for b in blocks]
        for b in blocks:
            b.release()
        s = small.stats()
        assert s.cached_bytes == 2 * (128 << 10) and s.segments == 2
        assert not segment_path(names[0]).exists() and segment_path(names[2]).exists()  # oldest evicted
        big = small.alloc(400_000)  # bigger than the whole cache: unlinked at release
        big.release()
        assert not segment_path(big.name).exists()
        assert small.trim() == 2 * (128 << 10)
        assert small.stats().reserved_bytes == 0 and reaper.list_segments(arena.run_id) == []
    finally:
        small.close()

    live = arena.alloc(MiB)
    view = live.ndarray(np.uint8, (MiB,))
    cached = arena.alloc(MiB)
    cached.release()
    arena.close()
    assert not segment_path(live.name).exists() and not segment_path(cached.name).exists()
    view[:] = 7  # the mapping outlives close/unlink while a view exists
    assert int(view.sum()) == 7 * MiB
    live.release()  # harmless after close
    with pytest.raises(ValueError, match="closed"):
        arena.alloc(10)
    arena.close()


def test_arena_dropped_without_close_unlinks_its_segments():
    a = Arena(session_run("tarena"))
    b = a.alloc(100)
    name = b.name
    del a, b
    gc.collect()
    assert not segment_path(name).exists()


def test_out_of_memory_is_clean(arena):
    free = os.statvfs("/dev/shm").f_bavail * os.statvfs("/dev/shm").f_frsize
    keep = arena.alloc(MiB)
    keep.release()
    with pytest.raises(OutOfMemory) as ei:
        arena.alloc(free + (1 << 30))
    e = ei.value
    assert e.device == "shm" and e.requested_bytes >= free + (1 << 30) and e.total_bytes > 0
    s = arena.stats()
    assert s.in_use_bytes == 0 and s.cached_bytes == 0  # it gave back its warm memory and retried
    assert reaper.list_segments(arena.run_id) == []


def test_threads_alloc_and_release(arena, run_threads):
    sizes = [1000, 70_000, 200_000, 300_000, 1 << 20]

    def work(tid: int) -> None:
        rng = random.Random(tid)
        held = []
        for _ in range(150):
            b = arena.alloc(rng.choice(sizes))
            arr = b.ndarray(np.uint8, (b.nbytes,))
            arr[:] = tid
            held.append((b, arr))
            assert arena.find(b.address, b.nbytes) == (b, 0)
            if len(held) > 3 or rng.random() < 0.5:
                blk, a = held.pop(rng.randrange(len(held)))
                assert (a == tid).all(), "another thread wrote into a block it did not own"
                del a
                blk.release()
        for blk, a in held:
            assert (a == tid).all()
            blk.release()

    errors = run_threads(work, range(1, 5))
    assert not errors, errors
    s = arena.stats()
    assert s.in_use_bytes == 0 and s.hits + s.misses == 4 * 150 and s.hits > s.misses
    assert s.reserved_bytes == s.cached_bytes and len(reaper.list_segments(arena.run_id)) == s.segments


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def test_warm_alloc_does_not_page_fault(arena):
    n = 8 * MiB
    pages = n // 4096
    arena.alloc(n).release()  # warm the class

    before = minor_faults()
    b = arena.alloc(n)
    b.ndarray(np.uint8, (n,)).fill(1)
    warm = minor_faults() - before
    b.release()

    # The same measurement on a fresh, not pre-faulted segment shows what it would cost otherwise.
    name = make_name(session_run("tarena"))
    cold_seg = _native.Segment.create(name, n, prefault=False)
    try:
        before = minor_faults()
        np.frombuffer(cold_seg, dtype=np.uint8).fill(1)
        cold = minor_faults() - before
    finally:
        cold_seg.close()
        _native.unlink(name)
    assert cold >= pages // 2, f"measurement broken: cold write of {pages} pages saw {cold} faults"
    assert warm < pages // 20, f"warm alloc + write of {pages} pages saw {warm} minor faults"


def test_a_cached_segment_unlinked_or_truncated_by_someone_else_is_never_handed_out(arena):
    gone, cut = arena.alloc(100_000), arena.alloc(100_000)
    names = {gone.name, cut.name}
    gone.release()
    cut.release()
    _native.unlink(gone.name)  # another process of the same uid removed it ...
    os.truncate("/dev/shm" + cut.name, 4096)  # ... or truncated it (touching it would be a SIGBUS)
    fresh = arena.alloc(100_000)
    assert fresh.name not in names and os.path.getsize("/dev/shm" + fresh.name) == fresh.capacity
    fresh.ndarray(np.uint8, 100_000)[:] = 1  # writable all the way: a new segment
    assert arena.stats().cached_bytes == 0 and arena.stats().segments == 1
    fresh.release()


def test_a_forked_child_never_shares_the_parents_free_list(arena):
    """Memory rule 9: after fork() the child's arena starts over. The parent's warm block is not
    handed out in the child, a block the child inherited is not put on any free list by its release,
    and the child's own segments are its own (named for its pid) and unlinked by it."""
    warm = arena.alloc(MIN_CLASS)
    warm_name = warm.name
    warm.release()  # on the parent's free list now
    held = arena.alloc(MIN_CLASS * 2)
    held.ndarray(np.uint8, (held.nbytes,))[:] = 7
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report what it saw, never return into pytest
        code = 1
        try:
            held.release()  # inherited: a no-op here
            mine = arena.alloc(MIN_CLASS)
            ok = (mine.name != warm_name and parse_name(mine.name).pid == os.getpid()
                  and arena.stats().segments == 1 and arena.find(held.address, 1) is None)
            mine.release()
            arena.close()  # unlinks only the child's own segment
            ok = ok and not os.path.exists(segment_path(mine.name))
            os.write(w, b"ok" if ok else b"bad")
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    answer = os.read(r, 16)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and answer == b"ok", answer
    # The parent's segments are untouched: the held block still holds its bytes, the warm one is reused.
    assert os.path.exists(segment_path(held.name)) and (held.ndarray(np.uint8, (held.nbytes,)) == 7).all()
    again = arena.alloc(MIN_CLASS)
    assert again.name == warm_name
    again.release()
    held.release()
