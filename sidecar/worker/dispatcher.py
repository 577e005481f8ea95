"""Call -> decode -> run on the device -> encode -> CallResult, independent of any transport.

Transports (gRPC, the Erlang port) call `Dispatcher.execute` from their own threads. It admits at
most `max_concurrency` calls to run at once and `max_queue` more to wait (in arrival order); beyond
that a call is refused at once with OVERLOADED, so a flood never piles up unbounded work. It keeps
the admitted calls in a table, so that a transport can find calls whose caller has gone but that
still run (`stuck_calls`: an op that ignores cancellation holds its slot for ever). Every
failure leaves here as a `SidecarError`, and whatever a failed or cancelled call had allocated is
given back before it returns.

Outputs go where the call's placement says: into the caller's `out` refs, inline, or into the
worker's arena under one lease per call (device-resident CUDA tensors too, kept alive by the lease).
On a CPU worker an op can write a large output straight into an arena block (`ctx.empty`, see
`sidecar.worker.scratch`): such an output is leased as it is, with no copy.
With `allow_alias` (per call) or `alias_inputs` (worker-wide) an output that is a view of a host input
is described in the host's own segment instead (no copy, no lease): the only way an identity round
trip of 100 MB costs no memcpy.

Inputs are the caller's and an op can never change them (DESIGN memory rule 8): on a CPU worker they
are decoded from private copy-on-write mappings checked out for the call (`mapcache.CallMappings`), so
an op may write into an input in place; the write stays in this process. After the op, a mapping it
wrote into is never aliased by an output (the host's segment does not hold what the op returned)
and is dropped from the cache. CUDA workers copy inputs to the device and keep shared mappings.
"""
from __future__ import annotations

import collections
import collections.abc
import itertools
import logging
import os
import secrets
import threading
import time
import traceback
import types
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from sidecar.dataplane import arrow, dtypes, tensors
from sidecar.dataplane.mapcache import CallMappings
from sidecar.errors import (Cancelled, DeviceUnavailable, InvalidArgument, InvalidTensorRef, OpFailed,
                            Overloaded, SidecarError, close_names, shorten)
from sidecar.protocol.calls import Call, CallResult, Placement, Timing
from sidecar.protocol.limits import INT64_MAX, INT64_MIN, MAX_ATTR_NAME, MAX_ATTRS
from sidecar.protocol.refs import (ArrowRef, CudaIpcStorage, ShmStorage, TensorRef, byte_span,
                                   elements_overlap)
from sidecar.worker.leases import LeaseOwner, free_objects
from sidecar.worker.registry import CTX_PARAM, OpContext, OpSpec, Registry
from sidecar.worker.scratch import CallBlocks, NoCallBlocks
from sidecar.worker.torch_errors import InputsMeta, is_sticky_cuda_error, to_sidecar_error

_now = time.perf_counter_ns
log = logging.getLogger(__name__)


def new_request_id() -> str:
    return "r-" + secrets.token_hex(8)


class _Admission:
    """A FIFO gate: `limit` holders at once, `max_queue` waiters, the rest refused."""

    def __init__(self, limit: int, max_queue: int) -> None:
        self.limit = max(int(limit), 1)
        self.max_queue = max(int(max_queue), 0)
        self._lock = threading.Lock()
        self.running = 0
        self._waiters: collections.deque[threading.Event] = collections.deque()
        self._idle = threading.Condition(self._lock)

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def acquire(self, is_cancelled: Callable[[], bool] | None) -> None:
        with self._lock:
            if self.running < self.limit and not self._waiters:
                self.running += 1
                return
            if len(self._waiters) >= self.max_queue:
                raise Overloaded(
                    f"worker overloaded: {self.running} calls running (max {self.limit}) and "
                    f"{len(self._waiters)} waiting (max {self.max_queue})",
                    queue_depth=len(self._waiters), limit=self.max_queue)
            turn = threading.Event()
            self._waiters.append(turn)
        # Poll for cancellation only while queued; a running slot is handed over by release().
        while not turn.wait(0.05 if is_cancelled is not None else None):
            if is_cancelled is not None and is_cancelled():
                with self._lock:
                    if not turn.is_set():
                        self._waiters.remove(turn)
                        self._idle.notify_all()
                        raise Cancelled("call cancelled while waiting in the queue")
                self.release()  # the slot arrived just as the caller left: pass it on
                raise Cancelled("call cancelled while waiting in the queue")

    def release(self) -> None:
        with self._lock:
            if self._waiters:
                self._waiters.popleft().set()  # the slot passes straight to the oldest waiter
            else:
                self.running -= 1
                if self.running == 0:
                    self._idle.notify_all()

    def wait_idle(self, timeout: float | None) -> bool:
        with self._lock:
            return self._idle.wait_for(lambda: self.running == 0 and not self._waiters, timeout)


