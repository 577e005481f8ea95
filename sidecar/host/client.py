"""`Client`: one sidecar worker over gRPC, from the host side.

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

torch is imported only when torch tensors are passed in.
"""
from __future__ import annotations

import logging
import os
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import grpc
import numpy as np

from sidecar.dataplane import arrow as arrow_io
from sidecar.dataplane import tensors
from sidecar.dataplane.arena import Arena, Block
from sidecar.dataplane.mapcache import MappingCache
from sidecar.dataplane.names import default_run_id
from sidecar.dataplane.validate import check_segment_bounds, validate_arrow_ref
from sidecar.errors import InvalidArgument, SidecarError, WorkerUnreachable
from sidecar.protocol import grpc_codec as wire
from sidecar.protocol.calls import Placement, Timing
from sidecar.protocol.refs import ArrowRef, InlineStorage, ShmStorage, TensorRef
from sidecar.v1 import sidecar_pb2 as pb
from sidecar.v1 import sidecar_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

__all__ = ["Client", "Result", "TelemetryWatch", "WorkerUnreachable"]

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


class _LeaseKeeper(np.ndarray):
    """A marker ndarray subclass that every leased output (and every `Client.empty` array) views.

    Its `.base` is a pyarrow Buffer holding a buffer export of the mapping (so the segment stays
    mapped), not an ndarray, and the array handed out is a plain view of it. NumPy collapses
    `.base` chains only through arrays of the same type, so every later view (slices, reshapes,
    torch.from_numpy, pyarrow buffers) keeps the keeper alive: its finalizer fires only once no
    view of the memory remains.
    """


def _owner(arr: np.ndarray) -> np.ndarray | None:
    """The outermost ndarray under `arr` (the contiguous view a buffer export was taken for)."""
    base = arr
    while isinstance(base.base, np.ndarray):
        base = base.base
    return base if base is not arr or arr.base is not None else None


def _kept(arr: np.ndarray, on_collect: Any) -> np.ndarray | None:
    """`arr` re-made as a view of a finalised keeper; None when `arr` shares no memory."""
    import pyarrow as pa

    owner = _owner(arr)
    if owner is None or not owner.flags.c_contiguous:
        return None
    buffer = pa.py_buffer(owner)
    offset = arr.__array_interface__["data"][0] - owner.__array_interface__["data"][0]
    keeper = np.ndarray.__new__(_LeaseKeeper, arr.shape, arr.dtype, buffer=buffer, offset=offset,
                                strides=arr.strides)
    if not arr.flags.writeable:
        keeper.flags.writeable = False
    weakref.finalize(keeper, on_collect)
    return keeper.view(np.ndarray)


class _LeaseGroup:
    """What the outputs of one call keep alive, and what happens once they are all collected.

    Holds the worker's lease ids (queued for release at the end), temporary input blocks that an
    output aliases (the worker may answer with a view of an input, e.g. identity), and input
    objects whose memory an output aliases (kept alive so their arena block is not reused).
    """

    __slots__ = ("client_ref", "lease_ids", "blocks", "keepalive", "names", "live", "lock", "done")

    def __init__(self, client: Client, lease_ids: list[str]) -> None:
        self.client_ref = weakref.ref(client)
        self.lease_ids = lease_ids
        self.blocks: list[Block] = []
        self.keepalive: list[Any] = []
        self.names: set[str] = set()  # segments the kept outputs view
        self.live = 1  # the decoder's own token, given up by seal(): nothing finishes before it
        self.lock = threading.Lock()
        self.done = False

    def keep(self, arr: np.ndarray, name: str) -> np.ndarray:
        kept = _kept(arr, self.drop)
        if kept is None:
            return arr  # nothing shared (an empty tensor)
        with self.lock:
            self.live += 1
        self.names.add(name)
        return kept

    def keep_cuda(self, ref: TensorRef) -> Any:
        """A CUDA tensor over the worker's memory; the lease is held until torch frees it."""
        from sidecar.dataplane import cuda_ipc

        with self.lock:
            self.live += 1
        return cuda_ipc.ref_to_tensor(ref, on_free=self.drop)  # calls drop once, whatever happens

    def seal(self) -> None:
        """All outputs decoded (and what they alias attached): drop the decoder's token."""
        self.drop()

    def drop(self) -> None:
        with self.lock:
            self.live -= 1
            if self.live > 0 or self.done:
                return
            self.done = True
        for block in self.blocks:
            block.release()
        self.blocks, self.keepalive = [], []
        client = self.client_ref()
        if client is not None:
            client._queue_release(self.lease_ids)


