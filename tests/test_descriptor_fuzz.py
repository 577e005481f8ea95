"""Descriptor validation: a table of known-bad fields, then Hypothesis fuzzing.

Whatever a descriptor holds, decoding it either raises InvalidTensorRef or returns a correct view
(the bytes at exactly the place the descriptor names): never a crash or another exception type.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.dataplane import dtypes
from sidecar.dataplane.arrow import ref_to_table
from sidecar.dataplane.mapcache import MappingCache
from sidecar.dataplane.segments import create_segment, unlink_segment
from sidecar.dataplane.tensors import to_numpy, to_torch
from sidecar.dataplane.validate import validate_tensor_ref
from sidecar.errors import InvalidTensorRef
from sidecar.protocol.refs import ArrowRef, CudaIpcStorage, InlineStorage, ShmStorage, TensorRef

SEG_SIZE = 1 << 16
GOOD_NAME = "/sc-fuzz-1-0123456789abcdef"
FUZZ = settings(max_examples=400, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


class RealSegment:
    """A real 64 KiB segment filled with a known byte pattern (short repr for Hypothesis reports)."""

    def __init__(self) -> None:
        self.seg = create_segment(SEG_SIZE, "fuzz")
        self.content = np.random.default_rng(3).integers(0, 256, SEG_SIZE, dtype=np.uint8).tobytes()
        np.frombuffer(self.seg, np.uint8)[:] = np.frombuffer(self.content, np.uint8)

    def __repr__(self) -> str:
        return f"RealSegment({self.seg.name})"


@pytest.fixture
def segment():
    real = RealSegment()
    yield real
    real.seg.close()
    unlink_segment(real.seg.name)


def shm(offset=0, nbytes=24, name=GOOD_NAME):
    return ShmStorage(name, offset, nbytes)


# --- explicit cases: each names the field at fault --------------------------------------------

BAD = [
    (TensorRef("float33", (2,), shm(nbytes=8)), "dtype"),
    (TensorRef(None, (2,), shm(nbytes=8)), "dtype"),
    (TensorRef("float32", (-1,), shm(nbytes=0)), "shape"),
    (TensorRef("float32", (2**63,), shm(nbytes=8)), "shape"),
    (TensorRef("float32", (2**62, 2**62), shm(nbytes=8)), "shape"),  # product overflows int64
    (TensorRef("float32", (0, 2**62, 4), shm(nbytes=0)), "shape"),  # empty, but no array can have that shape
    (TensorRef("float64", (2**61,), shm(nbytes=2**64 - 1)), "shape"),  # bytes overflow int64
    (TensorRef("float32", (2.0,), shm(nbytes=8)), "shape"),
    (TensorRef("float32", (True,), shm(nbytes=4)), "shape"),
    (TensorRef("float32", "23", shm(nbytes=8)), "shape"),
    (TensorRef("float32", (1,) * 33, shm(nbytes=4)), "shape"),
    (TensorRef("float32", (2, 3), shm(nbytes=25)), "nbytes"),  # contiguous needs exactly 24
    (TensorRef("float32", (2, 3), shm(nbytes=23)), "nbytes"),
    (TensorRef("float32", (2, 3), shm(nbytes=-24)), "nbytes"),
    (TensorRef("float32", (2, 3), shm(nbytes=2**64)), "nbytes"),
    (TensorRef("float32", (2, 3), shm(offset=-1)), "offset"),
    (TensorRef("float32", (2, 3), shm(offset=2**64)), "offset"),
    (TensorRef("float32", (2, 3), shm(offset="0")), "offset"),
    (TensorRef("float32", (2, 3), shm(), strides=(12,)), "strides"),  # count != ndim
    (TensorRef("float32", (2, 3), shm(), strides=(12, -4)), "strides"),  # negative
    (TensorRef("float32", (2, 3), shm(), strides=(12, 2)), "strides"),  # not a multiple of itemsize
    (TensorRef("float32", (2, 3), shm(), strides=(24, 4)), "strides"),  # reaches past nbytes
    (TensorRef("float32", (2, 3), shm(), strides=(2**63, 4)), "strides"),
    (TensorRef("float32", (2**40,), shm(nbytes=8), strides=(0,)), "strides"),  # broadcast posing as huge
    (TensorRef("float32", (2, 3), shm(), strides=12), "strides"),
    (TensorRef("float32", (2,), shm(name="/sc-../../etc-1-abcdef01", nbytes=8)), "name"),
    (TensorRef("float32", (2,), shm(name="/dev/shm/sc-a-1-abcdef01", nbytes=8)), "name"),
    (TensorRef("float32", (2,), shm(name="/sc-a-1-abcdef01/../x", nbytes=8)), "name"),
    (TensorRef("float32", (2,), shm(name="/sc-a-1-abcdef01\x00", nbytes=8)), "name"),
    (TensorRef("float32", (2,), shm(name="/sc-a-\u0661-abcdef01", nbytes=8)), "name"),  # Arabic digit
    (TensorRef("float32", (2,), shm(name=b"/sc-a-1-abcdef01", nbytes=8)), "name"),
    (TensorRef("float32", (2,), shm(name="/sc-" + "a" * 300 + "-1-abcdef01", nbytes=8)), "name"),
    (TensorRef("float32", (2,), ShmStorage(GOOD_NAME, 0, 8, inode=-1)), "inode"),
    (TensorRef("float32", (2,), InlineStorage(b"\0" * 7)), "nbytes"),
    (TensorRef("float32", (2,), InlineStorage("12345678")), "data"),
    (TensorRef("float32", (2,), CudaIpcStorage(b"\0" * 63, 0, 8)), "handle"),
    (TensorRef("float32", (2,), CudaIpcStorage(b"\0" * 65, 0, 8)), "handle"),
    (TensorRef("float32", (2,), CudaIpcStorage(b"\0" * 64, 2**64, 8)), "offset"),
    (TensorRef("float32", (2,), CudaIpcStorage(b"\0" * 64, 0, 8, device_index=-1)), "device_index"),
    (TensorRef("float32", (2,), CudaIpcStorage(b"\0" * 64, 8, 8, alloc_nbytes=12)), "nbytes"),
    (TensorRef("float32", (2,), "not storage"), "storage"),
    ("not a ref", "ref"),
]


@pytest.mark.parametrize("ref, field", BAD, ids=[f"{i}-{f}" for i, (_, f) in enumerate(BAD)])
def test_bad_field_is_named(ref, field):
    with pytest.raises(InvalidTensorRef) as info:
        validate_tensor_ref(ref, input_index=5)
    assert info.value.field == field, info.value
    assert info.value.input_index == 5
    assert info.value.to_dict()["kind"] == "INVALID_TENSOR_REF"


def test_segment_size_bounds():
    ok = TensorRef("uint8", (16,), shm(offset=48, nbytes=16))
    validate_tensor_ref(ok, segment_size=64)
    with pytest.raises(InvalidTensorRef) as info:
        validate_tensor_ref(ok, segment_size=63)
    assert info.value.field == "nbytes"
    with pytest.raises(InvalidTensorRef) as info:
        validate_tensor_ref(TensorRef("uint8", (0,), shm(offset=65, nbytes=0)), segment_size=64)
    assert info.value.field == "offset"
    # near 2**64: offset + nbytes must not wrap around
    with pytest.raises(InvalidTensorRef) as info:
        validate_tensor_ref(TensorRef("uint8", (16,), shm(offset=2**64 - 8, nbytes=16)), segment_size=64)
    assert info.value.field == "offset"


GOOD = [
    TensorRef("float32", (2, 3), shm()),
    TensorRef("float32", (), shm(nbytes=4)),
    TensorRef("float32", (0, 5), shm(nbytes=0)),
    TensorRef("float32", (0, 5), shm(nbytes=0), strides=(2**62, 4)),  # empty: reaches nothing
    TensorRef("float32", (3, 2), shm(), strides=(4, 12)),  # transposed
    TensorRef("float32", (2, 2), shm(nbytes=24), strides=(12, 8)),  # stepped: 12 + 8 + 4 bytes
    TensorRef("complex128", (1,), CudaIpcStorage(b"\1" * 64, 2**40, 16, alloc_nbytes=2**41)),
    TensorRef("bfloat16", (2,), InlineStorage(b"\0" * 4)),
]


@pytest.mark.parametrize("ref", GOOD)
def test_good_refs_pass(ref):
    validate_tensor_ref(ref)


# --- fuzzing -----------------------------------------------------------------------------------

EDGE_INTS = [0, 1, 2, 3, 4, 7, 8, 16, SEG_SIZE - 1, SEG_SIZE, SEG_SIZE + 1, 2**31, 2**32,
             2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**65, -1, -8, -(2**63), -(2**64)]
ints = st.one_of(st.sampled_from(EDGE_INTS), st.integers(0, SEG_SIZE + 64), st.integers(-(2**66), 2**66))
small_ints = st.one_of(st.integers(0, 6), st.sampled_from(EDGE_INTS))
dtype_names = st.one_of(st.sampled_from(dtypes.SUPPORTED), st.sampled_from(["float128", "", "Float32", "object"]))
PATH_TRICKS = ["/sc-../../etc", "/sc-a-1-../../../etc/passwd", "/../sc-a-1-abcdef01", "sc-a-1-abcdef01",
               "/sc-a-1-abcdef01/", "/sc-a-1-ABCDEF01", "/sc-a--1-abcdef01", "//sc-a-1-abcdef01",
               "/sc-a-1-abcdef0", "/sc-fuzz-1-0123456789abcdef", "/sc-a-99999999999-abcdef01"]


HOSTILE = {
    "name": st.one_of(st.sampled_from(PATH_TRICKS), st.text(max_size=40)),
    "inode": ints,
    "offset": ints,
    "nbytes": ints,
    "dtype": st.one_of(st.sampled_from(dtypes.SUPPORTED), st.sampled_from(["float128", "", "Float32", "object"])),
    "shape": st.lists(small_ints, max_size=5).map(tuple),
    "strides": st.one_of(st.none(), st.lists(st.one_of(ints, st.integers(-64, 64)), max_size=5).map(tuple)),
}


@st.composite
def non_overlapping_strides(draw, shape: tuple[int, ...], item: int) -> tuple[int, ...]:
    """Strides of a transposed/stepped view of some larger C array: each dimension in a random order
    steps over everything the previous ones span, times 1 or 2 (a gap)."""
    order = draw(st.permutations(range(len(shape))))
    strides = [0] * len(shape)
    step = item
    for dim in order:
        strides[dim] = step * draw(st.integers(1, 2))
        step = strides[dim] * max(shape[dim], 1)
    return tuple(strides)


@st.composite
def tensor_refs(draw, real_name: str, real_inode: int) -> TensorRef:
    """A plausible descriptor of the real segment, then up to two fields replaced by hostile values."""
    f = {"name": real_name, "inode": draw(st.sampled_from([real_inode, 0]))}
    f["dtype"] = draw(st.sampled_from(dtypes.SUPPORTED))
    item = dtypes.itemsize(f["dtype"])
    f["shape"] = tuple(draw(st.lists(st.integers(0, 6), max_size=4)))
    f["strides"] = draw(st.one_of(
        st.none(),
        st.tuples(*[st.integers(0, 8).map(lambda k: k * item) for _ in f["shape"]]),  # may overlap
        non_overlapping_strides(f["shape"], item)))
    numel = int(np.prod(f["shape"])) if f["shape"] else 1
    if f["strides"] is None or not numel:
        f["nbytes"] = numel * item if f["strides"] is None else 0
    else:
        f["nbytes"] = sum((d - 1) * s for d, s in zip(f["shape"], f["strides"], strict=True)) + item
    f["offset"] = draw(st.integers(0, SEG_SIZE))
    for field in draw(st.lists(st.sampled_from(sorted(HOSTILE)), max_size=2, unique=True)):
        f[field] = draw(HOSTILE[field])
    return TensorRef(f["dtype"], f["shape"], ShmStorage(f["name"], f["offset"], f["nbytes"], f["inode"]),
                     f["strides"])


def check_view(arr: np.ndarray, ref: TensorRef, mapping, content: bytes) -> None:
    """The view shows exactly the bytes the descriptor names, at the place it names."""
    dt = dtypes.to_numpy_dtype(ref.dtype)
    assert arr.shape == tuple(ref.shape) and arr.dtype == dt
    if arr.size == 0:
        return
    assert arr.__array_interface__["data"][0] == mapping.address + ref.storage.offset
    expected = np.ndarray(ref.shape, dt, buffer=content, offset=ref.storage.offset, strides=ref.strides)
    assert arr.tobytes() == expected.tobytes()


@FUZZ
@given(data=st.data())
def test_fuzz_shm_descriptors(segment, cache, data):
    seg = segment.seg
    ref = data.draw(tensor_refs(seg.name, seg.inode))
    try:
        arr = to_numpy(ref, cache, input_index=0)
    except InvalidTensorRef as err:
        assert err.field and err.input_index == 0
        return
    check_view(arr, ref, cache.get(seg.name, seg.inode), segment.content)
    t = to_torch(ref, cache)
    assert tuple(t.shape) == tuple(ref.shape)
    if ref.dtype != "bfloat16":  # bfloat16 has no NumPy twin; its bit view is compared above
        assert t.numpy().tobytes() == arr.tobytes()


@FUZZ
@given(dtype=dtype_names, shape=st.lists(small_ints, max_size=3).map(tuple),
       strides=st.one_of(st.none(), st.lists(st.integers(-16, 64), max_size=3).map(tuple)),
       data=st.binary(max_size=96))
def test_fuzz_inline_descriptors(cache, dtype, shape, strides, data):
    ref = TensorRef(dtype, shape, InlineStorage(data), strides)
    try:
        arr = to_numpy(ref, cache)
    except InvalidTensorRef:
        return
    assert arr.shape == shape
    if arr.size:
        expected = np.ndarray(shape, dtypes.to_numpy_dtype(dtype), buffer=data, strides=strides)
        assert arr.tobytes() == expected.tobytes()
        assert to_torch(ref, cache).shape == shape


@FUZZ
@given(handle=st.binary(min_size=60, max_size=68), offset=ints, nbytes=ints,
       device_index=st.one_of(st.integers(-2, 8), ints), alloc=st.one_of(st.just(0), ints))
def test_fuzz_cuda_ipc_fields(handle, offset, nbytes, device_index, alloc):
    ref = TensorRef("uint8", (nbytes,) if 0 <= nbytes < 2**63 else (1,),
                    CudaIpcStorage(handle, offset, nbytes, device_index, "", alloc))
    try:
        validate_tensor_ref(ref)
    except InvalidTensorRef as err:
        assert err.field in {"handle", "offset", "nbytes", "device_index", "alloc_nbytes", "shape"}
        return
    assert len(handle) == 64 and 0 <= offset and 0 <= nbytes < 2**64 and device_index >= 0
    assert not alloc or offset + nbytes <= alloc


def valid_stream() -> bytes:
    sink = pa.BufferOutputStream()
    table = pa.table({"i": [1, 2, None], "s": ["a", None, "ccc"], "l": [[1], [], None]})
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


@settings(max_examples=200, deadline=None, derandomize=True)
@given(data=st.data())
def test_fuzz_arrow_streams(data):
    """Mutated IPC streams: InvalidTensorRef or a table that passes full validation."""
    stream = bytearray(valid_stream())
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(stream) - 1))
        stream[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(stream)))
    cache = MappingCache()
    try:
        table = ref_to_table(ArrowRef(InlineStorage(bytes(stream[:cut]))), cache)
    except InvalidTensorRef as err:
        assert err.field == "stream"
        return
    table.validate(full=True)
    table.to_pylist()
