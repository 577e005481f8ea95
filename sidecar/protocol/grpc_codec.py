"""Neutral objects and records <-> the protobuf messages of `sidecar.v1` (both sides of gRPC).

One `MessageCodec` per message walks that message's field table (`schema`): it fills a message
from a bound dataclass (`records.BINDINGS`: attributes named like the fields) or from a record
(a dict keyed by field names), and reads one back into the same form. Nothing here names a field of
a message, except where the wire has a rule of its own (an error's size budget, its "unset" sentinels).
Errors travel as a gRPC status whose `grpc-status-details-bin` trailer is a `google.rpc.Status`
holding one `sidecar.v1.Error` (the rich error model, via grpcio-status).

Malformed messages (a value with no kind, a tensor with no storage, an unknown placement) become
`InvalidArgument` / `InvalidTensorRef` here, before anything touches memory; the data plane's
validator then checks names, bounds, dtypes and shapes.

Speed: a codec compiles its `fill` and `read` once from the field table; filling a field is one
attribute set (converted only when protobuf refuses the value as it is), reading one is one get.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Mapping, TypeVar

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message as PbMessage
from google.rpc import code_pb2, status_pb2
from grpc_status import rpc_status

from sidecar.errors import (ERROR_CLASSES, ERROR_FIELDS, Cancelled, ErrorKind, InvalidArgument, InvalidTensorRef,
                            OpFailed, SidecarError, UnknownOp, WorkerUnreachable, shorten)
from sidecar.protocol import records, schema
from sidecar.protocol.calls import Call, CallResult, Chunk, OutputSpec, Placement
from sidecar.protocol.limits import (ERROR_BYTES, ERROR_FIELD_BYTES, ERROR_LIST_ITEMS, ERROR_MESSAGE_BYTES,
                                     ERROR_TRACEBACK_BYTES, STATUS_MESSAGE_BYTES)
from sidecar.protocol.refs import TensorRef
from sidecar.v1 import sidecar_pb2 as pb

_M = TypeVar("_M", bound=PbMessage)  # the message a codec fills (and returns)

__all__ = ["MessageCodec", "codec", "record_codec", "fill_value", "read_value", "execute_request", "call_from_request",
           "result_to_response", "result_from_response", "message_to_dict", "dict_to_message", "op_to_pb",
           "op_from_pb", "hardware_to_pb", "hardware_from_pb", "telemetry_to_pb", "telemetry_from_pb",
           "error_to_pb", "error_from_pb", "error_to_status", "error_from_rpc", "cut", "WorkerUnreachable"]

def _utf8(text: str, field: str = "value") -> str:
    """`text` if protobuf can carry it (a str with lone surrogates has no UTF-8 form)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidArgument(f"string {shorten(text)} is not valid Unicode ({exc.reason}) and cannot be sent",
                              field=field) from None
    return text


class MessageCodec:
    """Fills and reads one message type: `codec(name)` for its bound class (if it has one),
    `record_codec(name)` for records. `fill` and `read` are compiled on first use from the message's
    field table, the way `dataclasses` compiles `__init__`: straight-line attribute sets and gets,
    as one would write them by hand (`.source` shows them)."""

    def __init__(self, name: str, *, records_only: bool = False) -> None:
        self.spec = schema.message(name)
        self.binding = None if records_only else records.BY_MESSAGE.get(name)
        b = self.binding
        self.is_ref = b is not None and b.descriptor
        # the oneof a bound class holds in one attribute (TensorRef.storage), if any
        self.held_oneof = next(iter(self.spec.oneofs)) if b is not None and b.oneof_attr else None
        self.source = ""

    # Replaced by the compiled functions (`codec()` compiles a codec as soon as it makes it).

    def fill(self, m: _M, src: Any) -> _M:
        """Sets the fields of message `m` from `src` (a bound object, or a record: absent and None
        values leave a field unset, keys that are no field are ignored); returns `m`."""
        raise NotImplementedError  # pragma: no cover

    def read(self, m: Any, index: int = -1, path: str = "") -> Any:
        """The neutral object (bound message) or record (any other) that `m` holds. `index` is the
        input an error names; `path` prefixes the field an error names (within a ref: its field)."""
        raise NotImplementedError  # pragma: no cover

    def _compile(self) -> None:
        env: dict[str, Any] = {}
        source = "\n".join(_Compiler(self, env).fill() + [""] + _Compiler(self, env).read())
        exec(compile(source, f"<sidecar.v1.{self.spec.name} codec>", "exec"), env)  # noqa: S102
        self.source = source
        self.fill = env["fill"]  # type: ignore[method-assign]
        self.read = env["read"]  # type: ignore[method-assign]


