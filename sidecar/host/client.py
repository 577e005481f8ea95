"""`Client`: one sidecar worker, from the host side, over a `Transport` (gRPC by default).

Inputs cross through the client's own arena (POSIX shared memory named `/sc-<run>-<host pid>-...`):
an array that already lives there travels as a descriptor only (zero copy, see `Client.empty`),
anything else is copied into it once; small tensors travel inline; CUDA tensors travel as CUDA IPC
handles. Outputs come back as views of the worker's memory (zero copy) held under a *lease*: when
every array/tensor/table of a result (and every view of it) has been garbage-collected, the lease
id is queued and sent with the next call's `release` field (or by `release()` / `close()`), and only
then may the worker reuse that memory. Should the worker reclaim the lease first (its TTL or cap,
or this process gone: each call names its pid and client), it unlinks the segment instead of
reusing it, so the outputs you hold stay valid. An output that is a view of an input (identity, transpose)
comes back as a view of that input's memory, which the client then keeps alive.

The client does not know how its descriptors travel: `sidecar.host.transport` is the cut (a worker
process over gRPC, or a worker runtime in this process). torch is imported only when torch tensors
are passed in.

Lifetime: `close()` refuses new calls at once; the connection (and the client's own arena) closes
when the calls in flight have ended, so no RPC ever starts on a closed channel. After `os.fork()`
the child's copy of a client starts over: its own connection, arena and lease list (the parent's
leases and arena blocks stay the parent's), so parent and child never share a free list. A client
cannot be pickled: pass its `address` and connect a new `Client` in the other process.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from sidecar.dataplane import arrow as arrow_io
from sidecar.dataplane import tensors
from sidecar.dataplane.arena import Arena, Block
from sidecar.dataplane.mapcache import MappingCache
from sidecar.dataplane.names import default_run_id
from sidecar.dataplane.validate import check_segment_bounds, validate_arrow_ref
from sidecar.errors import InvalidArgument, InvalidTensorRef, SidecarError, WorkerUnreachable
from sidecar.host.futures import CallFuture, CancelScope, FutureRunner
from sidecar.host.leases import LeaseGroup, LocalFirst, PendingReleases, empty_in
from sidecar.host.transport import TelemetryWatch, Transport
from sidecar.host.streams import Stream
from sidecar.protocol.calls import Call, CallResult, Chunk, OutputSpec, Placement, Timing
from sidecar.protocol.limits import DEFAULT_INLINE_THRESHOLD, DEFAULT_STREAM_MAX_CHUNKS
from sidecar.protocol.refs import ArrowRef, InlineStorage, ShmStorage, TensorRef

log = logging.getLogger(__name__)

__all__ = ["Client", "ClientClosed", "Result", "TelemetryWatch", "WorkerUnreachable", "WrongProcess", "empty_in"]


class ClientClosed(InvalidArgument):
    """A call on a closed `Client` (kind INVALID_ARGUMENT). It never reached the worker."""

    call_started = False  # read by the pool: a call that never left may be retried whatever it does


class WrongProcess(InvalidArgument, TypeError):
    """A host object used or pickled outside the process that owns it (kind INVALID_ARGUMENT).

    Its workers, connections and shared memory belong to the process that created it; the message
    says what to do instead. A TypeError too, which is what `pickle` callers expect.
    """


_PLACEMENTS = {"auto": Placement.AUTO, "shm": Placement.SHM, "inline": Placement.INLINE,
               "device": Placement.DEVICE, "out": Placement.OUT}


@dataclass
class Result:
    """Everything `Client.execute` learned about one call."""

    outputs: list[Any]
    timing: Timing
    device: str
    leases: list[str] = field(default_factory=list)
    bytes_in: int = 0
    bytes_out: int = 0
    request_id: str = ""


@dataclass
class PreparedCall:
    """A call whose inputs are encoded (`Client.prepare`): the `Call` to send and what it holds."""

    want_torch: bool = False
    call: Call = field(default_factory=lambda: Call(op=""))
    temp: dict[str, Block] = field(default_factory=dict)          # input copies made for it, by segment
    in_place: dict[str, list[Any]] = field(default_factory=dict)  # inputs described where they lie
    out_blocks: list[Block] = field(default_factory=list)
    out_objs: list[Any] = field(default_factory=list)
    copy_back: list[tuple[Any, Block]] = field(default_factory=list)

    def done(self) -> None:
        """The call is over: its input copies and out blocks go back to the arena (idempotent)."""
        blocks = [*self.temp.values(), *self.out_blocks]
        self.temp, self.out_blocks, self.in_place = {}, [], {}
        for block in blocks:
            block.release()


# Every live client, so that a forked child's copies start over (os.register_at_fork below).
_LIVE_CLIENTS: weakref.WeakSet[Client] = weakref.WeakSet()


def _start_over_in_child() -> None:
    for client in list(_LIVE_CLIENTS):
        client._start_over_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_start_over_in_child)


class Client:
    """A connection to one worker.

    `address` is what the worker printed (`unix:/path` or `host:port`): the client talks gRPC to it.
    Or pass `transport=` (a `sidecar.host.transport.Transport`, e.g. an `InProcessTransport`) instead.
    `arena`: share one host arena between clients (the caller then closes it); by default the client
    makes its own, named with `run_id` and this process's pid, and unlinks it on `close()`. `timeout`
    is the default deadline of every call in seconds (None = none). `max_message_bytes` raises gRPC's
    4 MiB message limits, needed only to move big tensors *inside* messages (placement="inline").

    `allow_alias` (default True): an output that is a view of an input (identity, reshape,
    transpose) comes back as a view of that input's memory, like NumPy views: no copy, no lease.
    The client keeps the input's memory alive for as long as the output lives; writing into one
    shows in the other. With False every output is a fresh copy in the worker's arena.
    """

    def __init__(self, address: str | None = None, *, transport: Transport | None = None,
                 arena: Arena | None = None, run_id: str | None = None,
                 inline_threshold: int = DEFAULT_INLINE_THRESHOLD, timeout: float | None = None,
                 max_message_bytes: int | None = None, allow_alias: bool = True) -> None:
        if (address is None) == (transport is None):
            raise InvalidArgument("a Client needs either a worker address or a transport", field="address")
        if transport is None:
            from sidecar.host.grpc_transport import GrpcTransport

            transport = GrpcTransport(str(address), max_message_bytes=max_message_bytes)
        self.address = transport.address
        self.run_id = run_id or (arena.run_id if arena is not None else default_run_id())
        self.inline_threshold = inline_threshold
        self.timeout = timeout
        self.allow_alias = allow_alias
        self._own_arena = arena is None
        self._arena: Arena | None = arena
        self._arena_lock = threading.Lock()
        self._cache = MappingCache()
        self._pending = PendingReleases()
        # Sent with every call (with our pid) as the owner of its leases: the worker reclaims the
        # leases of a client whose process has ended, instead of holding them until their TTL.
        self._client_id = os.urandom(8).hex()
        # Lifetime: _closed refuses new calls; _active counts calls in flight (the transport closes
        # when the last of them ends); _shut: the transport and arena are closed.
        self._life = threading.Lock()
        self._closed = False
        self._active = 0
        self._shut = False
        self._watches: weakref.WeakSet[TelemetryWatch] = weakref.WeakSet()
        self._futures = FutureRunner(name="sidecar-client-future")
        self._inherited: list[Any] = []  # a forked child keeps its parent's transport and arena, untouched
        self._parent_transport: Transport | None = None  # in a forked child: what to reopen
        self._pid = os.getpid()
        self._transport: Transport | None = transport
        _LIVE_CLIENTS.add(self)

    @property
    def transport(self) -> Transport:
        """The connection the client's descriptors travel by."""
        transport = self._transport
        if transport is None:  # a forked child that has not called yet
            raise WrongProcess("this client has not connected in this process yet", field="client")
        return transport

    # -- memory -----------------------------------------------------------------------------------

    @property
    def arena(self) -> Arena:
        """The host arena inputs travel through (created on first use)."""
        arena = self._arena
        if arena is not None:
            return arena
        with self._arena_lock:
            if self._arena is None:
                self._arena = Arena(self.run_id)
            return self._arena

    def empty(self, shape: int | Sequence[int], dtype: Any = "float32", *, torch: bool = False) -> Any:
        """An uninitialised array (or CPU torch tensor) living in the client's arena.

        Fill it and pass it to `call`: it crosses as a descriptor only, with no copy at all. Also the
        natural `out=` destination. Its memory returns to the arena when the array and every view
        of it are gone.
        """
        return empty_in(self.arena, shape, dtype, torch=torch)

    # -- calls ------------------------------------------------------------------------------------

    def call(self, op: str, *inputs: Any, out: Any = None, placement: str | Placement = "auto",
             timeout: float | None = None, idempotent: bool | None = None, request_id: str | None = None,
             session_id: str = "", session_ttl_s: float = 0.0, cancel_scope: CancelScope | None = None,
             **attrs: Any) -> Any:
        """Run `op` and return its output (a tuple when it has several).

        NumPy in -> NumPy out; any torch tensor in -> torch out; Arrow tables come back as
        `pyarrow.Table`. With `out=` (one array/tensor, or a sequence for several outputs) the
        results are written there and `out` is returned. `session_id` makes it a call of that
        session (its ops share `ctx.session` on this worker; `session_ttl_s`: its idle TTL).
        """
        result = self.execute(op, *inputs, out=out, placement=placement, timeout=timeout,
                              idempotent=idempotent, request_id=request_id, session_id=session_id,
                              session_ttl_s=session_ttl_s, cancel_scope=cancel_scope, **attrs)
        outs = result.outputs
        return outs[0] if len(outs) == 1 else tuple(outs)

    def execute(self, op: str, *inputs: Any, out: Any = None, placement: str | Placement = "auto",
                timeout: float | None = None, idempotent: bool | None = None,
                request_id: str | None = None, session_id: str = "", session_ttl_s: float = 0.0,
                cancel_scope: CancelScope | None = None, **attrs: Any) -> Result:
        """Like `call`, but returns a `Result` with outputs, timing, device, leases and bytes.
        `cancel_scope` (`sidecar.host.futures`) lets another thread cancel the call under way."""
        transport = self._enter()
        try:
            return self._execute(transport, op, inputs, out, placement, timeout, idempotent, request_id, attrs,
                                 session_id, session_ttl_s, cancel_scope)
        finally:
            self._leave()

    def _execute(self, transport: Transport, op: str, inputs: tuple[Any, ...], out: Any,
                 placement: str | Placement, timeout: float | None, idempotent: bool | None,
                 request_id: str | None, attrs: dict[str, Any], session_id: str = "",
                 session_ttl_s: float = 0.0, scope: CancelScope | None = None) -> Result:
        prepared = self.prepare(op, inputs, out, placement, idempotent, request_id, attrs,
                                session_id=session_id, session_ttl_s=session_ttl_s)
        try:
            deadline = timeout if timeout is not None else self.timeout
            res = transport.execute(prepared.call, deadline) if scope is None else \
                transport.execute_cancellable(prepared.call, deadline, scope)
            return self.complete(prepared, res)
        finally:
            prepared.done()

    def prepare(self, op: str, inputs: tuple[Any, ...], out: Any = None, placement: str | Placement = "auto",
                idempotent: bool | None = None, request_id: str | None = None,
                attrs: dict[str, Any] | None = None, *, stream_window: tuple[int, int] = (0, 0),
                session_id: str = "", session_ttl_s: float = 0.0) -> PreparedCall:
        """The data plane's half of a call before it is sent: inputs encoded (into the arena), `out`
        refs, the `Call` itself. Whatever transport sends it, `complete` decodes its answer and
        `done()` frees what the call held (the asyncio host sends it on grpc.aio)."""
        place = _placement(placement, out)
        p = PreparedCall(want_torch="torch" in sys.modules and any(_has_torch(x) for x in inputs))
        try:
            refs = [self._encode_input(x, p.temp, p.in_place) for x in inputs]
            out_refs: list[TensorRef] = []
            if place == Placement.OUT:
                p.out_objs = list(out) if isinstance(out, (list, tuple)) else [out]
                for obj in p.out_objs:
                    ref, block = tensors.to_ref(obj, self.arena, inline_threshold=0)
                    if block is not None:  # not arena memory: the worker writes a copy we bring back
                        p.out_blocks.append(block)
                        p.copy_back.append((obj, block))
                    out_refs.append(ref)
            p.call = Call(op=op, inputs=refs, attrs=dict(attrs or {}),
                          output=OutputSpec(placement=place, out=tuple(out_refs),
                                            allow_alias=self.allow_alias and place == Placement.AUTO),
                          release=self._pending.take(), request_id=request_id or os.urandom(8).hex(),
                          idempotent=bool(idempotent), client_pid=self._pid, client_id=self._client_id,
                          session_id=session_id, session_ttl_s=session_ttl_s,
                          stream_max_chunks=stream_window[0], stream_max_bytes=stream_window[1])
        except BaseException:
            p.done()
            raise
        return p

    def complete(self, p: PreparedCall, res: CallResult) -> Result:
        """The `Result` of a prepared call from its transport's answer (outputs decoded, zero copy)."""
        for obj, block in p.copy_back:
            _copy_back(obj, block)
        if p.call.output.placement == Placement.OUT:
            outputs = p.out_objs
            self._pending.add(res.leases)
        else:
            outputs = self._decode_outputs(p.call.op, res.outputs, res.leases, p.temp, p.in_place, p.want_torch)
        return Result(outputs=outputs, timing=res.timing, device=res.device, leases=list(res.leases),
                      bytes_in=res.bytes_in, bytes_out=res.bytes_out, request_id=res.request_id)

    def decode_chunk(self, p: PreparedCall, chunk: Chunk) -> Any:
        """One chunk of a prepared streaming call as the caller gets it (one value, or a tuple)."""
        outs = self._decode_outputs(p.call.op, chunk.values, chunk.leases, {}, {}, p.want_torch)
        return outs[0] if len(outs) == 1 else tuple(outs)

    def stream_ended(self, p: PreparedCall, res: CallResult | None,
                     release: Callable[[list[str]], None]) -> Result | None:
        """A prepared stream is over (`res` None: cancelled or failed): the inputs are freed, and the
        leases of consumed chunks are handed to `release` now (it requeues what it cannot send).
        Returns the final `Result`."""
        p.done()
        if res is None and self._pending:
            release(self._pending.take())
        if res is None:
            return None
        return Result(outputs=[], timing=res.timing, device=res.device, bytes_in=res.bytes_in,
                      bytes_out=res.bytes_out, request_id=res.request_id)

    def release_now(self, transport: Transport, ids: list[str]) -> None:
        """Releases `ids` with a blocking RPC; they are requeued (for the next message) if it fails."""
        try:
            transport.release(ids, self.timeout)
        except SidecarError:
            self._pending.add(ids)

    def take_releases(self) -> list[str]:
        """The lease ids queued for release (collected outputs), to piggyback on a message
        (`requeue_releases` them if it could not be sent)."""
        return self._pending.take()

    def requeue_releases(self, ids: list[str]) -> None:
        self._pending.add(ids)

    def submit(self, op: str, *inputs: Any, **kwargs: Any) -> CallFuture:
        """`call(op, *inputs, **kwargs)` in the background: a `concurrent.futures.Future` of its
        result whose `cancel()` also cancels the call in the worker (`sidecar.host.futures`)."""
        if self._closed:
            raise ClientClosed(f"the client of {self.address} is closed", field="client")
        return self._futures.submit(lambda scope: self.call(op, *inputs, cancel_scope=scope, **kwargs))

    def stream(self, op: str, *inputs: Any, timeout: float | None = None, idempotent: bool | None = None,
               request_id: str | None = None, max_chunks: int = 0, max_bytes: int = 0, **attrs: Any) -> Stream:
        """Run a streaming op (a generator): an iterator of its chunks as they are produced (see
        `sidecar.host.streams.Stream`). Each chunk comes back as `call` returns outputs.

        `max_chunks` / `max_bytes` (0 = the worker's defaults, 16 chunks and 64 MiB) bound what the
        worker sends ahead of your consumption; `timeout` bounds the whole stream. Break out (or
        `close()`) to cancel: the worker closes the generator. Errors: the op's structured error
        (raised by the iterator after the chunks produced before it), Cancelled, WorkerUnreachable.
        """
        transport = self._enter()
        try:
            p = self.prepare(op, inputs, None, "auto", idempotent, request_id, attrs,
                             stream_window=(max_chunks, max_bytes))
            chunks = transport.stream(p.call, timeout if timeout is not None else self.timeout)
        except BaseException:
            self._leave()
            raise

        def finish(res: CallResult | None) -> Result | None:
            try:
                return self.stream_ended(p, res, lambda ids: self.release_now(transport, ids))
            finally:
                self._leave()

        return Stream(chunks, max_chunks or DEFAULT_STREAM_MAX_CHUNKS, lambda chunk: self.decode_chunk(p, chunk),
                      self._pending.take, finish, self._pending.add)

    def _decode_outputs(self, op: str, values: list[Any], leases: Sequence[str], temp: dict[str, Block],
                        in_place: dict[str, list[Any]], want_torch: bool) -> list[Any]:
        """The values of a call's answer or of one chunk, as the caller gets them (zero copy, leased)."""
        if not leases and _all_inline(values):
            # The small call's path: values and inline tensors, nothing of the worker's to keep alive.
            return [self._decode_inline(v, want_torch) for v in values]
        group = LeaseGroup(self._pending, list(leases))
        cache = LocalFirst(self.arena, temp, in_place, self._cache) if temp or in_place else self._cache
        try:
            return [self._decode_value(v, group, want_torch, cache) for v in values]
        except InvalidTensorRef as err:
            if not isinstance(err.__cause__, FileNotFoundError):
                raise
            # The worker answered, then went away and its segments with it (its host unlinks
            # a dead worker's memory): a lost worker, not a bad descriptor.
            raise WorkerUnreachable(f"the worker answered {op!r} but its output segment is gone "
                                    f"(the worker exited?): {err.message}", op=op,
                                    classification="unreachable") from err
        finally:
            # Outputs that view an input's memory keep that memory from being reused.
            for name in group.names:
                if name in temp:
                    group.blocks.append(temp.pop(name))
                group.keepalive.extend(in_place.get(name, ()))
            group.seal()

    def _encode_input(self, x: Any, temp: dict[str, Block], in_place: dict[str, list[Any]]) -> Any:
        """A value as it travels: arrays/tensors/tables as refs, also inside lists and dicts (a
        HuggingFace-style {"input_ids": ..., "attention_mask": ...}), anything else as it is."""
        ref: TensorRef | ArrowRef
        if isinstance(x, np.ndarray):  # the common case first
            ref, block = tensors.to_ref(x, self.arena, inline_threshold=self.inline_threshold)
        elif isinstance(x, (list, tuple)):
            return [self._encode_input(v, temp, in_place) for v in x]
        elif isinstance(x, dict):
            return {k: self._encode_input(v, temp, in_place) for k, v in x.items()}
        elif _is_arrow(x):
            ref, block = arrow_io.table_to_ref(x, self.arena, inline_threshold=self.inline_threshold)
        elif _is_tensor_like(x):
            ref, block = tensors.to_ref(x, self.arena, inline_threshold=self.inline_threshold)
        else:
            return x  # a plain value: scalar, string, bytes, list, dict, None
        if block is not None:
            temp[block.name] = block
        elif isinstance(ref.storage, ShmStorage):
            in_place.setdefault(ref.storage.name, []).append(x)
        return ref

    def _decode_inline(self, v: Any, want_torch: bool) -> Any:
        """A value whose tensors are all inline (`_all_inline`), as the caller gets it."""
        if isinstance(v, TensorRef):
            assert isinstance(v.storage, InlineStorage)
            arr = tensors._view(v, bytearray(v.storage.data), 0, _numel(v.shape))  # private, writable
            return tensors._array_to_torch(arr, v.dtype) if want_torch else _numpy_out(arr, v.dtype)
        if isinstance(v, list):
            return [self._decode_inline(x, want_torch) for x in v]
        if isinstance(v, dict):
            return {k: self._decode_inline(x, want_torch) for k, x in v.items()}
        return v

    def _decode_value(self, v: Any, group: LeaseGroup, want_torch: bool, cache: Any) -> Any:
        if isinstance(v, TensorRef):
            if isinstance(v.storage, InlineStorage):
                return self._decode_inline(v, want_torch)
            if isinstance(v.storage, ShmStorage):
                # Writable: the leased block is ours until released, and torch has no read-only
                # tensors (an in-place op on a read-only mapping would crash the host).
                arr = tensors.to_numpy(v, cache, writable=True)
                arr = group.keep(arr, v.storage.name)
            else:  # CUDA IPC: a CUDA tensor viewing the worker's GPU memory
                return group.keep_cuda(v)
            return tensors._array_to_torch(arr, v.dtype) if want_torch else _numpy_out(arr, v.dtype)
        if isinstance(v, ArrowRef):
            return self._table(v, group, cache)
        if isinstance(v, list):
            return [self._decode_value(x, group, want_torch, cache) for x in v]
        if isinstance(v, dict):
            return {k: self._decode_value(x, group, want_torch, cache) for k, x in v.items()}
        return v

    def _table(self, ref: ArrowRef, group: LeaseGroup, cache: Any) -> Any:
        import pyarrow as pa

        if isinstance(ref.storage, InlineStorage):
            return arrow_io.ref_to_table(ref, cache)
        validate_arrow_ref(ref)
        s = ref.storage
        seg = cache.get(s.name, s.inode, writable=True)
        check_segment_bounds(s.offset, s.nbytes, seg.size, s.name, None)
        raw = np.frombuffer(seg, np.uint8, count=s.nbytes, offset=s.offset)  # holds an export
        # Column buffers point into `raw`, whose keeper holds the lease while any of them lives.
        return pa.ipc.open_stream(pa.py_buffer(group.keep(raw, s.name))).read_all()

    # -- leases -----------------------------------------------------------------------------------

    @property
    def pending_releases(self) -> int:
        """Lease ids queued for the next call (outputs already garbage-collected)."""
        return len(self._pending)

    def release(self, leases: Result | Sequence[str] | None = None) -> tuple[int, list[str]]:
        """Send a Release now: of `leases` (a Result or ids) plus everything queued.

        Releasing a result's lease while arrays of it are still in use lets the worker overwrite
        them; without arguments only the leases of collected results are sent.
        Returns (released, unknown ids).
        """
        transport = self._enter()
        try:
            ids = list(leases.leases if isinstance(leases, Result) else (leases or ()))
            ids += self._pending.take()
            if not ids:
                return 0, []
            try:
                return transport.release(ids, self.timeout)
            except SidecarError:
                self._pending.add(ids)
                raise
        finally:
            self._leave()

    # -- control ----------------------------------------------------------------------------------

    def list_ops(self) -> list[dict[str, Any]]:
        """Every op the worker serves: name, doc, min_inputs, max_inputs (-1 variadic), idempotent, attrs, module."""
        with self._in_use() as transport:
            return transport.list_ops(self.timeout)

    def hardware(self) -> dict[str, Any]:
        """The worker's `Hardware` message as a dict."""
        with self._in_use() as transport:
            return transport.hardware(self.timeout)

    def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        """The gRPC health status name: "SERVING", "NOT_SERVING", ..."""
        with self._in_use() as transport:
            return transport.health(service, timeout)

    # -- resources and sessions (guides/models-and-sessions.md) -----------------------------------

    def load(self, name: str, loader: str, *, timeout: float | None = None, **kwargs: Any) -> dict[str, Any]:
        """Runs `loader` (declared with `@sidecar.resource`) with `kwargs` in the worker and keeps what
        it returns as `name` (ops: `ctx.resource(name)`). Returns its `ResourceInfo` as a dict (device,
        host_bytes, device_bytes, load_ns, pid, already_loaded). RESOURCE_FAILED / OUT_OF_MEMORY."""
        with self._in_use() as transport:
            return transport.load(name, loader, kwargs, timeout if timeout is not None else self.timeout)

    def unload(self, name: str) -> dict[str, Any]:
        """Drops the resource `name`: {unloaded, host_bytes_freed, device_bytes_freed, device_reserved_freed}."""
        with self._in_use() as transport:
            return transport.unload(name, self.timeout)

    def resources(self) -> dict[str, Any]:
        """{"resources": [ResourceInfo dicts], "sessions": [SessionInfo dicts]} of the worker."""
        with self._in_use() as transport:
            return transport.list_resources(self.timeout)

    def close_session(self, session_id: str) -> bool:
        """Frees the worker-side state of a session; False when it had none (closed, idled out)."""
        with self._in_use() as transport:
            return transport.close_session(session_id, self.timeout)

    def watch_telemetry(self, memory_interval_s: float = 0.0, batch_window_ms: int = 20) -> TelemetryWatch:
        """Stream the worker's call spans and memory samples (dicts) until `close()`.

        Events arrive in batches gathered over `batch_window_ms` (0: one stream message per event),
        which keeps a watcher's cost to the calls it observes under 1 %; the iterator yields them one by one.
        """
        transport = self._enter()
        try:
            watch = transport.watch_telemetry(memory_interval_s, batch_window_ms)
            self._watches.add(watch)
            return watch
        finally:
            self._leave()

    # -- lifetime ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Release queued leases (best effort), refuse new calls, end telemetry watches; once the
        calls in flight have ended, close the connection and unlink the client's own arena."""
        if self._closed:
            return
        try:
            if self.pending_releases:
                self.release()
        except SidecarError as err:
            log.debug("releasing leases at close failed: %s", err)
        with self._life:
            if self._closed:
                return
            self._closed = True
            watches = list(self._watches)
            shut_now = self._active == 0 and not self._shut
            self._shut = self._shut or shut_now
        for watch in watches:
            watch.close()
        self._futures.close()
        if shut_now:
            self._shut_down()

    @property
    def closed(self) -> bool:
        return self._closed

    @contextmanager
    def _in_use(self) -> Iterator[Transport]:
        """The transport for one request, the client marked in use meanwhile (`_enter`/`_leave`)."""
        transport = self._enter()
        try:
            yield transport
        finally:
            self._leave()

    def _enter(self) -> Transport:
        """Counts a call in flight (refused with ClientClosed once the client is closed, so that the
        connection is never closed under a call, see `close`); returns the transport to use."""
        with self._life:
            if self._closed:
                raise ClientClosed(f"the client of {self.address} is closed", field="client")
            transport = self._transport
            if transport is None:  # first use in a forked child: a connection of its own
                assert self._parent_transport is not None
                transport = self._transport = self._parent_transport.reopen()
            self._active += 1
        return transport

    def _leave(self) -> None:
        with self._life:
            self._active -= 1
            last = self._closed and self._active == 0 and not self._shut
            self._shut = self._shut or last
        if last:  # close() came while calls were in flight: the last one out closes the connection
            self._shut_down()

    def _shut_down(self) -> None:
        if self._transport is not None:  # (a forked child that never called has only its parent's)
            self._transport.close()
        self._cache.clear()
        if self._own_arena and self._arena is not None:
            self._arena.close()

    def _start_over_after_fork(self) -> None:
        """In a forked child (the only thread there): fresh locks, connection, cache and arena.

        The parent's transport is kept but never used (grpc channels do not survive fork); its queued
        lease ids and its arena (free list included) stay the parent's, so nothing is released,
        reused or unlinked twice.
        """
        if self._transport is not None:
            self._parent_transport = self._transport
            self._inherited.append(self._transport)
        self._transport = None  # a new connection on first use: none is made in children that never call
        self._pid = os.getpid()
        self._life = threading.Lock()
        self._active = 0
        self._pending = PendingReleases()
        self._arena_lock = threading.Lock()
        if self._arena is not None:
            self._inherited.append(self._arena)  # its finalizer unlinks nothing outside the parent
        self._arena, self._own_arena = None, True
        self._cache = MappingCache()
        self._watches = weakref.WeakSet()
        self._futures = FutureRunner(name="sidecar-client-future")

    def __reduce__(self) -> Any:
        raise WrongProcess(f"a Client cannot be pickled (its connection and shared memory belong to process "
                           f"{self._pid}): pass its address ({self.address!r}) and create "
                           f"Client(address) in the other process", field="client")

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Client {self.address} run={self.run_id}{' closed' if self._closed else ''}>"


