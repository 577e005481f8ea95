"""sidecar._native: real POSIX shared memory, real views from NumPy/torch/pyarrow, a real child process."""
from __future__ import annotations

import ctypes
import gc
import io
import os
import stat
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pytest
import torch

from sidecar import _native
from sidecar._native import Segment
from sidecar.dataplane.names import make_name
from tests.workers import session_run

RUN = session_run("tnative")


@pytest.fixture
def name():
    """A fresh valid name; unlinked after the test whatever happened."""
    n = make_name(RUN)
    yield n
    try:
        _native.unlink(n)
    except FileNotFoundError:
        pass


def shm_file(name: str) -> str:
    return "/dev/shm/" + name.lstrip("/")


def test_create_open_close_unlink(name):
    seg = Segment.create(name, 3 * 4096 + 5)
    assert (seg.name, seg.size, seg.writable, seg.closed, seg.exports) == (name, 3 * 4096 + 5, True, False, 0)
    st = os.stat(shm_file(name))
    assert seg.inode == st.st_ino and st.st_size == seg.size
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_blocks * 512 >= seg.size  # space reserved up front by posix_fallocate
    assert seg.address != 0

    memoryview(seg)[:5] = b"hello"
    ro = Segment.open(name)
    assert (ro.size, ro.inode, ro.writable) == (seg.size, seg.inode, False)
    assert ro.address != seg.address and bytes(memoryview(ro)[:5]) == b"hello"

    seg.close()
    seg.close()  # idempotent
    assert seg.closed and seg.address == 0
    with pytest.raises(ValueError, match="closed"):
        memoryview(seg)
    with ro:
        pass
    assert ro.closed
    _native.unlink(name)
    assert not os.path.exists(shm_file(name))
    with pytest.raises(FileNotFoundError, match="sc-"):
        _native.unlink(name)
    with pytest.raises(FileNotFoundError):
        Segment.open(name)


def test_zero_size_segment(name):
    seg = Segment.create(name, 0)
    assert seg.size == 0 and len(memoryview(seg)) == 0
    assert np.frombuffer(seg, dtype=np.uint8).shape == (0,)
    assert Segment.open(name).size == 0
    seg.close()


def test_no_fd_kept_open(name):
    fds_before = set(os.listdir("/proc/self/fd"))
    segs = [Segment.create(name, 4096)] + [Segment.open(name) for _ in range(5)]
    assert set(os.listdir("/proc/self/fd")) <= fds_before | {str(max(map(int, fds_before)) + 1)}
    for s in segs:
        s.close()


def test_o_excl_collision(name):
    seg = Segment.create(name, 4096)
    memoryview(seg)[0] = 42
    with pytest.raises(FileExistsError, match=name):
        Segment.create(name, 8192)
    # the existing segment is untouched (not truncated, not unlinked)
    assert os.stat(shm_file(name)).st_size == 4096 and memoryview(seg)[0] == 42
    seg.close()


def test_readonly_segment_refuses_writable_buffer(name):
    Segment.create(name, 4096).close()
    ro = Segment.open(name)
    mv = memoryview(ro)
    assert mv.readonly
    with pytest.raises(TypeError):
        mv[0] = 1
    arr = np.frombuffer(ro, dtype=np.uint8)
    assert not arr.flags.writeable
    # Anything asking for a writable buffer is refused (C raises BufferError; some callers rewrap it).
    with pytest.raises((BufferError, TypeError)):
        io.BytesIO(b"x").readinto(ro)
    with pytest.raises((BufferError, TypeError)):
        (ctypes.c_char * 1).from_buffer(ro)
    del mv, arr
    rw = Segment.open(name, writable=True)
    assert not memoryview(rw).readonly
    ro.close()
    rw.close()


def test_bad_arguments(name):
    with pytest.raises(ValueError, match=">= 0"):
        Segment.create(name, -1)
    with pytest.raises(ValueError, match="NUL"):
        Segment.create(name + "\0x", 10)
    with pytest.raises(TypeError):
        Segment.create(b"/x", 10)
    with pytest.raises(TypeError):
        Segment()
    assert not os.path.exists(shm_file(name))