_CODECS: dict[tuple[str, bool], MessageCodec] = {}


def codec(name: str) -> MessageCodec:
    """The codec of `sidecar.v1.<name>` (reads and writes its bound class, if it has one)."""
    return _codec(name, False)


def record_codec(name: str) -> MessageCodec:
    """The codec of `sidecar.v1.<name>` that reads and writes records (dicts keyed by field name)."""
    return _codec(name, True)


def _codec(name: str, records_only: bool) -> MessageCodec:
    c = _CODECS.get((name, records_only))
    if c is None:
        # Registered before it is compiled: a message that contains itself (TelemetryEvent.batch)
        # finds this codec while compiling it.
        c = _CODECS[(name, records_only)] = MessageCodec(name, records_only=records_only)
        c._compile()
    return c


class _Compiler:
    """Writes the source of one codec's `fill` / `read`; what they call lives in `env`."""

    def __init__(self, c: MessageCodec, env: dict[str, Any]) -> None:
        self.c, self.env = c, env
        self.lookup = record_codec if c.binding is None else codec  # sub-messages in the same form
        env.update(_fill_value=fill_value, _read_value=read_value, _utf8=_utf8, InvalidArgument=InvalidArgument,
                   InvalidTensorRef=InvalidTensorRef, _enum_number=_enum_number)

    def name(self, prefix: str, obj: Any) -> str:
        """A name in the generated code's globals bound to `obj`."""
        key = f"_{prefix}{len(self.env)}"
        self.env[key] = obj
        return key

    def fields(self) -> list[schema.Field]:
        c = self.c
        fields = [f for f in c.spec.fields if c.held_oneof is None or f.oneof != c.held_oneof]
        if c.binding is not None:  # a bound object carries the attributes its class has
            attrs = records.attrs_of(c.binding.cls)
            fields = [f for f in fields if f.name in attrs]
        return fields

    # -- fill ----------------------------------------------------------------------------------------

    def fill(self) -> list[str]:
        c = self.c
        lines = ["def fill(m, src):"]

        def get(n: str) -> str:
            return f"src.get({n!r})" if c.binding is None else f"src.{n}"

        if c.binding is None:
            lines.append("    if not isinstance(src, dict): src = dict(src)")
        for f in self.fields():
            lines.append(f"    v = {get(f.name)}")
            lines.append("    if v is not None:")
            lines += ["        " + x for x in self.write(f, "v", oneof_member=f.oneof is not None)]
        b = c.binding
        if b is not None and b.oneof_attr is not None:
            lines.append(f"    v = src.{b.oneof_attr}")
            for k, (cls, member) in enumerate(b.members):
                f = c.spec.by_name[member]
                lines.append(f"    {'if' if k == 0 else 'elif'} isinstance(v, {self.name('T', cls)}):")
                value = "v" if f.kind == "message" else f"v.{records.wrapped_field(cls)}"
                lines += ["        " + x for x in self.write(f, value, oneof_member=True)]
            lines.append("    else:")
            lines.append(f"        raise TypeError(f'{{type(v).__name__}} is not a storage of {c.spec.name}')")
        lines.append("    return m")
        return lines

    def write(self, f: schema.Field, v: str, *, oneof_member: bool = False) -> list[str]:
        """Statements that write value `v` into field `f` of message `m`."""
        n = f.name
        if f.kind == "map":
            if f.message == "Value":
                return [f"t = m.{n}", f"for k, x in {v}.items():",
                        "    if not isinstance(k, str):",
                        f"        raise InvalidArgument(f'keys of {n} must be strings, got {{type(k).__name__}}', "
                        f"field={n!r})",
                        f"    _fill_value(t[_utf8(k, {n!r})], x)"]
            if f.message is not None:
                sub = self.name("C", self.lookup(f.message))
                return [f"t = m.{n}", f"for k, x in {v}.items():", f"    {sub}.fill(t[str(k)], x)"]
            conv = "str" if f.map_value_kind == "str" else self.name("K", _coerce(
                schema.Field("value", 0, f.map_value_kind or "str", False, None, None, None)))
            return [f"t = m.{n}", f"for k, x in {v}.items():", f"    t[str(k)] = {conv}(x)"]
        if f.kind == "message":
            if f.message == "Value":
                if f.repeated:
                    return [f"add = m.{n}.add", f"for x in {v}:", "    _fill_value(add(), x)"]
                return [f"_fill_value(m.{n}, {v})"]
            sub = self.name("C", self.lookup(f.message or ""))
            if f.repeated:
                return [f"add = m.{n}.add", f"for x in {v}:", f"    {sub}.fill(add(), x)"]
            # presence is what a oneof says: an all-default member is still set
            return ([f"m.{n}.SetInParent()"] if oneof_member else []) + [f"{sub}.fill(m.{n}, {v})"]
        conv = self.name("K", _coerce(f))
        if f.repeated:
            return ["try:", f"    m.{n}.extend({v})", "except (TypeError, ValueError):",
                    f"    del m.{n}[:]", f"    m.{n}.extend(map({conv}, {v}))"]
        if f.kind == "enum":
            return [f"m.{n} = {v} if type({v}) is int else {conv}({v})"]
        return ["try:", f"    m.{n} = {v}", "except (TypeError, ValueError):", f"    m.{n} = {conv}({v})"]

    # -- read ----------------------------------------------------------------------------------------

    def read(self) -> list[str]:
        c = self.c
        lines = ["def read(m, index=-1, path=''):"]
        b = c.binding
        if b is None:
            lines.append("    out = {}")
            for f in self.fields():
                expr = self.value(f, "-1", record=True)
                if f.kind == "message" and f.oneof is not None and not f.repeated:
                    lines += [f"    if m.HasField({f.name!r}):", f"        out[{f.name!r}] = {expr}"]
                else:
                    lines.append(f"    out[{f.name!r}] = {expr}")
            lines.append("    return out")
            return lines
        if c.is_ref:
            lines.append("    path = ''")  # a ref's errors name the field inside the ref
        args = [f"{f.name}={self.value(f, 'index', attr=records.attrs_of(b.cls)[f.name])}" for f in self.fields()]
        if b.oneof_attr is not None:
            lines += self.read_held()
            args.append(f"{b.oneof_attr}=held")
        lines.append(f"    return {self.name('cls', b.cls)}({', '.join(args)})")
        return lines

    def value(self, f: schema.Field, index: str, *, attr: records.Attr | None = None, record: bool = False) -> str:
        """An expression for field `f` of message `m`, as a bound class (`attr`) or a record wants it."""
        n = f.name
        if f.kind == "map":
            if f.message == "Value":  # most calls have no attrs: an empty map costs one len()
                return f"({{k: _read_value(x, -1) for k, x in t.items()}} if len(t := m.{n}) else {{}})"
            if f.message is not None:
                sub = self.name("C", self.lookup(f.message))
                return f"{{k: {sub}.read(x) for k, x in m.{n}.items()}}"
            return f"dict(m.{n})"
        container = "list" if attr is None else attr.container.__name__
        if f.kind == "message":
            if f.message == "Value":
                if f.repeated:  # a list of values: each says which input it is (`inputs[2]` is input 2)
                    listed = f"[_read_value(x, i) for i, x in enumerate(m.{n})]"
                    return listed if container == "list" else f"{container}({listed})"
                return f"_read_value(m.{n}, {index})"
            sub = self.name("C", self.lookup(f.message or ""))
            if f.repeated:
                listed = f"[{sub}.read(x, -1, path + {n + '.'!r}) for x in t]"
                if container != "list":
                    listed = f"{container}({listed})"
                empty = "[]" if container == "list" else "()"
                return f"({listed} if len(t := m.{n}) else {empty})"
            return f"{sub}.read(m.{n}, {index}, path + {n + '.'!r})"
        if f.kind == "enum":
            if record:
                names = self.name("N", {number: name for name, number in f.enum_names})
                return f"[{names}.get(x, x) for x in m.{n}]" if f.repeated else f"{names}.get(m.{n}, m.{n})"
            if attr is not None and attr.enum is not None:
                what = f"{records.message_words(self.c.spec.name)} {n}"
                enum = self.name("E", functools.partial(_enum_member, attr.enum, what))
                return f"{enum}(m.{n}, path + {n!r})"
        if f.repeated:  # an empty one (no strides, no releases) costs one len()
            empty = "None" if attr is not None and attr.none_when_empty else "[]" if container == "list" else "()"
            return f"({container}(t) if len(t := m.{n}) else {empty})"
        return f"m.{n}"

    def read_held(self) -> list[str]:
        """Statements that read the oneof a bound class holds into `held`."""
        c = self.c
        b = c.binding
        assert b is not None and c.held_oneof is not None
        oneof = c.held_oneof
        lines = [f"    which = m.WhichOneof({oneof!r})"]
        for k, (cls, member) in enumerate(b.members):
            f = c.spec.by_name[member]
            lines.append(f"    {'if' if k == 0 else 'elif'} which == {member!r}:")
            if f.kind == "message":
                sub = self.name("C", codec(f.message or ""))
                lines.append(f"        held = {sub}.read(m.{member}, index, path + {member + '.'!r})")
            else:
                lines.append(f"        held = {self.name('T', cls)}(m.{member})")
        error = "InvalidTensorRef" if c.is_ref else "InvalidArgument"
        text = f"{records.message_words(c.spec.name)} has no {oneof} (set one of {', '.join(c.spec.oneofs[oneof])})"
        lines += ["    else:", f"        raise {error}({text!r}, input_index=index, field=path + {oneof!r})"]
        return lines


