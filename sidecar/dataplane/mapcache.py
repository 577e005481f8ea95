"""Consumer-side cache of segment mappings, keyed by (name, inode).

Mapping a segment costs shm_open + fstat + mmap (+ page faults on first touch) and munmap later; a
worker sees the same host arena segments again and again, so a hit must be a dictionary lookup plus
one `stat` of the name (`Segment.file_size`, ~1 us). That stat is what keeps a cached mapping honest: a segment that was
unlinked (or re-created: a new inode) is dropped, since the mapping alone would keep its memory alive
invisibly, and a segment whose size changed (truncated by its owner) is mapped again, since touching
a page past the new end of the file raises SIGBUS. The inode is part of the key: a name that was
unlinked and re-created is a different segment and is never served from the old mapping (which is
closed; its unmap waits for any view still alive). Idle entries are swept the same way (`sweep`).

Two kinds of mapping:
- shared (`get`): MAP_SHARED, read-only or read-write, shared by every user at once. Hosts reading
  leased outputs, `out` refs, Arrow inputs and the inputs of CUDA workers (which page-lock them with
  the `on_map` hook) use these.
- private (`checkout` / `checkin`): MAP_PRIVATE + PROT_WRITE, copy-on-write. A CPU worker's inputs
  use these, so an op may write into an input without changing the caller's memory; unwritten pages
  keep showing the caller's current bytes. A private mapping serves one user at a time (a second
  concurrent user of the segment gets another one), and one that was written into holds stale
  private pages, so `checkin` drops it instead of caching it (`CallMappings` does both per call).

Bounded by entry count and by mapped bytes (default: a quarter of /dev/shm, so the cache can never
pin more than that of unlinked or idle memory), least recently used first out.
"""
from __future__ import annotations

import logging
import os
import stat as stat_mod
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

from sidecar._native import Segment
from sidecar.dataplane.names import parse_name
from sidecar.dataplane.segments import SHM_DIR, not_regular_file, open_segment, shm_usage
from sidecar.errors import InvalidTensorRef

__all__ = ["MappingCache", "MapCacheStats", "CallMappings", "DEFAULT_SHM_SHARE"]

log = logging.getLogger(__name__)

DEFAULT_SHM_SHARE = 0.25  # of /dev/shm's size: the default bound on the bytes the cache keeps mapped
_SHM_PREFIX = str(SHM_DIR)  # + "/sc-..." (names start with "/")


@dataclass(frozen=True)
class MapCacheStats:
    hits: int
    misses: int
    entries: int
    bytes: int
    dropped_stale: int = 0  # mappings dropped because their segment was unlinked, re-created or resized
    dropped_dirty: int = 0  # private mappings dropped after a user wrote into them


class _Entry:
    __slots__ = ("seg", "key", "private")

    def __init__(self, seg: Segment, key: tuple[str, int], private: bool) -> None:
        self.seg, self.key, self.private = seg, key, private