# ---------------------------------------------------------------------------------------------------
# helpers


def _placement(placement: str | Placement, out: Any) -> Placement:
    if out is not None:
        return Placement.OUT
    if isinstance(placement, Placement):
        return placement
    try:
        return _PLACEMENTS[str(placement).lower()]
    except KeyError:
        raise InvalidArgument(f"placement must be one of {sorted(_PLACEMENTS)}, got {placement!r}",
                              field="placement") from None


def _all_inline(values: list[Any]) -> bool:
    """Only plain values and inline tensors (at any depth): nothing of the worker's memory."""
    for v in values:
        if isinstance(v, TensorRef):
            if not isinstance(v.storage, InlineStorage):
                return False
        elif isinstance(v, ArrowRef):
            return False
        elif isinstance(v, list):
            if not _all_inline(v):
                return False
        elif isinstance(v, dict):
            if not _all_inline(list(v.values())):
                return False
    return True


def _is_torch(x: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _has_torch(x: Any) -> bool:
    """A torch tensor, or a list/dict holding one: then outputs come back as torch tensors."""
    if isinstance(x, (list, tuple)):
        return any(_has_torch(v) for v in x)
    if isinstance(x, dict):
        return any(_has_torch(v) for v in x.values())
    return _is_torch(x)


def _is_arrow(x: Any) -> bool:
    pa = sys.modules.get("pyarrow")
    return pa is not None and isinstance(x, (pa.Table, pa.RecordBatch))


def _is_tensor_like(x: Any) -> bool:
    if isinstance(x, np.generic):
        return False  # a NumPy scalar travels as a plain value
    return isinstance(x, np.ndarray) or _is_torch(x) or hasattr(x, "__dlpack__")


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _numpy_out(arr: np.ndarray, dtype: str) -> Any:
    """bfloat16 has no NumPy dtype: such outputs come back as torch tensors even for NumPy callers."""
    if dtype == "bfloat16":
        return tensors._array_to_torch(arr, dtype)
    return arr


def _copy_back(obj: Any, block: Block) -> None:
    """Copy what the worker wrote into a temporary arena block back into the caller's `out` object."""
    src = block.buffer()
    if _is_torch(obj):
        import torch

        flat = torch.frombuffer(src, dtype=torch.uint8) if len(src) else torch.empty(0, dtype=torch.uint8)
        obj.copy_(flat.view(obj.dtype).view(obj.shape))
        return
    arr = np.asarray(obj)
    np.copyto(arr, np.frombuffer(src, dtype=arr.dtype).reshape(arr.shape))
