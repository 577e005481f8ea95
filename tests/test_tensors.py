"""Tensor descriptors: encode (to_ref) and decode (to_numpy / to_torch / write_into) over real shm."""
from __future__ import annotations

import array
import subprocess
import warnings

import numpy as np
import pytest
import torch

from sidecar._native import Segment
from sidecar.dataplane import dtypes
from sidecar.dataplane.mapcache import MappingCache
from sidecar.dataplane.segments import create_segment, unlink_segment
from sidecar.dataplane.tensors import to_numpy, to_ref, to_torch, write_into
from sidecar.errors import DeviceUnavailable, DtypeMismatch, InvalidArgument, InvalidTensorRef, ShapeMismatch
from sidecar.protocol.refs import CudaIpcStorage, InlineStorage, ShmStorage, TensorRef

NUMPY_DTYPES = [d for d in dtypes.SUPPORTED if d != "bfloat16"]


def sample(name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Deterministic, non-trivial values of a dtype (random bit patterns for floats, incl. NaNs)."""
    rng = np.random.default_rng(abs(hash((name, shape))) % 2**32)
    n = int(np.prod(shape))
    dt = dtypes.to_numpy_dtype(name)
    raw = rng.integers(0, 256, size=n * dt.itemsize, dtype=np.uint8)
    if name == "bool":
        raw = raw % 2
    return raw.view(dt).reshape(shape)


def same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and np.ascontiguousarray(a).tobytes() == \
        np.ascontiguousarray(b).tobytes()


# --- round trips -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NUMPY_DTYPES)
@pytest.mark.parametrize("where", ["inline", "arena"])
def test_numpy_round_trip_every_dtype(name, where, arena, cache):
    a = sample(name, (33, 17))
    ref, block = to_ref(a, arena, inline_threshold=1 << 30 if where == "inline" else 0)
    try:
        assert ref.dtype == name and ref.shape == (33, 17) and ref.strides is None
        if where == "inline":
            assert isinstance(ref.storage, InlineStorage) and block is None
        else:
            assert isinstance(ref.storage, ShmStorage) and ref.storage.nbytes == a.nbytes
            assert block is not None and ref.storage.name == block.name
        back = to_numpy(ref, cache)
        assert same_bytes(back, a)
        t = to_torch(ref, cache)
        assert t.dtype == dtypes.to_torch_dtype(name)
        assert t.numpy().tobytes() == a.tobytes()
    finally:
        if block is not None:
            block.release()


@pytest.mark.parametrize("name", dtypes.SUPPORTED)
def test_torch_round_trip_every_dtype_including_bfloat16(name, arena, cache):
    src = torch.from_numpy(sample(name, (700,)).copy())  # bfloat16: random 16-bit patterns
    if name == "bfloat16":
        src = src.view(torch.bfloat16)
    ref, block = to_ref(src, arena, inline_threshold=512)
    try:
        assert ref.dtype == name and isinstance(ref.storage, ShmStorage)
        back = to_torch(ref, cache)
        assert back.dtype == src.dtype and back.shape == src.shape
        # Bit-exact (equal() would fail on NaN patterns): compare the raw bytes.
        assert back.view(torch.uint8).numpy().tobytes() == src.contiguous().view(torch.uint8).numpy().tobytes()
    finally:
        if block is not None:
            block.release()


def test_bfloat16_values_round_trip_exactly(arena, cache):
    src = torch.tensor([1.5, -2.25, 3.0e38, float("inf"), 1e-40], dtype=torch.bfloat16)
    for threshold in (0, 1 << 20):  # arena and inline
        ref, block = to_ref(src, arena, inline_threshold=threshold)
        assert ref.dtype == "bfloat16"
        assert torch.equal(to_torch(ref, cache), src)
        # NumPy sees the bit patterns (documented choice: no ml_dtypes dependency)
        bits = to_numpy(ref, cache)
        assert bits.dtype == np.uint16 and (bits == src.view(torch.int16).numpy().view(np.uint16)).all()
        if block is not None:
            block.release()


def test_bool_round_trip(arena, cache):
    a = np.array([[True, False, True], [False, False, True]])
    for threshold in (0, 1 << 20):
        ref, block = to_ref(a, arena, inline_threshold=threshold)
        assert ref.dtype == "bool"
        assert (to_numpy(ref, cache) == a).all()
        assert torch.equal(to_torch(ref, cache), torch.from_numpy(a))
        if block is not None:
            block.release()


@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 5, 2), ()])
@pytest.mark.parametrize("threshold", [0, 1 << 20])
def test_empty_and_zero_d(shape, threshold, arena, cache):
    a = np.full(shape, 7.5, dtype=np.float32)
    ref, block = to_ref(a, arena, inline_threshold=threshold)
    try:
        assert ref.shape == shape
        back = to_numpy(ref, cache)
        assert back.shape == shape and back.dtype == np.float32
        assert (back == a).all()
        t = to_torch(ref, cache)
        assert tuple(t.shape) == shape
        if shape == ():
            assert t.item() == 7.5
    finally:
        if block is not None:
            block.release()


def test_zero_d_torch_bfloat16(cache):
    ref, _ = to_ref(torch.tensor(2.5, dtype=torch.bfloat16))
    assert ref.shape == () and to_torch(ref, cache).item() == 2.5


# --- non-contiguous arrays --------------------------------------------------------------------

VIEWS = {
    "transposed": lambda a: a.T,
    "row_steps": lambda a: a[::3],
    "col_steps": lambda a: a[:, 1::4],
    "both_steps_transposed": lambda a: a[2::5, ::3].T,
    "reversed": lambda a: a[::-1, ::-2],  # negative strides: copied, never described in place
    "broadcast": lambda a: np.broadcast_to(a[:1], a.shape),  # stride 0: copied
    "size1_dims": lambda a: a[:1, None, 3:4],
}


@pytest.mark.parametrize("view", list(VIEWS))
def test_non_contiguous_copy_and_inline(view, arena, cache):
    base = sample("int32", (64, 48))
    v = VIEWS[view](base)
    for threshold in (0, 1 << 20):
        ref, block = to_ref(v, arena, inline_threshold=threshold)
        assert ref.strides is None  # copies are C-contiguous
        assert np.array_equal(to_numpy(ref, cache), v)
        assert np.array_equal(to_torch(ref, cache).numpy(), v)
        if block is not None:
            block.release()


@pytest.mark.parametrize("view", ["transposed", "row_steps", "col_steps", "both_steps_transposed", "size1_dims"])
def test_strided_view_of_arena_block_is_zero_copy(view, arena, cache):
    block = arena.alloc(64 * 48 * 8)
    base = block.ndarray(np.float64, (64, 48))
    base[:] = sample("float64", (64, 48))
    v = VIEWS[view](base)
    ref, extra = to_ref(v, arena)
    assert extra is None, "data already in the arena must not be copied"
    assert ref.storage.name == block.name
    if not v.flags.c_contiguous:
        assert ref.strides is not None and all(s >= 0 for s in ref.strides)
    back = to_numpy(ref, cache)
    assert same_bytes(back, v)
    if view != "size1_dims":  # strides of length-1 dims are normalised to 0
        assert back.strides == v.strides
    tv = to_torch(ref, cache)
    assert same_bytes(tv.numpy(), v)
    block.release()


def test_torch_strided_view_in_arena_keeps_strides(arena, cache):
    block = arena.alloc(40 * 30 * 2)
    host = torch.from_numpy(block.ndarray(np.int16, (40, 30))).view(torch.bfloat16)
    host.copy_(torch.randn(40, 30).to(torch.bfloat16))
    v = host[1::2, ::3].t()
    ref, extra = to_ref(v, arena)
    assert extra is None and ref.dtype == "bfloat16"
    assert ref.strides == tuple(s * 2 for s in v.stride())
    assert torch.equal(to_torch(ref, cache), v)
    block.release()


# --- zero copy proven by addresses and shared writes --------------------------------------------

def test_arena_block_ref_decodes_to_the_same_bytes(arena, cache):
    block = arena.alloc(1 << 20)
    host = block.ndarray(np.float32, (512, 512))
    host[:] = 1.0
    ref, extra = to_ref(host, arena)
    assert extra is None
    assert ref.storage == ShmStorage(block.name, 0, host.nbytes, block.inode)
    view = to_numpy(ref, cache, writable=True)
    seg = cache.get(block.name, block.inode)
    assert view.__array_interface__["data"][0] == seg.address  # a view of the mapping, not a copy
    view[3, 4] = 42.0
    assert host[3, 4] == 42.0  # written through the consumer mapping, seen by the producer
    host[0, 0] = -1.0
    assert view[0, 0] == -1.0
    t = to_torch(ref, cache, writable=True)
    t[5, 5] = 9.0
    assert host[5, 5] == 9.0 and t.data_ptr() == seg.address
    del view, t
    block.release()


def test_readonly_views_refuse_writes(arena, cache):
    block = arena.alloc(4096)
    ref, _ = to_ref(block.ndarray(np.uint8, (4096,)), arena)
    v = to_numpy(ref, cache)
    assert not v.flags.writeable
    with pytest.raises(ValueError):
        v[0] = 1
    # even when the cache already holds a writable mapping of the segment
    to_numpy(ref, cache, writable=True)
    assert not to_numpy(ref, cache).flags.writeable
    del v
    block.release()


def test_view_keeps_segment_mapped_after_cache_drops_it(arena):
    cache = MappingCache()
    block = arena.alloc(8192)
    block.ndarray(np.int64, (1024,))[:] = np.arange(1024)
    ref, _ = to_ref(block.ndarray(np.int64, (1024,)), arena)
    view = to_numpy(ref, cache)
    cache.clear()  # closes the Segment: the unmap must wait for the view
    assert view[1023] == 1023 and int(view.sum()) == 1023 * 1024 // 2
    t = to_torch(ref, MappingCache())
    assert int(t[7]) == 7
    del view, t
    block.release()


def test_copy_into_arena_returns_block_to_release(arena, cache):
    a = np.arange(100_000, dtype=np.int64)
    ref, block = to_ref(a, arena)
    assert block is not None and arena.stats().in_use_bytes > 0
    assert np.array_equal(to_numpy(ref, cache), a)
    block.release()
    assert arena.stats().in_use_bytes == 0


def test_no_arena_means_inline(cache):
    a = np.arange(1_000_000, dtype=np.uint8)
    ref, block = to_ref(a)
    assert block is None and isinstance(ref.storage, InlineStorage)
    assert np.array_equal(to_numpy(ref, cache), a)


def test_inline_torch_tensor_is_private_and_writable(cache):
    ref, _ = to_ref(np.arange(6, dtype=np.float32).reshape(2, 3))
    t = to_torch(ref, cache)
    t += 1  # must not alter the descriptor's bytes
    assert np.array_equal(to_numpy(ref, cache), np.arange(6, dtype=np.float32).reshape(2, 3))


# --- other producers ----------------------------------------------------------------------------

class DLPackOnly:
    """Exposes nothing but the DLPack protocol (like a CuPy/JAX array on the CPU)."""

    def __init__(self, inner):
        self._inner = inner

    def __dlpack__(self, **kwargs):
        return self._inner.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._inner.__dlpack_device__()


def test_dlpack_only_object(arena, cache):
    a = sample("float32", (300, 100))
    ref, block = to_ref(DLPackOnly(a), arena)
    assert ref.dtype == "float32" and block is not None
    assert same_bytes(to_numpy(ref, cache), a)
    block.release()
    # bfloat16 through DLPack (NumPy cannot import it; torch can)
    bt = torch.randn(50, dtype=torch.float32).to(torch.bfloat16)
    ref, _ = to_ref(DLPackOnly(bt))
    assert ref.dtype == "bfloat16" and torch.equal(to_torch(ref, cache), bt)


def test_dlpack_object_already_in_arena_is_zero_copy(arena, cache):
    block = arena.alloc(1 << 16)
    host = block.ndarray(np.int32, (128, 128))
    host[:] = 5
    ref, extra = to_ref(DLPackOnly(host[::2]), arena)
    assert extra is None and ref.strides == (1024, 4)
    assert (to_numpy(ref, cache) == 5).all()
    block.release()


@pytest.mark.parametrize("obj, name, shape", [
    (b"\x01\x02\x03", "uint8", (3,)),
    (bytearray(range(10)), "uint8", (10,)),
    (array.array("d", [1.0, 2.0]), "float64", (2,)),
    (memoryview(np.arange(12, dtype=np.int16).reshape(3, 4)), "int16", (3, 4)),
    (np.float32(2.5), "float32", ()),
])
def test_buffer_protocol_objects(obj, name, shape, cache):
    ref, _ = to_ref(obj)
    assert ref.dtype == name and ref.shape == shape
    assert to_numpy(ref, cache).tobytes() == memoryview(obj).tobytes()


def test_non_native_byte_order_is_converted(cache):
    a = np.arange(5, dtype=">i4")
    ref, _ = to_ref(a)
    assert ref.dtype == "int32" and to_numpy(ref, cache).tolist() == [0, 1, 2, 3, 4]


def test_requires_grad_and_conj_tensors(cache):
    t = torch.ones(3, requires_grad=True)
    ref, _ = to_ref(t)
    assert to_torch(ref, cache).tolist() == [1.0, 1.0, 1.0]
    c = torch.tensor([1 + 2j], dtype=torch.complex64).conj()
    ref, _ = to_ref(c)
    assert to_torch(ref, cache).tolist() == [1 - 2j]


@pytest.mark.parametrize("obj, err", [
    (object(), InvalidArgument),
    ("text", InvalidArgument),
    (np.array(["a", "b"]), InvalidTensorRef),
    (np.array([1, 2], dtype=object), InvalidTensorRef),
    (np.array([1.0], np.longdouble), InvalidTensorRef),
    (torch.zeros(2, dtype=torch.float8_e4m3fn), InvalidTensorRef),
    (torch.zeros(3).to_sparse(), InvalidArgument),
])
def test_unsupported_objects(obj, err):
    with pytest.raises(err) as info:
        to_ref(obj)
    if err is InvalidTensorRef:
        assert info.value.field == "dtype"


# --- write_into (caller-provided out refs) ------------------------------------------------------

def test_write_into_out_ref(arena, cache):
    block = arena.alloc(24 * 4)
    out_ref, _ = to_ref(block.ndarray(np.float32, (4, 6)), arena)
    write_into(out_ref, torch.arange(24, dtype=torch.float32).reshape(4, 6), cache)
    assert block.ndarray(np.float32, (4, 6)).ravel().tolist() == list(range(24))
    write_into(out_ref, np.full((4, 6), 3.0, np.float32), cache)
    assert (block.ndarray(np.float32, (4, 6)) == 3.0).all()
    block.release()


def test_write_into_strided_out_ref_bfloat16(arena, cache):
    block = arena.alloc(8 * 8 * 2)
    host = torch.from_numpy(block.ndarray(np.int16, (8, 8))).view(torch.bfloat16)
    host.zero_()
    out_ref, _ = to_ref(host[::2, 1::2], arena)
    assert out_ref.strides == (32, 4)
    write_into(out_ref, torch.full((4, 4), 1.5, dtype=torch.bfloat16), cache)
    assert float(host.sum()) == 16 * 1.5 and float(host[0, 1]) == 1.5 and float(host[0, 0]) == 0
    block.release()


def test_write_into_mismatches(arena, cache):
    block = arena.alloc(64)
    out_ref, _ = to_ref(block.ndarray(np.float32, (2, 8)), arena)
    with pytest.raises(DtypeMismatch) as info:
        write_into(out_ref, np.zeros((2, 8), np.float64), cache)
    assert info.value.expected == "float32" and info.value.got == "float64"
    with pytest.raises(ShapeMismatch) as info:
        write_into(out_ref, np.zeros((8, 2), np.float32), cache)
    assert info.value.expected == "[2, 8]" and info.value.got == "[8, 2]"
    inline_ref, _ = to_ref(np.zeros((2, 8), np.float32))
    with pytest.raises(InvalidTensorRef) as info:
        write_into(inline_ref, np.zeros((2, 8), np.float32), cache)
    assert info.value.field == "storage"
    block.release()


# --- decoding refuses bad descriptors -----------------------------------------------------------

def test_decode_checks_real_segment_size(arena, cache):
    block = arena.alloc(100)  # the segment is a 64 KiB size class
    seg_size = block.capacity
    bad = TensorRef("uint8", (seg_size + 1,), ShmStorage(block.name, 0, seg_size + 1, block.inode))
    with pytest.raises(InvalidTensorRef) as info:
        to_numpy(bad, cache, input_index=3)
    assert info.value.field == "nbytes" and info.value.input_index == 3
    past = TensorRef("uint8", (1,), ShmStorage(block.name, seg_size + 8, 1, block.inode))
    with pytest.raises(InvalidTensorRef) as info:
        to_torch(past, cache, input_index=0)
    assert info.value.field == "offset" and info.value.input_index == 0
    ok = TensorRef("uint8", (seg_size,), ShmStorage(block.name, 0, seg_size, block.inode))
    assert to_numpy(ok, cache).shape == (seg_size,)  # the whole segment is fine
    block.release()


def test_missing_and_recreated_segment(cache):
    seg = create_segment(4096, "testtensors")
    name, inode = seg.name, seg.inode
    np.frombuffer(seg, np.uint8)[:4] = [1, 2, 3, 4]
    ref = TensorRef("uint8", (4,), ShmStorage(name, 0, 4, inode))
    assert to_numpy(ref, cache).tolist() == [1, 2, 3, 4]
    seg.close()
    unlink_segment(name)
    with pytest.raises(InvalidTensorRef) as info:
        to_numpy(ref, MappingCache(), input_index=1)
    assert info.value.field == "name" and info.value.input_index == 1
    # Same name, new segment (new inode, new bytes): `cache` still maps the old one, but a
    # descriptor of the new segment (or with inode unknown) is never served from it.
    again = Segment.create(name, 4096, True)
    try:
        np.frombuffer(again, np.uint8)[:4] = [9, 9, 9, 9]
        if again.inode != inode:
            # The old descriptor names the old inode: a cache that never mapped it refuses it.
            with pytest.raises(InvalidTensorRef) as info:
                to_numpy(ref, MappingCache())
            assert info.value.field == "name" and "re-created" in info.value.message
        fresh = TensorRef("uint8", (4,), ShmStorage(name, 0, 4, again.inode))
        assert to_numpy(fresh, cache).tolist() == [9, 9, 9, 9]
        unknown_inode = TensorRef("uint8", (4,), ShmStorage(name, 0, 4, 0))
        assert to_numpy(unknown_inode, cache).tolist() == [9, 9, 9, 9]
    finally:
        cache.clear()
        again.close()
        unlink_segment(name)


def test_foreign_names_are_refused_before_touching_the_filesystem(cache):
    for name in ["/etc/passwd", "/sc-../../etc-1-abcdef01", "sc-run-1-abcdef01", "/psm_1234", ""]:
        ref = TensorRef("uint8", (1,), ShmStorage(name, 0, 1))
        with pytest.raises(InvalidTensorRef) as info:
            to_numpy(ref, cache, input_index=2)
        assert info.value.field == "name" and info.value.input_index == 2


def test_cuda_ref_without_cuda_is_a_clean_error(cache):
    ref = TensorRef("float32", (2,), CudaIpcStorage(b"\0" * 63, 0, 8))
    with pytest.raises(InvalidTensorRef) as info:
        to_torch(ref, cache)
    assert info.value.field == "handle"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only answer to a CUDA ref")
def test_valid_cuda_ref_on_cpu_machine_is_device_unavailable(cache):
    ref = TensorRef("float32", (2,), CudaIpcStorage(b"\1" * 64, 0, 8, device_uuid="GPU-0"))
    with pytest.raises(DeviceUnavailable):
        to_torch(ref, cache, input_index=0)


def test_no_torch_warnings_for_readonly_views(arena, cache):
    block = arena.alloc(4096)
    ref, _ = to_ref(block.ndarray(np.float32, (1024,)), arena)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = to_torch(ref, cache)
    assert t.shape == (1024,)
    del t
    block.release()


LAZY_IMPORTS = """
import sys
import numpy as np
from sidecar.dataplane.arena import Arena
from sidecar.dataplane.mapcache import MappingCache
from sidecar.dataplane.tensors import to_numpy, to_ref, to_torch
with Arena("lazyimports") as arena:
    cache = MappingCache()
    ref, block = to_ref(np.ones(100_000, np.float32), arena)
    assert to_numpy(ref, cache).sum() == 100_000
    assert "torch" not in sys.modules, "NumPy-only paths imported torch"
    assert float(to_torch(ref, cache).sum()) == 100_000
    assert "sidecar.dataplane.cuda_ipc" not in sys.modules, "CPU paths imported cuda_ipc"
    block.release()
    cache.clear()
print("ok")
"""


def test_numpy_paths_need_neither_torch_nor_cuda_ipc(python_exe):
    out = subprocess.run([python_exe, "-c", LAZY_IMPORTS], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
