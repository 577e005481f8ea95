"""What a transport hands the dispatcher, and what it gets back.

Transports (gRPC, the Erlang port) translate their wire form into a `Call` and a `CallResult` back;
the dispatcher never sees protobuf or Erlang terms. The host side builds the same `Call` for the
codec that encodes it. Field names are those of `sidecar.v1.ExecuteRequest` / `OutputSpec` /
`ExecuteResponse` / `Timing`, so the codecs convert them by name. Values are plain Python:
`TensorRef`, `ArrowRef`, float, int, bool, str, bytes, list, dict or None.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Callable, Union

from sidecar.protocol.refs import ArrowRef, TensorRef

# What an input, an attr or an output is on the wire (sidecar.v1.Value): refs or plain values, nested.
Value = Union[TensorRef, ArrowRef, float, int, bool, str, bytes, None, list["Value"], dict[str, "Value"]]


class Placement(enum.IntEnum):
    """Where outputs go; values equal sidecar.v1.Placement (PLACEMENT_<name>)."""

    AUTO = 0    # inline below the inline threshold, otherwise the worker's arena under a lease
    SHM = 1     # the worker's arena under a lease
    INLINE = 2  # bytes inside the response
    DEVICE = 3  # stays on the GPU, returned as a CUDA IPC handle under a lease
    OUT = 4     # written into the caller's `out` refs


@dataclass
class OutputSpec:
    placement: Placement = Placement.AUTO
    out: tuple[TensorRef, ...] = ()
    inline_threshold: int = 0  # 0 = the worker's default
    # Outputs that are views of inputs may come back as refs into the input's segment (no copy, no
    # lease); the caller keeps that input alive while it uses the output. See sidecar.v1.OutputSpec.
    allow_alias: bool = False


@dataclass
class Call:
    op: str
    inputs: list[Value] = field(default_factory=list)
    attrs: dict[str, Value] = field(default_factory=dict)
    output: OutputSpec = field(default_factory=OutputSpec)
    release: list[str] = field(default_factory=list)
    request_id: str = ""
    idempotent: bool = False
    # Who takes the output leases (sidecar.v1.ExecuteRequest.client_pid / client_id); 0 = nobody said.
    client_pid: int = 0
    client_id: str = ""
    # The session the call belongs to ("" = none) and its idle TTL (0 = the worker's default):
    # sidecar.v1.ExecuteRequest.session_id / session_ttl_s.
    session_id: str = ""
    session_ttl_s: float = 0.0
    # ExecuteStream's flow-control window (chunks / bytes sent and not yet acknowledged); 0 = default.
    stream_max_chunks: int = 0
    stream_max_bytes: int = 0
    # Set by the transport: returns True once the caller has gone (cancelled, deadline passed).
    is_cancelled: Callable[[], bool] | None = None


@dataclass
class Timing:
    queue_ns: int = 0
    decode_ns: int = 0
    compute_ns: int = 0
    encode_ns: int = 0
    total_ns: int = 0


@dataclass
class CallResult:
    outputs: list[Value]
    leases: list[str]
    timing: Timing
    device: str
    bytes_in: int = 0
    bytes_out: int = 0
    request_id: str = ""


@dataclass
class Chunk:
    """One chunk of a streaming call (the fields of `sidecar.v1.ExecuteChunk` but `end`): what the
    op yielded, encoded like a call's outputs, with the chunk's own lease when it has one."""

    values: list[Value]
    leases: list[str] = field(default_factory=list)
    index: int = 0
    bytes: int = 0
