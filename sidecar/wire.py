"""Plain Python values <-> the protobuf messages of `sidecar.v1` (both sides of the gRPC transport).

The dispatcher and the data plane speak dataclasses (`TensorRef`, `Call`, `CallResult`, ...) and
dicts; this module is the only place that knows the protobuf shapes. Errors travel as a gRPC status
whose `grpc-status-details-bin` trailer is a `google.rpc.Status` holding one `sidecar.v1.Error`
(the rich error model, via grpcio-status).

Malformed messages (a value with no kind, a tensor with no storage, an unknown placement) become
`InvalidArgument` / `InvalidTensorRef` here, before anything touches memory; the data plane's
validator then checks names, bounds, dtypes and shapes.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, status_pb2
from grpc_status import rpc_status

from sidecar.dataplane.refs import (
    ArrowRef,
    CudaIpcStorage,
    InlineStorage,
    ShmStorage,
    TensorRef,
)
from sidecar.errors import (
    ERROR_CLASSES,
    Cancelled,
    ErrorKind,
    InvalidArgument,
    InvalidTensorRef,
    OpFailed,
    SidecarError,
    UnknownOp,
    WorkerCrashed,
    shorten,
)
from sidecar.v1 import sidecar_pb2 as pb
from sidecar.worker.calls import Call, CallResult, OutputSpec, Placement, Timing

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1

# ---------------------------------------------------------------------------------------------------
# Tensors and Arrow tables


# Encoders fill the message in place (`_fill_*`): a sub-message passed to a constructor or to
# CopyFrom is copied, inline bytes included, once per level of nesting.

def _fill_shm(m: pb.ShmRef, s: ShmStorage) -> None:
    m.name, m.offset, m.nbytes, m.inode = s.name, s.offset, s.nbytes, s.inode


def _shm_from_pb(m: pb.ShmRef) -> ShmStorage:
    return ShmStorage(name=m.name, offset=m.offset, nbytes=m.nbytes, inode=m.inode)


def tensor_to_pb(ref: TensorRef) -> pb.Tensor:
    t = pb.Tensor()
    _fill_tensor(t, ref)
    return t


def _fill_tensor(t: pb.Tensor, ref: TensorRef) -> None:
    t.dtype = ref.dtype
    t.shape.extend(ref.shape)
    if ref.strides:
        t.strides.extend(ref.strides)
    s = ref.storage
    if isinstance(s, ShmStorage):
        _fill_shm(t.shm, s)
    elif isinstance(s, InlineStorage):
        t.inline_data = bytes(s.data)
    elif isinstance(s, CudaIpcStorage):
        c = t.cuda_ipc
        c.handle, c.offset, c.nbytes = s.handle, s.offset, s.nbytes
        c.device_index, c.device_uuid, c.alloc_nbytes = s.device_index, s.device_uuid, s.alloc_nbytes
    else:  # pragma: no cover - a programming error on our side
        raise TypeError(f"unknown tensor storage {type(s).__name__}")


def tensor_from_pb(t: pb.Tensor, input_index: int = -1) -> TensorRef:
    which = t.WhichOneof("storage")
    if which == "shm":
        storage: Any = _shm_from_pb(t.shm)
    elif which == "inline_data":
        storage = InlineStorage(t.inline_data)
    elif which == "cuda_ipc":
        c = t.cuda_ipc
        storage = CudaIpcStorage(handle=c.handle, offset=c.offset, nbytes=c.nbytes,
                                 device_index=c.device_index, device_uuid=c.device_uuid,
                                 alloc_nbytes=c.alloc_nbytes)
    else:
        raise InvalidTensorRef("tensor has no storage (set one of shm, inline_data, cuda_ipc)",
                               input_index=input_index, field="storage")
    return TensorRef(dtype=t.dtype, shape=tuple(t.shape), storage=storage,
                     strides=tuple(t.strides) if len(t.strides) else None)


def arrow_to_pb(ref: ArrowRef) -> pb.ArrowTable:
    m = pb.ArrowTable()
    _fill_arrow(m, ref)
    return m


def _fill_arrow(m: pb.ArrowTable, ref: ArrowRef) -> None:
    m.num_rows = ref.num_rows
    if isinstance(ref.storage, ShmStorage):
        _fill_shm(m.shm, ref.storage)
    else:
        m.inline_data = bytes(ref.storage.data)


def arrow_from_pb(m: pb.ArrowTable, input_index: int = -1) -> ArrowRef:
    which = m.WhichOneof("storage")
    if which == "shm":
        return ArrowRef(storage=_shm_from_pb(m.shm), num_rows=m.num_rows)
    if which == "inline_data":
        return ArrowRef(storage=InlineStorage(m.inline_data), num_rows=m.num_rows)
    raise InvalidTensorRef("arrow table has no storage (set shm or inline_data)",
                           input_index=input_index, field="storage")


# ---------------------------------------------------------------------------------------------------
# Values


def value_to_pb(v: Any) -> pb.Value:
    """A plain value (TensorRef, ArrowRef, scalar, str, bytes, list, dict, None) as a `Value`."""
    m = pb.Value()
    _fill_value(m, v)
    return m


def _fill_value(m: pb.Value, v: Any) -> None:
    if isinstance(v, TensorRef):
        _fill_tensor(m.tensor, v)
        return
    if isinstance(v, ArrowRef):
        _fill_arrow(m.arrow, v)
        return
    if v is None:
        m.none.SetInParent()
        return
    # bool before int: bool is an int subclass. numpy scalars expose .item() to a Python scalar.
    if hasattr(v, "item") and hasattr(v, "dtype") and getattr(v, "ndim", 1) == 0:
        v = v.item()
    if isinstance(v, bool):
        m.b = v
    elif isinstance(v, int):
        if not INT64_MIN <= v <= INT64_MAX:
            raise InvalidArgument(f"integer {v} does not fit in int64", field="value")
        m.i64 = v
    elif isinstance(v, float):
        m.f64 = v
    elif isinstance(v, str):
        m.s = _utf8(v)
    elif isinstance(v, (bytes, bytearray, memoryview)):
        m.raw = bytes(v)
    elif isinstance(v, (list, tuple)):
        items = m.list.items
        m.list.SetInParent()  # an empty list is still a list
        for x in v:
            _fill_value(items.add(), x)
    elif isinstance(v, Mapping):
        items = m.map.items
        m.map.SetInParent()
        for k, x in v.items():
            if not isinstance(k, str):
                raise InvalidArgument(f"map keys must be strings, got {type(k).__name__}", field="value")
            _fill_value(items[_utf8(k)], x)
    else:
        raise InvalidArgument(f"cannot send a value of type {type(v).__name__} (convert it to a tensor "
                              f"first)", field="value")


def _utf8(text: str) -> str:
    """`text` if protobuf can carry it (a str with lone surrogates has no UTF-8 form)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidArgument(f"string {shorten(text)} is not valid Unicode ({exc.reason}) and cannot be sent",
                              field="value") from None
    return text