class _LocalFirst:
    """A MappingCache stand-in for one call: an output that aliases one of the call's own input
    segments is read from the segment we already hold, never re-opened by name (which could be gone
    or re-created); anything else comes from the cache. Looked up only for outputs, by name."""

    __slots__ = ("arena", "temp", "in_place", "cache")

    def __init__(self, arena: Arena, temp: dict[str, Block], in_place: dict[str, list[Any]],
                 cache: MappingCache) -> None:
        self.arena, self.temp, self.in_place, self.cache = arena, temp, in_place, cache

    def get(self, name: str, inode: int = 0, writable: bool = False) -> Any:
        seg = self._input_segment(name)
        if seg is not None and (not inode or inode == seg.inode):
            return seg
        return self.cache.get(name, inode, writable)

    def _input_segment(self, name: str) -> Any:
        block = self.temp.get(name)
        if block is not None:
            return block.segment
        objs = self.in_place.get(name)
        if objs:
            arr = tensors._host_array(objs[0])[0]
            hit = self.arena.find(arr.__array_interface__["data"][0], 1)
            if hit is not None and hit[0].name == name:
                return hit[0].segment
        return None


class TelemetryWatch:
    """An iterator of telemetry event dicts; `close()` (or leaving a `with` block) ends the stream."""

    def __init__(self, call: Any) -> None:
        self._call = call

    def __iter__(self) -> Iterator[dict[str, Any]]:
        try:
            for message in self._call:
                for event in message.batch or (message,):
                    yield wire.telemetry_from_pb(event)
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.CANCELLED:
                return
            raise wire.error_from_rpc(err) from None

    def close(self) -> None:
        self._call.cancel()

    def __enter__(self) -> TelemetryWatch:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _channel_target(address: str) -> str:
    if address.startswith(("unix:", "dns:", "ipv4:", "ipv6:")) or ":" in address:
        return address
    return f"unix:{address}"  # a bare socket path



def empty_in(arena: Arena, shape: int | Sequence[int], dtype: Any = "float32", *, torch: bool = False) -> Any:
    """An uninitialised array (or CPU torch tensor) in `arena`, returned to it when no view is left."""
    from sidecar.dataplane import dtypes

    shp = (shape,) if isinstance(shape, int) else tuple(int(d) for d in shape)
    name = dtypes.name_of(dtype)
    np_dtype = dtypes.to_numpy_dtype(name)
    count = int(np.prod(shp, dtype=np.int64)) if shp else 1
    block = arena.alloc(count * np_dtype.itemsize)
    arr = _kept(block.ndarray(np_dtype, shp), block.release)
    if arr is None:  # zero elements: nothing to share
        block.release()
        arr = np.empty(shp, np_dtype)
    return tensors._array_to_torch(arr, name) if torch else arr


