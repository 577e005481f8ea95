"""Streaming ops: a generator's chunks, with flow control and cancellation, for every transport.

An op that is a generator (or returns an iterator) is a stream: each value it yields is one chunk,
encoded like a unary call's outputs (a tuple is several values; tensors at or above the inline
threshold go into the worker's arena under one lease per chunk, smaller ones inline). The
transports only frame chunks (gRPC: `ExecuteStream` messages, the port: `{:chunk, id, chunk}`
frames); everything else happens here, once:

- flow control (`ChunkWindow`): at most `max_chunks` chunks are sent and not yet acknowledged by
  the host (`AckChunks` / `{:ack, id, n}`), and a new one is produced only while fewer than
  `max_bytes` bytes of them are unacknowledged. The generator is simply not advanced while the
  window is full, so a slow consumer costs the worker one window of chunks, never more;
- cancellation: the host cancelling (or going away, or the deadline passing) wakes a paused stream
  at once; the generator is closed (`GeneratorExit` inside it, so its `finally` runs) and the
  leases of every chunk the host had not acknowledged are reclaimed: unlinked, never reused, since
  the host may have mapped a chunk it had not acknowledged yet (memory rule 7);
- the call itself (admission, decoding, telemetry, errors, timing) is the dispatcher's
  (`Dispatcher.run` with the stream's body): a stream takes one concurrency slot for its whole life.
"""
from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from typing import Any

from sidecar.errors import Cancelled
from sidecar.protocol.calls import CallResult, Chunk
from sidecar.protocol.limits import DEFAULT_STREAM_MAX_BYTES, DEFAULT_STREAM_MAX_CHUNKS, MAX_STREAM_MAX_CHUNKS
from sidecar.worker.dispatcher import CallBody, CallState, close_stream, is_stream, outputs_of
from sidecar.worker.server_core import CallHandle, ServerCore

__all__ = ["ChunkWindow", "StreamService", "stream_body"]

_now = time.perf_counter_ns
_CANCEL_POLL_S = 0.05  # how often a paused stream looks at a caller that cannot wake it (a deadline)


class ChunkWindow:
    """The flow-control window of one stream: chunks sent and not yet acknowledged by the host.

    `wait_for_room` blocks the producer while `max_chunks` chunks (or `max_bytes` bytes of them) are
    unacknowledged; `ack(n)` (the host consumed n more) makes room; `close()` wakes the producer
    for good (the caller went away). Thread-safe.
    """

    def __init__(self, max_chunks: int = 0, max_bytes: int = 0) -> None:
        self.max_chunks = min(int(max_chunks) or DEFAULT_STREAM_MAX_CHUNKS, MAX_STREAM_MAX_CHUNKS)
        self.max_bytes = int(max_bytes) or DEFAULT_STREAM_MAX_BYTES
        self._cond = threading.Condition()
        self._unacked: collections.deque[tuple[int, list[str]]] = collections.deque()  # (bytes, leases)
        self._bytes = 0
        self._closed = False
        self.peak_chunks = 0  # the most chunks that were ever unacknowledged at once
        self.peak_bytes = 0

    def _full(self) -> bool:
        return len(self._unacked) >= self.max_chunks or (bool(self._unacked) and self._bytes >= self.max_bytes)

    def wait_for_room(self, is_cancelled: Callable[[], bool] | None) -> None:
        """Returns once another chunk may be produced; Cancelled once the caller is gone."""
        with self._cond:
            while True:
                if self._closed or (is_cancelled is not None and is_cancelled()):
                    raise Cancelled("stream cancelled by the caller")
                if not self._full():
                    return
                self._cond.wait(_CANCEL_POLL_S)

    def sent(self, nbytes: int, leases: list[str]) -> None:
        """A chunk is on its way to the host (counted before it is sent: an ack may overtake it)."""
        with self._cond:
            self._unacked.append((nbytes, leases))
            self._bytes += nbytes
            self.peak_chunks = max(self.peak_chunks, len(self._unacked))
            self.peak_bytes = max(self.peak_bytes, self._bytes)

    def ack(self, n: int) -> None:
        """The host consumed `n` more chunks (more than were sent is no error: they are all)."""
        with self._cond:
            for _ in range(min(max(int(n), 0), len(self._unacked))):
                nbytes, _leases = self._unacked.popleft()
                self._bytes -= nbytes
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def unacknowledged_leases(self) -> list[str]:
        with self._cond:
            return [lease for _, leases in self._unacked for lease in leases]

    @property
    def in_flight(self) -> int:
        return len(self._unacked)