def value_from_pb(m: pb.Value, input_index: int = -1) -> Any:
    which = m.WhichOneof("kind")
    if which == "tensor":
        return tensor_from_pb(m.tensor, input_index)
    if which == "arrow":
        return arrow_from_pb(m.arrow, input_index)
    if which == "list":
        return [value_from_pb(x, input_index) for x in m.list.items]
    if which == "map":
        return {k: value_from_pb(x, input_index) for k, x in m.map.items.items()}
    if which == "none":
        return None
    if which is None:
        raise InvalidArgument("value has no kind (set one of tensor, arrow, f64, i64, b, s, raw, list, map, none)",
                              input_index=input_index, field="kind")
    return getattr(m, which)  # f64, i64, b, s, raw


# ---------------------------------------------------------------------------------------------------
# Execute


def timing_to_pb(t: Timing) -> pb.Timing:
    return pb.Timing(queue_ns=max(0, int(t.queue_ns)), decode_ns=max(0, int(t.decode_ns)),
                     compute_ns=max(0, int(t.compute_ns)), encode_ns=max(0, int(t.encode_ns)),
                     total_ns=max(0, int(t.total_ns)))


def timing_from_pb(m: pb.Timing) -> Timing:
    return Timing(queue_ns=m.queue_ns, decode_ns=m.decode_ns, compute_ns=m.compute_ns,
                  encode_ns=m.encode_ns, total_ns=m.total_ns)