def test_views_are_zero_copy(name):
    seg = Segment.create(name, 1 << 20)
    a = np.frombuffer(seg, dtype=np.float32)
    # torch.frombuffer releases the buffer at once and keeps only a reference to its argument, so it
    # must be given a memoryview (which holds the export), never the segment itself.
    t = torch.frombuffer(memoryview(seg), dtype=torch.float32)
    b = pa.py_buffer(seg)
    assert a.ctypes.data == t.data_ptr() == b.address == seg.address
    assert seg.exports == 3
    a[:4] = [1, 2, 3, 4]
    assert t[:4].tolist() == [1, 2, 3, 4]
    assert np.frombuffer(b, dtype=np.float32)[3] == 4
    del a, t, b
    gc.collect()
    assert seg.exports == 0
    seg.close()


def test_close_while_exported_keeps_view_valid(name):
    seg = Segment.create(name, 1 << 20)
    addr = seg.address
    arr = np.frombuffer(seg, dtype=np.uint8)
    ten = torch.frombuffer(memoryview(seg), dtype=torch.uint8)
    seg.close()
    assert seg.closed and seg.address == addr  # unmap deferred
    _native.unlink(name)  # unlink never unmaps either
    arr[:] = 9  # would SIGSEGV if the mapping were gone
    assert int(ten.sum()) == 9 * (1 << 20)
    with pytest.raises(ValueError):
        memoryview(seg)  # no new exports after close
    del arr
    gc.collect()
    assert seg.exports == 1 and seg.address == addr
    del ten
    gc.collect()
    assert seg.exports == 0 and seg.address == 0  # the last release unmapped
    seg.close()


def test_dealloc_without_close_unmaps(name):
    seg = Segment.create(name, 1 << 20)
    view = memoryview(seg)
    del seg  # the view keeps the segment object alive
    view[0] = 1
    assert view[0] == 1
    del view
    gc.collect()


CHILD = textwrap.dedent("""
    import sys
    from sidecar._native import Segment
    name, writable = sys.argv[1], sys.argv[2] == "rw"
    seg = Segment.open(name, writable=writable)
    mv = memoryview(seg)
    print(seg.size, seg.inode, bytes(mv[:8]).hex())
    if writable:
        mv[8:16] = b"fromkid!"
""")


def test_cross_process_read_and_write(name):
    seg = Segment.create(name, 1 << 16)
    mv = memoryview(seg)
    mv[:8] = b"parent!!"
    out = subprocess.run([sys.executable, "-c", CHILD, name, "rw"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(1 << 16), str(seg.inode), b"parent!!".hex()]
    assert bytes(mv[8:16]) == b"fromkid!"  # the child's write is seen here, no copy back
    out = subprocess.run([sys.executable, "-c", CHILD, name, "ro"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    del mv
    seg.close()


def test_full_shm_is_clean_oserror_and_leaves_nothing(name):
    free = os.statvfs("/dev/shm").f_bavail * os.statvfs("/dev/shm").f_frsize
    size = free + (1 << 30)
    with pytest.raises(OSError) as ei:
        Segment.create(name, size)
    assert ei.value.errno in (28, 12)  # ENOSPC (or ENOMEM)
    assert name in str(ei.value) and str(size) in str(ei.value)
    assert not os.path.exists(shm_file(name))  # the half-made segment was unlinked


def test_module_has_no_policy_on_names():
    # C accepts any POSIX name; the sc- policy is sidecar.dataplane.names' job.
    n = "/sidecar-native-policy-free-%d" % os.getpid()
    try:
        Segment.create(n, 10).close()
    finally:
        _native.unlink(n)
    assert _native.PAGE_SIZE >= 4096


def test_open_prefault_maps_pages_up_front(name):
    import resource

    n = 4 << 20
    Segment.create(name, n).close()  # pages now exist in /dev/shm, but not in a new mapping

    def faults_touching(seg: Segment) -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        np.frombuffer(seg, dtype=np.uint8)[::4096] = 1  # write faults: no fault-around batching
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    lazy, eager = Segment.open(name, writable=True), Segment.open(name, writable=True, prefault=True)
    assert faults_touching(lazy) >= (n // 4096) // 2
    assert faults_touching(eager) < (n // 4096) // 20
    lazy.close()
    eager.close()
