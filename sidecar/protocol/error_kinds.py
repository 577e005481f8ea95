"""The error kinds and the structured fields an error carries, as `sidecar.v1.Error` defines them.

`ERROR_FIELDS` is read from the proto's descriptor (a field added to `Error` in the .proto is a
field every error class accepts, both codecs carry and `Sidecar.Error` knows: tests/test_protocol.py
compares bridge/lib/sidecar/error.ex with it). `ErrorKind` is written out for the type checker and
compared with the proto's enum by the same test.
"""
from __future__ import annotations

from enum import Enum

from sidecar.v1 import sidecar_pb2 as pb


class ErrorKind(str, Enum):
    """`sidecar.v1.ErrorKind` without ERROR_KIND_UNSPECIFIED; the value is the proto's name."""

    SHAPE_MISMATCH = "SHAPE_MISMATCH"
    DTYPE_MISMATCH = "DTYPE_MISMATCH"
    DEVICE_MISMATCH = "DEVICE_MISMATCH"
    OUT_OF_MEMORY = "OUT_OF_MEMORY"
    INVALID_TENSOR_REF = "INVALID_TENSOR_REF"
    UNKNOWN_OP = "UNKNOWN_OP"
    OP_FAILED = "OP_FAILED"
    OVERLOADED = "OVERLOADED"
    DEVICE_UNAVAILABLE = "DEVICE_UNAVAILABLE"
    WORKER_CRASHED = "WORKER_CRASHED"
    CIRCUIT_OPEN = "CIRCUIT_OPEN"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    CANCELLED = "CANCELLED"
    RESOURCE_FAILED = "RESOURCE_FAILED"
    SESSION_LOST = "SESSION_LOST"


def _error_fields() -> tuple[str, ...]:
    """`sidecar.v1.Error`'s fields in proto order, but kind and message (every error has them) and
    `has_<field>` presence flags (wire bookkeeping: proto3 cannot tell 0 from unset)."""
    by_number = {f.number: f.name for f in pb.Error.DESCRIPTOR.fields}
    names = [by_number[n] for n in sorted(by_number)]
    return tuple(n for n in names if n not in ("kind", "message")
                 and not (n.startswith("has_") and n[len("has_"):] in names))


# Fields of sidecar.v1.Error that an error may carry (besides kind and message).
ERROR_FIELDS: tuple[str, ...] = _error_fields()
