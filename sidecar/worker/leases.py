"""Output leases: worker memory handed to a host until it says it is done.

A lease holds the arena blocks (and, for device-resident outputs, the CUDA tensors) of one call's
outputs. The host releases it explicitly or piggybacked on its next call. Leases of a host that
vanished would otherwise pin memory forever, so each one expires after `ttl_s`, and beyond
`max_leases` the oldest go first.
"""
from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterable


@dataclass
class _Lease:
    created: float
    objects: list[Any] = field(default_factory=list)


def free_objects(objects: Iterable[Any]) -> None:
    """Give each held object back: blocks have release(); other objects (tensors) are just dropped."""
    for obj in objects:
        release = getattr(obj, "release", None)
        if callable(release):
            try:
                release()
            except Exception:  # one bad block must not keep the others pinned
                pass


class LeaseTable:
    """Thread-safe table of leases, oldest first."""

    def __init__(self, ttl_s: float = 300.0, max_leases: int = 10000,
                 clock: Any = time.monotonic) -> None:
        self.ttl_s = float(ttl_s)
        self.max_leases = max(int(max_leases), 1)
        self._clock = clock
        self._lock = threading.Lock()
        self._leases: OrderedDict[str, _Lease] = OrderedDict()
        self._closed = False
        self.expired_total = 0  # leases freed by TTL or by the cap (a host forgot them)

    def add(self, objects: Iterable[Any]) -> str:
        """Keep `objects` alive under a new lease; returns its id. May push the oldest lease out."""
        lease = _Lease(self._clock(), list(objects))
        lease_id = "l-" + secrets.token_hex(8)
        evicted: list[_Lease] = []
        with self._lock:
            if self._closed:
                closed = True
            else:
                closed = False
                self._leases[lease_id] = lease
                while len(self._leases) > self.max_leases:
                    evicted.append(self._leases.popitem(last=False)[1])
                self.expired_total += len(evicted)
        if closed:
            free_objects(lease.objects)
            raise RuntimeError("lease table is closed")
        for old in evicted:
            free_objects(old.objects)
        return lease_id

    def release(self, ids: Iterable[str]) -> tuple[int, list[str]]:
        """Free the given leases; returns (released count, ids that were not held). Unknown ids are no error."""
        freed: list[_Lease] = []
        unknown: list[str] = []
        with self._lock:
            for lease_id in ids:
                lease = self._leases.pop(lease_id, None)
                if lease is None:
                    unknown.append(lease_id)
                else:
                    freed.append(lease)
        for lease in freed:
            free_objects(lease.objects)
        return len(freed), unknown

    def expire(self) -> int:
        """Free leases older than the TTL (and any over the cap), oldest first; returns how many."""
        deadline = self._clock() - self.ttl_s
        freed: list[_Lease] = []
        with self._lock:
            while self._leases:
                lease_id, lease = next(iter(self._leases.items()))
                if lease.created > deadline and len(self._leases) <= self.max_leases:
                    break  # insertion order = age order: the rest are younger
                del self._leases[lease_id]
                freed.append(lease)
            self.expired_total += len(freed)
        for lease in freed:
            free_objects(lease.objects)
        return len(freed)

    @property
    def count(self) -> int:
        return len(self._leases)

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._leases)

    def __contains__(self, lease_id: object) -> bool:
        return lease_id in self._leases

    def close(self) -> None:
        """Free every lease; later add() calls fail."""
        with self._lock:
            self._closed = True
            leases = list(self._leases.values())
            self._leases.clear()
        for lease in leases:
            free_objects(lease.objects)