def _enum_member(enum: Any, what: str, number: int, field: str) -> Any:
    try:
        return enum(number)
    except ValueError:
        raise InvalidArgument(f"unknown {what} {number}", field=field) from None


# ---------------------------------------------------------------------------------------------------
# Conversions of values protobuf refused as they were


def _coerce(f: schema.Field) -> Callable[[Any], Any]:
    """What turns a value protobuf refused as it was into one this field takes."""
    if f.kind == "int":
        return f.clamp
    if f.kind == "float":
        return float
    if f.kind == "bool":
        return bool
    if f.kind == "bytes":
        return bytes
    if f.kind == "str":
        return lambda v: _utf8(v if isinstance(v, str) else str(v), f.name)
    if f.kind == "enum":
        return functools.partial(_enum_number, f)
    raise TypeError(f.kind)  # pragma: no cover


def _enum_number(f: schema.Field, v: Any) -> int:
    """An enum field's number from a number, a Python enum, or a name in any case, with or without
    the values' common prefix ("stop", "STOP", "PLACEMENT_SHM", "shm")."""
    if isinstance(v, str):
        wanted = v.upper()
        for name, number in f.enum_names:
            if name == wanted or name.endswith("_" + wanted):
                return number
        return 0
    return int(v)


# ---------------------------------------------------------------------------------------------------
# Values