def execute_request(op: str, inputs: Iterable[Any] = (), attrs: Mapping[str, Any] | None = None, *,
                    placement: Placement = Placement.AUTO, out: Iterable[TensorRef] = (),
                    inline_threshold: int = 0, release: Iterable[str] = (), request_id: str = "",
                    idempotent: bool = False, allow_alias: bool = False, client_pid: int = 0,
                    client_id: str = "") -> pb.ExecuteRequest:
    req = pb.ExecuteRequest(op=op, release=list(release), request_id=request_id, idempotent=idempotent,
                            client_pid=client_pid, client_id=client_id)
    for v in inputs:
        _fill_value(req.inputs.add(), v)
    for k, v in (attrs or {}).items():
        _fill_value(req.attrs[k], v)
    req.output.placement = int(placement)
    req.output.inline_threshold = inline_threshold
    req.output.allow_alias = allow_alias
    for r in out:
        _fill_tensor(req.output.out.add(), r)
    return req


def call_from_request(req: pb.ExecuteRequest, is_cancelled: Any = None) -> Call:
    """Decode a request; every structural problem is an InvalidArgument/InvalidTensorRef."""
    if not req.op:
        raise InvalidArgument("ExecuteRequest.op is empty", field="op")
    try:
        placement = Placement(req.output.placement)
    except ValueError:
        raise InvalidArgument(f"unknown output placement {req.output.placement}", op=req.op,
                              field="output.placement") from None
    inputs = [value_from_pb(v, i) for i, v in enumerate(req.inputs)]
    attrs = {k: value_from_pb(v, -1) for k, v in req.attrs.items()}
    out = tuple(tensor_from_pb(t, -1) for t in req.output.out)
    return Call(op=req.op, inputs=inputs, attrs=attrs,
                output=OutputSpec(placement=placement, out=out,
                                  inline_threshold=req.output.inline_threshold,
                                  alias_inputs=req.output.allow_alias),
                release=list(req.release), request_id=req.request_id, idempotent=req.idempotent,
                client_pid=req.client_pid, client_id=req.client_id, is_cancelled=is_cancelled)


def result_to_response(r: CallResult) -> pb.ExecuteResponse:
    m = pb.ExecuteResponse(leases=list(r.leases), timing=timing_to_pb(r.timing), device=r.device,
                           bytes_in=max(0, int(r.bytes_in)), bytes_out=max(0, int(r.bytes_out)),
                           request_id=r.request_id)
    for v in r.outputs:
        _fill_value(m.outputs.add(), v)
    return m


def result_from_response(m: pb.ExecuteResponse) -> CallResult:
    return CallResult(outputs=[value_from_pb(v, i) for i, v in enumerate(m.outputs)],
                      leases=list(m.leases), timing=timing_from_pb(m.timing), device=m.device,
                      bytes_in=m.bytes_in, bytes_out=m.bytes_out, request_id=m.request_id)


# ---------------------------------------------------------------------------------------------------
# Generic message <-> dict (hardware, ops, telemetry): ints stay ints (json_format would make
# uint64 strings), enums become their names, unknown dict keys are ignored.


