"""Neutral Python objects as the messages of the .proto: which class travels as which message, and
the records (dicts keyed by the message's field names) of what has no class of its own.

Both codecs start here. A dataclass that travels is bound to one message (`BINDINGS`); its attributes
carry the message's fields of the same names, and a oneof of the message is held by one attribute
whose value's type says which member it is (`TensorRef.storage` is a `ShmStorage`: the member `shm`).
What has no dataclass (hardware, op infos, release replies, telemetry events) travels as a record:
`op_record`, `telemetry_record` build those from the worker's own objects, once for both transports.
`value_kind` sorts a plain value into the member of `sidecar.v1.Value` it travels as.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from enum import Enum
from typing import Any, Mapping

from sidecar.errors import InvalidArgument
from sidecar.protocol import schema
from sidecar.protocol.calls import Call, CallResult, OutputSpec, Timing
from sidecar.protocol.limits import INT64_MAX, INT64_MIN
from sidecar.protocol.refs import ArrowRef, CudaIpcStorage, InlineStorage, ShmStorage, TensorRef


@dataclass(frozen=True)
class Binding:
    """How one neutral class travels as one message."""

    cls: type
    message: str
    # The attribute that holds the message's oneof, and which member each type of its value is.
    oneof_attr: str | None = None
    members: tuple[tuple[type, str], ...] = ()
    # A descriptor of memory (a ref, its storage): what is wrong in it is an INVALID_TENSOR_REF,
    # named by its own field (`storage`, `nbytes`), not by where it sits in the request.
    descriptor: bool = False

    def member_of(self, value: Any) -> str:
        for cls, member in self.members:
            if isinstance(value, cls):
                return member
        raise TypeError(f"{type(value).__name__} is not a {self.message} member "
                        f"({', '.join(c.__name__ for c, _ in self.members)})")  # a bug on our side


BINDINGS: dict[type, Binding] = {b.cls: b for b in (
    Binding(ShmStorage, "ShmRef", descriptor=True),
    Binding(CudaIpcStorage, "CudaIpcRef", descriptor=True),
    Binding(TensorRef, "Tensor", "storage",
            ((ShmStorage, "shm"), (InlineStorage, "inline_data"), (CudaIpcStorage, "cuda_ipc")), descriptor=True),
    Binding(ArrowRef, "ArrowTable", "storage", ((ShmStorage, "shm"), (InlineStorage, "inline_data")),
            descriptor=True),
    Binding(Timing, "Timing"),
    Binding(OutputSpec, "OutputSpec"),
    Binding(Call, "ExecuteRequest"),
    Binding(CallResult, "ExecuteResponse"),
)}
BY_MESSAGE: dict[str, Binding] = {b.message: b for b in BINDINGS.values()}


@dataclass(frozen=True)
class Attr:
    """What a binding's class says of one attribute: its default, and the container it wants."""

    name: str
    required: bool            # no default: a value must be given
    default: Any
    container: type           # tuple or list, for a repeated field
    none_when_empty: bool     # an empty repeated field is None (TensorRef.strides: C-contiguous)
    enum: type[Enum] | None   # the Python enum of an enum field (OutputSpec.placement: Placement)


@functools.cache
def attrs_of(cls: type) -> dict[str, Attr]:
    """The attributes of a bound dataclass, by name."""
    out: dict[str, Attr] = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default, required = f.default, False
        elif f.default_factory is not dataclasses.MISSING:
            default, required = f.default_factory(), False
        else:
            default, required = None, True
        hint = str(f.type)
        out[f.name] = Attr(f.name, required, default, tuple if hint.startswith("tuple") else list,
                           not required and default is None,
                           type(default) if isinstance(default, Enum) else None)
    return out


def message_words(message: str) -> str:
    """"ArrowTable" -> "arrow table": how an error names a message."""
    return "".join(" " + c.lower() if c.isupper() and i else c.lower() for i, c in enumerate(message))


@functools.cache
def wrapped_field(cls: type) -> str:
    """The one attribute of a class that wraps a scalar member of a oneof (InlineStorage.data)."""
    (f,) = dataclasses.fields(cls)
    return f.name


# ---------------------------------------------------------------------------------------------------
# Values

# Exact types first (the common case costs one dict lookup); subclasses and look-alikes below.
_KINDS: dict[type, str] = {TensorRef: "tensor", ArrowRef: "arrow", type(None): "none", bool: "b", int: "i64",
                           float: "f64", str: "s", bytes: "raw", list: "list", tuple: "list", dict: "map"}


def value_kind(v: Any) -> tuple[str, Any]:
    """(the `sidecar.v1.Value` member `v` travels as, `v` in that member's Python form).

    bool before int (bool is an int subclass), NumPy scalars as Python numbers, bytearray and
    memoryview as bytes; an int outside int64 and anything else are an InvalidArgument.
    """
    kind = _KINDS.get(type(v))
    if kind is None:
        if hasattr(v, "item") and hasattr(v, "dtype") and getattr(v, "ndim", 1) == 0:
            return value_kind(v.item())  # a NumPy scalar
        for cls, k in _KINDS.items():
            if isinstance(v, cls):
                kind = k
                break
        else:
            if isinstance(v, (bytearray, memoryview)):
                return "raw", bytes(v)
            if isinstance(v, Mapping):
                return "map", v
            raise InvalidArgument(f"cannot send a value of type {type(v).__name__} (convert it to a tensor "
                                  f"first)", field="value")
    if kind == "i64" and not INT64_MIN <= v <= INT64_MAX:
        raise InvalidArgument(f"integer {v} does not fit in int64", field="value")
    return kind, v


# ---------------------------------------------------------------------------------------------------
# Records


def op_record(spec: Any) -> dict[str, Any]:
    """An `OpSpec` (registry) as an `OpInfo` record."""
    return {"name": spec.name, "doc": spec.doc or "", "min_inputs": int(spec.min_inputs),
            "max_inputs": -1 if spec.max_inputs is None else int(spec.max_inputs),
            "idempotent": bool(spec.idempotent), "attrs": list(spec.attrs or ()), "module": spec.module or "",
            "takes_context": bool(getattr(spec, "accepts_ctx", False))}


_EVENT_MEMBERS = schema.message("TelemetryEvent").oneofs["event"]  # span, memory, pool


def telemetry_record(event: Mapping[str, Any]) -> dict[str, Any]:
    """A telemetry hub event (`{"type": "span", "phase": "stop", "op": ..., "time_unix_ns": ...}`)
    as a `TelemetryEvent` record: `{"time_unix_ns", "pid", "span": {CallSpan fields}}`."""
    kind = event.get("type")
    record: dict[str, Any] = {"time_unix_ns": event.get("time_unix_ns") or 0, "pid": event.get("pid") or 0}
    if kind in _EVENT_MEMBERS:
        names = _event_fields(kind)
        record[kind] = {k: v for k, v in event.items() if k in names}
    return record


@functools.cache
def _event_fields(member: str) -> frozenset[str]:
    return frozenset(schema.message(schema.message("TelemetryEvent").by_name[member].message or "").names)
