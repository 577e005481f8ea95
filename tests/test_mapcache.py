"""MappingCache: hits without syscalls, (name, inode) keys, LRU bounds, writable upgrades, threads."""
from __future__ import annotations

import gc
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from sidecar import _native
from sidecar._native import Segment
from sidecar.dataplane.mapcache import MapCacheStats, MappingCache
from sidecar.dataplane.names import make_name
from sidecar.errors import InvalidTensorRef
from tests.workers import session_run


@pytest.fixture
def made():
    """Creates segments (name, size, fill byte) and unlinks whatever is left at the end."""
    names: list[str] = []

    def make(size: int = 4096, fill: int = 0, name: str | None = None) -> Segment:
        n = name or make_name(session_run("tmapc"))
        seg = Segment.create(n, size)
        memoryview(seg)[:] = bytes([fill]) * size
        names.append(n)
        return seg

    yield make
    for n in set(names):
        try:
            _native.unlink(n)
        except FileNotFoundError:
            pass


def test_hit_is_a_lookup(made):
    src = made(8192, 5)
    cache = MappingCache()
    m = cache.get(src.name)
    assert not m.writable and m.size == 8192 and m.inode == src.inode and memoryview(m)[0] == 5
    assert cache.get(src.name) is m and cache.get(src.name, src.inode) is m
    assert cache.stats() == MapCacheStats(hits=2, misses=1, entries=1, bytes=8192)
    cache.clear()
    assert m.closed and cache.stats().entries == 0


def test_recreated_name_is_never_served_stale(made):
    old = made(4096, 1)
    cache = MappingCache()
    m_old = cache.get(old.name, old.inode)
    view = np.frombuffer(m_old, dtype=np.uint8)
    _native.unlink(old.name)
    new = made(8192, 2, name=old.name)  # same name, new segment
    assert new.inode != old.inode
    m_new = cache.get(old.name)  # inode unknown: one stat finds the new inode
    assert m_new is not m_old and m_new.inode == new.inode and m_new.size == 8192 and memoryview(m_new)[0] == 2
    assert m_old.closed and view[0] == 1  # the stale mapping is closed, its live view still valid
    assert cache.get(old.name, new.inode) is m_new
    with pytest.raises(InvalidTensorRef, match="re-created") as ei:
        cache.get(old.name, old.inode + 10**9)  # a descriptor for some other incarnation
    assert ei.value.field == "name"
    assert cache.stats().entries == 1
    del view
    gc.collect()
    assert m_old.address == 0  # unmapped once the view went away


def test_writable_request_upgrades_read_only_mapping(made):
    src = made(4096, 0)
    cache = MappingCache()
    ro = cache.get(src.name, src.inode)
    rw = cache.get(src.name, src.inode, writable=True)
    assert not ro.writable and rw.writable and ro.closed
    memoryview(rw)[0] = 77
    assert memoryview(src)[0] == 77
    assert cache.get(src.name, src.inode) is rw  # a writable mapping serves read requests
    assert cache.stats().entries == 1


def test_lru_bounds_by_count_and_bytes(made):
    segs = [made(4096 * (i + 1), i) for i in range(5)]
    cache = MappingCache(max_entries=3)
    maps = [cache.get(s.name, s.inode) for s in segs[:3]]
    cache.get(segs[0].name, segs[0].inode)  # touch: 1 is now the oldest
    held = np.frombuffer(maps[1], dtype=np.uint8)
    cache.get(segs[3].name, segs[3].inode)
    assert maps[1].closed and not maps[0].closed and not maps[2].closed
    assert held[0] == 1  # evicted while a view lives: still mapped
    assert cache.stats().entries == 3

    by_bytes = MappingCache(max_bytes=4096 * 6)
    a = by_bytes.get(segs[0].name)  # 4 KiB
    b = by_bytes.get(segs[1].name)  # 8 KiB
    c = by_bytes.get(segs[4].name)  # 20 KiB: pushes out both older ones
    assert a.closed and b.closed and not c.closed
    assert by_bytes.stats().bytes == 4096 * 5
    huge = MappingCache(max_bytes=4096)
    h = huge.get(segs[2].name)  # bigger than the whole cache: returned, not cached
    assert not h.closed and huge.stats().entries == 0
    assert by_bytes.evict(segs[4].name) == 1 and c.closed and by_bytes.evict(segs[4].name) == 0
    for cch in (cache, by_bytes, huge):
        cch.clear()


def test_bad_and_missing_names():
    cache = MappingCache()
    for name in ("/etc/passwd", "/sc-x-1-zz", "sc-x-1-0123abcd", 5):
        with pytest.raises(InvalidTensorRef) as ei:
            cache.get(name)
        assert ei.value.field == "name"
    missing = make_name(session_run("tmapc"))
    for inode in (0, 12345):
        with pytest.raises(InvalidTensorRef, match="does not exist"):
            cache.get(missing, inode)
    assert cache.stats().entries == 0


def test_threads_share_one_mapping_per_segment(made, run_threads):
    segs = [made(4096, i) for i in range(4)]
    cache = MappingCache(max_entries=3)  # small: eviction races with lookups

    def work(tid: int) -> None:
        for i in range(300):
            s = segs[(i + tid) % 4]
            m = cache.get(s.name, s.inode if i % 2 else 0)
            assert m.inode == s.inode and m.size == 4096

    errors = run_threads(work, range(4))
    assert not errors, errors
    st = cache.stats()
    assert st.hits + st.misses == 4 * 300 and st.entries == 3
    cache.clear()


def test_child_process_maps_through_cache_and_writes(made):
    src = made(4096, 3)
    code = textwrap.dedent("""
        import sys
        from sidecar.dataplane.mapcache import MappingCache
        cache = MappingCache()
        m = cache.get(sys.argv[1], int(sys.argv[2]), writable=True)
        assert cache.get(sys.argv[1], int(sys.argv[2]), writable=True) is m
        mv = memoryview(m)
        print(mv[0])
        mv[1] = 99
    """)
    out = subprocess.run([sys.executable, "-c", code, src.name, str(src.inode)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "3" and memoryview(src)[1] == 99


def test_map_and_unmap_hooks_see_each_cached_mapping_once(made):
    """The hooks a CUDA worker uses to page-lock its inputs: once per mapping, undone before it goes."""
    a, b = made(4096, 1), made(4096, 2)
    mapped: list[str] = []
    unmapped: list[tuple[str, bool]] = []
    cache = MappingCache(max_entries=1, on_map=lambda s: mapped.append(s.name),
                         on_unmap=lambda s: unmapped.append((s.name, s.closed)))
    cache.get(a.name)
    cache.get(a.name)  # a hit: no second registration
    assert mapped == [a.name] and unmapped == []
    cache.get(b.name)  # evicts a (max_entries=1): unregistered while still mapped
    assert mapped == [a.name, b.name] and unmapped == [(a.name, False)]
    cache.clear()
    assert unmapped == [(a.name, False), (b.name, False)]
