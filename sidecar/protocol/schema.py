"""The messages of `protos/sidecar/v1/sidecar.proto` as plain field tables, read once from the
generated descriptors.

Both codecs (`grpc_codec`, `port_codec`) walk these tables instead of naming fields themselves, so a
field added to a message in the .proto (and regenerated: scripts/gen_protos.py) is carried by both
transports without another edit. A table is built on first use and kept: the hot path reads plain
attributes, never the descriptor API.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from sidecar.protocol.limits import INT32_MAX, INT32_MIN, INT64_MAX, INT64_MIN, UINT32_MAX, UINT64_MAX
from sidecar.v1 import sidecar_pb2 as pb

_FD = FieldDescriptor
# The Python kind of each protobuf scalar type, and the range of the integer ones.
_KINDS: dict[int, str] = {
    _FD.TYPE_DOUBLE: "float", _FD.TYPE_FLOAT: "float", _FD.TYPE_BOOL: "bool", _FD.TYPE_STRING: "str",
    _FD.TYPE_BYTES: "bytes", _FD.TYPE_ENUM: "enum", _FD.TYPE_MESSAGE: "message",
    _FD.TYPE_INT64: "int", _FD.TYPE_SINT64: "int", _FD.TYPE_SFIXED64: "int", _FD.TYPE_UINT64: "int",
    _FD.TYPE_FIXED64: "int", _FD.TYPE_INT32: "int", _FD.TYPE_SINT32: "int", _FD.TYPE_SFIXED32: "int",
    _FD.TYPE_UINT32: "int", _FD.TYPE_FIXED32: "int",
}
_RANGES: dict[int, tuple[int, int]] = {
    _FD.TYPE_INT64: (INT64_MIN, INT64_MAX), _FD.TYPE_SINT64: (INT64_MIN, INT64_MAX),
    _FD.TYPE_SFIXED64: (INT64_MIN, INT64_MAX), _FD.TYPE_UINT64: (0, UINT64_MAX),
    _FD.TYPE_FIXED64: (0, UINT64_MAX), _FD.TYPE_INT32: (INT32_MIN, INT32_MAX),
    _FD.TYPE_SINT32: (INT32_MIN, INT32_MAX), _FD.TYPE_SFIXED32: (INT32_MIN, INT32_MAX),
    _FD.TYPE_UINT32: (0, UINT32_MAX), _FD.TYPE_FIXED32: (0, UINT32_MAX),
}


@dataclass(frozen=True)
class Field:
    """One field of a message."""

    name: str
    number: int
    kind: str                   # int | float | bool | str | bytes | enum | message | map
    repeated: bool              # a repeated field (not a map)
    message: str | None         # the message type of a message field, or of a map's values
    map_value_kind: str | None  # a map's value kind (map keys are always strings here)
    oneof: str | None           # the oneof it belongs to
    lo: int = 0                 # range of an integer field
    hi: int = 0
    enum_names: tuple[tuple[str, int], ...] = ()  # (name, number) of an enum field's values

    def clamp(self, value: Any) -> int:
        """An integer for this field from any number-ish value, clamped to what it can hold
        (`dim=1e300` echoed in an error, an "unknown" -1 in an unsigned field)."""
        try:
            n = int(value)
        except OverflowError:  # +-inf
            n = self.hi if value > 0 else self.lo
        except (TypeError, ValueError):  # NaN, or not a number at all
            n = 0
        return min(max(n, self.lo), self.hi)


@dataclass(frozen=True)
class Message:
    """A message's fields in declaration order, by name, and its oneofs."""

    name: str
    fields: tuple[Field, ...]
    by_name: dict[str, Field]
    oneofs: dict[str, tuple[str, ...]]  # oneof name -> its member fields

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)


def _field(f: FieldDescriptor) -> Field:
    kind = _KINDS[f.type]
    message: str | None = f.message_type.name if f.message_type is not None else None
    map_value_kind: str | None = None
    repeated = bool(f.is_repeated)
    if f.message_type is not None and f.message_type.GetOptions().map_entry:
        value = f.message_type.fields_by_name["value"]
        kind, repeated, map_value_kind = "map", False, _KINDS[value.type]
        message = value.message_type.name if value.message_type is not None else None
    lo, hi = _RANGES.get(f.type, (0, 0))
    enum_names = tuple((v.name, v.number) for v in f.enum_type.values) if f.enum_type is not None else ()
    oneof = f.containing_oneof.name if f.containing_oneof is not None else None
    return Field(f.name, f.number, kind, repeated, message, map_value_kind, oneof, lo, hi, enum_names)


def _descriptors() -> dict[str, Descriptor]:
    found: dict[str, Descriptor] = {}

    def walk(d: Descriptor) -> None:
        found.setdefault(d.name, d)
        for nested in d.nested_types:
            walk(nested)

    for d in pb.DESCRIPTOR.message_types_by_name.values():
        walk(d)
    return found


@functools.cache
def message(name: str) -> Message:
    """The table of `sidecar.v1.<name>` (e.g. "Tensor", "ExecuteRequest", "Error")."""
    d = _descriptors()[name]
    fields = tuple(_field(f) for f in d.fields)
    oneofs = {o.name: tuple(f.name for f in o.fields) for o in d.oneofs}
    return Message(name, fields, {f.name: f for f in fields}, oneofs)