class MappingCache:
    """Thread-safe LRU of mapped segments. `get` returns a Segment the caller must not close."""

    def __init__(self, max_entries: int = 512, max_bytes: int | None = None, *,
                 shm_share: float = DEFAULT_SHM_SHARE, prefault: bool = False,
                 on_map: Callable[[Segment], Any] | None = None,
                 on_unmap: Callable[[Segment], Any] | None = None) -> None:
        if not 0 < shm_share <= 1:
            raise ValueError(f"shm_share must be in (0, 1], got {shm_share!r}")
        self.max_entries = max_entries
        # e.g. page-lock each shared mapping for CUDA (a CUDA worker's inputs then reach the GPU at full
        # speed) and unlock it before the mapping goes; called under the cache's lock, on misses only
        self._on_map, self._on_unmap = on_map, on_unmap
        self.max_bytes = int(shm_usage()[1] * shm_share) if max_bytes is None else max_bytes
        self.prefault = prefault  # map new entries with MAP_POPULATE (no page faults on first touch)
        self._lock = threading.Lock()
        # Every cached mapping, least recently used first: shared ones, and private ones nobody holds.
        self._lru: OrderedDict[int, _Entry] = OrderedDict()  # id(seg) -> entry
        self._shared: dict[tuple[str, int], _Entry] = {}
        self._idle: dict[tuple[str, int], list[_Entry]] = {}  # private mappings free for a checkout
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._dropped_stale = 0
        self._dropped_dirty = 0

    # -- the file behind a name -------------------------------------------------------------------

    def _current(self, name: str, known: bool) -> os.stat_result:
        """stat of the segment's file now; InvalidTensorRef when it is gone or not a regular file.
        `known`: the name is already in the cache (valid); otherwise it is checked first."""
        if not known:
            parse_name(name)  # before touching the file system with it
        try:
            st = os.stat(_SHM_PREFIX + name)
        except FileNotFoundError as e:
            self._forget_name(name)
            raise InvalidTensorRef(f"shared-memory segment {name} does not exist", field="name") from e
        except OSError as e:
            raise InvalidTensorRef(f"cannot stat shared-memory segment {name}: {e.strerror or e}",
                                   field="name") from e
        if not stat_mod.S_ISREG(st.st_mode):
            raise not_regular_file(name)
        return st

    def _key(self, name: str, inode: int) -> tuple[tuple[str, int], int]:
        """((name, inode of the file now), its size); refuses a descriptor of an earlier incarnation."""
        known = inode != 0 and ((name, inode) in self._shared or (name, inode) in self._idle)
        st = self._current(name, known)
        if inode and st.st_ino != inode:
            self._forget_name(name, keep_inode=st.st_ino)
            raise InvalidTensorRef(
                f"shared-memory segment {name} was re-created (inode {st.st_ino}, descriptor says {inode})",
                field="name")
        return (name, st.st_ino), st.st_size

    # -- shared mappings --------------------------------------------------------------------------

    def get(self, name: str, inode: int = 0, writable: bool = False) -> Segment:
        """The shared mapping of segment `name` (whose inode is `inode`; 0 = whatever it is now)."""
        if inode:  # the hot path: a cached mapping whose file is still the same size (one stat)
            entry = self._shared.get((name, inode))
            if entry is not None and (entry.seg.writable or not writable) and \
                    entry.seg.file_size() == entry.seg.size:
                with self._lock:
                    if self._lru.get(id(entry.seg)) is entry:
                        self._lru.move_to_end(id(entry.seg))
                        self._hits += 1
                        return entry.seg
        key, size = self._key(name, inode)
        with self._lock:
            entry = self._shared.get(key)
            if entry is not None and entry.seg.size == size and (entry.seg.writable or not writable):
                self._lru.move_to_end(id(entry.seg))
                self._hits += 1
                return entry.seg
        return self._map_shared(key, size, writable)

    def _map_shared(self, key: tuple[str, int], size: int, writable: bool) -> Segment:
        name, inode = key
        seg = self._open(name, inode, writable=writable, private=False)
        with self._lock:
            self._misses += 1
            old = self._shared.get(key)
            if old is not None and old.seg.size == seg.size and (old.seg.writable or not writable):
                seg.close()  # another thread mapped it meanwhile
                self._lru.move_to_end(id(old.seg))
                return old.seg
            if old is not None:  # read-only, replaced by a writable one; or of another size
                self._dropped_stale += old.seg.size != seg.size
                self._drop(old)
            self._forget_name_locked(name, keep_inode=inode)
            if seg.size > self.max_bytes:
                return seg  # too big to cache: the caller's reference keeps it mapped
            entry = _Entry(seg, key, private=False)
            self._shared[key] = entry
            self._insert(entry)
            if self._on_map is not None:
                self._on_map(seg)
            return seg

    # -- private (copy-on-write) mappings ---------------------------------------------------------

    def checkout(self, name: str, inode: int = 0) -> Segment:
        """A private copy-on-write mapping of `name`, for the caller alone until `checkin`."""
        if inode:  # the hot path: an idle mapping whose file is still the same size (one stat)
            with self._lock:
                idle = self._idle.get((name, inode))
                entry = idle[-1] if idle else None  # the most recently used: its pages are the warmest
                if entry is not None:
                    self._remove(entry)
            if entry is not None:
                if entry.seg.file_size() == entry.seg.size:
                    with self._lock:
                        self._hits += 1
                    return entry.seg
                with self._lock:
                    self._dropped_stale += 1
                entry.seg.close()  # unlinked, re-created or resized under it: look again below
        key, size = self._key(name, inode)
        with self._lock:
            while key in self._idle:
                entry = self._idle[key][-1]  # the most recently used: its pages are the warmest
                self._remove(entry)
                if entry.seg.size == size:
                    self._hits += 1
                    return entry.seg
                self._dropped_stale += 1
                entry.seg.close()  # the file was resized under it
            self._misses += 1
        return self._open(*key, writable=False, private=True)

    def checkin(self, seg: Segment, *, dirty: bool) -> None:
        """Hands back a mapping from `checkout`. A `dirty` one (written into: its private pages no
        longer show the segment's bytes) is closed, never served again; a clean one is cached."""
        if dirty or seg.closed:
            if dirty:
                with self._lock:
                    self._dropped_dirty += 1
            seg.close()
            return
        if seg.size > self.max_bytes:
            seg.close()
            return
        entry = _Entry(seg, (seg.name, seg.inode), private=True)
        with self._lock:
            self._idle.setdefault(entry.key, []).append(entry)
            self._insert(entry)

    # -- common -----------------------------------------------------------------------------------

    def _open(self, name: str, inode: int, *, writable: bool, private: bool) -> Segment:
        seg = open_segment(name, writable, prefault=self.prefault, private=private)  # outside the lock
        if seg.inode != inode:  # re-created between our stat and the open
            seg.close()
            raise InvalidTensorRef(
                f"shared-memory segment {name} was re-created (inode {seg.inode}, descriptor says {inode})",
                field="name")
        return seg

    def _insert(self, entry: _Entry) -> None:
        self._lru[id(entry.seg)] = entry
        self._bytes += entry.seg.size
        while len(self._lru) > self.max_entries or self._bytes > self.max_bytes:
            self._drop(next(iter(self._lru.values())))

    def _remove(self, entry: _Entry) -> None:
        """Takes `entry` out of the LRU and the indexes (its mapping stays open)."""
        if self._lru.pop(id(entry.seg), None) is None:
            return
        self._bytes -= entry.seg.size
        if entry.private:
            idle = self._idle.get(entry.key)
            if idle is not None:
                try:
                    idle.remove(entry)
                except ValueError:
                    pass
                if not idle:
                    del self._idle[entry.key]
        elif self._shared.get(entry.key) is entry:
            del self._shared[entry.key]

    def _drop(self, entry: _Entry) -> None:
        self._remove(entry)
        if not entry.private and self._on_unmap is not None:
            self._on_unmap(entry.seg)
        entry.seg.close()  # the unmap waits for live views

    def _forget_name(self, name: str, keep_inode: int = 0) -> None:
        with self._lock:
            self._forget_name_locked(name, keep_inode)

    def _forget_name_locked(self, name: str, keep_inode: int = 0) -> None:
        """Drops every mapping of `name` but those of inode `keep_inode`: their file was unlinked."""
        stale = [e for e in self._lru.values() if e.key[0] == name and e.key[1] != keep_inode]
        self._dropped_stale += len(stale)
        for entry in stale:
            self._drop(entry)

    def sweep(self) -> int:
        """Drops every cached mapping whose segment was unlinked, re-created or resized meanwhile
        (their memory would otherwise stay allocated, invisibly); returns how many went."""
        with self._lock:
            entries = list(self._lru.values())
        stale = [entry for entry in entries if _stale(entry.seg)]
        with self._lock:
            stale = [e for e in stale if self._lru.get(id(e.seg)) is e]
            self._dropped_stale += len(stale)
            for entry in stale:
                self._drop(entry)
        return len(stale)

    def evict(self, name: str) -> int:
        """Forgets (and closes) every cached mapping of `name`; returns how many there were."""
        with self._lock:
            entries = [e for e in self._lru.values() if e.key[0] == name]
            for entry in entries:
                self._drop(entry)
            return len(entries)

    def clear(self) -> None:
        with self._lock:
            while self._lru:
                self._drop(next(iter(self._lru.values())))

    def stats(self) -> MapCacheStats:
        with self._lock:
            return MapCacheStats(hits=self._hits, misses=self._misses, entries=len(self._lru), bytes=self._bytes,
                                 dropped_stale=self._dropped_stale, dropped_dirty=self._dropped_dirty)

    def __len__(self) -> int:
        return len(self._lru)

    def __contains__(self, name: object) -> bool:
        return any(e.key[0] == name for e in list(self._lru.values()))


