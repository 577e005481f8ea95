"""Neutral objects and records <-> the Erlang terms of the port transport (`sidecar serve --stdio`).

The terms are the .proto's messages as maps with atom keys, from the same field tables
(`schema`) as protobuf, so a field added to a message in the .proto travels on the port too. The
port's own conventions, written once here (and in guides/elixir.md):

- a tensor or Arrow table is tagged: `{:tensor, %{dtype:, shape:, strides:, shm: %{...}}}`,
  `{:arrow, %{...}}` (the tag is its `sidecar.v1.Value` member); inline bytes are `data:` (the
  proto's `inline_data`); a oneof is the one key of its member that is present;
- other values are native terms: numbers, binaries (text arrives as `str` when it is UTF-8),
  `{:bytes, binary}` for raw bytes, lists, maps, `nil`; non-finite floats go out as `:nan`,
  `:infinity`, `:neg_infinity`;
- a call is `{:call, id, op, inputs, attrs[, opts]}`: `opts` holds the other `ExecuteRequest`
  fields and those of its `OutputSpec`, flat (`placement: :shm`; `out:` alone means `:out`); attrs
  may be a keyword list;
- an error is `%{kind: :shape_mismatch, message:, ...the fields it has}`;
- a telemetry event is `{:telemetry, [:sidecar | name], measurements, metadata}` in `:telemetry`'s
  shape: numbers are measurements (`duration_ns` is `duration`), the rest metadata (`pid` is
  `os_pid`).

Absent map keys take the neutral class's default; a field whose class has no default is required
unless it is a number (a number absent from a term is 0, as in protobuf). A malformed term raises
`InvalidTensorRef` (inside a descriptor) or `InvalidArgument` naming the field and the input.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Mapping

from sidecar.errors import ERROR_FIELDS, InvalidArgument, InvalidTensorRef, SidecarError, shorten
from sidecar.etf import Atom
from sidecar.protocol import records, schema
from sidecar.protocol.calls import Call, CallResult, Chunk, OutputSpec, Placement
from sidecar.protocol.limits import INT64_MAX, INT64_MIN

__all__ = ["TermCodec", "term_codec", "value_from_term", "value_to_term", "call_from_term", "result_to_term",
           "error_to_term", "op_to_term", "record_to_term", "telemetry_to_term", "text", "keyed"]

# The port's names of fields whose proto names differ.
TERM_NAMES = {"inline_data": "data"}
# Messages that travel tagged, and their tags: the `sidecar.v1.Value` member that holds each.
TAGS: dict[str, str] = {f.message: f.name for f in schema.message("Value").fields
                        if f.kind == "message" and f.message in ("Tensor", "ArrowTable")}
_BY_TAG = {tag: name for name, tag in TAGS.items()}

ErrorClass = Callable[..., SidecarError]


# ---------------------------------------------------------------------------------------------------
# Checks of terms from the VM


def text(v: Any, what: str, err: ErrorClass = InvalidArgument, **where: Any) -> str:
    """A binary or an atom as str; anything else is a malformed request."""
    if isinstance(v, str):  # Atom included
        return str(v)
    if isinstance(v, bytes):
        try:
            return v.decode("utf-8")
        except UnicodeDecodeError:
            pass
    raise err(f"{what} must be a UTF-8 binary or an atom, got {shorten(v)}", field=what, **where)


def integer(v: Any, what: str, err: ErrorClass = InvalidArgument, **where: Any) -> int:
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    raise err(f"{what} must be an integer, got {shorten(v)}", field=what, **where)


def keyed(m: Any, what: str, err: ErrorClass = InvalidArgument, **where: Any) -> dict[str, Any]:
    """A map whose keys are atoms or binaries, with str keys."""
    if not isinstance(m, dict):
        raise err(f"{what} must be a map, got {shorten(m)}", field=what, **where)
    if all(type(k) is Atom for k in m):
        return m  # Atom is a str: looked up by plain names as it is
    out: dict[str, Any] = {}
    for k, v in m.items():
        if isinstance(k, str):
            out[str(k)] = v
        elif isinstance(k, bytes):
            out[text(k, what, err, **where)] = v
        else:
            raise err(f"keys of {what} must be atoms or binaries, got {shorten(k)}", field=what, **where)
    return out


def _enum_names(f: schema.Field) -> dict[str, int]:
    """An enum's values by their port names: lower case, without the common prefix (:shm)."""
    names = [n for n, _ in f.enum_names]
    prefix = names[0][:names[0].index("_") + 1] if all("_" in n for n in names) else ""
    if not all(n.startswith(prefix) for n in names):
        prefix = ""
    return {n[len(prefix):].lower(): number for n, number in f.enum_names}


