"""The host's side of output leases: outputs that view a worker's memory stay valid until every view of
them is gone, and only then is their lease handed back (memory rule 7).

- `PendingReleases`: lease ids whose outputs were collected, sent with the client's next call (or by
  `Client.release()` / `close()`).
- `LeaseGroup`: what the outputs of one call keep alive (the worker's lease ids, input blocks and
  objects that an output aliases) and what happens once they are all collected.
- `keep_alive(arr, on_collect)`: `arr` re-made as a view of a finalised keeper array, so that every
  later view (slices, torch.from_numpy, pyarrow buffers) keeps the memory and the lease.
- `LocalFirst`: the mapping lookup of one call's outputs: an output that aliases one of the call's
  own input segments is read from the segment already held, never re-opened by name.
- `empty_in(arena, shape, dtype)`: an uninitialised array in a host arena (zero-copy inputs).
"""
from __future__ import annotations

import os
import threading
import weakref
from typing import Any, Callable, Sequence

import numpy as np

from sidecar.dataplane import tensors
from sidecar.dataplane.arena import Arena, Block
from sidecar.dataplane.mapcache import MappingCache
from sidecar.protocol.refs import TensorRef

__all__ = ["PendingReleases", "LeaseGroup", "LocalFirst", "keep_alive", "empty_in"]


class PendingReleases:
    """Lease ids queued for the worker (their outputs were garbage-collected). Thread-safe."""

    __slots__ = ("_ids", "_lock", "__weakref__")

    def __init__(self) -> None:
        self._ids: list[str] = []
        self._lock = threading.Lock()

    def add(self, ids: list[str]) -> None:
        if ids:
            with self._lock:
                self._ids.extend(ids)

    def take(self) -> list[str]:
        """Every queued id, removed from the queue (put them back with `add` if sending fails)."""
        if not self._ids:  # the common case, without the lock: a stale empty view only defers ids
            return []
        with self._lock:
            ids, self._ids = self._ids, []
        return ids

    def __len__(self) -> int:
        with self._lock:
            return len(self._ids)


class _LeaseKeeper(np.ndarray):
    """A marker ndarray subclass that every leased output (and every `empty_in` array) views.

    Its `.base` is a pyarrow Buffer holding a buffer export of the mapping (so the segment stays
    mapped), not an ndarray, and the array handed out is a plain view of it. NumPy collapses
    `.base` chains only through arrays of the same type, so every later view (slices, reshapes,
    torch.from_numpy, pyarrow buffers) keeps the keeper alive: its finalizer fires only once no
    view of the memory remains.
    """


def _owner(arr: np.ndarray) -> np.ndarray | None:
    """The outermost ndarray under `arr` (the contiguous view a buffer export was taken for)."""
    base = arr
    while isinstance(base.base, np.ndarray):
        base = base.base
    return base if base is not arr or arr.base is not None else None


def keep_alive(arr: np.ndarray, on_collect: Callable[[], Any]) -> np.ndarray | None:
    """`arr` re-made as a view of a finalised keeper; None when `arr` shares no memory."""
    import pyarrow as pa

    owner = _owner(arr)
    if owner is None or not owner.flags.c_contiguous:
        return None
    buffer = pa.py_buffer(owner)
    offset = arr.__array_interface__["data"][0] - owner.__array_interface__["data"][0]
    keeper = np.ndarray.__new__(_LeaseKeeper, arr.shape, arr.dtype, buffer=buffer, offset=offset,
                                strides=arr.strides)
    if not arr.flags.writeable:
        keeper.flags.writeable = False
    weakref.finalize(keeper, on_collect)
    view: np.ndarray = keeper.view(np.ndarray)
    return view


