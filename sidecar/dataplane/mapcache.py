"""Consumer-side cache of segment mappings, keyed by (name, inode).

Mapping a segment costs shm_open + fstat + mmap + munmap later; a worker sees the same host arena
segments again and again, so a hit must be a dictionary lookup. The inode is part of the key: a
name that was unlinked and re-created is a different segment and is never served from the old
mapping (which is closed; its unmap waits for any view still alive). Bounded by entry count and
mapped bytes, least recently used first out.
"""
from __future__ import annotations

import os
import threading
from typing import Any, Callable
from collections import OrderedDict
from dataclasses import dataclass

from sidecar._native import Segment
from sidecar.dataplane.names import parse_name
from sidecar.dataplane.segments import open_segment, segment_path
from sidecar.errors import InvalidTensorRef

__all__ = ["MappingCache", "MapCacheStats"]


@dataclass(frozen=True)
class MapCacheStats:
    hits: int
    misses: int
    entries: int
    bytes: int


class MappingCache:
    """Thread-safe LRU of mapped segments. `get` returns a Segment the caller must not close."""

    def __init__(self, max_entries: int = 512, max_bytes: int = 64 << 30, *, prefault: bool = False,
                 on_map: Callable[[Segment], Any] | None = None,
                 on_unmap: Callable[[Segment], Any] | None = None) -> None:
        self.max_entries = max_entries
        # e.g. page-lock each cached mapping for CUDA (a CUDA worker's inputs then reach the GPU at full
        # speed) and unlock it before the mapping goes; called under the cache's lock, on misses only
        self._on_map, self._on_unmap = on_map, on_unmap
        self.max_bytes = max_bytes
        self.prefault = prefault  # map new entries with MAP_POPULATE (no page faults on first touch)
        self._lock = threading.Lock()
        self._lru: OrderedDict[tuple[str, int], Segment] = OrderedDict()  # least recently used first
        self._bytes = 0
        self._hits = 0
        self._misses = 0

    def get(self, name: str, inode: int = 0, writable: bool = False) -> Segment:
        """The mapping of segment `name` (whose inode is `inode`; 0 = unknown, found with one stat)."""
        if inode:
            seg = self._lookup((name, inode), writable)
            if seg is not None:
                return seg
        else:
            parse_name(name)  # before touching the file system with it
            try:
                inode = os.stat(segment_path(name)).st_ino
            except FileNotFoundError as e:
                raise InvalidTensorRef(f"shared-memory segment {name} does not exist", field="name") from e
            seg = self._lookup((name, inode), writable)
            if seg is not None:
                return seg
        return self._map(name, inode, writable)

    def _lookup(self, key: tuple[str, int], writable: bool) -> Segment | None:
        with self._lock:
            seg = self._lru.get(key)
            if seg is None or (writable and not seg.writable):
                return None
            self._lru.move_to_end(key)
            self._hits += 1
            return seg

    def _map(self, name: str, inode: int, writable: bool) -> Segment:
        seg = open_segment(name, writable, prefault=self.prefault)  # outside the lock: syscalls, may raise
        if seg.inode != inode:
            seg.close()
            raise InvalidTensorRef(
                f"shared-memory segment {name} was re-created (inode {seg.inode}, descriptor says {inode})",
                field="name")
        with self._lock:
            self._misses += 1
            key = (name, inode)
            old = self._lru.get(key)
            if old is not None and (old.writable or not writable):
                seg.close()  # another thread mapped it meanwhile
                self._lru.move_to_end(key)
                return old
            # Drop every mapping of this name: a read-only one we now replace, or stale inodes.
            for stale in [k for k in self._lru if k[0] == name]:
                self._drop(stale)
            if seg.size > self.max_bytes:
                return seg  # too big to cache: the caller's reference keeps it mapped
            self._lru[key] = seg
            self._bytes += seg.size
            if self._on_map is not None:
                self._on_map(seg)
            while len(self._lru) > self.max_entries or self._bytes > self.max_bytes:
                self._drop(next(iter(self._lru)))
            return seg

    def _drop(self, key: tuple[str, int]) -> None:
        seg = self._lru.pop(key)
        self._bytes -= seg.size
        if self._on_unmap is not None:
            self._on_unmap(seg)
        seg.close()  # the unmap waits for live views

    def evict(self, name: str) -> int:
        """Forgets (and closes) every mapping of `name`; returns how many there were."""
        with self._lock:
            keys = [k for k in self._lru if k[0] == name]
            for k in keys:
                self._drop(k)
            return len(keys)

    def clear(self) -> None:
        with self._lock:
            while self._lru:
                self._drop(next(iter(self._lru)))

    def stats(self) -> MapCacheStats:
        with self._lock:
            return MapCacheStats(hits=self._hits, misses=self._misses, entries=len(self._lru), bytes=self._bytes)

    def __len__(self) -> int:
        return len(self._lru)

    def __contains__(self, name: object) -> bool:
        return any(k[0] == name for k in list(self._lru))