def _decoder(f: schema.Field, err: ErrorClass) -> Callable[[Any, int], Any]:
    """What checks and converts the term of field `f` (inside a message whose errors are `err`)."""
    n = TERM_NAMES.get(f.name, f.name)
    if f.kind == "message":
        sub = f.message or ""
        if f.repeated:
            def messages(v: Any, index: int) -> list[Any]:
                if not isinstance(v, list):
                    raise err(f"{n} must be a list, got {shorten(v)}", field=n, input_index=index)
                return [term_codec(sub).decode_tagged(x, -1, f"{n}[{k}]") if sub in TAGS
                        else term_codec(sub).decode(x, -1, n) for k, x in enumerate(v)]
            return messages
        return lambda v, index: term_codec(sub).decode(v, index, n)
    if f.kind == "enum":
        by_name = _enum_names(f)
        numbers = set(by_name.values())

        def enum(v: Any, index: int) -> int:
            if isinstance(v, int) and not isinstance(v, bool) and v in numbers:
                return v
            name = text(v, n, err, input_index=index)
            if name not in by_name:
                raise err(f"{n} must be one of {', '.join(by_name)}, got {name!r}", field=n, input_index=index)
            return by_name[name]
        return enum
    one: Callable[[Any, int], Any]
    if f.kind == "int":
        one = functools.partial(_int_of, n, err)
    elif f.kind == "str":
        one = lambda v, index: text(v, n, err, input_index=index)  # noqa: E731
    elif f.kind == "bytes":
        one = functools.partial(_bytes_of, n, err)
    elif f.kind == "float":
        one = functools.partial(_float_of, n, err)
    else:  # bool: any term, by its truth (as the port has always read idempotent)
        one = lambda v, index: bool(v)  # noqa: E731
    if not f.repeated:
        return one
    kind = {"int": "integers", "str": "binaries", "bytes": "binaries", "float": "numbers"}.get(f.kind, "terms")

    def repeated(v: Any, index: int) -> list[Any]:
        if not isinstance(v, list):
            raise err(f"{n} must be a list of {kind}, got {shorten(v)}", field=n, input_index=index)
        return [one(x, index) for x in v]
    return repeated


def _int_of(what: str, err: ErrorClass, v: Any, index: int) -> int:
    return integer(v, what, err, input_index=index)


def _bytes_of(what: str, err: ErrorClass, v: Any, index: int) -> bytes:
    if isinstance(v, bytes):
        return v
    raise err(f"{what} must be a binary, got {shorten(v)}", field=what, input_index=index)


def _float_of(what: str, err: ErrorClass, v: Any, index: int) -> float:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    raise err(f"{what} must be a number, got {shorten(v)}", field=what, input_index=index)


# ---------------------------------------------------------------------------------------------------
# Messages