class StreamService:
    """The streams of one server core's transports: runs them and routes the host's acks."""

    def __init__(self, core: ServerCore) -> None:
        self.core = core
        self._lock = threading.Lock()
        self._windows: dict[Hashable, ChunkWindow] = {}

    def run(self, handle: CallHandle, key: Hashable, send: Callable[[Chunk], None]) -> CallResult:
        """Runs the stream of `handle` (begun on the core), calling `send` with each chunk in order,
        on this thread; returns the final `CallResult` (no outputs; timing, bytes). `key` is what
        the host's acks name (`ack(key, n)`). Raises SidecarError (Cancelled when the caller left)."""
        call = handle.call
        window = ChunkWindow(call.stream_max_chunks, call.stream_max_bytes)
        with self._lock:
            self._windows[key] = window
        try:
            return self.core.execute(handle, stream_body(self.core.dispatcher, window, send))
        finally:
            with self._lock:
                if self._windows.get(key) is window:
                    del self._windows[key]
            if handle.cancelled():
                # The host will never acknowledge (or maybe even map) these: unlink, never reuse.
                self.core.runtime.leases.reclaim(window.unacknowledged_leases())

    def ack(self, key: Hashable, n: int) -> bool:
        """Credit from the host for the stream under `key`; False when it has ended (not an error)."""
        with self._lock:
            window = self._windows.get(key)
        if window is None:
            return False
        window.ack(n)
        return True

    def wake(self, key: Hashable) -> None:
        """The caller of the stream under `key` went away: a paused producer notices now."""
        with self._lock:
            window = self._windows.get(key)
        if window is not None:
            window.close()

    def window(self, key: Hashable) -> ChunkWindow | None:
        with self._lock:
            return self._windows.get(key)


def stream_body(dispatcher: Any, window: ChunkWindow, send: Callable[[Chunk], None]) -> CallBody:
    """The body (`Dispatcher.run`) of a streaming call: produce, encode and send chunks while the
    window has room; close the generator however the stream ends."""

    def body(st: CallState) -> tuple[list[Any], list[str], int]:
        call, timing = st.call, st.timing
        t = _now()
        produced = dispatcher.run_op(st)
        st.args = []  # the generator's frame holds what it needs
        timing.compute_ns += _now() - t
        chunks: Iterator[Any] = produced if is_stream(produced) else iter([produced])  # a unary op: one chunk
        index = total = 0
        try:
            while True:
                window.wait_for_room(call.is_cancelled)
                t = _now()
                try:
                    item = next(chunks)
                except StopIteration:
                    timing.compute_ns += _now() - t
                    break
                t2 = _now()
                timing.compute_ns += t2 - t
                values, leases, nbytes = dispatcher.encode(outputs_of(item), call, st.op_name, None, st.blocks)
                del item
                timing.encode_ns += _now() - t2
                window.sent(nbytes, leases)
                try:
                    send(Chunk(values, leases, index, nbytes))
                except BaseException:
                    dispatcher.leases.reclaim(leases)  # the host may or may not have got it
                    raise
                index += 1
                total += nbytes
        finally:
            close_stream(chunks)  # GeneratorExit in a generator that did not run out
        return [], [], total

    return body