def message_to_dict(m: Message) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in m.DESCRIPTOR.fields:
        v = getattr(m, f.name)
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            vf = f.message_type.fields_by_name["value"]
            out[f.name] = {k: (message_to_dict(x) if vf.message_type else x) for k, x in v.items()}
        elif f.message_type is not None:
            if f.is_repeated:
                out[f.name] = [message_to_dict(x) for x in v]
            elif f.containing_oneof is None or m.HasField(f.name):
                out[f.name] = message_to_dict(v)
        elif f.enum_type is not None:
            names = [f.enum_type.values_by_number[x].name if x in f.enum_type.values_by_number else x
                     for x in (v if f.is_repeated else [v])]
            out[f.name] = names if f.is_repeated else names[0]
        else:
            out[f.name] = list(v) if f.is_repeated else v
    return out


def dict_to_message(d: Mapping[str, Any], m: Message) -> Message:
    """Fill `m` from a dict; None values and unknown keys are skipped."""
    fields = m.DESCRIPTOR.fields_by_name
    for k, v in d.items():
        f = fields.get(k)
        if f is None or v is None:
            continue
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            vf = f.message_type.fields_by_name["value"]
            target = getattr(m, k)
            for mk, mv in v.items():
                if vf.message_type:
                    dict_to_message(mv, target[mk])
                else:
                    target[mk] = mv if vf.type == vf.TYPE_STRING and isinstance(mv, str) else _coerce(vf, mv)
        elif f.message_type is not None:
            if f.is_repeated:
                for x in v:
                    dict_to_message(x, getattr(m, k).add())
            else:
                dict_to_message(v, getattr(m, k))
        elif f.is_repeated:
            getattr(m, k).extend(_coerce(f, x) for x in v)
        else:
            setattr(m, k, _coerce(f, v))
    return m


def _coerce(f: Any, v: Any) -> Any:
    if f.enum_type is not None and isinstance(v, str):
        return f.enum_type.values_by_name[v.upper()].number
    if f.type == f.TYPE_STRING:
        return str(v)
    if f.type in (f.TYPE_DOUBLE, f.TYPE_FLOAT):
        return float(v)
    if f.type == f.TYPE_BOOL:
        return bool(v)
    if f.type == f.TYPE_BYTES:
        return bytes(v)
    v = int(v)
    if f.type in (f.TYPE_UINT64, f.TYPE_UINT32, f.TYPE_FIXED64, f.TYPE_FIXED32):
        v = max(0, v)  # "unknown" sentinels such as -1 have no unsigned form
    return v


def hardware_to_pb(d: Mapping[str, Any]) -> pb.Hardware:
    return dict_to_message(d, pb.Hardware())  # type: ignore[return-value]


def hardware_from_pb(m: pb.Hardware) -> dict[str, Any]:
    return message_to_dict(m)


def op_to_pb(spec: Any) -> pb.OpInfo:
    """An `OpSpec` (name, doc, min_inputs, max_inputs, idempotent, attrs, module) as `OpInfo`."""
    max_inputs = spec.max_inputs
    return pb.OpInfo(name=spec.name, doc=spec.doc or "", min_inputs=int(spec.min_inputs),
                     max_inputs=-1 if max_inputs is None else int(max_inputs),
                     idempotent=bool(spec.idempotent), attrs=list(spec.attrs or ()),
                     module=spec.module or "")


def op_from_pb(m: pb.OpInfo) -> dict[str, Any]:
    return message_to_dict(m)


# ---------------------------------------------------------------------------------------------------
# Telemetry: event dicts {"type": "span"|"memory"|"pool", ...} <-> TelemetryEvent

_PHASES = {"start": pb.CallSpan.START, "stop": pb.CallSpan.STOP, "exception": pb.CallSpan.EXCEPTION}


