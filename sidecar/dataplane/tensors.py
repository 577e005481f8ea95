"""Arrays and tensors <-> `TensorRef` descriptors, without copying where the memory allows it.

Encoding (`to_ref`): an array whose bytes already lie in an arena block is described in place (zero
copies); a small one travels inline; anything else is copied once into a fresh arena block. Decoding
(`to_numpy`, `to_torch`) validates the descriptor, maps the segment through the consumer's
`MappingCache` and wraps the mapping as a view: the returned array's `.base` chain holds the
`Segment`, so the mapping outlives every view of it.

torch is imported only when a torch tensor (or a bfloat16 `__dlpack__` object) is involved, and
`sidecar.dataplane.cuda_ipc` only for CUDA tensors, so CPU/NumPy paths never pay for either.
"""
from __future__ import annotations

import sys
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

from sidecar.dataplane import dtypes
from sidecar.dataplane.validate import Layout, check_segment_bounds, layout_of
from sidecar.errors import DeviceMismatch, DtypeMismatch, InvalidArgument, InvalidTensorRef, ShapeMismatch
from sidecar.protocol.limits import DEFAULT_INLINE_THRESHOLD
from sidecar.protocol.refs import CudaIpcStorage, InlineStorage, ShmStorage, TensorRef, byte_span, elements_overlap

if TYPE_CHECKING:
    import torch

    from sidecar.dataplane.arena import Arena, Block
    from sidecar.dataplane.mapcache import MappingCache
    from sidecar.dataplane.segments import Segment

# DLPack device types (dlpack.h): host memory that NumPy can read, and CUDA memory.
_DL_CPU = 1
_DL_CUDA_HOST = 3
_DL_CUDA = (2, 13)  # kDLCUDA, kDLCUDAManaged


# ---------------------------------------------------------------------------------------------------
# encoding

def _torch_module() -> Any:
    return sys.modules.get("torch")  # a torch tensor can only exist once torch is imported


def _cuda_tensor(obj: Any) -> Any:
    """`obj` as a CUDA torch tensor if it is one (or a CUDA `__dlpack__` object), else None."""
    if isinstance(obj, np.ndarray):
        return None  # host memory by definition (and the common case: skip the DLPack probe)
    torch = _torch_module()
    if torch is not None and isinstance(obj, torch.Tensor):
        return obj if obj.is_cuda else None  # (not .device: that builds a torch.device, ~1.7 us)
    if hasattr(obj, "__dlpack__") and hasattr(obj, "__dlpack_device__"):
        if int(obj.__dlpack_device__()[0]) in _DL_CUDA:
            import torch

            return torch.from_dlpack(obj)
    return None


def _torch_to_array(t: Any) -> tuple[np.ndarray, str]:
    """A CPU torch tensor as a NumPy view of the same memory (bfloat16 -> its uint16 bit patterns)."""
    import torch

    if not t.is_cpu:
        raise DeviceMismatch(f"cannot describe a tensor on {t.device}: only CPU and CUDA tensors travel",
                             expected="cpu or cuda", got=str(t.device))
    if t.layout != torch.strided:
        raise InvalidArgument(f"only dense (strided) tensors travel, got layout {t.layout}")
    name = dtypes.name_of(t.dtype)
    t = t.detach()
    if t.is_conj():  # lazy conjugate / negative bits: NumPy must see the values themselves
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    if name == "bfloat16":
        # Same-size dtype views keep the strides; NumPy then sees the raw 16-bit patterns.
        return t.view(torch.int16).numpy().view(np.uint16), name
    return t.numpy(), name


def _host_array(obj: Any) -> tuple[np.ndarray, str]:
    """Any supported host-memory object as (NumPy view without copying, wire dtype name)."""
    torch = _torch_module()
    if torch is not None and isinstance(obj, torch.Tensor):
        return _torch_to_array(obj)
    if isinstance(obj, np.generic):
        obj = np.asarray(obj)
    if isinstance(obj, np.ndarray):
        if not obj.dtype.isnative:
            obj = obj.astype(obj.dtype.newbyteorder("="))  # the wire is native-endian
        return obj, dtypes.name_of(obj.dtype)
    if hasattr(obj, "__dlpack__"):
        device = obj.__dlpack_device__()[0] if hasattr(obj, "__dlpack_device__") else _DL_CPU
        if int(device) not in (_DL_CPU, _DL_CUDA_HOST):
            raise DeviceMismatch(f"cannot describe a __dlpack__ object on device type {int(device)}",
                                 expected="cpu or cuda", got=str(device))
        try:
            arr = np.from_dlpack(obj)
        except (RuntimeError, BufferError, TypeError):
            # NumPy refuses dtypes it lacks (bfloat16); torch reads every DLPack dtype we support.
            import torch

            return _torch_to_array(torch.from_dlpack(obj))
        return arr, dtypes.name_of(arr.dtype)
    try:
        view = memoryview(obj)
    except TypeError:
        raise InvalidArgument(
            f"cannot describe a {type(obj).__name__} as a tensor: expected a NumPy array, a torch "
            f"tensor, or an object with __dlpack__ or the buffer protocol") from None
    try:
        arr = np.asarray(view)
    except (ValueError, TypeError, NotImplementedError) as err:
        raise InvalidTensorRef(f"buffer format {view.format!r} is not a supported dtype: {err}",
                               field="dtype") from None
    return _host_array(arr)