class TermCodec:
    """Terms of one message (`term_codec(name)`): maps with atom keys, read into the bound class
    (or a record) and written from it."""

    def __init__(self, name: str) -> None:
        spec = self.spec = schema.message(name)
        b = self.binding = records.BY_MESSAGE.get(name)
        self.is_ref = b is not None and b.descriptor
        self.error: ErrorClass = InvalidTensorRef if self.is_ref else InvalidArgument
        self.what = TAGS.get(name, schema.message(name).name)
        held = next(iter(spec.oneofs)) if b is not None and b.oneof_attr else None
        self.held_oneof = held
        attrs = records.attrs_of(b.cls) if b is not None else {}
        # (attribute, term key, default or _REQUIRED, decoder) of the fields a bound class carries
        self.fields: list[tuple[str, str, Any, Callable[[Any, int], Any]]] = []
        # (field name, term key, converter) of every field, for writing
        self.out: list[tuple[str, Atom, Callable[[Any], Any]]] = []
        for f in spec.fields:
            key = TERM_NAMES.get(f.name, f.name)
            if f.oneof is None or f.oneof != held:
                self.out.append((f.name, Atom(key), _term_of(f)))
            if b is None or f.name not in attrs or (held is not None and f.oneof == held):
                continue
            a = attrs[f.name]
            optional_number = f.kind in ("int", "float", "bool") and not f.repeated
            default = (0 if optional_number else _REQUIRED) if a.required else a.default
            decode = _decoder(f, self.error)
            if a.none_when_empty:
                decode = functools.partial(_none_when_empty, decode)
            elif f.repeated and a.container is tuple:
                decode = functools.partial(_as_tuple, decode)
            if a.enum is not None:
                decode = functools.partial(_as_enum, a.enum, decode)
            self.fields.append((f.name, key, default, decode))
        # key and converter of each member of the held oneof, for writing
        self.member_out = {f.name: (Atom(TERM_NAMES.get(f.name, f.name)), _term_of(f),
                                    f.kind == "message") for f in spec.fields if held is not None and f.oneof == held}
        # (member, term key, class, decoder) of the oneof a bound class holds
        self.members: list[tuple[str, Atom, type, Callable[[Any, int], Any]]] = []
        if b is not None and held is not None:
            for cls, member in b.members:
                f = spec.by_name[member]
                self.members.append((member, Atom(TERM_NAMES.get(member, member)), cls, _decoder(f, self.error)))

    # -- from the VM ---------------------------------------------------------------------------------

    def decode(self, term: Any, index: int = -1, what: str | None = None) -> Any:
        """The bound object of a map term (`what` names it in errors)."""
        b = self.binding
        assert b is not None, f"{self.spec.name} has no neutral class to decode into"
        t = keyed(term, what or self.what, self.error, input_index=index)
        kwargs: dict[str, Any] = {}
        for name, key, default, decode in self.fields:
            v = t.get(key)
            if v is None:
                if default is _REQUIRED:
                    decode(None, index)  # raises: "<key> must be ..., got None"
                kwargs[name] = default
            else:
                kwargs[name] = decode(v, index)
        if self.members:
            for _member, key, cls, decode in self.members:
                if key in t:
                    v = decode(t[key], index)
                    kwargs[b.oneof_attr or ""] = v if isinstance(v, cls) else cls(v)
                    break
            else:
                names = ", ".join(key for _, key, _, _ in self.members)
                what = records.message_words(self.spec.name)
                raise self.error(f"{what} has no {self.held_oneof} (give one of {names})", field=self.held_oneof,
                                 input_index=index)
        return b.cls(**kwargs)

    def decode_tagged(self, term: Any, index: int, what: str) -> Any:
        """`{:tensor, map}` (the tag of this message) as the bound object."""
        tag = TAGS[self.spec.name]
        if isinstance(term, tuple) and len(term) == 2 and term[0] == tag:
            return self.decode(term[1], index, tag)
        raise self.error(f"{what} must be {{:{tag}, map}}, got {shorten(term)}", field=what.split("[")[0],
                         input_index=index)

    # -- to the VM -----------------------------------------------------------------------------------

    def encode(self, src: Any) -> Any:
        """The term of a bound object (every field; of a oneof the member set) or of a record (the
        fields it has). A tensor or table comes tagged."""
        out: dict[Atom, Any] = {}
        if isinstance(src, dict):
            for name, key, term in self.out:
                if name in src:
                    v = src[name]
                    out[key] = None if v is None else term(v)
            return out
        for name, key, term in self.out:
            v = getattr(src, name, _MISSING)
            if v is not _MISSING:
                out[key] = None if v is None else term(v)
        b = self.binding
        if b is not None and b.oneof_attr is not None:
            held = getattr(src, b.oneof_attr)
            key, term, is_message = self.member_out[b.member_of(held)]
            held_cls: type = type(held)
            out[key] = term(held if is_message else getattr(held, records.wrapped_field(held_cls)))
        tag = TAGS.get(self.spec.name)
        return (Atom(tag), out) if tag is not None else out