class _Region:
    """A host-owned shared-memory range an input tensor views. An output lying inside one (identity,
    a reshape or transpose view) is described as that range of the host's segment: zero copies and
    no lease, since the host owns the memory. Segments of this worker (a leased output passed back
    in) are never aliased: their lease may end before the host reads the new output."""

    __slots__ = ("name", "inode", "base", "start", "end")

    def __init__(self, name: str, inode: int, base: int, start: int, end: int) -> None:
        self.name, self.inode, self.base, self.start, self.end = name, inode, base, start, end

    @classmethod
    def of_input(cls, ref: TensorRef, t: torch.Tensor, own_prefix: str) -> "_Region | None":
        s = ref.storage
        if not isinstance(s, ShmStorage) or t.device.type != "cpu" or t.numel() == 0:
            return None
        if s.name.startswith(own_prefix):  # "/sc-<our run>-<our pid>-": a segment of our arena
            return None
        start = t.data_ptr()  # the element at offset `s.offset` (strides are never negative on the wire)
        return cls(s.name, s.inode, start - s.offset, start, start + s.nbytes)

    def describe(self, t: torch.Tensor) -> TensorRef | None:
        if t.numel() == 0 or not self.start <= t.data_ptr() < self.end:
            return None
        item = t.element_size()
        strides = [0 if d <= 1 else st * item for d, st in zip(t.shape, t.stride(), strict=True)]
        if any(st < 0 for st in strides):
            return None
        span = byte_span(t.shape, strides, item)
        if elements_overlap(t.shape, strides, item) or t.data_ptr() + span > self.end:
            return None  # broadcast/overlapping views, or reaching past what the host described
        name = dtypes.name_of(t.dtype)
        storage = ShmStorage(self.name, t.data_ptr() - self.base, span, self.inode)
        return TensorRef(name, tuple(t.shape), storage, None if t.is_contiguous() else tuple(strides))


def _is_array(x: Any) -> bool:
    return isinstance(x, torch.Tensor) or hasattr(x, "__array_interface__") or hasattr(x, "__dlpack__")


def _is_table(x: Any) -> bool:
    mod = type(x).__module__
    return mod.startswith("pyarrow") and type(x).__name__ in ("Table", "RecordBatch")


def _ref_nbytes(v: Any) -> int:
    if isinstance(v, (TensorRef, ArrowRef)):
        return v.nbytes
    if isinstance(v, (list, tuple)):
        return sum(_ref_nbytes(x) for x in v)
    if isinstance(v, dict):
        return sum(_ref_nbytes(x) for x in v.values())
    return 0


def _in_shared_memory(v: Any) -> bool:
    """Whether a value has a descriptor of shared memory in it (then it is decoded from mappings)."""
    if isinstance(v, (TensorRef, ArrowRef)):
        return isinstance(v.storage, ShmStorage)
    if isinstance(v, (list, tuple)):
        return any(_in_shared_memory(x) for x in v)
    if isinstance(v, dict):
        return any(_in_shared_memory(x) for x in v.values())
    return False


def _meta(values: list[Any]) -> list[tuple[list[int], str]]:
    out = []
    for v in values:
        if isinstance(v, torch.Tensor):
            out.append((list(v.shape), str(v.dtype).removeprefix("torch.")))
        elif isinstance(v, TensorRef):
            out.append((list(v.shape), v.dtype))
        else:
            out.append(([], ""))
    return out


def outputs_of(result: Any) -> list[Any]:
    """An op's return value as a list of outputs: a tuple is several, a list is several when it
    holds tensors or tables (otherwise it is one plain list value), None is none."""
    if result is None:
        return []
    if isinstance(result, tuple):
        return list(result)
    if isinstance(result, list) and any(_is_array(x) or _is_table(x) for x in result):
        return list(result)
    return [result]


def _plain(x: Any) -> Any:
    if hasattr(x, "item") and getattr(x, "shape", None) == () and not isinstance(x, torch.Tensor):
        return x.item()  # NumPy scalar -> Python number
    return x


