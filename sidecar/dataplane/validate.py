"""Descriptor checks, done before any memory is touched.

A descriptor comes from another process and may be wrong or hostile; every field is checked here and
a bad one raises `InvalidTensorRef(field=..., input_index=...)`, never anything else. Python ints are
unbounded, so there is no overflow in the arithmetic itself; instead every figure is capped at what
the wire can carry (int64 shapes/strides, uint64 offsets/sizes) and at what NumPy can address
(2**63 - 1 bytes).

Layout rules (the choices made here, also described in guides/zero-copy.md):
- `strides=None` means C-contiguous and then `nbytes == prod(shape) * itemsize` exactly.
- Explicit strides are in bytes, one per dimension, non-negative and multiples of the itemsize
  (negative strides are refused: the offset names the first element, and torch cannot view them);
  every reachable byte must lie in `[offset, offset + nbytes)`, and the elements may not overlap
  so much that `prod(shape) * itemsize > nbytes` (no stride-0 broadcasts posing as huge tensors).
- At most `MAX_NDIM` dimensions.
"""
from __future__ import annotations

from typing import Any, NamedTuple, NoReturn

from sidecar.dataplane import dtypes, names
from sidecar.errors import InvalidTensorRef
from sidecar.protocol.limits import CUDA_IPC_HANDLE_BYTES, INT64_MAX, MAX_NDIM, MAX_SEGMENT_NAME, UINT64_MAX
from sidecar.protocol.refs import ArrowRef, CudaIpcStorage, InlineStorage, ShmStorage, TensorRef, byte_span


class Layout(NamedTuple):  # a NamedTuple: built on every decode, and cheaper than a dataclass
    """What validation learned about a ref, so decoders need not recompute it."""

    itemsize: int
    numel: int
    span: int  # bytes from the first element to one past the last reachable byte (0 if empty)
    offset: int  # storage offset (0 for inline)
    nbytes: int


def _fail(message: str, field: str, input_index: int | None) -> NoReturn:
    raise InvalidTensorRef(message, field=field, input_index=input_index)


def _int(value: Any, lo: int, hi: int, what: str, field: str, input_index: int | None,
         index: int | None = None) -> int:
    """`value` if it is an int in [lo, hi]; `what` (with `[index]` when given) names it in errors."""
    # bool is an int subclass but never a meaningful size; floats and strings are refused outright.
    if isinstance(value, bool) or not isinstance(value, int):
        what = what if index is None else f"{what}[{index}]"
        _fail(f"{what} must be an integer, got {type(value).__name__}", field, input_index)
    if value < lo or value > hi:
        what = what if index is None else f"{what}[{index}]"
        _fail(f"{what} {value} is out of range [{lo}, {hi}]", field, input_index)
    return value


def check_name(name: Any, input_index: int | None = None) -> str:
    if not isinstance(name, str) or not name or len(name) > MAX_SEGMENT_NAME:
        _fail(f"segment name {name!r} is not a valid /sc-<run>-<pid>-<random> name", "name", input_index)
    if not names.is_valid_name(name):  # the cheap test first: parse_name builds the parts
        try:
            names.parse_name(name)
        except InvalidTensorRef as err:
            _fail(err.message, "name", input_index)
    return name


def _check_region(offset: Any, nbytes: Any, input_index: int | None) -> tuple[int, int]:
    offset = _int(offset, 0, UINT64_MAX, "offset", "offset", input_index)
    nbytes = _int(nbytes, 0, UINT64_MAX, "nbytes", "nbytes", input_index)
    return offset, nbytes


def check_segment_bounds(offset: int, nbytes: int, segment_size: int, name: str,
                         input_index: int | None = None) -> None:
    """The region [offset, offset + nbytes) must lie inside a segment of `segment_size` bytes."""
    if offset > segment_size:
        _fail(f"offset {offset} is past the end of segment {name} ({segment_size} bytes)",
              "offset", input_index)
    if offset + nbytes > segment_size:
        _fail(f"{nbytes} bytes at offset {offset} run past the end of segment {name} "
              f"({segment_size} bytes)", "nbytes", input_index)


def _check_storage(storage: Any, input_index: int | None) -> tuple[int, int]:
    """Returns (offset, nbytes) of the storage after checking its own fields."""
    if isinstance(storage, ShmStorage):
        check_name(storage.name, input_index)
        offset, nbytes = _check_region(storage.offset, storage.nbytes, input_index)
        _int(storage.inode, 0, UINT64_MAX, "inode", "inode", input_index)
        return offset, nbytes
    if isinstance(storage, InlineStorage):
        if not isinstance(storage.data, (bytes, bytearray, memoryview)):
            _fail(f"inline data must be bytes, got {type(storage.data).__name__}", "data", input_index)
        return 0, memoryview(storage.data).nbytes
    if isinstance(storage, CudaIpcStorage):
        handle = storage.handle
        if not isinstance(handle, (bytes, bytearray)) or len(handle) != CUDA_IPC_HANDLE_BYTES:
            got = len(handle) if isinstance(handle, (bytes, bytearray)) else type(handle).__name__
            _fail(f"CUDA IPC handle must be exactly {CUDA_IPC_HANDLE_BYTES} bytes, got {got}",
                  "handle", input_index)
        offset, nbytes = _check_region(storage.offset, storage.nbytes, input_index)
        _int(storage.device_index, 0, 2**31 - 1, "device_index", "device_index", input_index)
        alloc = _int(storage.alloc_nbytes, 0, UINT64_MAX, "alloc_nbytes", "alloc_nbytes", input_index)
        if alloc and offset + nbytes > alloc:
            _fail(f"{nbytes} bytes at offset {offset} run past the end of the CUDA allocation "
                  f"({alloc} bytes)", "nbytes", input_index)
        return offset, nbytes
    _fail(f"unknown storage {type(storage).__name__}", "storage", input_index)