_REQUIRED = object()
_MISSING = object()


def _none_when_empty(decode: Callable[[Any, int], Any], v: Any, index: int) -> Any:
    return None if v == [] else tuple(decode(v, index))


def _as_tuple(decode: Callable[[Any, int], Any], v: Any, index: int) -> tuple[Any, ...]:
    return tuple(decode(v, index))


def _as_enum(enum: Any, decode: Callable[[Any, int], Any], v: Any, index: int) -> Any:
    return enum(decode(v, index))


@functools.cache
def term_codec(name: str) -> TermCodec:
    """The term codec of `sidecar.v1.<name>`."""
    return TermCodec(name)


def _term_of(f: schema.Field) -> Callable[[Any], Any]:
    """What makes the term of a (not None) value of field `f`."""
    if f.kind in ("message", "map"):
        sub = f.message or ""

        def one(x: Any) -> Any:
            return value_to_term(x) if sub == "Value" else term_codec(sub).encode(x)
        if f.kind == "map":
            if f.message is None:
                return lambda v: {k: value_to_term(x) for k, x in v.items()}
            return lambda v: {k: one(x) for k, x in v.items()}
        return (lambda v: [one(x) for x in v]) if f.repeated else one
    if f.kind in ("int", "str", "bytes", "bool"):  # ETF has them as they are
        return list if f.repeated else _same
    return (lambda v: [value_to_term(x) for x in v]) if f.repeated else value_to_term


def _same(v: Any) -> Any:
    return v


def _field_term(f: schema.Field, v: Any) -> Any:
    """The term of field `f`'s value `v`."""
    return None if v is None else _term_of(f)(v)


# ---------------------------------------------------------------------------------------------------
# Values


def value_from_term(v: Any, index: int = -1, field: str = "value") -> Any:
    """A value from the VM: tensors/tables by descriptor, binaries as str when UTF-8 (Elixir strings),
    `{:bytes, bin}` for raw bytes, atoms as their name, lists and maps recursively."""
    if isinstance(v, tuple):
        if len(v) == 2 and isinstance(v[0], Atom):
            tag = str(v[0])
            if tag in _BY_TAG:
                return term_codec(_BY_TAG[tag]).decode(v[1], index, tag)
            if tag == "bytes" and isinstance(v[1], bytes):
                return v[1]
        tags = ", ".join(f"{{:{t}, map}}" for t in _BY_TAG)
        raise InvalidArgument(f"unsupported value {shorten(v)} (a tuple must be {tags} or {{:bytes, binary}})",
                              field="value", input_index=index)
    if isinstance(v, bytes):
        try:
            return v.decode("utf-8")
        except UnicodeDecodeError:
            return v
    if isinstance(v, Atom):
        return str(v)
    if isinstance(v, list):
        return [value_from_term(x, index, field) for x in v]
    if isinstance(v, dict):
        return {k: value_from_term(x, index, field) for k, x in keyed(v, "value", input_index=index).items()}
    if isinstance(v, int) and not isinstance(v, bool) and not INT64_MIN <= v <= INT64_MAX:
        # a bignum: gRPC's Value holds int64, and torch cannot take more
        raise InvalidArgument(f"integer {shorten(v)} does not fit in int64", field=field, input_index=index,
                              expected="an integer in int64 range", got=shorten(v))
    return v  # int, float, bool, None


def value_to_term(v: Any) -> Any:
    """A value as a term. Strings and bytes both become binaries; map keys of user data stay
    binaries (turning arbitrary strings into atoms would fill the VM's atom table)."""
    kind, v = records.value_kind(v)
    if kind == "tensor":
        return _TENSOR.encode(v)
    if kind == "arrow":
        return _ARROW.encode(v)
    if kind == "f64":
        if math.isfinite(v):
            return v
        return Atom("nan") if math.isnan(v) else Atom("infinity" if v > 0 else "neg_infinity")
    if kind == "list":
        return [value_to_term(x) for x in v]
    if kind == "map":
        return {k: value_to_term(x) for k, x in v.items()}
    return v  # None, bool, int, str, bytes: ETF has them


