"""CUDA tensors <-> `CudaIpcStorage` descriptors, without copying (both sides of the boundary).

Export (`tensor_to_ref`): the producer's stream is synchronised first (the consumer must see finished
data), then `sidecar._cudaipc.export` names the *allocation* holding the tensor (a block of torch's
caching allocator, say) by a 64-byte CUDA IPC handle; the ref carries the tensor's offset from that
allocation's base, so several tensors in one block all travel. Memory this process itself opened
from another process's handle is re-described by that original handle (a mapping cannot be
re-exported), so an identity op hands the caller's own handle back.

Import (`ref_to_tensor`): the device is picked by uuid (the ordinal differs between processes with
different `CUDA_VISIBLE_DEVICES`); a handle is opened once per process and shared by every tensor
that uses it (a reference count per handle; the driver refuses a second open of the same handle in
one context); the last tensor to go closes it. `offset + nbytes` is checked against the size of the
opened allocation before any tensor is made. The tensor reaches torch as a DLPack capsule whose
deleter drops that reference: no copy. A handle this process exported itself comes back as a view
of the original tensor's storage (a process cannot open its own handles).

Lifetime rule (CUDA's, not ours): the producer must keep the memory alive until every consumer has
closed it; freeing it first is undefined behaviour. The sidecar's leases and the host client's
in-flight inputs guarantee that.

Pinned host memory (`register_host_memory`): arena segments page-locked with the driver so host <->
GPU copies from them run at full PCIe/NVLink speed. Unregister before the segment is unmapped.

The C extension loads libcuda lazily, so importing this module never touches CUDA; on a machine
without it every entry point raises `DeviceUnavailable` saying why.
"""
from __future__ import annotations

import logging
import threading
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from sidecar.dataplane import dtypes
from sidecar.dataplane.validate import layout_of
from sidecar.errors import DeviceUnavailable, InvalidArgument, InvalidTensorRef
from sidecar.protocol.limits import CUDA_IPC_HANDLE_BYTES
from sidecar.protocol.refs import CudaIpcStorage, TensorRef, byte_span, elements_overlap

try:
    from sidecar import _cudaipc
except ImportError as _err:  # an install without the compiled extension
    _cudaipc = None  # type: ignore[assignment]
    _IMPORT_ERROR: str | None = f"the sidecar._cudaipc extension is not built: {_err}"
else:
    _IMPORT_ERROR = None

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

__all__ = ["available", "unavailable_reason", "tensor_to_ref", "ref_to_tensor", "register_host_memory",
           "unregister_host_memory", "cache_stats", "device_uuid", "ordinal_of_uuid", "EMPTY_HANDLE"]

EMPTY_HANDLE = bytes(CUDA_IPC_HANDLE_BYTES)  # stands for "no memory": an empty tensor has none

# DLPack type codes (dlpack.h): kDLInt, kDLUInt, kDLFloat, kDLBfloat, kDLComplex, kDLBool.
_DL_CODE = {"int": 0, "uint": 1, "float": 2, "bfloat": 4, "complex": 5, "bool": 6}


def _dl_dtype(name: str) -> tuple[int, int]:
    """(DLPack type code, bits) of a wire dtype name."""
    bits = dtypes.itemsize(name) * 8
    for prefix in ("bfloat", "complex", "float", "uint", "int", "bool"):
        if name.startswith(prefix):
            return _DL_CODE[prefix], bits
    raise InvalidTensorRef(f"dtype {name!r} has no DLPack form", field="dtype")


# ---------------------------------------------------------------------------------------------------
# availability

_usable = False  # once CUDA worked in this process it stays usable (a sticky error ends the process)


def unavailable_reason() -> str | None:
    """Why CUDA IPC cannot work in this process (None when it can). Loads libcuda on first use."""
    global _usable
    if _usable:
        return None
    if _cudaipc is None:
        return _IMPORT_ERROR
    reason = _cudaipc.load_error()
    if reason is None:
        import torch

        if not torch.cuda.is_available():
            return f"torch {torch.__version__} in this process has no usable CUDA"
        _usable = True
    return reason


def available() -> bool:
    return unavailable_reason() is None


