"""Arena: pre-faulted shared-memory segments reused across allocations.

Fresh shared memory is slow: every 4 KiB page faults on first touch (100 MB costs ~75 ms). The arena
hands out whole segments rounded up to a size class (4 classes per power of two, so at most 25%
slack, minimum 64 KiB), created with MAP_POPULATE, and keeps released ones mapped for the next
allocation of that class: a warm allocation touches no new page and costs one stat, which makes
sure nobody unlinked or truncated the segment meanwhile (the plasma / Ray object-store idea). Cached segments are bounded by `max_cached_bytes` (least recently released
go first).

Memory rules:
- A released block is reused. Whoever releases a block must be done with every view of it, and so
  must every other process that mapped it (a worker's host releases a lease explicitly for that).
- A discarded block (`Block.discard`) is never reused: its segment is unlinked at once, and POSIX
  keeps the pages alive for whoever still maps them. That is how memory another process may still
  hold (a lease reclaimed after its TTL, or whose client is gone) is given up safely.
- A block handed out again never shows an earlier user's bytes past its own `nbytes` (a consumer
  maps the whole segment): the arena remembers how far each segment was ever handed out and zeroes
  that slack (`[nbytes, high-water mark)`) when it reuses the segment for fewer bytes.
- After fork() the child's copy of an arena starts over (DESIGN memory rule 9): it never reuses,
  releases or unlinks one of the parent's segments, and allocates its own, named for its pid.
"""
from __future__ import annotations

import bisect
import math
import os
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from sidecar._native import Segment, unlink
from sidecar.dataplane.names import default_run_id, validate_run_id
from sidecar.dataplane.segments import create_segment
from sidecar.errors import OutOfMemory
from sidecar.protocol.refs import ShmStorage

if TYPE_CHECKING:
    import numpy as np

__all__ = ["Arena", "ArenaStats", "Block", "size_class", "MIN_CLASS", "CLASSES_PER_DOUBLING"]

MIN_CLASS = 64 << 10
CLASSES_PER_DOUBLING = 4


