"""Structured errors, shared by the worker and every host.

One exception class per `sidecar.v1.ErrorKind`. Each carries the structured fields of
`sidecar.v1.Error` as attributes (and in `.fields`), so hosts can match on the class and read the
figures. The kinds and the field names come from `sidecar.protocol.error_kinds` (i.e. from the
.proto); the wire mapping (to/from `google.rpc.Status` details and Erlang terms) lives in the codecs
of `sidecar.protocol`; this module knows nothing of gRPC beyond the status-code *names*.
"""
from __future__ import annotations

import difflib
import json
import re
from typing import Any, ClassVar, Iterable

from sidecar.protocol.error_kinds import ERROR_FIELDS, ErrorKind
from sidecar.protocol.limits import ECHO_CHARS

__all__ = ["ErrorKind", "ERROR_FIELDS", "ERROR_CLASSES", "SidecarError", "ShapeMismatch", "DtypeMismatch",
           "DeviceMismatch", "OutOfMemory", "InvalidTensorRef", "UnknownOp", "OpFailed", "Overloaded",
           "DeviceUnavailable", "WorkerCrashed", "WorkerUnreachable", "CircuitOpen", "InvalidArgument",
           "Cancelled", "ResourceFailed", "SessionLost", "shorten", "close_names", "START_ERROR_PREFIX",
           "start_error_line", "parse_start_error"]


class SidecarError(Exception):
    """Base of every structured error. `kind` and `grpc_code` (a grpc.StatusCode name) are per class."""

    kind: ClassVar[ErrorKind] = ErrorKind.OP_FAILED
    grpc_code: ClassVar[str] = "INTERNAL"

    def __init__(self, message: str, **fields: Any) -> None:
        super().__init__(message)
        unknown = set(fields) - set(ERROR_FIELDS)
        if unknown:
            raise TypeError(f"unknown error fields {sorted(unknown)} for {type(self).__name__}")
        self.message = message
        self.fields: dict[str, Any] = {k: v for k, v in fields.items() if v is not None}

    def __getattr__(self, name: str) -> Any:
        # Only called when normal lookup fails: expose structured fields as attributes (None if unset).
        if name in ERROR_FIELDS:
            return self.__dict__.get("fields", {}).get(name)
        raise AttributeError(name)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "message": self.message, **self.fields}

    def __repr__(self) -> str:
        extra = ", ".join(f"{k}={v!r}" for k, v in self.fields.items() if k != "traceback")
        return f"{type(self).__name__}({self.message!r}{', ' + extra if extra else ''})"

    def __str__(self) -> str:
        """The message, then the structured fields, a line each for what says what to do.

        An uncaught error then shows more than its message: where a remote exception was raised (the
        traceback's last frame, not the whole traceback), the close names, the suggestion, the figures.
        """
        f = self.fields
        lines = [self.message]
        where = _last_frame(str(f.get("traceback") or ""))
        if f.get("exception_type") or where:
            lines.append(f"  {f.get('exception_type') or 'exception'} raised" + (f" at {where}" if where else ""))
        if f.get("close_names"):
            lines.append("  did you mean: " + ", ".join(map(str, f["close_names"])))
        if f.get("suggestion"):
            lines.append(f"  suggestion: {f['suggestion']}")
        details = ", ".join(f"{k}={_brief(f[k])}" for k in ERROR_FIELDS if k in f and k not in _OWN_LINES)
        if details:
            lines.append(f"  {details}")
        tail = [line for line in list(f.get("stderr_tail") or ())[-3:] if str(line) not in self.message]
        if tail:
            lines.append("  last output: " + " | ".join(map(str, tail)))
        return "\n".join(lines)


_OWN_LINES = frozenset({"traceback", "exception_type", "close_names", "suggestion", "stderr_tail"})
_FRAME = re.compile(r'^\s*File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<func>.+)$')


def _last_frame(traceback: str) -> str | None:
    """`file:line in func: code` of the innermost frame of a formatted traceback."""
    lines = traceback.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        m = _FRAME.match(lines[i])
        if m:
            code = lines[i + 1].strip() if i + 1 < len(lines) and lines[i + 1].startswith("    ") else ""
            return f"{m['file']}:{m['line']} in {m['func']}" + (f": {code}" if code else "")
    return None