def _check_plain(x: Any) -> Any:
    """A plain output must be something every transport can carry."""
    if x is None or isinstance(x, (bool, float, str, bytes)):
        return x
    if isinstance(x, int):
        if not INT64_MIN <= x <= INT64_MAX:
            raise OpFailed(f"the op returned the integer {x}, which does not fit in int64",
                           exception_type="OverflowError")
        return x
    raise OpFailed(f"the op returned a value of type {type(x).__module__}.{type(x).__qualname__}; ops return "
                   "tensors, arrays, Arrow tables, numbers, strings, bytes, None, or lists/dicts of them",
                   exception_type="TypeError")


@dataclass
class CallState:
    """One admitted call with its inputs decoded, as a call body (`Dispatcher.run`) gets it."""

    spec: OpSpec
    args: list[Any]
    call: Call
    op_name: str
    request_id: str
    blocks: CallBlocks | None
    regions: list[_Region] | None   # host memory inputs view (None: outputs are never aliased)
    mappings: CallMappings | None
    timing: Timing


CallBody = Callable[[CallState], "tuple[list[Any], list[str], int]"]


def is_stream(result: Any) -> bool:
    """Whether an op's return value is a stream of chunks: a generator or another iterator (a
    tensor, array or table is iterable but no iterator)."""
    return isinstance(result, (types.GeneratorType, collections.abc.Iterator)) and not _is_table(result)


def close_stream(result: Any) -> None:
    """Ends a stream the op returned (GeneratorExit inside a generator); its errors are its own."""
    close = getattr(result, "close", None)
    if close is not None:
        try:
            close()
        except Exception:  # noqa: BLE001 - a generator failing in its clean-up must not hide why it ended
            log.warning("closing the stream of an op failed", exc_info=True)