def fill_value(m: pb.Value, v: Any) -> None:
    """A plain value (TensorRef, ArrowRef, scalar, str, bytes, list, dict, None) into a `Value`."""
    kind, v = records.value_kind(v)
    if kind == "tensor":
        _fill_tensor(m.tensor, v)
    elif kind == "arrow":
        _fill_arrow(m.arrow, v)
    elif kind == "s":
        m.s = _utf8(v)
    elif kind == "list":
        items = m.list.items
        m.list.SetInParent()  # an empty list is still a list
        for x in v:
            fill_value(items.add(), x)
    elif kind == "map":
        entries = m.map.items
        m.map.SetInParent()
        for k, x in v.items():
            if not isinstance(k, str):
                raise InvalidArgument(f"map keys must be strings, got {type(k).__name__}", field="value")
            fill_value(entries[_utf8(k)], x)
    elif kind == "none":
        m.none.SetInParent()
    else:  # f64, i64, b, raw: the member holds the Python value as it is
        setattr(m, kind, v)


def read_value(m: pb.Value, input_index: int = -1) -> Any:
    which = m.WhichOneof("kind")
    if which == "tensor":
        return _read_tensor(m.tensor, input_index, "")
    if which == "arrow":
        return _read_arrow(m.arrow, input_index, "")
    if which == "list":
        return [read_value(x, input_index) for x in m.list.items]
    if which == "map":
        return {k: read_value(x, input_index) for k, x in m.map.items.items()}
    if which == "none":
        return None
    if which is None:
        raise InvalidArgument(f"value has no kind (set one of {', '.join(_VALUE_KINDS)})",
                              input_index=input_index, field="kind")
    return getattr(m, which)  # f64, i64, b, s, raw