def size_class(nbytes: int) -> int:
    """The capacity a request of `nbytes` gets: the next of 4 steps per power of two, >= 64 KiB."""
    if nbytes <= MIN_CLASS:
        return MIN_CLASS
    base = 1 << (nbytes.bit_length() - 1)  # largest power of two <= nbytes
    step = base // CLASSES_PER_DOUBLING    # >= 16 KiB: whole pages
    return -(-nbytes // step) * step


@dataclass(frozen=True)
class ArenaStats:
    reserved_bytes: int  # capacity of every segment the arena holds (in use + cached)
    in_use_bytes: int    # capacity of the blocks handed out and not yet released
    cached_bytes: int    # capacity of released segments kept warm for reuse
    hits: int            # allocations served from the cache
    misses: int          # allocations that created a segment
    segments: int        # segments the arena holds


class Block:
    """One allocation: a whole segment (offset 0) of `capacity` bytes, of which `nbytes` were asked."""

    __slots__ = ("segment", "name", "inode", "offset", "nbytes", "capacity", "address", "_arena", "_released",
                 "__weakref__")

    def __init__(self, arena: Arena, segment: Segment, nbytes: int) -> None:
        self.segment = segment
        self.name: str = segment.name
        self.inode: int = segment.inode
        self.offset = 0
        self.nbytes = nbytes
        self.capacity: int = segment.size
        self.address: int = segment.address
        self._arena = arena
        self._released = False

    @property
    def released(self) -> bool:
        return self._released

    def buffer(self) -> memoryview:
        """A writable view of exactly `nbytes` (it holds a buffer export: the mapping outlives close)."""
        if self._released:
            raise ValueError(f"block {self.name} was released")
        return memoryview(self.segment)[self.offset:self.offset + self.nbytes]

    def ndarray(self, dtype: Any, shape: int | tuple[int, ...]) -> np.ndarray:
        """A C-contiguous NumPy view of the block's first prod(shape)*itemsize bytes."""
        import numpy as np

        dt = np.dtype(dtype)
        shp = (shape,) if isinstance(shape, int) else tuple(shape)
        count = math.prod(shp)
        if any(d < 0 for d in shp) or count * dt.itemsize > self.nbytes:
            raise ValueError(f"shape {shp} of {dt} needs {count * dt.itemsize} bytes; block has {self.nbytes}")
        return np.frombuffer(self.buffer(), dtype=dt, count=count).reshape(shp)

    def storage(self) -> ShmStorage:
        return ShmStorage(name=self.name, offset=self.offset, nbytes=self.nbytes, inode=self.inode)

    def release(self) -> None:
        """Gives the block back to the arena for reuse (idempotent)."""
        self._arena._release(self, reuse=True)

    def discard(self) -> None:
        """Gives the block up for good: its segment is unlinked, never handed out again (idempotent).
        Mappings of it (here or in another process) stay valid until they are unmapped."""
        self._arena._release(self, reuse=False)

    def __enter__(self) -> Block:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        state = " released" if self._released else ""
        return f"<Block {self.name} nbytes={self.nbytes} capacity={self.capacity}{state}>"


def _unlink_names(names: set[str], owner_pid: int) -> None:
    # Runs at close() or, as a last resort, when the arena is collected or the interpreter exits.
    # A forked child inherits the arena but does not own its segments: it must not unlink them.
    if os.getpid() != owner_pid:
        return
    for name in list(names):
        try:
            unlink(name)
        except FileNotFoundError:
            pass
        names.discard(name)


# Every live arena, so that a forked child's copies start over (os.register_at_fork at the end).
_ARENAS: weakref.WeakSet[Arena] = weakref.WeakSet()


class Arena:
    """Thread-safe allocator of shared-memory blocks; the creator owns (and unlinks) every segment."""

    def __init__(self, run_id: str | None = None, *, max_cached_bytes: int = 2 << 30,
                 prefault: bool = True, on_create: Callable[[Segment], Any] | None = None,
                 on_destroy: Callable[[Segment], Any] | None = None) -> None:
        self.run_id = validate_run_id(run_id) if run_id is not None else default_run_id()
        self.max_cached_bytes = max_cached_bytes
        self.prefault = prefault
        # e.g. pin each new segment for CUDA and unpin it before it is unmapped (cuda_ipc)
        self._on_create, self._on_destroy = on_create, on_destroy
        self._lock = threading.Lock()
        self._free: dict[int, list[Segment]] = {}          # capacity -> warm segments, last = warmest
        self._free_lru: OrderedDict[str, Segment] = OrderedDict()  # oldest release first (eviction order)
        self._starts: list[int] = []                        # sorted base addresses of blocks in use
        self._live: dict[int, Block] = {}                   # base address -> block in use
        self._names: set[str] = set()                       # every segment we hold, for unlinking
        # segment name -> bytes of it ever handed out (a fresh segment is all zeros); bytes past a new
        # block's nbytes up to this mark are zeroed before the block is handed out again
        self._high_water: dict[str, int] = {}
        self._in_use = 0
        self._cached = 0
        self._hits = 0
        self._misses = 0
        self.discarded = 0  # blocks given up by discard(): unlinked, never reused
        self._closed = False
        self._finalizer = weakref.finalize(self, _unlink_names, self._names, os.getpid())
        _ARENAS.add(self)

    def _start_over_in_child(self) -> None:
        """After fork() in the child: the parent's segments are the parent's (memory rule 9). The child
        forgets them (never reuses, releases or unlinks one) and allocates its own, named for its pid."""
        self._finalizer.detach()
        self._lock = threading.Lock()
        self._free, self._free_lru, self._starts, self._live = {}, OrderedDict(), [], {}
        self._names, self._high_water = set(), {}
        self._in_use = self._cached = self._hits = self._misses = self.discarded = 0
        self._finalizer = weakref.finalize(self, _unlink_names, self._names, os.getpid())

    # -- allocation -------------------------------------------------------------------------------

    def alloc(self, nbytes: int) -> Block:
        """A writable block of at least `nbytes` (warm if one of its size class was released)."""
        if not isinstance(nbytes, int) or nbytes < 0:
            raise ValueError(f"allocation size must be a non-negative int, got {nbytes!r}")
        cap = size_class(nbytes)
        with self._lock:
            self._check_open()
            seg = self._take_cached(cap)
            if seg is not None:
                self._hits += 1
                slack_end = self._high_water[seg.name]
                self._high_water[seg.name] = nbytes
                block = self._hand_out(seg, nbytes)
            else:
                self._misses += 1
                block = None
        if block is not None:
            if slack_end > nbytes:  # outside the lock: the segment is this block's alone now
                block.segment.zero(nbytes, slack_end)
            return block
        seg = self._create(cap)  # outside the lock: populating a big segment takes a while
        with self._lock:
            self._names.add(seg.name)
            self._high_water[seg.name] = nbytes
            if self._closed:
                self._destroy(seg)
                self._check_open()
            return self._hand_out(seg, nbytes)

    def _create(self, cap: int) -> Segment:
        try:
            seg = create_segment(cap, self.run_id, self.prefault)
        except OutOfMemory:
            if not self.trim():  # warm memory we hold may be what is missing
                raise
            seg = create_segment(cap, self.run_id, self.prefault)
        if self._on_create is not None:
            self._on_create(seg)
        return seg

    def _take_cached(self, cap: int) -> Segment | None:
        stack = self._free.get(cap)
        while stack:
            seg = stack.pop()
            del self._free_lru[seg.name]
            self._cached -= cap
            # One stat: a segment someone else unlinked or truncated meanwhile is useless to every
            # consumer (they refuse it, or would SIGBUS on it): drop it and look further.
            if seg.file_size() == seg.size:
                return seg
            self._destroy(seg)
        return None

    def _hand_out(self, seg: Segment, nbytes: int) -> Block:
        block = Block(self, seg, nbytes)
        bisect.insort(self._starts, block.address)
        self._live[block.address] = block
        self._in_use += block.capacity
        return block

    def _release(self, block: Block, reuse: bool) -> None:
        with self._lock:
            if block._released:
                return
            block._released = True
            if self._live.get(block.address) is not block:
                return  # the arena was closed under it: the segment is already gone
            del self._live[block.address]
            del self._starts[bisect.bisect_left(self._starts, block.address)]
            self._in_use -= block.capacity
            seg = block.segment
            if not reuse:
                self.discarded += 1
            if not reuse or self._closed or block.capacity > self.max_cached_bytes:
                self._destroy(seg)
                return
            self._free.setdefault(block.capacity, []).append(seg)
            self._free_lru[seg.name] = seg
            self._cached += block.capacity
            while self._cached > self.max_cached_bytes:
                self._evict_oldest()

    def _evict_oldest(self) -> None:
        name, seg = self._free_lru.popitem(last=False)
        self._free[seg.size].remove(seg)
        self._cached -= seg.size
        self._destroy(seg)

    def _destroy(self, seg: Segment) -> None:
        if self._on_destroy is not None:
            self._on_destroy(seg)  # before the unmap
        seg.close()  # deferred while anyone still holds a view
        try:
            unlink(seg.name)
        except FileNotFoundError:
            pass
        self._names.discard(seg.name)
        self._high_water.pop(seg.name, None)

    # -- queries ----------------------------------------------------------------------------------

    def find(self, address: int, nbytes: int) -> tuple[Block, int] | None:
        """The block in use whose segment holds [address, address+nbytes), and the byte offset of
        `address` in that segment; None when the range is not (entirely) arena memory."""
        with self._lock:
            i = bisect.bisect_right(self._starts, address) - 1
            if i < 0:
                return None
            block = self._live[self._starts[i]]
        offset = address - block.address
        if nbytes < 0 or offset + nbytes > block.capacity:
            return None
        return block, offset

    def stats(self) -> ArenaStats:
        with self._lock:
            return ArenaStats(
                reserved_bytes=self._in_use + self._cached, in_use_bytes=self._in_use,
                cached_bytes=self._cached, hits=self._hits, misses=self._misses,
                segments=len(self._live) + len(self._free_lru))

    # -- teardown ---------------------------------------------------------------------------------

    def trim(self) -> int:
        """Unlinks every cached (released) segment; returns the bytes given back."""
        with self._lock:
            freed = self._cached
            while self._free_lru:
                self._evict_oldest()
            return freed

    def close(self) -> None:
        """Unlinks every segment this arena created, in use or not (idempotent). Views stay valid."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            while self._free_lru:
                self._evict_oldest()
            for block in self._live.values():
                self._destroy(block.segment)
            self._live.clear()
            self._starts.clear()
            self._in_use = 0
        self._finalizer()

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("arena is closed")

    def __enter__(self) -> Arena:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        s = self.stats()
        return (f"<Arena run={self.run_id} segments={s.segments} in_use={s.in_use_bytes} "
                f"cached={s.cached_bytes}>")


def _arenas_start_over_in_child() -> None:
    for arena in list(_ARENAS):
        arena._start_over_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_arenas_start_over_in_child)