class Dispatcher:
    def __init__(self, runtime: Any) -> None:
        """`runtime`: a `sidecar.worker.runtime.Runtime` (its parts, and `options` for the limits)."""
        opts = runtime.options
        self.runtime = runtime
        # The runtime's parts, copied once: the hot path reads them as plain attributes.
        self.registry: Registry = runtime.registry
        self.device: torch.device = runtime.device
        self.arena = runtime.arena
        self.cache = runtime.cache
        self.leases = runtime.leases
        self.telemetry = runtime.telemetry
        self.inline_threshold = opts.inline_threshold
        # Opt-in (worker-wide, or per call with `call.output.allow_alias`): outputs that are views
        # of a host input are described in the host's segment, with no copy and no lease. Only for
        # hosts that keep input memory alive while such outputs live.
        self.alias_inputs = opts.alias_inputs
        self._own_prefix = f"/sc-{getattr(self.arena, 'run_id', '')}-{os.getpid()}-"
        # ctx.empty hands out arena blocks only where outputs travel through host shared memory.
        self._blocks_for_ops = self.device.type == "cpu" and self.arena is not None
        self._no_blocks = NoCallBlocks(self.arena) if self._blocks_for_ops else None
        self._device_name = str(self.device)
        # CPU ops compute on the mapped inputs themselves: give them private (copy-on-write) mappings.
        # Other devices copy inputs to the device first (a CUDA worker also pins the shared mappings).
        self._private_inputs = self.device.type == "cpu"
        self._gate = _Admission(opts.max_concurrency, opts.max_queue)
        # Set once a sticky CUDA error poisoned the context: the transport must answer, then exit 70.
        self.tainted: str | None = None
        self.on_taint: list[Callable[[str], None]] = []
        self._counts_lock = threading.Lock()
        self.calls_total = 0
        # Admitted calls: id -> [op, request id, is_cancelled, when first seen cancelled (or None)].
        self._running: dict[int, list[Any]] = {}
        self._running_ids = itertools.count(1)

    # -- load ----------------------------------------------------------------------------------------

    @property
    def running(self) -> int:
        return self._gate.running

    @property
    def queue_depth(self) -> int:
        return self._gate.waiting

    @property
    def in_flight(self) -> int:
        return self._gate.running + self._gate.waiting

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Blocks until no call runs or waits (SIGTERM drain); False on timeout."""
        return self._gate.wait_idle(timeout)

    def stuck_calls(self, grace_s: float) -> list[str]:
        """Calls still running `grace_s` after this first saw their caller gone (call it periodically:
        that is when cancellation is noticed), described for a log line."""
        now = time.monotonic()
        with self._counts_lock:
            entries = list(self._running.values())
        stuck = []
        for entry in entries:
            op, request_id, is_cancelled, since = entry
            if is_cancelled is None or not is_cancelled():
                continue
            if since is None:
                entry[3] = since = now
            if now - since >= grace_s:
                stuck.append(f"call {request_id} of op {op!r} (its caller left over {now - since:.1f} s ago)")
        return stuck

    # -- the call ------------------------------------------------------------------------------------

    def execute(self, call: Call) -> CallResult:
        """Runs a unary call: the op's return value becomes the outputs (an op that streams is refused)."""
        return self.run(call, self._unary)

    def run(self, call: Call, body: CallBody) -> CallResult:
        """What every call goes through: releases, checks, admission, decoding, telemetry, the
        structured errors and the clean-up of per-call state; `body` runs the op on the decoded
        inputs and encodes what it produced (`_unary` here, a stream's loop in `streams`)."""
        t0 = _now()
        request_id = call.request_id or new_request_id()
        op_name = call.op if isinstance(call.op, str) else str(call.op)
        timing = Timing()
        bytes_in = _ref_nbytes(call.inputs)
        tel = self.telemetry
        if tel.active:
            tel.span_start(op_name, request_id, bytes_in)
        decoded = False  # inputs_meta for the error mapping, taken from call.inputs only on failure
        with self._counts_lock:
            self.calls_total += 1
        try:
            if call.release:
                self.leases.release(list(call.release))
            self.leases.expire()
            if self.tainted is not None:
                raise DeviceUnavailable(f"this worker's device is unusable and the worker is being replaced: "
                                        f"{self.tainted}", device=str(self.device), available=[])
            spec = self.registry.get(op_name)
            self._check_call(spec, call)
            if call.session_id:  # the session's idle clock restarts with each of its calls
                self.runtime.sessions.touch(call.session_id, call.session_ttl_s)
            self._gate.acquire(call.is_cancelled)
            with self._counts_lock:
                token = next(self._running_ids)
                self._running[token] = [op_name, request_id, call.is_cancelled, None]
            # Per-call state only where the call can use it: blocks for an op that may call
            # ctx.empty, private mappings for inputs in shared memory.
            blocks: Any = None
            if self._blocks_for_ops:
                blocks = CallBlocks(self.arena, self.inline_threshold) if spec.accepts_ctx else self._no_blocks
            mappings = CallMappings(self.cache) if self._private_inputs and _in_shared_memory(call.inputs) else None
            try:
                t1 = _now()
                timing.queue_ns = t1 - t0
                self._check_cancelled(call, "before it ran")
                # host shared memory the inputs are views of (None: outputs are never aliased)
                regions: list[_Region] | None = [] if self.alias_inputs or call.output.allow_alias else None
                source = self.cache if mappings is None else mappings
                args = [self._decode(v, i, regions, source) for i, v in enumerate(call.inputs)]
                decoded = True
                t2 = _now()
                timing.decode_ns = t2 - t1
                self._check_cancelled(call, "before it ran")
                state = CallState(spec, args, call, op_name, request_id, blocks, regions, mappings, timing)
                del args  # the body drops the inputs once the op has run (state.args)
                outputs, lease_ids, bytes_out = body(state)
                del state
            finally:
                with self._counts_lock:
                    del self._running[token]
                if blocks is not None:
                    blocks.close()  # every block no output lies in (all of them after an error)
                if mappings is not None:
                    mappings.close()  # written mappings are dropped, clean ones cached for the next call
                self._gate.release()
            timing.total_ns = _now() - t0
            if tel.active:
                tel.span_stop(op_name, request_id, timing.total_ns, bytes_in, bytes_out, _timing_dict(timing))
            return CallResult(outputs=outputs, leases=lease_ids, timing=timing, device=self._device_name,
                              bytes_in=bytes_in, bytes_out=bytes_out, request_id=request_id)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # SystemExit from a user op too: the worker stays up
            err = self._structured(exc, op_name, _meta(call.inputs) if decoded else None)
            err.fields.setdefault("request_id", request_id)
            err.fields.setdefault("op", op_name)
            timing.total_ns = _now() - t0
            if tel.active:
                tel.span_exception(op_name, request_id, timing.total_ns, bytes_in, err.kind.value,
                                   _timing_dict(timing), err.message)
            if err is exc:
                raise
            raise err from None  # the original chain is in err.traceback (OP_FAILED)

    def _unary(self, st: CallState) -> tuple[list[Any], list[str], int]:
        call, regions = st.call, st.regions
        t2 = _now()
        result = self.run_op(st)
        st.args = []
        t3 = _now()
        st.timing.compute_ns = t3 - t2
        if is_stream(result):
            close_stream(result)
            raise InvalidArgument(f"op {st.op_name!r} streams its results (it returned {type(result).__name__}); "
                                  "call it with ExecuteStream (client.stream / pool.stream, Sidecar.stream)",
                                  op=st.op_name, field="op", expected="a unary call of an op that returns",
                                  got="a streaming op")
        self._check_cancelled(call, "after it ran")
        if regions and st.mappings is not None:
            written = st.mappings.scan()  # an input the op wrote into no longer shows its output
            regions = [r for r in regions if r.name not in written]
        outputs, lease_ids, bytes_out = self.encode(outputs_of(result), call, st.op_name, regions, st.blocks)
        del result
        st.timing.encode_ns = _now() - t3
        if call.is_cancelled is not None and call.is_cancelled():
            self.leases.release(lease_ids)  # nobody will read or release them
            raise Cancelled("call cancelled while its outputs were written")
        return outputs, lease_ids, bytes_out

    def run_op(self, st: CallState) -> Any:
        """Calls the op on the decoded inputs (what it returns, a generator for a streaming op)."""
        return self._run(st.spec, st.args, st.call, st.request_id, st.blocks)

    # -- phases --------------------------------------------------------------------------------------

    def _check_call(self, spec: OpSpec, call: Call) -> None:
        n = len(call.inputs)
        lo, hi = spec.min_inputs, spec.max_inputs
        if n < lo or (hi >= 0 and n > hi):
            want = f"{lo}" if lo == hi else f"at least {lo}" if hi < 0 else f"{lo} to {hi}"
            raise InvalidArgument(f"op {spec.name!r} takes {want} input(s), got {n}", op=spec.name,
                                  field="inputs", input_index=-1, expected=want, got=str(n))
        if not isinstance(call.attrs, dict):
            raise InvalidArgument("attrs must be a map of name to value", op=spec.name, field="attrs",
                                  input_index=-1)
        if len(call.attrs) > MAX_ATTRS:
            raise InvalidArgument(f"op {spec.name!r} got {len(call.attrs)} attrs; at most {MAX_ATTRS} are accepted",
                                  op=spec.name, field="attrs", input_index=-1, expected=f"at most {MAX_ATTRS}",
                                  got=str(len(call.attrs)))
        long_name = next((k for k in call.attrs if len(str(k)) > MAX_ATTR_NAME), None)
        if long_name is not None:
            raise InvalidArgument(f"attr name {shorten(long_name)} is longer than {MAX_ATTR_NAME} characters",
                                  op=spec.name, field="attrs", input_index=-1,
                                  expected=f"names of at most {MAX_ATTR_NAME} characters", got=shorten(long_name))
        missing = [a for a in spec.required_attrs if a not in call.attrs]
        if missing:
            raise InvalidArgument(f"op {spec.name!r} needs attr(s) {', '.join(map(repr, missing))}",
                                  op=spec.name, field=f"attrs.{missing[0]}", input_index=-1,
                                  expected=", ".join(missing), got="absent")
        bad = [k for k in call.attrs if k == CTX_PARAM or (not spec.any_attrs and k not in spec.attrs)]
        if bad:
            accepted = ", ".join(spec.attrs) or "none"
            shown = ", ".join(map(repr, bad[:5])) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise InvalidArgument(
                f"op {spec.name!r} does not accept attr(s) {shown}; it accepts: {accepted}",
                op=spec.name, field="attrs", input_index=-1, expected=accepted, got=shown,
                close_names=[c for b in bad[:5] for c in close_names(str(b), spec.attrs)])

    def _check_cancelled(self, call: Call, when: str) -> None:
        if call.is_cancelled is not None and call.is_cancelled():
            raise Cancelled(f"call cancelled by the caller {when}")

    def _decode(self, v: Any, i: int, regions: list[_Region] | None, source: Any) -> Any:
        """One input as the op sees it; `source` maps its segments (the call's `CallMappings`)."""
        if isinstance(v, TensorRef):
            if isinstance(v.storage, CudaIpcStorage) and self.device.type != "cuda":
                raise DeviceUnavailable(f"input {i} is a CUDA IPC tensor but this worker runs on {self.device}",
                                        device="cuda", available=[str(self.device)], input_index=i)
            t = tensors.to_torch(v, source, writable=False, input_index=i)
            if self.device.type != "cpu" and t.device != self.device:
                return t.to(self.device)
            if regions is not None:
                region = _Region.of_input(v, t, self._own_prefix)
                if region is not None:
                    regions.append(region)
            return t
        if isinstance(v, ArrowRef):
            return arrow.ref_to_table(v, source, input_index=i)
        if isinstance(v, list):
            return [self._decode(x, i, regions, source) for x in v]
        if isinstance(v, dict):
            return {k: self._decode(x, i, regions, source) for k, x in v.items()}
        return v

    def _run(self, spec: OpSpec, args: list[Any], call: Call, request_id: str,
             blocks: CallBlocks | None) -> Any:
        kwargs: dict[str, Any] = dict(call.attrs)  # the attrs, and the ctx an op may take
        if spec.accepts_ctx:
            kwargs[CTX_PARAM] = OpContext(self.device, self.runtime, request_id,
                                          call.is_cancelled or (lambda: False),
                                          blocks.empty if blocks is not None else None,
                                          call.session_id, call.session_ttl_s)
        result = spec.fn(*args, **kwargs)
        if self.device.type == "cuda":
            # Kernels run asynchronously: wait here so compute time is honest, errors surface in
            # this call, and no output is handed out before it is written.
            torch.cuda.current_stream(self.device).synchronize()
        return result

    def encode(self, outputs: list[Any], call: Call, op_name: str, regions: list[_Region] | None,
               blocks: CallBlocks | None = None) -> tuple[list[Any], list[str], int]:
        """Outputs as values (refs, inline tensors, plain values) under at most one new lease:
        (values, lease ids, bytes)."""
        placement = Placement(call.output.placement)
        held: list[Any] = []  # blocks / device tensors the lease keeps alive
        values: list[Any] = []
        # The call's own blocks stand in for the arena: outputs lying in them are described in place.
        arena = self.arena if blocks is None else blocks
        if blocks is not None:
            blocks.share_min = 0 if placement == Placement.SHM else self._threshold(call, Placement.AUTO)
        try:
            if placement == Placement.OUT:
                values = self._write_out(outputs, call, op_name, held, arena)
            else:
                for out in outputs:
                    values.append(self._encode_one(out, placement, call, held, regions or (), arena))
            if blocks is not None:
                held += blocks.take_found()  # whole blocks, also when an output is a view of part of one
            bytes_out = sum(_ref_nbytes(v) for v in values)
            lease_ids: list[str] = []
            if held:
                owner = LeaseOwner(call.client_pid, call.client_id) if call.client_pid else None
                lease_ids.append(self.leases.add(held, owner))
        except BaseException:
            free_objects(held, reuse=True)  # no host has seen them
            raise
        return values, lease_ids, bytes_out

    def _threshold(self, call: Call, placement: Placement) -> int:
        return 0 if placement in (Placement.SHM, Placement.DEVICE) else (
            call.output.inline_threshold or self.inline_threshold)

    def _encode_one(self, out: Any, placement: Placement, call: Call, held: list[Any],
                    regions: Sequence[_Region], arena: Any) -> Any:
        inline = placement == Placement.INLINE
        arena = None if inline else arena
        threshold = self._threshold(call, placement)
        if _is_table(out):
            table_ref, block = arrow.table_to_ref(out, arena, inline_threshold=threshold)
            if block is not None:
                held.append(block)
            return table_ref
        if isinstance(out, dict):
            return {str(k): self._encode_one(v, placement, call, held, regions, arena) for k, v in out.items()}
        if isinstance(out, (list, tuple)):
            return [self._encode_one(v, placement, call, held, regions, arena) for v in out]
        if not _is_array(out):
            return _check_plain(_plain(out))
        if placement == Placement.DEVICE:
            return self._to_device_ref(out, held)
        if isinstance(out, torch.Tensor):
            out = out.detach()
            if not out.is_cpu:  # (.is_cpu, not .device: that builds a torch.device each time)
                out = out.cpu()
            elif not inline:
                for region in regions:
                    alias = region.describe(out)
                    if alias is not None:
                        return alias  # a view of the host's own input: nothing to copy, nothing to lease
        ref, block = tensors.to_ref(out, arena, inline_threshold=threshold)
        if block is not None:
            held.append(block)
        return ref

    def _to_device_ref(self, out: Any, held: list[Any]) -> TensorRef:
        if self.device.type != "cuda":
            raise DeviceUnavailable(f"device-resident outputs need a CUDA worker; this one runs on {self.device}",
                                    device="cuda", available=[str(self.device)])
        from sidecar.dataplane import cuda_ipc  # only CUDA workers load it

        t = out.detach() if isinstance(out, torch.Tensor) else torch.as_tensor(out)
        if t.device != self.device:
            t = t.to(self.device)
            torch.cuda.current_stream(self.device).synchronize()
        ref = cuda_ipc.tensor_to_ref(t)
        held.append(t)  # the lease keeps the allocation alive until the host releases it
        return ref

    def _write_out(self, outputs: list[Any], call: Call, op_name: str, held: list[Any],
                   arena: Any) -> list[Any]:
        outs = list(call.output.out)
        n_arrays = sum(1 for o in outputs if _is_array(o))
        if len(outs) != n_arrays:
            raise InvalidArgument(f"op {op_name!r} produced {n_arrays} tensor output(s) but {len(outs)} out "
                                  f"ref(s) were given", op=op_name, field="out", input_index=-1,
                                  expected=str(n_arrays), got=str(len(outs)))
        values: list[Any] = []
        k = 0
        for out in outputs:
            if not _is_array(out):  # plain values (and tables) travel as with the default placement
                values.append(self._encode_one(out, Placement.AUTO, call, held, (), arena))
                continue
            ref = outs[k]
            try:
                if not isinstance(ref, TensorRef):
                    raise InvalidTensorRef(f"out ref {k} is not a tensor descriptor", field="out")
                tensors.write_into(ref, out.detach() if isinstance(out, torch.Tensor) else out, self.cache)
            except SidecarError as err:
                fields = {**err.fields, "input_index": -1}
                if isinstance(err, InvalidTensorRef):
                    fields["field"] = f"out[{k}].{err.fields.get('field', '')}".rstrip(".")
                else:  # the result does not fit the ref: say what would
                    fields["field"] = f"out[{k}]"
                    fields.setdefault("input_shapes", [shape for shape, _ in _meta(call.inputs)])
                    fields.setdefault("suggestion", f"give out ref {k} the result's shape {list(out.shape)} and "
                                                    f"dtype {dtypes.name_of(out.dtype)}, or call without out")
                raise type(err)(f"out ref {k}: {err.message}", **fields) from None
            values.append(ref)
            k += 1
        return values

    # -- errors --------------------------------------------------------------------------------------

    def structured(self, exc: BaseException, what: str) -> SidecarError:
        """The structured error of `exc` raised outside a call (a resource loader), with the same
        mapping (OOM figures) and taint rule as a call's."""
        return self._structured(exc, what, None)

    def _structured(self, exc: BaseException, op_name: str, meta: InputsMeta | None) -> SidecarError:
        try:
            err = to_sidecar_error(exc, op=op_name, inputs_meta=meta, device=self.device)
        except Exception as inner:  # mapping must never be the thing that escapes
            err = OpFailed(f"{type(exc).__name__}: {exc} (and mapping it failed: {inner})", op=op_name,
                           exception_type=type(exc).__name__,
                           traceback="".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
        if self.device.type == "cuda" and not isinstance(exc, SidecarError) and is_sticky_cuda_error(exc):
            self._taint(f"sticky CUDA error in op {op_name!r}: {str(exc).splitlines()[0] if str(exc) else exc}")
        if exc.__traceback__ is not None:
            # Frames of the failed op hold its tensors: drop them now, not at the next GC pass.
            traceback.clear_frames(exc.__traceback__)
        return err

    def _taint(self, reason: str) -> None:
        if self.tainted is None:
            self.tainted = reason
            for cb in list(self.on_taint):
                try:
                    cb(reason)
                except Exception:
                    pass


def _timing_dict(t: Timing) -> dict[str, int]:
    return {"queue_ns": t.queue_ns, "decode_ns": t.decode_ns, "compute_ns": t.compute_ns,
            "encode_ns": t.encode_ns, "total_ns": t.total_ns}
