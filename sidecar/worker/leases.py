"""Output leases: worker memory handed to a host until it says it is done.

A lease holds the arena blocks (and, for device-resident outputs, the CUDA tensors) of one call's
outputs, and the client that took it. The memory rule (guides/zero-copy.md, DESIGN rule 7):

- Only the host's own word returns memory for reuse: an explicit release (the Release RPC, the
  `release` field of its next call, `{:release, id, ids}` on the port) puts the blocks back on the
  arena's free list.
- Every other end of a lease *reclaims* it, and a reclaimed lease *discards* its blocks: the segment
  is unlinked and never handed out again, so a host that still maps it keeps reading its own
  result (POSIX keeps the pages for whoever maps them). A lease is reclaimed when it is older than
  `ttl_s`, when more than `max_leases` are held (the oldest goes), when its client's process is gone
  (`drop_dead_owners`), and when the worker shuts down.

Clients identify themselves on each call (`LeaseOwner`: pid + a random id per client object). The
worker looks the pid up once (psutil) and remembers the process's create time, so a pid reused by
another process is not mistaken for the owner. A pid it cannot see (another pid namespace) is never
judged dead: such leases end by release, TTL or cap only. A call without an identity (the port
transport: there the client is the VM, whose leases end with stdin EOF; or a third-party gRPC client)
has no owner to watch.
"""
from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import psutil

from sidecar.protocol.limits import DEFAULT_LEASE_TTL_S, DEFAULT_MAX_LEASES


@dataclass(frozen=True)
class LeaseOwner:
    """The client that took a lease: its process and a random id of the client object."""

    pid: int
    client_id: str = ""


@dataclass
class _Lease:
    created: float
    objects: list[Any] = field(default_factory=list)
    owner: LeaseOwner | None = None


def free_objects(objects: Iterable[Any], *, reuse: bool) -> None:
    """Give each held object back: blocks are released for reuse (`reuse`) or discarded (unlinked,
    never reused); other objects (CUDA tensors) are just dropped."""
    for obj in objects:
        give_back = getattr(obj, "release" if reuse else "discard", None)
        if callable(give_back):
            try:
                give_back()
            except Exception:  # one bad block must not keep the others pinned
                pass


class _OwnerLiveness:
    """Whether a lease owner's process still runs: (pid, create time) as first seen."""

    def __init__(self) -> None:
        self._started: dict[LeaseOwner, float | None] = {}  # None: not visible here, never judged dead

    def seen(self, owner: LeaseOwner) -> None:
        """Record `owner` while it is known to be alive (it is making a call)."""
        if owner not in self._started:
            self._started[owner] = _create_time(owner.pid)

    def alive(self, owner: LeaseOwner) -> bool:
        started = self._started.get(owner)
        if started is None:
            return True
        return _create_time(owner.pid) == started

    def forget(self, owners: Iterable[LeaseOwner]) -> None:
        for owner in owners:
            self._started.pop(owner, None)

    def keep_only(self, owners: set[LeaseOwner]) -> None:
        for owner in [o for o in self._started if o not in owners]:
            del self._started[owner]

    def __len__(self) -> int:
        return len(self._started)


def _create_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return None
    except psutil.Error:  # e.g. access denied: it exists; a stable stand-in for its start time
        return -1.0


class LeaseTable:
    """Thread-safe table of leases, oldest first."""

    def __init__(self, ttl_s: float = DEFAULT_LEASE_TTL_S, max_leases: int = DEFAULT_MAX_LEASES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not ttl_s > 0:  # also refuses NaN
            raise ValueError(f"lease TTL must be > 0 seconds, got {ttl_s!r}")
        if int(max_leases) < 1:
            raise ValueError(f"max_leases must be >= 1, got {max_leases!r}")
        self.ttl_s = float(ttl_s)
        self.max_leases = int(max_leases)
        self._clock = clock
        self._lock = threading.Lock()
        self._leases: OrderedDict[str, _Lease] = OrderedDict()
        self._owners = _OwnerLiveness()
        self._closed = False
        self.expired_total = 0    # leases reclaimed by TTL or by the cap (a host forgot them)
        self.orphaned_total = 0   # leases reclaimed because their client's process was gone

    def add(self, objects: Iterable[Any], owner: LeaseOwner | None = None) -> str:
        """Keep `objects` alive under a new lease of `owner`; returns its id. Over the cap the oldest
        lease is reclaimed (its blocks discarded, never reused)."""
        lease = _Lease(self._clock(), list(objects), owner)
        lease_id = "l-" + secrets.token_hex(8)
        evicted: list[_Lease] = []
        with self._lock:
            if self._closed:
                closed = True
            else:
                closed = False
                if owner is not None:
                    self._owners.seen(owner)  # a psutil lookup the first time a client object is seen
                self._leases[lease_id] = lease
                while len(self._leases) > self.max_leases:
                    evicted.append(self._leases.popitem(last=False)[1])
                self.expired_total += len(evicted)
        if closed:
            free_objects(lease.objects, reuse=True)  # never handed to anyone
            raise RuntimeError("lease table is closed")
        for old in evicted:
            free_objects(old.objects, reuse=False)
        return lease_id

    def release(self, ids: Iterable[str]) -> tuple[int, list[str]]:
        """The host is done with these leases: their blocks are reused. Returns (released count, ids
        that were not held); unknown ids (e.g. already reclaimed) are no error."""
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
            free_objects(lease.objects, reuse=True)
        return len(freed), unknown

    def reclaim(self, ids: Iterable[str]) -> int:
        """Ends these leases without the host's word (a cancelled stream's chunks the host may or
        may not have mapped): their blocks are discarded (unlinked), never reused. Returns how many
        were held; unknown ids (already released) are skipped."""
        with self._lock:
            freed = [lease for lease in (self._leases.pop(i, None) for i in ids) if lease is not None]
        for lease in freed:
            free_objects(lease.objects, reuse=False)
        return len(freed)

    def expire(self) -> int:
        """Reclaim leases older than the TTL (and any over the cap), oldest first; returns how many."""
        if not self._leases:
            return 0  # every call asks: most hold no lease (inline outputs), and then no lock is taken
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
            free_objects(lease.objects, reuse=False)
        return len(freed)

    def drop_dead_owners(self) -> int:
        """Reclaim every lease whose client's process has ended; returns how many."""
        with self._lock:
            owners = {lease.owner for lease in self._leases.values() if lease.owner is not None}
            self._owners.keep_only(owners)  # clients that hold nothing are forgotten (no growth)
        dead = {owner for owner in owners if not self._owners.alive(owner)}  # psutil, outside the lock
        if not dead:
            return 0
        freed: list[_Lease] = []
        with self._lock:
            for lease_id in [i for i, lease in self._leases.items() if lease.owner in dead]:
                freed.append(self._leases.pop(lease_id))
            self._owners.forget(dead)
            self.orphaned_total += len(freed)
        for lease in freed:
            free_objects(lease.objects, reuse=False)
        return len(freed)

    @property
    def count(self) -> int:
        return len(self._leases)

    @property
    def watched_clients(self) -> int:
        """Client objects whose process liveness is remembered (only those that hold leases, after
        each `drop_dead_owners`)."""
        return len(self._owners)

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._leases)

    def __contains__(self, lease_id: object) -> bool:
        return lease_id in self._leases

    def close(self) -> None:
        """Reclaim every lease (the worker is stopping); later add() calls fail."""
        with self._lock:
            self._closed = True
            leases = list(self._leases.values())
            self._leases.clear()
        for lease in leases:
            free_objects(lease.objects, reuse=False)