class Client:
    """A connection to one worker.

    `address` is what the worker printed (`unix:/path` or `host:port`). `arena`: share one host
    arena between clients (the caller then closes it); by default the client makes its own, named
    with `run_id` and this process's pid, and unlinks it on `close()`. `timeout` is the default
    deadline of every call in seconds (None = none). `max_message_bytes` raises gRPC's 4 MiB message
    limits, needed only to move big tensors *inside* messages (placement="inline").

    `allow_alias` (default True): an output that is a view of an input (identity, reshape,
    transpose) comes back as a view of that input's memory, like NumPy views: no copy, no lease.
    The client keeps the input's memory alive for as long as the output lives; writing into one
    shows in the other. With False every output is a fresh copy in the worker's arena.
    """

    def __init__(self, address: str, *, arena: Arena | None = None, run_id: str | None = None,
                 inline_threshold: int = tensors.DEFAULT_INLINE_THRESHOLD, timeout: float | None = None,
                 max_message_bytes: int | None = None, allow_alias: bool = True) -> None:
        self.address = address
        self.run_id = run_id or (arena.run_id if arena is not None else default_run_id())
        self.inline_threshold = inline_threshold
        self.timeout = timeout
        self.allow_alias = allow_alias
        options: list[tuple[str, Any]] = [("grpc.enable_retries", 0)]
        if max_message_bytes:
            options += [("grpc.max_receive_message_length", max_message_bytes),
                        ("grpc.max_send_message_length", max_message_bytes)]
        self._channel = grpc.insecure_channel(_channel_target(address), options=options)
        self._stub = pb_grpc.SidecarStub(self._channel)
        self._own_arena = arena is None
        self._arena: Arena | None = arena
        self._arena_lock = threading.Lock()
        self._cache = MappingCache()
        self._pending: list[str] = []
        self._pending_lock = threading.Lock()
        # Sent with every call (with our pid) as the owner of its leases: the worker reclaims the
        # leases of a client whose process has ended, instead of holding them until their TTL.
        self._client_id = os.urandom(8).hex()
        self._closed = False

    # -- memory -----------------------------------------------------------------------------------

    @property
    def arena(self) -> Arena:
        """The host arena inputs travel through (created on first use)."""
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
             **attrs: Any) -> Any:
        """Run `op` and return its output (a tuple when it has several).

        NumPy in -> NumPy out; any torch tensor in -> torch out; Arrow tables come back as
        `pyarrow.Table`. With `out=` (one array/tensor, or a sequence for several outputs) the
        results are written there and `out` is returned.
        """
        result = self.execute(op, *inputs, out=out, placement=placement, timeout=timeout,
                              idempotent=idempotent, request_id=request_id, **attrs)
        outs = result.outputs
        return outs[0] if len(outs) == 1 else tuple(outs)

    def execute(self, op: str, *inputs: Any, out: Any = None, placement: str | Placement = "auto",
                timeout: float | None = None, idempotent: bool | None = None,
                request_id: str | None = None, **attrs: Any) -> Result:
        """Like `call`, but returns a `Result` with outputs, timing, device, leases and bytes."""
        self._check_open()
        place = _placement(placement, out)
        want_torch = any(_has_torch(x) for x in inputs)
        temp: dict[str, Block] = {}          # input copies made for this call, by segment name
        in_place: dict[str, list[Any]] = {}  # inputs described where they lie (zero copy)
        out_blocks: list[Block] = []
        try:
            refs = [self._encode_input(x, temp, in_place) for x in inputs]
            out_objs: list[Any] = []
            out_refs: list[TensorRef] = []
            copy_back: list[tuple[Any, Block]] = []
            if place == Placement.OUT:
                out_objs = list(out) if isinstance(out, (list, tuple)) else [out]
                for obj in out_objs:
                    ref, block = tensors.to_ref(obj, self.arena, inline_threshold=0)
                    if block is not None:  # not arena memory: the worker writes a copy we bring back
                        out_blocks.append(block)
                        copy_back.append((obj, block))
                    out_refs.append(ref)
            req = wire.execute_request(
                op, refs, attrs, placement=place, out=out_refs, release=self._take_pending(),
                request_id=request_id or os.urandom(8).hex(), idempotent=bool(idempotent),
                allow_alias=self.allow_alias and place == Placement.AUTO, client_pid=os.getpid(),
                client_id=self._client_id)
            try:
                resp = self._stub.Execute(req, timeout=timeout if timeout is not None else self.timeout)
            except grpc.RpcError as err:
                raise wire.error_from_rpc(err, op) from None
            for obj, block in copy_back:
                _copy_back(obj, block)
            res = wire.result_from_response(resp)
            if place == Placement.OUT:
                outputs = out_objs
                self._queue_release(res.leases)
            else:
                group = _LeaseGroup(self, res.leases)  # a fresh list: result_from_response made it
                cache = _LocalFirst(self.arena, temp, in_place, self._cache) if temp or in_place else self._cache
                try:
                    outputs = [self._decode_value(v, group, want_torch, cache) for v in res.outputs]
                finally:
                    # Outputs that view an input's memory keep that memory from being reused.
                    for name in group.names:
                        if name in temp:
                            group.blocks.append(temp.pop(name))
                        group.keepalive.extend(in_place.get(name, ()))
                    group.seal()
        finally:
            for block in [*temp.values(), *out_blocks]:
                block.release()
        return Result(outputs=outputs, timing=res.timing, device=res.device, leases=list(res.leases),
                      bytes_in=res.bytes_in, bytes_out=res.bytes_out, request_id=res.request_id)

    def _encode_input(self, x: Any, temp: dict[str, Block], in_place: dict[str, list[Any]]) -> Any:
        """A value as it travels: arrays/tensors/tables as refs, also inside lists and dicts (a
        HuggingFace-style {"input_ids": ..., "attention_mask": ...}), anything else as it is."""
        if isinstance(x, (list, tuple)):
            return [self._encode_input(v, temp, in_place) for v in x]
        if isinstance(x, dict):
            return {k: self._encode_input(v, temp, in_place) for k, v in x.items()}
        if _is_arrow(x):
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

    def _decode_value(self, v: Any, group: _LeaseGroup, want_torch: bool, cache: Any) -> Any:
        if isinstance(v, TensorRef):
            if isinstance(v.storage, InlineStorage):
                arr = tensors._view(v, bytearray(v.storage.data), 0, _numel(v.shape))  # private, writable
            elif isinstance(v.storage, ShmStorage):
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

    def _table(self, ref: ArrowRef, group: _LeaseGroup, cache: Any) -> Any:
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

    def _queue_release(self, ids: list[str]) -> None:
        if ids:
            with self._pending_lock:
                self._pending.extend(ids)

    def _take_pending(self) -> list[str]:
        with self._pending_lock:
            ids, self._pending = self._pending, []
        return ids

    @property
    def pending_releases(self) -> int:
        """Lease ids queued for the next call (outputs already garbage-collected)."""
        with self._pending_lock:
            return len(self._pending)

    def release(self, leases: Result | Sequence[str] | None = None) -> tuple[int, list[str]]:
        """Send a Release now: of `leases` (a Result or ids) plus everything queued.

        Releasing a result's lease while arrays of it are still in use lets the worker overwrite
        them; without arguments only the leases of collected results are sent.
        Returns (released, unknown ids).
        """
        ids = list(leases.leases if isinstance(leases, Result) else (leases or ()))
        ids += self._take_pending()
        if not ids:
            return 0, []
        try:
            resp = self._stub.Release(pb.ReleaseRequest(leases=ids), timeout=self.timeout)
        except grpc.RpcError as err:
            self._queue_release(ids)
            raise wire.error_from_rpc(err, "Release") from None
        return resp.released, list(resp.unknown)

    # -- control ----------------------------------------------------------------------------------

    def list_ops(self) -> list[dict[str, Any]]:
        """Every op the worker serves: name, doc, min_inputs, max_inputs (-1 variadic), idempotent, attrs, module."""
        resp = self._unary(self._stub.ListOps, pb.ListOpsRequest(), "ListOps")
        return [wire.op_from_pb(o) for o in resp.ops]

    def hardware(self) -> dict[str, Any]:
        """The worker's `Hardware` message as a dict."""
        return wire.hardware_from_pb(self._unary(self._stub.GetHardware, pb.HardwareRequest(), "GetHardware"))

    def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        """The gRPC health status name: "SERVING", "NOT_SERVING", ..."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self._channel)
        try:
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as err:
            raise wire.error_from_rpc(err, "Health") from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    def watch_telemetry(self, memory_interval_s: float = 0.0, batch_window_ms: int = 20) -> TelemetryWatch:
        """Stream the worker's call spans and memory samples (dicts) until `close()`.

        Events arrive in batches gathered over `batch_window_ms` (0: one stream message per event),
        which keeps a watcher's cost to the calls it observes under 1 %; the iterator yields them one by one.
        """
        self._check_open()
        request = pb.TelemetryRequest(memory_interval_s=memory_interval_s, batch_window_ms=batch_window_ms)
        return TelemetryWatch(self._stub.WatchTelemetry(request))

    def _unary(self, method: Any, request: Any, name: str) -> Any:
        self._check_open()
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as err:
            raise wire.error_from_rpc(err, name) from None

    # -- lifetime ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Release queued leases (best effort), close the channel and unlink the client's own arena."""
        if self._closed:
            return
        try:
            self.release()
        except SidecarError as err:
            log.debug("releasing leases at close failed: %s", err)
        self._closed = True
        self._channel.close()
        self._cache.clear()
        if self._own_arena and self._arena is not None:
            self._arena.close()

    def _check_open(self) -> None:
        if self._closed:
            raise InvalidArgument("client is closed")

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


def _is_torch(x: Any) -> bool:
    import sys

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
    import sys

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