def _byte_layout(arr: np.ndarray) -> tuple[tuple[int, ...] | None, int] | None:
    """(strides or None if C-contiguous, span in bytes) if `arr` can be described in place, else None.

    Strides of dimensions of length 0 or 1 never move the pointer, so they are normalised to 0
    (NumPy leaves arbitrary, even negative, values there).
    """
    item = arr.itemsize
    if arr.flags.c_contiguous:
        return None, arr.size * item
    strides = tuple(0 if dim <= 1 else s for dim, s in zip(arr.shape, arr.strides, strict=True))
    if any(s < 0 or s % item for s in strides):
        return None  # negative or misaligned strides: not describable, copy instead
    if elements_overlap(arr.shape, strides, item):
        return None  # broadcast / overlapping elements: validation would refuse the descriptor
    return strides, byte_span(arr.shape, strides, item)


def to_ref(obj: Any, arena: Arena | None = None, *,
           inline_threshold: int = DEFAULT_INLINE_THRESHOLD) -> tuple[TensorRef, Block | None]:
    """Describes `obj` (NumPy array, torch tensor, `__dlpack__` or buffer-protocol object).

    Returns (ref, block). `block` is the arena block this call filled with a copy of the data: the
    caller releases it once the receiver is done. It is None when nothing was allocated: the data
    already lay in one of `arena`'s blocks (zero copy), travels inline (under `inline_threshold`
    bytes), or when `arena` is None (then everything travels inline).
    A CUDA tensor is described by a CUDA IPC handle (`sidecar.dataplane.cuda_ipc`).
    """
    cuda = _cuda_tensor(obj)
    if cuda is not None:
        from sidecar.dataplane import cuda_ipc  # only CUDA callers need it (and libcuda)

        return cuda_ipc.tensor_to_ref(cuda), None
    arr, name = _host_array(obj)
    shape = arr.shape
    nbytes = arr.nbytes
    # Memory NumPy allocated for an array of its own is never an arena block: no lookup for it.
    if arena is not None and nbytes and not arr.flags.owndata:
        layout = _byte_layout(arr)
        if layout is not None:
            strides, span = layout
            hit = arena.find(arr.__array_interface__["data"][0], span)
            if hit is not None:
                block, offset = hit
                storage = ShmStorage(block.name, offset, span, block.inode)
                return TensorRef(name, shape, storage, strides), None
    if arena is None or nbytes < inline_threshold or nbytes == 0:
        return TensorRef(name, shape, InlineStorage(arr.tobytes())), None
    block = arena.alloc(nbytes)
    try:
        dst = np.ndarray(shape, arr.dtype, buffer=block.buffer())
        np.copyto(dst, arr, casting="no")
    except BaseException:
        block.release()
        raise
    return TensorRef(name, shape, block.storage()), block


# ---------------------------------------------------------------------------------------------------
# decoding

def _with_index(err: InvalidTensorRef, input_index: int | None) -> InvalidTensorRef:
    if input_index is None or err.fields.get("input_index") is not None:
        return err
    return InvalidTensorRef(err.message, **{**err.fields, "input_index": input_index})


def _segment(cache: MappingCache, storage: ShmStorage, writable: bool,
             input_index: int | None) -> Segment:
    try:
        return cache.get(storage.name, storage.inode, writable=writable)
    except InvalidTensorRef as err:  # segments.open_segment maps every OSError of mapping to this
        raise _with_index(err, input_index) from err.__cause__


def to_numpy(ref: TensorRef, cache: MappingCache, *, writable: bool = False,
             input_index: int | None = None) -> np.ndarray:
    """A NumPy view of the descriptor's bytes (no copy); read-only unless `writable`, or unless
    `cache` hands out private copy-on-write mappings (`mapcache.CallMappings`): such a view is
    writable and its writes stay in this process.

    bfloat16 is viewed as uint16 bit patterns (see `sidecar.dataplane.dtypes`). Inline data is
    viewed read-only; asking for a writable view of it is an InvalidTensorRef(field="storage").
    """
    return _to_numpy(ref, layout_of(ref, input_index=input_index), cache, writable, input_index)