def _brief(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= 120 else text[:119] + "…"


class ShapeMismatch(SidecarError):
    kind = ErrorKind.SHAPE_MISMATCH
    grpc_code = "INVALID_ARGUMENT"


class DtypeMismatch(SidecarError):
    kind = ErrorKind.DTYPE_MISMATCH
    grpc_code = "INVALID_ARGUMENT"


class DeviceMismatch(SidecarError):
    kind = ErrorKind.DEVICE_MISMATCH
    grpc_code = "FAILED_PRECONDITION"


class OutOfMemory(SidecarError):
    kind = ErrorKind.OUT_OF_MEMORY
    grpc_code = "RESOURCE_EXHAUSTED"


class InvalidTensorRef(SidecarError):
    """A descriptor that cannot be used: `field` says which part is wrong, `input_index` which input."""

    kind = ErrorKind.INVALID_TENSOR_REF
    grpc_code = "INVALID_ARGUMENT"


class UnknownOp(SidecarError):
    kind = ErrorKind.UNKNOWN_OP
    grpc_code = "NOT_FOUND"


class OpFailed(SidecarError):
    kind = ErrorKind.OP_FAILED
    grpc_code = "INTERNAL"


class Overloaded(SidecarError):
    kind = ErrorKind.OVERLOADED
    grpc_code = "RESOURCE_EXHAUSTED"


class DeviceUnavailable(SidecarError):
    kind = ErrorKind.DEVICE_UNAVAILABLE
    grpc_code = "FAILED_PRECONDITION"


class WorkerCrashed(SidecarError):
    kind = ErrorKind.WORKER_CRASHED
    grpc_code = "UNAVAILABLE"


class WorkerUnreachable(WorkerCrashed):
    """The worker could not be reached or went away during the call (gRPC UNAVAILABLE, no details).

    A WORKER_CRASHED kind (so a pool treats it like a crash whose exit it has not seen yet), with
    classification "unreachable" and no exit code; the pool fills in the exit details when it reaps.
    """


class CircuitOpen(SidecarError):
    kind = ErrorKind.CIRCUIT_OPEN
    grpc_code = "UNAVAILABLE"


class InvalidArgument(SidecarError):
    kind = ErrorKind.INVALID_ARGUMENT
    grpc_code = "INVALID_ARGUMENT"


class Cancelled(SidecarError):
    kind = ErrorKind.CANCELLED
    grpc_code = "CANCELLED"


class ResourceFailed(SidecarError):
    """A resource could not be loaded, or an op asked for one that is not loaded: `resource`, `loader`
    and `cause` say which and why (missing/unexpected keys, shape mismatches, close names)."""

    kind = ErrorKind.RESOURCE_FAILED
    grpc_code = "FAILED_PRECONDITION"


class SessionLost(SidecarError):
    """The worker holding a session's state died: `session_id`, and the crash (`classification`,
    `pid`, `exit_code`, `signal`). The session's state is gone; open a new session."""

    kind = ErrorKind.SESSION_LOST
    grpc_code = "ABORTED"


ERROR_CLASSES: dict[ErrorKind, type[SidecarError]] = {
    cls.kind: cls
    for cls in (ShapeMismatch, DtypeMismatch, DeviceMismatch, OutOfMemory, InvalidTensorRef, UnknownOp,
                OpFailed, Overloaded, DeviceUnavailable, WorkerCrashed, CircuitOpen, InvalidArgument,
                Cancelled, ResourceFailed, SessionLost)
}


# A worker that cannot start (DEVICE_UNAVAILABLE, ...) writes its structured error as one line on
# stderr; the host that spawned it raises that error instead of a bare start failure.
START_ERROR_PREFIX = "SIDECAR_START_ERROR"


def start_error_line(err: SidecarError) -> str:
    return f"{START_ERROR_PREFIX} {json.dumps(err.to_dict(), default=str)}"


def parse_start_error(line: str) -> SidecarError | None:
    """The error of a `start_error_line`; None for any other line."""
    if not line.startswith(START_ERROR_PREFIX + " "):
        return None
    try:
        data = json.loads(line[len(START_ERROR_PREFIX) + 1:])
        if not isinstance(data, dict):
            return None
        kind = ErrorKind(str(data.get("kind", "OP_FAILED")).upper())
        fields = {k: v for k, v in data.items() if k in ERROR_FIELDS}
        return ERROR_CLASSES[kind](str(data.get("message", "")), **fields)
    except (ValueError, TypeError):  # not JSON, an unknown kind or field
        return None


def shorten(value: Any, limit: int = ECHO_CHARS) -> str:
    """`repr(value)`, cut to `limit` characters: what a message shows of a value a caller sent (a
    10 KB op name must not make a 10 KB error)."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit - 1]}… ({len(text)} characters)"


def close_names(name: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """Names a user probably meant (for UNKNOWN_OP)."""
    return difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.5)