class CallMappings:
    """The private mappings one call's inputs use: a `MappingCache` stand-in for `tensors.to_torch`
    and `arrow.ref_to_table` during one call.

    Read requests get a private (copy-on-write) mapping checked out for this call alone, one per
    segment however many inputs name it; writable requests (`out` refs) get the cache's shared
    mapping. `scan` (after the op ran) finds the mappings an op wrote into; `close` hands every
    mapping back, dropping the written ones.
    """

    __slots__ = ("_cache", "_held", "_dirty")

    def __init__(self, cache: MappingCache) -> None:
        self._cache = cache
        self._held: dict[str, Segment] = {}  # name -> the mapping this call holds
        self._dirty: set[str] | None = None  # names of written mappings, once scanned

    def get(self, name: str, inode: int = 0, writable: bool = False) -> Segment:
        if writable:
            return self._cache.get(name, inode, writable=True)
        seg = self._held.get(name)
        if seg is not None and (not inode or inode == seg.inode):
            return seg
        seg = self._cache.checkout(name, inode)
        old = self._held.get(name)
        if old is not None:  # another incarnation of the name within one call: hand the old one back
            self._cache.checkin(old, dirty=_written(old))
        self._held[name] = seg
        return seg

    def scan(self) -> set[str]:
        """Names of the segments whose mapping was written into (an op changed its input in place)."""
        if self._dirty is None:
            self._dirty = {name for name, seg in self._held.items() if _written(seg)}
        return self._dirty

    def close(self) -> None:
        """Hands every mapping back (idempotent); uses `scan`'s verdicts when it already ran."""
        dirty = self.scan()
        held, self._held = self._held, {}
        for name, seg in held.items():
            self._cache.checkin(seg, dirty=name in dirty)


def _stale(seg: Segment) -> bool:
    """The file behind the mapping was unlinked, re-created or resized (or cannot be looked at)."""
    try:
        return seg.file_size() != seg.size
    except OSError:
        return True


def _written(seg: Segment) -> bool:
    """The private mapping holds pages an op wrote. If pagemap cannot be read, assume it does."""
    try:
        return seg.private_pages() > 0
    except OSError as err:
        log.warning("cannot check mapping of %s for writes (%s); dropping it", seg.name, err)
        return True