def _unavailable(what: str, reason: str | None = None) -> DeviceUnavailable:
    why = reason or unavailable_reason() or "CUDA is not available"
    return DeviceUnavailable(f"{what}, but {why}", device="cuda", available=["cpu"])


def _require_cuda(what: str) -> None:
    reason = unavailable_reason()
    if reason is not None:
        raise _unavailable(what, reason)


def _driver_call(what: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Calls the extension, mapping a missing driver to DeviceUnavailable."""
    if _cudaipc is None:
        raise _unavailable(what, _IMPORT_ERROR)
    try:
        return fn(*args)
    except _cudaipc.CudaUnavailableError as err:
        raise _unavailable(what, str(err)) from err


# ---------------------------------------------------------------------------------------------------
# devices by uuid

_uuid_lock = threading.Lock()
_uuids: list[str] | None = None  # uuid of each ordinal visible to this process


def _visible_uuids() -> list[str]:
    global _uuids
    with _uuid_lock:
        if _uuids is None:
            assert _cudaipc is not None
            n = _driver_call("listing CUDA devices", _cudaipc.device_count)
            _uuids = [_cudaipc.device_uuid(i) for i in range(n)]
        return _uuids


def device_uuid(ordinal: int) -> str:
    """The uuid ("GPU-xxxxxxxx-...", as nvidia-smi writes it) of a device ordinal of this process."""
    uuids = _visible_uuids()
    if not 0 <= ordinal < len(uuids):
        raise DeviceUnavailable(f"cuda:{ordinal} does not exist: {len(uuids)} device(s) are visible",
                                device=f"cuda:{ordinal}", available=[f"cuda:{i}" for i in range(len(uuids))])
    return uuids[ordinal]


def ordinal_of_uuid(uuid: str, fallback: int = -1, input_index: int | None = None) -> int:
    """This process's ordinal of the device `uuid`; `fallback` (the sender's ordinal) when uuid is ''."""
    uuids = _visible_uuids()
    if uuid:
        try:
            return uuids.index(uuid)
        except ValueError:
            raise DeviceUnavailable(
                f"the tensor lives on GPU {uuid}, which this process cannot see (it sees "
                f"{', '.join(uuids) or 'no GPU'}; check CUDA_VISIBLE_DEVICES)",
                device=uuid, available=[f"cuda:{i} {u}" for i, u in enumerate(uuids)]) from None
    if 0 <= fallback < len(uuids):
        return fallback
    raise InvalidTensorRef(f"no device_uuid and device_index {fallback} is not one of the "
                           f"{len(uuids)} visible devices", field="device_index", input_index=input_index)


# ---------------------------------------------------------------------------------------------------
# bookkeeping: handles this process opened, and handles it exported

@dataclass
class _Opened:
    key: tuple[str, bytes]
    handle: bytes
    uuid: str
    device: int
    base: int
    size: int
    refs: int = 0


@dataclass
class _Exported:
    base: int
    size: int
    device: int
    buffer_id: int
    tensors: list[weakref.ref[Any]]


_lock = threading.RLock()  # re-entrant: a tensor freed while we hold it runs _release on this thread
_opened: dict[tuple[str, bytes], _Opened] = {}
_exported: dict[bytes, _Exported] = {}
_stats = {"opens": 0, "hits": 0, "closes": 0, "close_errors": 0, "exports": 0, "reexports": 0,
          "own_handles": 0}
_EXPORT_PRUNE_AT = 256  # prune dead exports when the table grows past this


def cache_stats() -> dict[str, int]:
    """Counters of this process's handle cache: opens (driver opens), hits (served from the cache),
    closes, exports, reexports (opened memory handed on by its original handle), own_handles (our
    own handles come back), open_handles (mapped now)."""
    with _lock:
        return {**_stats, "open_handles": len(_opened), "open_bytes": sum(o.size for o in _opened.values())}


def _release(key: tuple[str, bytes]) -> None:
    """One tensor over an opened handle is gone; the last one closes the handle."""
    with _lock:
        entry = _opened.get(key)
        if entry is None:
            return
        entry.refs -= 1
        if entry.refs > 0:
            return
        del _opened[key]
        _stats["closes"] += 1
        try:
            _cudaipc.close(entry.base, entry.device)
        except Exception as err:  # called from a tensor deleter: nobody to raise to
            _stats["close_errors"] += 1
            log.warning("closing CUDA IPC mapping 0x%x on cuda:%d failed: %s", entry.base, entry.device, err)


def _acquire(handle: bytes, uuid: str, device: int, input_index: int | None) -> _Opened:
    """The opened allocation for `handle` with one more reference (opened now or from the cache)."""
    key = (uuid, handle)
    with _lock:
        entry = _opened.get(key)
        if entry is not None:
            entry.refs += 1
            _stats["hits"] += 1
            return entry
        try:
            base, size = _driver_call("opening a CUDA IPC handle", _cudaipc.open, handle, device)
        except _cudaipc.CudaError as err:
            raise InvalidTensorRef(
                f"cannot open the CUDA IPC handle on cuda:{device}: {err} (is the producer process "
                f"still alive and holding the memory, and is this its handle?)",
                field="handle", input_index=input_index) from err
        entry = _Opened(key, handle, uuid, device, base, size, refs=1)
        _opened[key] = entry
        _stats["opens"] += 1
        return entry


def _register_export(handle: bytes, base: int, size: int, device: int, t: Any) -> None:
    with _lock:
        entry = _exported.get(handle)
        if entry is None or entry.base != base or entry.size != size:
            try:
                buffer_id = _cudaipc.pointer_info(base)[3]
            except Exception:
                buffer_id = 0
            entry = _Exported(base, size, device, buffer_id, [])
            _exported[handle] = entry
        live = [r for r in entry.tensors if r() is not None]
        if not any(r() is t for r in live):  # the same tensor sent again is tracked once
            live.append(weakref.ref(t))
        entry.tensors = live
        if len(_exported) > _EXPORT_PRUNE_AT:
            for h in [h for h, e in _exported.items() if all(r() is None for r in e.tensors)]:
                del _exported[h]


def _own_storage(storage: CudaIpcStorage, layout_offset: int, span: int) -> tuple[int, Any] | None:
    """(pointer, keep-alive) when `storage` names memory this process exported and still holds."""
    with _lock:
        entry = _exported.get(storage.handle)
        if entry is None:
            return None
        tensors = [t for t in (r() for r in entry.tensors) if t is not None]
    try:  # the allocation must be the very one exported: same base, size and driver buffer id
        _, base, size, buffer_id, _ = _cudaipc.pointer_info(entry.base)
    except Exception:
        return None
    if (base, size) != (entry.base, entry.size) or (entry.buffer_id and buffer_id != entry.buffer_id):
        return None
    ptr = entry.base + layout_offset
    for t in tensors:
        st = t.untyped_storage()
        lo = st.data_ptr()
        if lo <= ptr and ptr + span <= lo + st.nbytes():
            return ptr, st
    # Still our allocation, but no exported tensor of it is alive here (a CuPy/JAX array exported
    # through a temporary torch view, say): its owner keeps it alive, as for any view.
    return ptr, None


# ---------------------------------------------------------------------------------------------------
# export

def tensor_to_ref(t: torch.Tensor, *, sync: bool = True) -> TensorRef:
    """Describes a CUDA tensor by a CUDA IPC handle (no copy).

    With `sync` (the default) the current stream of the tensor's device is synchronised first, so
    the consumer never sees unfinished work; pass False only if the caller synchronised already.
    The caller must keep `t` alive until the consumer is done with it.
    """
    import torch

    if not isinstance(t, torch.Tensor) or t.device.type != "cuda":
        got = t.device if isinstance(t, torch.Tensor) else type(t).__name__
        raise InvalidArgument(f"tensor_to_ref describes CUDA tensors, got {got}")
    if t.layout != torch.strided:
        raise InvalidArgument(f"only dense (strided) tensors travel by CUDA IPC, got layout {t.layout}")
    if t.is_conj() or t.is_neg():
        raise InvalidArgument("resolve the lazy conjugate/negation first (t.resolve_conj().resolve_neg())")
    name = dtypes.name_of(t.dtype)
    item = t.element_size()
    shape = tuple(int(d) for d in t.shape)
    strides_el = tuple(int(s) for s in t.stride())
    numel = t.numel()
    if any(s < 0 for s in strides_el):
        raise InvalidArgument("tensors with negative strides cannot travel; call .contiguous() first")
    span = byte_span(shape, [s * item for s in strides_el], item)
    if elements_overlap(shape, [s * item for s in strides_el], item):
        raise InvalidArgument(f"tensor of shape {list(shape)} has overlapping strides {list(strides_el)} "
                              f"(an expand/broadcast); call .contiguous() before sending it")
    strides = None if t.is_contiguous() else tuple(0 if d <= 1 else s * item for d, s in zip(shape, strides_el, strict=True))
    device = t.device.index if t.device.index is not None else torch.cuda.current_device()
    uuid = device_uuid(device)
    if numel == 0:
        return TensorRef(name, shape, CudaIpcStorage(EMPTY_HANDLE, 0, 0, device, uuid, 0), strides)
    if sync:
        torch.cuda.current_stream(t.device).synchronize()
    ptr = t.data_ptr()
    with _lock:
        for entry in _opened.values():  # memory we mapped from someone else: hand on its handle
            if entry.device == device and entry.base <= ptr and ptr + span <= entry.base + entry.size:
                _stats["reexports"] += 1
                return TensorRef(name, shape, CudaIpcStorage(entry.handle, ptr - entry.base, span, device,
                                                             entry.uuid, entry.size), strides)
    try:
        handle, offset, alloc, dev = _driver_call("exporting a CUDA tensor", _cudaipc.export, ptr, device)
    except _cudaipc.CudaError as err:
        raise InvalidTensorRef(f"cannot export the CUDA tensor ({name}, shape {list(shape)}): {err}",
                               field="cuda_ipc") from err
    if offset + span > alloc:
        raise InvalidTensorRef(f"the tensor's {span} bytes at offset {offset} run past its allocation of "
                               f"{alloc} bytes", field="nbytes")
    _register_export(handle, ptr - offset, alloc, dev, t)
    with _lock:
        _stats["exports"] += 1
    return TensorRef(name, shape, CudaIpcStorage(handle, offset, span, dev, uuid, alloc), strides)


# ---------------------------------------------------------------------------------------------------
# import

class _Owner:
    """What a DLPack capsule holds: called once when torch frees the tensor. Drops our reference to
    an opened handle (`key`) or lets go of our own storage (`keep`), then tells `on_free`."""

    __slots__ = ("key", "keep", "on_free")

    def __init__(self, key: tuple[str, bytes] | None, keep: Any, on_free: Callable[[], None] | None) -> None:
        self.key, self.keep, self.on_free = key, keep, on_free

    def __call__(self) -> None:
        key, on_free = self.key, self.on_free
        self.key = self.keep = self.on_free = None
        if key is not None:
            _release(key)  # closes the mapping first: the producer may free the memory after on_free
        if on_free is not None:
            try:
                on_free()
            except Exception:  # called from a tensor deleter: nobody to raise to
                log.exception("on_free callback of a CUDA IPC tensor failed")


def ref_to_tensor(ref: TensorRef, *, input_index: int | None = None,
                  on_free: Callable[[], None] | None = None) -> torch.Tensor:
    """A CUDA tensor viewing the memory `ref` names (no copy), on the device whose uuid it carries.

    `on_free` (optional) is called exactly once: when torch frees the returned tensor (every view of
    it gone, this process's mapping already closed), or before returning when no memory is held (an
    empty tensor) or the ref is refused. A host releases the producer's lease there.
    Raises InvalidTensorRef (field = handle / offset / nbytes / ...) for a descriptor that cannot be
    used and DeviceUnavailable where this process has no CUDA or cannot see that GPU.
    """
    handed_over = False  # True once a capsule owns on_free
    try:
        layout = layout_of(ref, input_index=input_index)
        storage = ref.storage
        if not isinstance(storage, CudaIpcStorage):
            raise InvalidTensorRef(f"expected a CUDA IPC ref, got {type(storage).__name__}", field="storage",
                                   input_index=input_index)
        _require_cuda("a CUDA IPC tensor arrived")
        import torch

        device = ordinal_of_uuid(storage.device_uuid, storage.device_index, input_index)
        dtype = dtypes.to_torch_dtype(ref.dtype)
        if layout.numel == 0:  # no memory to share: nothing to keep
            return torch.empty(ref.shape, dtype=dtype, device=torch.device("cuda", device))
        handle = bytes(storage.handle)
        if handle == EMPTY_HANDLE:
            raise InvalidTensorRef("a non-empty tensor with an all-zero CUDA IPC handle", field="handle",
                                   input_index=input_index)
        strides_el = ([s // layout.itemsize for s in ref.strides] if ref.strides is not None
                      else _contiguous_strides(ref.shape))
        code, bits = _dl_dtype(ref.dtype)
        shape = [int(d) for d in ref.shape]
        own = _own_storage(storage, layout.offset, layout.span)
        if own is not None:  # our own memory came back (e.g. an identity op): a view, nothing opened
            ptr, keep = own
            with _lock:
                _stats["own_handles"] += 1
            capsule = _cudaipc.dlpack(ptr, device, code, bits, shape, strides_el, _Owner(None, keep, on_free))
        else:
            entry = _acquire(handle, storage.device_uuid, device, input_index)
            try:
                _check_bounds(entry.size or storage.alloc_nbytes, layout.offset, layout.nbytes, input_index)
                capsule = _cudaipc.dlpack(entry.base + layout.offset, device, code, bits, shape, strides_el,
                                          _Owner(entry.key, None, on_free))
            except BaseException:
                _release(entry.key)
                raise
        # The capsule owns the reference now: consumed, torch calls the owner when it frees the
        # tensor; not consumed (an error in from_dlpack), the capsule's destructor calls it.
        handed_over = True
        return torch.utils.dlpack.from_dlpack(capsule)
    finally:
        if not handed_over and on_free is not None:
            on_free()


def _check_bounds(size: int, offset: int, nbytes: int, input_index: int | None) -> None:
    """[offset, offset + nbytes) must lie inside the opened allocation of `size` bytes."""
    if not size:
        raise InvalidTensorRef("the driver cannot tell the size of the opened allocation and the ref "
                               "carries no alloc_nbytes: refusing to map it unchecked",
                               field="alloc_nbytes", input_index=input_index)
    if offset >= size:
        raise InvalidTensorRef(f"offset {offset} is past the end of the CUDA allocation ({size} bytes)",
                               field="offset", input_index=input_index)
    if offset + nbytes > size:
        raise InvalidTensorRef(f"{nbytes} bytes at offset {offset} run past the end of the CUDA "
                               f"allocation ({size} bytes)", field="nbytes", input_index=input_index)


def _contiguous_strides(shape: tuple[int, ...]) -> list[int]:
    out, acc = [], 1
    for d in reversed(shape):
        out.append(acc)
        acc *= max(int(d), 1)
    return out[::-1]


# ---------------------------------------------------------------------------------------------------
# pinned host memory

_registered: dict[int, int] = {}  # address -> nbytes registered by us


def register_host_memory(segment: Any, device: int = 0) -> bool:
    """Page-locks an arena segment (anything with `address`, `size`, `writable`) for fast host<->GPU copies.

    Best effort: returns False (and logs why) when the driver refuses, e.g. a locked-memory limit;
    the data still travel, only through pageable memory. Call `unregister_host_memory` before the
    segment is unmapped.
    """
    address, nbytes = int(segment.address), int(segment.size)
    if not address or not nbytes:
        return False
    with _lock:
        if address in _registered:
            return True
    try:
        _driver_call("pinning host memory", _cudaipc.host_register, address, nbytes,
                     not bool(getattr(segment, "writable", True)), device)
    except Exception as err:  # DeviceUnavailable or CudaError: pinning is an optimisation
        log.warning("could not pin %d bytes of shared memory at 0x%x for CUDA: %s", nbytes, address, err)
        return False
    with _lock:
        _registered[address] = nbytes
    return True


def unregister_host_memory(segment: Any) -> bool:
    """Undoes `register_host_memory`; False if the segment was not registered by us."""
    address = int(segment.address)
    with _lock:
        if _registered.pop(address, None) is None:
            return False
    try:
        return bool(_cudaipc.host_unregister(address))
    except Exception as err:
        log.warning("could not unpin shared memory at 0x%x: %s", address, err)
        return False