def _span_to_pb(ev: Mapping[str, Any]) -> pb.TelemetryEvent:
    """The hot path of telemetry (two spans per call): fields set directly, no reflection."""
    t = ev.get("timing") or {}
    if isinstance(t, Timing):
        t = {"queue_ns": t.queue_ns, "decode_ns": t.decode_ns, "compute_ns": t.compute_ns,
             "encode_ns": t.encode_ns, "total_ns": t.total_ns}
    phase = ev.get("phase")
    span = pb.CallSpan(
        phase=_PHASES.get(phase.lower(), 0) if isinstance(phase, str) else int(phase or 0),
        op=str(ev.get("op") or ""), request_id=str(ev.get("request_id") or ""),
        duration_ns=max(0, int(ev.get("duration_ns") or 0)), bytes_in=max(0, int(ev.get("bytes_in") or 0)),
        bytes_out=max(0, int(ev.get("bytes_out") or 0)), outcome=str(ev.get("outcome") or ""),
        timing=pb.Timing(**{k: max(0, int(v)) for k, v in t.items() if k in _TIMING_FIELDS}))
    return pb.TelemetryEvent(time_unix_ns=int(ev.get("time_unix_ns") or 0), pid=int(ev.get("pid") or 0),
                             span=span)


_TIMING_FIELDS = frozenset(pb.Timing.DESCRIPTOR.fields_by_name)


def telemetry_to_pb(ev: Mapping[str, Any]) -> pb.TelemetryEvent:
    kind = ev.get("type")
    if kind == "span":
        return _span_to_pb(ev)
    m = pb.TelemetryEvent(time_unix_ns=int(ev.get("time_unix_ns") or 0), pid=int(ev.get("pid") or 0))
    if kind == "memory":
        dict_to_message(ev, m.memory)
    elif kind == "pool":
        m.pool.event = str(ev.get("event", ""))
        for k, v in (ev.get("metadata") or {}).items():
            m.pool.metadata[str(k)] = str(v)
    return m


def telemetry_from_pb(m: pb.TelemetryEvent) -> dict[str, Any]:
    which = m.WhichOneof("event")
    out: dict[str, Any] = {"type": which, "time_unix_ns": m.time_unix_ns, "pid": m.pid}
    if which == "span":
        d = message_to_dict(m.span)
        d["phase"] = d["phase"].lower()
        out.update(d)
    elif which == "memory":
        out.update(message_to_dict(m.memory))
    elif which == "pool":
        out.update(event=m.pool.event, metadata=dict(m.pool.metadata))
    return out


# ---------------------------------------------------------------------------------------------------
# Errors <-> sidecar.v1.Error <-> gRPC status

# Fields that are meaningful even when zero, per kind (proto3 cannot tell 0 from unset).
_ALWAYS: dict[ErrorKind, tuple[str, ...]] = {
    ErrorKind.OUT_OF_MEMORY: ("requested_bytes", "free_bytes", "total_bytes"),
    ErrorKind.OVERLOADED: ("queue_depth", "limit"),
    ErrorKind.WORKER_CRASHED: ("exit_code", "signal"),
}
_SCALARS = ("op", "request_id", "expected", "got", "suggestion", "device", "requested_bytes",
            "free_bytes", "total_bytes", "allocated_bytes", "reserved_bytes", "field",
            "exception_type", "traceback", "queue_depth", "limit", "exit_code", "signal",
            "classification", "pid")
_LISTS = ("input_dtypes", "available", "close_names", "stderr_tail")
_INT64_FIELDS = ("dim", "requested_bytes", "free_bytes", "total_bytes", "allocated_bytes", "reserved_bytes",
                 "queue_depth", "limit", "exit_code", "signal", "pid", "input_index")

# A failed call's status travels in HTTP/2 headers: grpc-message (percent-encoded) and
# grpc-status-details-bin (base64). gRPC drops metadata over 8 KiB (soft) / 16 KiB (hard) by default,
# and the caller then gets a bare RESOURCE_EXHAUSTED with no details: errors that echo long input
# (a 10 KB op name, thousands of attrs, a user's huge message) are cut to stay well inside that.
STATUS_MESSAGE_BYTES = 512   # grpc-message (== google.rpc.Status.message)
ERROR_MESSAGE_BYTES = 1024   # sidecar.v1.Error.message
ERROR_FIELD_BYTES = 256      # each other string, and each item of a list
ERROR_TRACEBACK_BYTES = 2048
ERROR_LIST_ITEMS = 16
ERROR_BYTES = 3072           # the whole serialized sidecar.v1.Error
# What gives way first when an error is still over ERROR_BYTES.
_EXPENDABLE = ("traceback", "stderr_tail", "close_names", "available", "input_dtypes", "input_shapes",
               "suggestion", "expected", "got", "message", "op", "request_id", "field", "exception_type",
               "device", "classification")


