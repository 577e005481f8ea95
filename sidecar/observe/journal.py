"""Bounded rings of recent entries (calls, pool events) with sequence numbers, so that a poller asks
only for what is new (`since(seq)`) and memory stays bounded however long the pool runs.

`append` is on the call path: it stores what it is given (a tuple is fine) without a lock (the
counter and the deque are atomic under the GIL); readers format entries when they ask.
"""
from __future__ import annotations

import collections
import itertools
from typing import Any

__all__ = ["Journal"]


class Journal:
    """The last `maxlen` entries, each numbered by a `seq` that grows by one per entry."""

    def __init__(self, maxlen: int) -> None:
        self._entries: collections.deque[tuple[int, Any]] = collections.deque(maxlen=maxlen)
        self._seq = itertools.count(1)
        self.last = 0  # seq of the newest entry (0: none yet)

    def append(self, entry: Any) -> None:
        seq = next(self._seq)
        self._entries.append((seq, entry))
        self.last = max(self.last, seq)

    def since(self, seq: int = 0, limit: int | None = None) -> list[tuple[int, Any]]:
        """(seq, entry) of the entries newer than `seq`, oldest first (at most the newest `limit`)."""
        out = [e for e in list(self._entries) if e[0] > seq]
        return out[-limit:] if limit else out

    def __len__(self) -> int:
        return len(self._entries)