class LeaseGroup:
    """What the outputs of one call keep alive, and what happens once they are all collected.

    Holds the worker's lease ids (queued for release at the end), temporary input blocks that an
    output aliases (the worker may answer with a view of an input, e.g. identity), and input
    objects whose memory an output aliases (kept alive so their arena block is not reused).
    """

    __slots__ = ("pending", "lease_ids", "blocks", "keepalive", "names", "live", "lock", "done", "pid")

    def __init__(self, pending: PendingReleases, lease_ids: list[str]) -> None:
        self.pid = os.getpid()  # a forked child's copy of these outputs releases nothing of the parent's
        self.pending = weakref.ref(pending)
        self.lease_ids = lease_ids
        self.blocks: list[Block] = []
        self.keepalive: list[Any] = []
        self.names: set[str] = set()  # segments the kept outputs view
        self.live = 1  # the decoder's own token, given up by seal(): nothing finishes before it
        self.lock = threading.Lock()
        self.done = False

    def keep(self, arr: np.ndarray, name: str) -> np.ndarray:
        kept = keep_alive(arr, self.drop)
        if kept is None:
            return arr  # nothing shared (an empty tensor)
        with self.lock:
            self.live += 1
        self.names.add(name)
        return kept

    def keep_cuda(self, ref: TensorRef) -> Any:
        """A CUDA tensor over the worker's memory; the lease is held until torch frees it."""
        from sidecar.dataplane import cuda_ipc

        with self.lock:
            self.live += 1
        return cuda_ipc.ref_to_tensor(ref, on_free=self.drop)  # calls drop once, whatever happens

    def seal(self) -> None:
        """All outputs decoded (and what they alias attached): drop the decoder's token."""
        self.drop()

    def drop(self) -> None:
        with self.lock:
            self.live -= 1
            if self.live > 0 or self.done:
                return
            self.done = True
        if self.pid != os.getpid():
            return  # collected in a forked child: the leases and blocks are the parent's to give back
        for block in self.blocks:
            block.release()
        self.blocks, self.keepalive = [], []
        pending = self.pending()
        if pending is not None:
            pending.add(self.lease_ids)


class LocalFirst:
    """A MappingCache stand-in for one call: an output that aliases one of the call's own input
    segments is read from the segment we already hold, never re-opened by name (which could be gone
    or re-created); anything else comes from the cache. Looked up only for outputs, by name."""

    __slots__ = ("arena", "temp", "in_place", "cache")

    def __init__(self, arena: Arena, temp: dict[str, Block], in_place: dict[str, list[Any]],
                 cache: MappingCache) -> None:
        self.arena, self.temp, self.in_place, self.cache = arena, temp, in_place, cache

    def get(self, name: str, inode: int = 0, writable: bool = False) -> Any:
        seg = self._input_segment(name)
        if seg is not None and (not inode or inode == seg.inode):
            return seg
        return self.cache.get(name, inode, writable)

    def _input_segment(self, name: str) -> Any:
        block = self.temp.get(name)
        if block is not None:
            return block.segment
        objs = self.in_place.get(name)
        if objs:
            arr = tensors._host_array(objs[0])[0]
            hit = self.arena.find(arr.__array_interface__["data"][0], 1)
            if hit is not None and hit[0].name == name:
                return hit[0].segment
        return None


def empty_in(arena: Arena, shape: int | Sequence[int], dtype: Any = "float32", *, torch: bool = False) -> Any:
    """An uninitialised array (or CPU torch tensor) in `arena`, returned to it when no view is left."""
    from sidecar.dataplane import dtypes

    shp = (shape,) if isinstance(shape, int) else tuple(int(d) for d in shape)
    name = dtypes.name_of(dtype)
    np_dtype = dtypes.to_numpy_dtype(name)
    count = int(np.prod(shp, dtype=np.int64)) if shp else 1
    block = arena.alloc(count * np_dtype.itemsize)
    arr = keep_alive(block.ndarray(np_dtype, shp), block.release)
    if arr is None:  # zero elements: nothing to share
        block.release()
        arr = np.empty(shp, np_dtype)
    return tensors._array_to_torch(arr, name) if torch else arr