def _check_shape(shape: Any, item: int, input_index: int | None) -> int:
    """Returns prod(shape), refusing anything whose byte size could not be addressed."""
    if not isinstance(shape, (tuple, list)):
        _fail(f"shape must be a sequence of integers, got {type(shape).__name__}", "shape", input_index)
    if len(shape) > MAX_NDIM:
        _fail(f"{len(shape)} dimensions; at most {MAX_NDIM} are supported", "shape", input_index)
    numel = 1
    span = item  # bytes spanned by the non-zero dimensions: NumPy and torch refuse more, empty or not
    for i, dim in enumerate(shape):
        dim = _int(dim, 0, INT64_MAX, "shape", "shape", input_index, i)
        numel *= dim
        span *= max(dim, 1)
        if span > INT64_MAX:
            _fail(f"shape {tuple(shape)} spans more than {INT64_MAX} bytes (counting its non-zero dimensions)",
                  "shape", input_index)
    return numel


def layout_of(ref: Any, *, input_index: int | None = None) -> Layout:
    """Checks every field of `ref` (no segment needed) and returns its layout."""
    if not isinstance(ref, TensorRef):
        _fail(f"expected a TensorRef, got {type(ref).__name__}", "ref", input_index)
    if not (isinstance(ref.dtype, str) and ref.dtype in dtypes.SUPPORTED):
        _fail(f"unsupported dtype {ref.dtype!r}; supported: {', '.join(dtypes.SUPPORTED)}",
              "dtype", input_index)
    item = dtypes.itemsize(ref.dtype)
    numel = _check_shape(ref.shape, item, input_index)
    offset, nbytes = _check_storage(ref.storage, input_index)
    shape = ref.shape
    strides = ref.strides
    if strides is None:
        span = numel * item
        if nbytes != span:
            _fail(f"contiguous {ref.dtype} tensor of shape {tuple(shape)} needs {span} bytes, "
                  f"descriptor says {nbytes}", "nbytes", input_index)
        return Layout(item, numel, span, offset, nbytes)
    if not isinstance(strides, (tuple, list)) or len(strides) != len(shape):
        got = len(strides) if isinstance(strides, (tuple, list)) else type(strides).__name__
        _fail(f"{len(shape)}-d tensor needs {len(shape)} strides, got {got}", "strides", input_index)
    for i, stride in enumerate(strides):
        stride = _int(stride, -INT64_MAX - 1, INT64_MAX, "strides", "strides", input_index, i)
        if stride < 0:
            _fail(f"strides[{i}] = {stride} is negative; negative strides are not accepted "
                  f"(send a copy: to_ref makes one)", "strides", input_index)
        if stride % item:
            _fail(f"strides[{i}] = {stride} is not a multiple of the itemsize {item}",
                  "strides", input_index)
    span = byte_span(shape, strides, item)
    if span > nbytes:
        _fail(f"strides {tuple(strides)} with shape {tuple(shape)} reach {span} bytes past the "
              f"offset, descriptor spans {nbytes}", "strides", input_index)
    if numel * item > nbytes:
        # Broadcast (stride 0) or overlapping views would let a small region pose as a huge tensor.
        _fail(f"shape {tuple(shape)} holds {numel * item} bytes of elements, more than the "
              f"{nbytes} bytes the descriptor spans (overlapping strides)", "strides", input_index)
    return Layout(item, numel, span, offset, nbytes)


def validate_tensor_ref(ref: TensorRef, *, input_index: int | None = None,
                        segment_size: int | None = None) -> None:
    """Raises InvalidTensorRef naming the first wrong field; returns None when `ref` is usable.

    `segment_size` (when known) bounds a shared-memory ref's [offset, offset + nbytes).
    """
    layout = layout_of(ref, input_index=input_index)
    if segment_size is not None and isinstance(ref.storage, ShmStorage):
        check_segment_bounds(layout.offset, layout.nbytes, segment_size, ref.storage.name, input_index)


def validate_arrow_ref(ref: ArrowRef, *, input_index: int | None = None,
                       segment_size: int | None = None) -> None:
    """Same checks for an Arrow IPC stream descriptor."""
    if not isinstance(ref, ArrowRef):
        _fail(f"expected an ArrowRef, got {type(ref).__name__}", "ref", input_index)
    if not isinstance(ref.storage, (ShmStorage, InlineStorage)):
        _fail(f"Arrow tables travel in shared memory or inline, not {type(ref.storage).__name__}",
              "storage", input_index)
    offset, nbytes = _check_storage(ref.storage, input_index)
    if segment_size is not None and isinstance(ref.storage, ShmStorage):
        check_segment_bounds(offset, nbytes, segment_size, ref.storage.name, input_index)