_VALUE_KINDS = schema.message("Value").oneofs["kind"]
_fill_tensor = codec("Tensor").fill
_fill_arrow = codec("ArrowTable").fill
_read_tensor = codec("Tensor").read
_read_arrow = codec("ArrowTable").read


# ---------------------------------------------------------------------------------------------------
# Execute


def execute_request(op: str, inputs: Iterable[Any] = (), attrs: Mapping[str, Any] | None = None, *,
                    placement: Placement = Placement.AUTO, out: Iterable[TensorRef] = (),
                    inline_threshold: int = 0, release: Iterable[str] = (), request_id: str = "",
                    idempotent: bool = False, allow_alias: bool = False, client_pid: int = 0,
                    client_id: str = "", session_id: str = "", session_ttl_s: float = 0.0) -> pb.ExecuteRequest:
    """The request of a call (what a host sends)."""
    call = Call(op=op, inputs=list(inputs), attrs=dict(attrs or {}),
                output=OutputSpec(placement=placement, out=tuple(out), inline_threshold=inline_threshold,
                                  allow_alias=allow_alias),
                release=list(release), request_id=request_id, idempotent=idempotent, client_pid=client_pid,
                client_id=client_id, session_id=session_id, session_ttl_s=session_ttl_s)
    return call_to_request(call)


def call_to_request(call: Call) -> pb.ExecuteRequest:
    """The request of a `Call` the host built (the small call's path: no second Call)."""
    return _fill_request(pb.ExecuteRequest(), call)


_fill_request = codec("ExecuteRequest").fill
_read_request = codec("ExecuteRequest").read


def call_from_request(req: pb.ExecuteRequest, is_cancelled: Any = None) -> Call:
    """Decode a request; every structural problem is an InvalidArgument/InvalidTensorRef."""
    if not req.op:
        raise InvalidArgument("ExecuteRequest.op is empty", field="op")
    call: Call = _read_request(req)
    call.is_cancelled = is_cancelled
    return call


def result_to_response(r: CallResult) -> pb.ExecuteResponse:
    return _fill_response(pb.ExecuteResponse(), r)


def result_from_response(m: pb.ExecuteResponse) -> CallResult:
    return _read_response(m)  # type: ignore[no-any-return]


_fill_response = codec("ExecuteResponse").fill
_read_response = codec("ExecuteResponse").read


def chunk_to_pb(c: Chunk) -> pb.ExecuteChunk:
    """One chunk of a stream as an `ExecuteChunk` message (its `end` unset)."""
    m = pb.ExecuteChunk(leases=c.leases, index=c.index, bytes=c.bytes)
    add = m.values.add
    for v in c.values:
        fill_value(add(), v)
    return m


def chunk_from_pb(m: pb.ExecuteChunk) -> Chunk:
    return Chunk([read_value(x, i) for i, x in enumerate(m.values)], list(m.leases), m.index, m.bytes)


# ---------------------------------------------------------------------------------------------------
# Records: hardware, ops, telemetry (and any message <-> dict)


def message_to_dict(m: PbMessage) -> dict[str, Any]:
    """Any sidecar.v1 message as a record (ints stay ints, enums become their names)."""
    return record_codec(m.DESCRIPTOR.name).read(m)  # type: ignore[no-any-return]


def dict_to_message(d: Mapping[str, Any], m: _M) -> _M:
    """Fill `m` from a record; None values and unknown keys are skipped."""
    return record_codec(m.DESCRIPTOR.name).fill(m, d)


def hardware_to_pb(d: Mapping[str, Any]) -> pb.Hardware:
    return dict_to_message(d, pb.Hardware())


def hardware_from_pb(m: pb.Hardware) -> dict[str, Any]:
    return message_to_dict(m)


def op_to_pb(spec: Any) -> pb.OpInfo:
    """An `OpSpec` (name, doc, min_inputs, max_inputs, idempotent, attrs, module) as `OpInfo`."""
    return dict_to_message(records.op_record(spec), pb.OpInfo())