_TENSOR = term_codec("Tensor")
_ARROW = term_codec("ArrowTable")


# ---------------------------------------------------------------------------------------------------
# Calls and results

_OUTPUT_FIELDS = tuple(f.name for f in schema.message("OutputSpec").fields)
# What opts may hold: the ExecuteRequest fields that are not positional, and the OutputSpec ones.
_OPTS = [(name, key, default, decode) for name, key, default, decode in term_codec("ExecuteRequest").fields
         if name not in ("op", "inputs", "attrs", "output")] + term_codec("OutputSpec").fields


def attrs_from_term(a: Any) -> dict[str, Any]:
    """An attrs map, or an Elixir keyword list ([dim: 1] == [{:dim, 1}])."""
    if isinstance(a, list):
        if not all(isinstance(p, tuple) and len(p) == 2 for p in a):
            raise InvalidArgument("attrs must be a map or a keyword list", field="attrs", input_index=-1)
        a = dict(a)
    return {k: value_from_term(v, -1, f"attrs.{k}") for k, v in keyed(a, "attrs", input_index=-1).items()}


def call_from_term(req: tuple[Any, ...], is_cancelled: Callable[[], bool] | None = None) -> Call:
    """`{:call, id, op, inputs, attrs}` or `{:call, id, op, inputs, attrs, opts}` -> Call."""
    op = text(req[2], "op")
    inputs = req[3]
    if not isinstance(inputs, list):
        raise InvalidArgument(f"inputs must be a list, got {shorten(inputs)}", field="inputs", input_index=-1, op=op)
    values = [value_from_term(v, i) for i, v in enumerate(inputs)]
    call = Call(op=op, inputs=values, attrs=attrs_from_term(req[4]), is_cancelled=is_cancelled)
    if len(req) > 5 and req[5] is not None:
        opts = keyed(req[5], "opts", input_index=-1)
        given: dict[str, Any] = {}
        for name, key, _default, decode in _OPTS:
            v = opts.get(key)
            if v is not None:
                given[name] = decode(v, -1)
        output = {k: given.pop(k) for k in _OUTPUT_FIELDS if k in given}
        if output.get("out") and "placement" not in output:
            output["placement"] = Placement.OUT  # out refs alone say where outputs go
        call.output = OutputSpec(**output)
        for name, v in given.items():
            setattr(call, name, v)
    return call


def result_to_term(r: CallResult) -> dict[Atom, Any]:
    """`%{outputs:, leases:, timing: %{queue_ns:, ...}, device:, bytes_in:, bytes_out:, request_id:}`."""
    return _RESULT.encode(r)  # type: ignore[no-any-return]


_RESULT = term_codec("ExecuteResponse")

_VALUES, _LEASES, _INDEX, _BYTES = (Atom(n) for n in ("values", "leases", "index", "bytes"))


def chunk_to_term(c: Chunk) -> dict[Atom, Any]:
    """`%{values: [values], leases: [ids], index: n, bytes: n}`: an `ExecuteChunk` but its `end`
    (on the port the final message is the usual `{:ok, id, result}`)."""
    return {_VALUES: [value_to_term(v) for v in c.values], _LEASES: list(c.leases), _INDEX: c.index,
            _BYTES: c.bytes}


def record_to_term(message: str, record: Mapping[str, Any]) -> dict[Atom, Any]:
    """A record of `sidecar.v1.<message>` (hardware, release reply, ...) as a map with atom keys."""
    return term_codec(message).encode(record)  # type: ignore[no-any-return]


def op_to_term(spec: Any) -> dict[Atom, Any]:
    return record_to_term("OpInfo", records.op_record(spec))


def error_to_term(err: SidecarError) -> dict[Atom, Any]:
    """`%{kind: :shape_mismatch, message: "...", op: "add", input_shapes: [[2, 3], [4]], ...}`."""
    m: dict[Atom, Any] = {Atom("kind"): Atom(err.kind.value.lower()), Atom("message"): err.message}
    fields = err.fields
    for name in ERROR_FIELDS:
        if name in fields:
            m[Atom(name)] = value_to_term(fields[name])
    return m


