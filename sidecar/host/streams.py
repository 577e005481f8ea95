"""`Stream`: the chunks of one streaming call on one worker, decoded, with flow control.

`Client.stream(op, ...)` returns one. Iterating yields each chunk as `Client.call` would return
outputs (one value, or a tuple when the op yielded a tuple); tensors come back as zero-copy views
under the chunk's own lease, released once they are garbage-collected, like a call's outputs.

Flow control: the worker sends at most `max_chunks` chunks (and `max_bytes` bytes of them) that
this side has not acknowledged; a chunk is acknowledged once the iterator hands it to you, in
batches of half a window (with the lease ids queued by then), so a consumer that reads slowly
pauses the op instead of making the worker buffer.

Ending early: `close()` (also on leaving a `with` block, `break` in a `for` loop followed by the
iterator's collection, or garbage collection) cancels the stream: the worker closes the generator
and reclaims the leases of the chunks it sent that were not consumed. The inputs' shared memory
stays held until the stream ends, since the op reads it while it runs.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from typing_extensions import Self  # typing.Self is 3.11+; the package supports 3.10

from sidecar.errors import SidecarError
from sidecar.host.transport import ChunkStream
from sidecar.protocol.calls import CallResult, Chunk

if TYPE_CHECKING:
    from sidecar.host.client import Result

__all__ = ["PoolStream", "Stream"]


class Stream(Iterator[Any]):
    """See the module doc. `delivered`: chunks handed out so far; `result`: the final `Result`
    (timing, bytes; no outputs) once the stream has run out."""

    def __init__(self, chunks: ChunkStream, window: int, decode: Callable[[Chunk], Any],
                 take_releases: Callable[[], list[str]], finish: Callable[[CallResult | None], Result | None],
                 requeue: Callable[[list[str]], None] | None = None) -> None:
        self._chunks = chunks
        self._it = iter(chunks)
        self._decode = decode
        self._take_releases = take_releases
        self._finish = finish
        self._requeue = requeue
        self._ack_every = max(1, window // 2)
        self._unacked = 0
        self._lock = threading.Lock()
        self._ended = False
        self.delivered = 0
        self.result: Result | None = None

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> Any:
        if self._ended:
            raise StopIteration
        try:
            chunk = next(self._it)
        except StopIteration:
            self._end(cancel=False)
            raise
        except BaseException:
            self._end(cancel=False)  # the stream failed after the chunks delivered so far
            raise
        try:
            value = self._decode(chunk)
        except BaseException:
            self.close()
            raise
        self.delivered += 1
        self._unacked += 1
        if self._unacked >= self._ack_every:
            self._chunks.ack(self._unacked, self._take_releases(), self._requeue)
            self._unacked = 0
        return value

    def close(self) -> None:
        """Cancels the stream unless it has ended (the worker stops the op); idempotent."""
        self._end(cancel=True)

    @property
    def ended(self) -> bool:
        return self._ended

    def _end(self, cancel: bool) -> None:
        with self._lock:
            if self._ended:
                return
            self._ended = True
        try:
            if cancel:
                self._chunks.cancel()
        finally:
            self.result = self._finish(None if cancel else self._chunks.result)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_ended", True):
            try:
                self.close()
            except SidecarError:
                pass


class PoolStream(Iterator[Any]):
    """A pool's stream (`Pool.stream`): the chunks of one streaming call on one of its workers, with
    the pool's crash handling (`CallScheduler.stream`). `close()` cancels it; `delivered` counts."""

    def __init__(self, chunks: Iterator[Any]) -> None:
        self._chunks = chunks
        self.delivered = 0

    def __iter__(self) -> PoolStream:
        return self

    def __next__(self) -> Any:
        value = next(self._chunks)
        self.delivered += 1
        return value

    def close(self) -> None:
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