def _to_numpy(ref: TensorRef, layout: Layout, cache: MappingCache, writable: bool,
              input_index: int | None) -> np.ndarray:
    """`to_numpy` of a ref that `layout_of` has already checked."""
    storage = ref.storage
    private = False
    if isinstance(storage, ShmStorage):
        seg = _segment(cache, storage, writable, input_index)
        private = seg.private  # copy-on-write: writing the view never reaches the segment
        check_segment_bounds(layout.offset, layout.nbytes, seg.size, storage.name, input_index)
        # np.frombuffer's array holds a memoryview, i.e. a buffer export, for as long as any view
        # of it lives, so closing the Segment (cache eviction) defers the munmap. np.ndarray(buffer=
        # seg) would keep only a reference to `seg` and release its export at once (a later SIGSEGV).
        # (numpy's stubs take the buffer protocol as a Protocol only from Python 3.12 on)
        buf: Any = np.frombuffer(seg, np.uint8)  # type: ignore[call-overload]
    elif isinstance(storage, InlineStorage):
        if writable:
            raise InvalidTensorRef("inline data cannot be written: a writable ref needs shared memory",
                                   field="storage", input_index=input_index)
        buf = storage.data
    else:
        raise DeviceMismatch("a CUDA IPC tensor cannot be viewed as a NumPy array; use to_torch",
                             expected="cpu", got="cuda")
    arr = _view(ref, buf, layout.offset, layout.numel)
    if not writable and not private:
        arr.flags.writeable = False  # the cache may hold a writable mapping of this segment
    return arr


def _view(ref: TensorRef, buf: Any, offset: int, numel: int) -> np.ndarray:
    dtype = dtypes.to_numpy_dtype(ref.dtype)
    if numel == 0:
        return np.empty(ref.shape, dtype)  # nothing to share; NumPy would still want a buffer
    arr: np.ndarray = np.ndarray(ref.shape, dtype, buffer=buf, offset=offset, strides=ref.strides)
    return arr


def _array_to_torch(arr: np.ndarray, name: str) -> torch.Tensor:
    import torch

    if name == "bfloat16":
        return _from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    return _from_numpy(arr)


def _from_numpy(arr: np.ndarray) -> torch.Tensor:
    import torch

    if arr.flags.writeable:
        return torch.from_numpy(arr)
    # torch has no read-only tensors and warns about it; the caller asked for a read-only view and
    # the mapping itself enforces it, so the warning says nothing new.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(arr)


def to_torch(ref: TensorRef, cache: MappingCache, *, writable: bool = False,
             input_index: int | None = None) -> torch.Tensor:
    """A torch view of the descriptor's bytes (no copy for shared memory; bfloat16 exact).

    Caution: torch has no read-only tensors. A view with `writable=False` from a plain
    `MappingCache` lies over a read-only shared mapping, so writing into it in place kills the
    process (SIGSEGV); clone before mutating. From a `CallMappings` (what a CPU worker decodes its
    inputs with) it lies over a private copy-on-write mapping: writes are allowed and never reach
    the segment. Inline data (small by definition) is copied into a private writable buffer, so
    writing into such a tensor never alters the descriptor either.
    A CudaIpcStorage ref is opened by `sidecar.dataplane.cuda_ipc`.
    """
    if isinstance(getattr(ref, "storage", None), CudaIpcStorage):
        from sidecar.dataplane import cuda_ipc

        return cuda_ipc.ref_to_tensor(ref, input_index=input_index)  # validates the ref itself
    layout = layout_of(ref, input_index=input_index)
    if isinstance(ref.storage, InlineStorage) and not writable:
        arr = _view(ref, bytearray(ref.storage.data), 0, layout.numel)
    else:
        arr = _to_numpy(ref, layout, cache, writable, input_index)
    return _array_to_torch(arr, ref.dtype)


def write_into(ref: TensorRef, value: Any, cache: MappingCache) -> None:
    """Copies `value` into the caller-provided writable `out` ref (dtype and shape must match).

    Raises DtypeMismatch / ShapeMismatch (with expected and got) before touching the destination.
    """
    layout = layout_of(ref)
    cuda = _cuda_tensor(value)
    if isinstance(ref.storage, CudaIpcStorage):
        src = cuda if cuda is not None else _array_to_torch(*_host_array(value))
        _check_match(ref, dtypes.name_of(src.dtype), tuple(src.shape))
        to_torch(ref, cache).copy_(src)
        return
    src, name = _host_array(cuda.cpu() if cuda is not None else value)
    _check_match(ref, name, tuple(src.shape))
    if not isinstance(ref.storage, ShmStorage):
        raise InvalidTensorRef("an out ref must be in shared memory (inline data cannot be written)",
                               field="storage")
    np.copyto(_to_numpy(ref, layout, cache, True, None), src, casting="no")


def _check_match(ref: TensorRef, name: str, shape: tuple[int, ...]) -> None:
    if name != ref.dtype:
        raise DtypeMismatch(f"out ref holds {ref.dtype}, result is {name}", expected=ref.dtype, got=name)
    if shape != tuple(ref.shape):
        raise ShapeMismatch(f"out ref has shape {list(ref.shape)}, result has shape {list(shape)}",
                            expected=str(list(ref.shape)), got=str(list(shape)))