# ---------------------------------------------------------------------------------------------------
# Telemetry, in :telemetry's shape

_SIDECAR, _OS_PID = Atom("sidecar"), Atom("os_pid")
_EVENT_NAMES = {"span": "call"}                   # a span is [:sidecar, :call, <phase>]
_NAMED_BY = {"span": ("phase", "stop"), "pool": ("event", "event")}  # the field that ends the name
_MEASUREMENT_NAMES = {"duration_ns": "duration"}  # :telemetry's span convention
# A span's outcome is not metadata: an exception says it as `kind` (an atom), a stop not at all.
_NOT_METADATA = {"outcome"}


@functools.cache
def _telemetry_layout(member: str) -> tuple[tuple[tuple[str, Atom], ...], tuple[str, ...], tuple[str, ...]]:
    """How a TelemetryEvent member's fields land in a :telemetry event: (measurements, as
    (field, key); metadata fields; fields whose items are merged into the metadata). Numbers are
    measurements, and so are the numbers of a sub-message (a span's timing)."""
    spec = schema.message(schema.message("TelemetryEvent").by_name[member].message or "")
    measurements: list[tuple[str, Atom]] = []
    metadata: list[str] = []
    merged: list[str] = []
    for f in spec.fields:
        if f.name == _NAMED_BY.get(member, ("",))[0] or f.name in _NOT_METADATA:
            continue
        if f.kind in ("int", "float") and not f.repeated:
            measurements.append((f.name, Atom(_MEASUREMENT_NAMES.get(f.name, f.name))))
        elif f.kind == "message" and not f.repeated:
            measurements += [(f"{f.name}.{n}", Atom(n)) for n in schema.message(f.message or "").names]
        elif f.kind == "map":
            merged.append(f.name)
        else:
            metadata.append(f.name)
    return tuple(measurements), tuple(metadata), tuple(merged)


def telemetry_to_term(event: Mapping[str, Any]) -> tuple[Any, ...]:
    """A hub event as `{:telemetry, event_name, measurements, metadata}`.

    Durations are nanoseconds here (`duration`, `*_ns`); the Elixir side converts `duration` to
    native time units like `:telemetry.span/3` does. A span's start measures only `system_time` and
    `bytes_in`; an exception's metadata adds the error `kind` and `message`.
    """
    record = records.telemetry_record(event)
    pid = int(record.get("pid") or 0)
    member = next((k for k in record if k not in ("time_unix_ns", "pid")), None)
    if member is None:
        return Atom("telemetry"), [_SIDECAR, Atom(str(event.get("type") or "event"))], {}, {_OS_PID: pid}
    body = record[member]
    name = [_SIDECAR, Atom(_EVENT_NAMES.get(member, member))]
    if member in _NAMED_BY:
        field, default = _NAMED_BY[member]
        name.append(Atom(str(body.get(field) or default)))
    measurements, metadata, merged = _telemetry_layout(member)
    meas: dict[Atom, Any] = {}
    if name[-1] == "start":
        meas = {Atom("bytes_in"): int(body.get("bytes_in") or 0),
                Atom("system_time"): int(record.get("time_unix_ns") or 0)}
    else:
        for field, key in measurements:
            outer, _, inner = field.partition(".")
            value = (body.get(outer) or {}).get(inner) if inner else body.get(field)
            if value is not None or not inner:
                meas[key] = int(value or 0)
    meta: dict[Atom, Any] = {}
    spec = schema.message(schema.message("TelemetryEvent").by_name[member].message or "")
    for field in metadata:
        if field in body:
            meta[Atom(field)] = _field_term(spec.by_name[field], body[field])
    meta[_OS_PID] = pid
    for field in merged:
        meta.update({Atom(str(k)): str(v) for k, v in (body.get(field) or {}).items()})
    if name[-1] == "exception":
        meta[Atom("kind")] = Atom(str(body.get("outcome") or "OP_FAILED").lower())
        meta[Atom("message")] = str(event.get("message", ""))
    return Atom("telemetry"), name, meas, meta