def op_from_pb(m: pb.OpInfo) -> dict[str, Any]:
    return message_to_dict(m)


_fill_event = record_codec("TelemetryEvent").fill


def telemetry_to_pb(ev: Mapping[str, Any]) -> pb.TelemetryEvent:
    """A telemetry hub event (`{"type": "span"|"memory"|"pool", ...}`) as a `TelemetryEvent`."""
    return _fill_event(pb.TelemetryEvent(), records.telemetry_record(ev))


def telemetry_from_pb(m: pb.TelemetryEvent) -> dict[str, Any]:
    """The hub's event dict of a `TelemetryEvent` (the phase of a span in lower case)."""
    which = m.WhichOneof("event")
    out: dict[str, Any] = {"type": which, "time_unix_ns": m.time_unix_ns, "pid": m.pid}
    if which is not None:
        sub = message_to_dict(getattr(m, which))
        if "phase" in sub:
            sub["phase"] = str(sub["phase"]).lower()
        out.update(sub)
    return out


# ---------------------------------------------------------------------------------------------------
# Errors <-> sidecar.v1.Error <-> gRPC status

_ERROR = schema.message("Error")
# Fields that are meaningful even when zero, per kind (proto3 cannot tell 0 from unset).
_ALWAYS: dict[ErrorKind, tuple[str, ...]] = {
    ErrorKind.OUT_OF_MEMORY: ("requested_bytes", "free_bytes", "total_bytes"),
    ErrorKind.OVERLOADED: ("queue_depth", "limit"),
    ErrorKind.WORKER_CRASHED: ("exit_code", "signal"),
}
# Fields with a wire form of their own: `dim` is set with `has_dim`, `input_index` is -1 when no
# input is at fault, `input_shapes` are lists of dims.
_OWN_FORM = ("dim", "input_index", "input_shapes")
_PLAIN_ERROR_FIELDS = tuple(_ERROR.by_name[n] for n in ERROR_FIELDS if n not in _OWN_FORM)
_DIM = _ERROR.by_name["dim"]
_INPUT_INDEX = _ERROR.by_name["input_index"]
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


def _cut_field(name: str, value: Any) -> str:
    if name == "traceback":
        return cut(str(value), ERROR_TRACEBACK_BYTES, keep_head=0.25)
    return cut(str(value), ERROR_FIELD_BYTES)


def error_to_pb(e: SidecarError) -> pb.Error:
    """The error as a `sidecar.v1.Error` of at most ERROR_BYTES: long strings cut in the middle,
    lists shortened, integers that their field cannot hold clamped (a `dim=1e300` echoed back)."""
    f = e.fields
    m = pb.Error(kind=e.kind.value, message=cut(e.message, ERROR_MESSAGE_BYTES))  # the enum by its name
    for field in _PLAIN_ERROR_FIELDS:
        v = f.get(field.name)
        if v is None or (field.repeated and not v):
            continue
        if field.repeated:
            getattr(m, field.name).extend(_cut_field(field.name, x) for x in list(v)[:ERROR_LIST_ITEMS])
        elif field.kind == "int":
            setattr(m, field.name, field.clamp(v))
        elif field.kind == "str":
            setattr(m, field.name, _cut_field(field.name, v))
        else:
            setattr(m, field.name, _coerce(field)(v))
    for shape in list(f.get("input_shapes") or ())[:ERROR_LIST_ITEMS]:
        m.input_shapes.add(dims=[_DIM.clamp(x) for x in list(shape)[:64]])
    if f.get("dim") is not None:
        m.dim, m.has_dim = _DIM.clamp(f["dim"]), True
    m.input_index = _INPUT_INDEX.clamp(f["input_index"]) if f.get("input_index") is not None else -1
    _fit(m, ERROR_BYTES)
    return m


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
    for field in _PLAIN_ERROR_FIELDS:
        v = getattr(m, field.name)
        if field.repeated:
            if len(v):
                fields[field.name] = list(v)
        elif v or field.name in always:
            fields[field.name] = v
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
    status: grpc.Status = rpc_status.to_status(status_pb2.Status(code=code, message=message, details=[detail]))
    return status


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
        status = rpc_status.from_call(e)
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