def cut(text: str, max_bytes: int, keep_head: float = 0.5) -> str:
    """`text` in at most `max_bytes` of UTF-8 (lone surrogates replaced), with the middle cut out and
    marked; `keep_head` is the share kept from the start (a traceback keeps its end)."""
    data = text.encode("utf-8", "replace")
    if len(data) <= max_bytes:
        return data.decode("utf-8")
    marker_room = 28  # " …[1234567890 bytes cut]… "
    keep = max(max_bytes - marker_room, 0)
    head = data[:int(keep * keep_head)].decode("utf-8", "ignore")
    tail = data[len(data) - (keep - int(keep * keep_head)):].decode("utf-8", "ignore")
    cut_bytes = len(data) - len(head.encode()) - len(tail.encode())
    return f"{head} …[{cut_bytes} bytes cut]… {tail}"


class WorkerUnreachable(WorkerCrashed):
    """The worker could not be reached or went away during the call (gRPC UNAVAILABLE, no details).

    A WORKER_CRASHED kind (so a pool treats it like a crash whose exit it has not seen yet), with
    classification "unreachable" and no exit code; the pool fills in the exit details when it reaps.
    """


def error_to_pb(e: SidecarError) -> pb.Error:
    """The error as a `sidecar.v1.Error` of at most ERROR_BYTES: long strings cut in the middle,
    lists shortened, integers that int64 cannot hold clamped (a `dim=1e300` echoed back)."""
    f = e.fields
    m = pb.Error(kind=pb.ErrorKind.Value(e.kind.value), message=cut(e.message, ERROR_MESSAGE_BYTES))
    fields = pb.Error.DESCRIPTOR.fields_by_name
    for name in _SCALARS:
        v = f.get(name)
        if v is None:
            continue
        if name in _INT64_FIELDS:
            setattr(m, name, _clamp(fields[name], v))
        elif fields[name].type == fields[name].TYPE_STRING:
            limit = ERROR_TRACEBACK_BYTES if name == "traceback" else ERROR_FIELD_BYTES
            setattr(m, name, cut(str(v), limit, keep_head=0.25 if name == "traceback" else 0.5))
        else:
            setattr(m, name, _coerce(fields[name], v))
    for name in _LISTS:
        if f.get(name):
            getattr(m, name).extend(cut(str(x), ERROR_FIELD_BYTES) for x in list(f[name])[:ERROR_LIST_ITEMS])
    for shape in list(f.get("input_shapes") or ())[:ERROR_LIST_ITEMS]:
        m.input_shapes.add(dims=[_clamp(fields["dim"], x) for x in list(shape)[:64]])
    if f.get("dim") is not None:
        m.dim, m.has_dim = _clamp(fields["dim"], f["dim"]), True
    m.input_index = _clamp(fields["input_index"], f["input_index"]) if f.get("input_index") is not None else -1
    _fit(m, ERROR_BYTES)
    return m


def _clamp(f: Any, v: Any) -> int:
    """An integer field from any number-ish value, clamped to what the field can hold."""
    lo, hi = _INT_RANGES[f.type]
    try:
        n = int(v)
    except OverflowError:  # +-inf
        n = hi if v > 0 else lo
    except (TypeError, ValueError):  # NaN, or not a number at all
        n = 0
    return min(max(n, lo), hi)


