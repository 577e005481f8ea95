"""`Transport`: what a `Client` needs from one connection to a worker, and nothing more.

The cut (as httpx separates its client from its transports): a transport carries *descriptors* to a
worker and back, in neutral Python types, and turns every failure into a structured error. It never
touches memory. Encoding inputs into refs (shared memory in the host arena, inline bytes, CUDA IPC
handles), decoding output refs into arrays, keeping leases until outputs are collected, the call's
request id and lease owner: all of that is the `Client`'s, whichever transport it uses. A `Pool`
knows only Clients.

    execute(call, timeout)          a `Call` (op, input refs and values, attrs, output spec, lease
                                    ids to release, request id, owner) -> its `CallResult`
    stream(call, timeout)           a streaming call -> a `ChunkStream` (chunks, acks, cancel)
    list_ops(timeout)               [{"name", "doc", "min_inputs", "max_inputs" (-1 variadic),
                                      "idempotent", "attrs", "module"}]
    hardware(timeout)               the worker's `Hardware` as a dict (every field present)
    release(lease_ids, timeout)     (released, unknown ids)
    health(service, timeout)        "SERVING", "NOT_SERVING", ... (the gRPC health names)
    watch_telemetry(interval, ms)   a `TelemetryWatch`: event dicts until closed
    reopen()                        a new connection to the same worker, for a forked child (the
                                    parent's is left untouched; see `Client`)
    close()                         end the connection (calls in flight are the Client's concern)

Errors: every method raises a `SidecarError` (the worker's own structured error, `Cancelled` when the
timeout passed, `WorkerUnreachable` when the worker cannot be reached). One that provably never
reached the worker carries `call_started = False`, so that a pool may send it again whatever it does.

Two transports ship: `sidecar.host.grpc_transport.GrpcTransport` (a worker process over gRPC, what
`Client(address)` uses) and `sidecar.worker.local_transport.InProcessTransport` (a worker `Runtime` in
this very process, no sockets: what the dispatcher's and the ops' tests run through).

Example: a transport that counts the calls of another one.

    from sidecar.host import Client
    from sidecar.host.grpc_transport import GrpcTransport
    from sidecar.host.transport import Transport

    class Counting(Transport):
        def __init__(self, inner: Transport) -> None:
            self.inner, self.address, self.calls = inner, inner.address, 0

        def execute(self, call, timeout=None):
            self.calls += 1
            return self.inner.execute(call, timeout)

        def list_ops(self, timeout=None):
            return self.inner.list_ops(timeout)
        ...  # hardware, release, health, watch_telemetry, reopen, close: the same

    client = Client(transport=Counting(GrpcTransport("unix:/tmp/worker.sock")))
"""
from __future__ import annotations

import abc
from collections.abc import Callable, Iterator
from typing import Any

from sidecar.errors import Cancelled, InvalidArgument
from sidecar.host.futures import CancelScope
from sidecar.protocol.calls import Call, CallResult, Chunk

__all__ = ["ChunkStream", "TelemetryWatch", "Transport"]


class ChunkStream(abc.ABC):
    """The chunks of one streaming call as they arrive (`Transport.stream`), in neutral types.

    Iterating yields `Chunk`s in order and ends when the worker's final message came (then
    `result` is the stream's `CallResult`: timing, bytes, no outputs), or raises the stream's
    `SidecarError` after the chunks delivered before it. `ack(n, release, requeue)` gives the worker
    credit for n more consumed chunks (and releases leases on the way); `cancel()` ends the stream (the
    worker closes the generator); both may be called from any thread, and late calls are no-ops.
    """

    result: CallResult | None = None

    @abc.abstractmethod
    def __iter__(self) -> Iterator[Chunk]: ...

    @abc.abstractmethod
    def ack(self, chunks: int, release: list[str], requeue: Callable[[list[str]], None] | None = None) -> None:
        """Credit for `chunks` more consumed chunks, with `release` piggybacked; an ack that cannot
        be delivered hands `release` to `requeue` (it must never be lost: rule 7's other half)."""

    @abc.abstractmethod
    def cancel(self) -> None: ...


class TelemetryWatch(abc.ABC):
    """An iterator of telemetry event dicts (call spans, memory samples; the shape of
    `sidecar.v1.TelemetryEvent`); `close()` (or leaving a `with` block, or closing the client) ends it."""

    @abc.abstractmethod
    def __iter__(self) -> Iterator[dict[str, Any]]: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> TelemetryWatch:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Transport(abc.ABC):
    """One connection to one worker (see the module doc for the contract). Thread-safe."""

    address: str  # what the worker is called in messages (its listen address, or a description)

    @abc.abstractmethod
    def execute(self, call: Call, timeout: float | None = None) -> CallResult: ...

    def execute_cancellable(self, call: Call, timeout: float | None, scope: CancelScope) -> CallResult:
        """`execute`, cancellable from another thread through `scope` (`sidecar.host.futures`). A
        transport that cannot cancel a call under way runs it to its end (or its timeout)."""
        if scope.cancelled:
            raise Cancelled("the call was cancelled before it was sent", op=call.op, request_id=call.request_id)
        return self.execute(call, timeout)

    def stream(self, call: Call, timeout: float | None = None) -> ChunkStream:
        """Starts a streaming call (ExecuteStream); a transport that cannot stream says so."""
        raise InvalidArgument(f"{type(self).__name__} does not carry streaming calls", field="transport",
                              op=call.op)

    @abc.abstractmethod
    def list_ops(self, timeout: float | None = None) -> list[dict[str, Any]]: ...

    @abc.abstractmethod
    def hardware(self, timeout: float | None = None) -> dict[str, Any]: ...

    @abc.abstractmethod
    def release(self, lease_ids: list[str], timeout: float | None = None) -> tuple[int, list[str]]: ...

    @abc.abstractmethod
    def health(self, service: str = "", timeout: float | None = None) -> str: ...

    @abc.abstractmethod
    def watch_telemetry(self, memory_interval_s: float = 0.0, batch_window_ms: int = 20) -> TelemetryWatch: ...

    @abc.abstractmethod
    def reopen(self) -> Transport: ...

    # Resources and sessions (records of sidecar.v1.ResourceInfo, UnloadResponse, ResourceList,
    # CloseSessionResponse). Not abstract: a transport without them refuses them.

    def load(self, name: str, loader: str, kwargs: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        raise self._unsupported("Load")

    def unload(self, name: str, timeout: float | None = None) -> dict[str, Any]:
        raise self._unsupported("Unload")

    def list_resources(self, timeout: float | None = None) -> dict[str, Any]:
        raise self._unsupported("ListResources")

    def close_session(self, session_id: str, timeout: float | None = None) -> bool:
        raise self._unsupported("CloseSession")

    def _unsupported(self, what: str) -> Exception:
        from sidecar.errors import InvalidArgument

        return InvalidArgument(f"{type(self).__name__} does not carry {what}", field="transport")

    @abc.abstractmethod
    def close(self) -> None: ...

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.address}>"
