"""Session state in a worker: what calls of one session share (`ctx.session`, e.g. a KV cache).

A call names its session (`ExecuteRequest.session_id`); the first call of a session creates its
state, an empty dict the ops fill as they like. The state is freed when the host closes the session
(`CloseSession`) or when no call of it came for its TTL (`session_ttl_s` of its calls, else the
worker's default), by the worker's janitor. A worker that dies loses its sessions: the host pool
reports that as SESSION_LOST (`sidecar.host.sessions`).
"""
from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from sidecar.errors import InvalidArgument, shorten
from sidecar.protocol.limits import DEFAULT_SESSION_TTL_S

log = logging.getLogger(__name__)

MAX_SESSION_ID = 128
MAX_SESSIONS = 10_000


@dataclass
class SessionState:
    session_id: str
    ttl_s: float
    state: dict[str, Any] = field(default_factory=dict)
    calls: int = 0
    last_used: float = field(default_factory=time.monotonic)

    def info(self, now: float) -> dict[str, Any]:
        """A `sidecar.v1.SessionInfo` record."""
        return {"session_id": self.session_id, "calls": self.calls, "idle_s": round(now - self.last_used, 3),
                "ttl_s": self.ttl_s, "keys": len(self.state)}


class SessionTable:
    """Sessions by id; thread-safe. A session's own dict is the ops' to guard (calls of one session
    normally run one at a time: the host sends them in turn)."""

    def __init__(self, default_ttl_s: float = DEFAULT_SESSION_TTL_S, max_sessions: int = MAX_SESSIONS) -> None:
        self.default_ttl_s = default_ttl_s
        self.max_sessions = max_sessions
        self._items: dict[str, SessionState] = {}
        self._lock = threading.Lock()

    def touch(self, session_id: str, ttl_s: float = 0.0, *, count: bool = True) -> SessionState:
        """The state of `session_id` (created by its first call), its idle clock restarted; `count`:
        this is a new call of the session (the dispatcher's, at admission)."""
        if not isinstance(session_id, str) or len(session_id) > MAX_SESSION_ID:
            raise InvalidArgument(f"session_id must be a string of at most {MAX_SESSION_ID} characters, got "
                                  f"{shorten(session_id)}", field="session_id")
        if math.isnan(ttl_s) or ttl_s < 0:
            raise InvalidArgument(f"session_ttl_s must be >= 0, got {ttl_s}", field="session_ttl_s")
        now = time.monotonic()
        with self._lock:
            s = self._items.get(session_id)
            if s is None:
                if len(self._items) >= self.max_sessions:
                    self._expire_locked(now)
                if len(self._items) >= self.max_sessions:
                    raise InvalidArgument(f"this worker holds {len(self._items)} sessions, its limit; close some",
                                          field="session_id", expected=f"at most {self.max_sessions} sessions")
                s = self._items[session_id] = SessionState(session_id, ttl_s or self.default_ttl_s)
            elif ttl_s:
                s.ttl_s = ttl_s
            s.calls += count
            s.last_used = now
            return s

    def close(self, session_id: str) -> bool:
        """Frees a session's state; False when there was none (closed already, idled out, never used)."""
        with self._lock:
            return self._items.pop(session_id, None) is not None

    def expire(self) -> int:
        """Frees the sessions idle past their TTL (the janitor's chore); returns how many."""
        with self._lock:
            return self._expire_locked(time.monotonic())

    def _expire_locked(self, now: float) -> int:
        idle = [sid for sid, s in self._items.items() if now - s.last_used > s.ttl_s]
        for sid in idle:
            del self._items[sid]
        if idle:
            log.info("%d session(s) idled out: %s", len(idle), ", ".join(idle[:5]))
        return len(idle)

    def infos(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        with self._lock:
            return [s.info(now) for s in self._items.values()]

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