_FD = pb.Error.DESCRIPTOR.fields_by_name["dim"]
_INT_RANGES = {_FD.TYPE_INT64: (INT64_MIN, INT64_MAX), _FD.TYPE_UINT64: (0, (1 << 64) - 1),
               _FD.TYPE_INT32: (-(1 << 31), (1 << 31) - 1), _FD.TYPE_UINT32: (0, (1 << 32) - 1)}


def _fit(m: pb.Error, budget: int) -> None:
    """Shrinks the most expendable fields of `m` until it serializes to at most `budget` bytes."""
    for name in _EXPENDABLE:
        excess = m.ByteSize() - budget
        if excess <= 0:
            return
        value = getattr(m, name)
        if isinstance(value, str):
            size = len(value.encode())
            setattr(m, name, cut(value, max(size - excess, 64), keep_head=0.25 if name == "traceback" else 0.5))
        else:  # a repeated field: drop items from the end, keep the first
            while len(value) > 1 and m.ByteSize() > budget:
                del value[-1]


def error_from_pb(m: pb.Error, message: str | None = None) -> SidecarError:
    try:
        kind = ErrorKind(pb.ErrorKind.Name(m.kind))
    except ValueError:  # ERROR_KIND_UNSPECIFIED or a kind newer than this client
        kind = ErrorKind.OP_FAILED
    always = _ALWAYS.get(kind, ())
    if kind is ErrorKind.OUT_OF_MEMORY and m.device.startswith("cuda"):
        always += ("allocated_bytes", "reserved_bytes")  # torch's figures: 0 is a real answer on a GPU
    fields: dict[str, Any] = {}
    for name in _SCALARS:
        v = getattr(m, name)
        if v or name in always:
            fields[name] = v
    for name in _LISTS:
        if len(getattr(m, name)):
            fields[name] = list(getattr(m, name))
    if len(m.input_shapes):
        fields["input_shapes"] = [list(s.dims) for s in m.input_shapes]
    if m.has_dim:
        fields["dim"] = m.dim
    if m.input_index != -1:  # error_to_pb writes -1 when no input is at fault
        fields["input_index"] = m.input_index
    return ERROR_CLASSES[kind](m.message or message or kind.value, **fields)


def error_to_status(e: SidecarError) -> grpc.Status:
    """The status a servicer aborts with: code per kind, details = [Any(sidecar.v1.Error)]."""
    detail = any_pb2.Any()
    detail.Pack(error_to_pb(e))
    code = getattr(code_pb2, e.grpc_code, code_pb2.INTERNAL)
    message = cut(e.message, STATUS_MESSAGE_BYTES)  # the whole message is in the details
    return rpc_status.to_status(status_pb2.Status(code=code, message=message, details=[detail]))


_BY_CODE: dict[grpc.StatusCode, type[SidecarError]] = {
    grpc.StatusCode.UNAVAILABLE: WorkerUnreachable,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.DEADLINE_EXCEEDED: Cancelled,
    grpc.StatusCode.UNIMPLEMENTED: UnknownOp,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.RESOURCE_EXHAUSTED: InvalidArgument,  # without details: a message-size limit
}


def error_from_rpc(e: grpc.RpcError, op: str | None = None) -> SidecarError:
    """The structured error inside a failed RPC; a status without details is classified by code."""
    try:
        status = rpc_status.from_call(e)  # type: ignore[arg-type]
    except (ValueError, AttributeError):
        status = None
    if status is not None:
        for detail in status.details:
            err = pb.Error()
            if detail.Unpack(err):
                return error_from_pb(err, status.message)
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    text = (e.details() if hasattr(e, "details") else None) or str(e)
    cls = _BY_CODE.get(code, OpFailed)
    message = f"{code.name}: {text}" if code is not None else text
    extra: dict[str, Any] = {"op": op}
    if cls is WorkerUnreachable:
        extra["classification"] = "unreachable"
    elif cls is OpFailed:
        extra["exception_type"] = f"grpc.{code.name if code else 'UNKNOWN'}"
    return cls(message, **extra)
