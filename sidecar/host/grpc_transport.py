"""`GrpcTransport`: a worker process over gRPC (the `Sidecar` service and the standard health
service), for a `Client`. The protobuf shapes stay in `sidecar.protocol.grpc_codec`; this module only makes the
RPCs and maps their failures (see `sidecar.host.transport` for the contract)."""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from sidecar.errors import Cancelled, SidecarError, WorkerUnreachable
from sidecar.host.futures import CancelScope
from sidecar.host.transport import ChunkStream, TelemetryWatch, Transport
from sidecar.v1 import sidecar_pb2 as pb
from sidecar.v1 import sidecar_pb2_grpc as pb_grpc
from sidecar.protocol import grpc_codec as wire
from sidecar.protocol.calls import Call, CallResult, Chunk

__all__ = ["GrpcTransport"]


def channel_target(address: str) -> str:
    """What grpc dials for a worker address (`unix:/path`, `host:port`, or a bare socket path)."""
    if address.startswith(("unix:", "dns:", "ipv4:", "ipv6:")) or ":" in address:
        return address
    return f"unix:{address}"


def channel_options(max_message_bytes: int | None) -> list[tuple[str, Any]]:
    """The options of a channel to a worker, blocking or grpc.aio: no transparent retries (the
    pool decides what is sent again), and `max_message_bytes` as both message limits when given."""
    options: list[tuple[str, Any]] = [("grpc.enable_retries", 0)]
    if max_message_bytes:
        options += [("grpc.max_receive_message_length", max_message_bytes),
                    ("grpc.max_send_message_length", max_message_bytes)]
    return options


def stream_request(call: Call) -> pb.ExecuteRequest:
    """The ExecuteStream request of a streaming `Call` (its flow-control window included)."""
    request = wire.call_to_request(call)
    request.stream_max_chunks = call.stream_max_chunks
    request.stream_max_bytes = call.stream_max_bytes
    return request


def rpc_failure(err: grpc.RpcError, op: str) -> SidecarError:
    """The structured error of a failed RPC, marked `call_started = False` when the request provably
    never reached the worker (no connection could be made)."""
    exc = wire.error_from_rpc(err, op)
    details = err.details() if hasattr(err, "details") else None
    if err.code() == grpc.StatusCode.UNAVAILABLE and str(details or "").startswith("failed to connect"):
        exc.call_started = False  # type: ignore[attr-defined]
    return exc


class _GrpcTelemetryWatch(TelemetryWatch):
    def __init__(self, call: Any) -> None:
        self._call = call

    def __iter__(self) -> Iterator[dict[str, Any]]:
        try:
            for message in self._call:
                for event in message.batch or (message,):
                    yield wire.telemetry_from_pb(event)
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.CANCELLED:
                return
            raise wire.error_from_rpc(err) from None

    def close(self) -> None:
        self._call.cancel()


class _GrpcChunkStream(ChunkStream):
    """ExecuteStream's messages as chunks; AckChunks sent without waiting for their answers."""

    def __init__(self, stub: Any, request: pb.ExecuteRequest, timeout: float | None, acks: AcksInFlight) -> None:
        self._stub = stub
        self._op = request.op
        self._request_id, self._client_id = request.request_id, request.client_id
        self._call = stub.ExecuteStream(request, timeout=timeout)
        self._acks = acks

    def __iter__(self) -> Iterator[Chunk]:
        try:
            for message in self._call:
                if message.HasField("end"):
                    self.result = wire.result_from_response(message.end)
                    return
                yield wire.chunk_from_pb(message)
        except grpc.RpcError as err:
            raise rpc_failure(err, self._op) from None
        raise WorkerUnreachable(f"the stream of {self._op!r} ended without its final message", op=self._op,
                                classification="unreachable")

    def ack(self, chunks: int, release: list[str], requeue: Callable[[list[str]], None] | None = None) -> None:
        ack = pb.ChunkAck(request_id=self._request_id, client_id=self._client_id, chunks=chunks, release=release)
        self._acks.send(self._stub.AckChunks.future(ack, timeout=ACK_TIMEOUT_S), release, requeue)

    def cancel(self) -> None:
        self._call.cancel()


ACK_TIMEOUT_S = 30.0


class AcksInFlight:
    """The AckChunks futures of a channel (grpc futures, or asyncio tasks on grpc.aio) until they are
    done (the last ack of a stream is often still on its way when the stream ends): an ack that
    failed (its deadline passed, the channel closed) hands its piggybacked lease ids back
    (`requeue`), to go with the client's next message, instead of leaving their memory held until
    the lease TTL."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._futures: set[Any] = set()

    def send(self, future: Any, release: list[str], requeue: Callable[[list[str]], None] | None) -> None:
        with self._lock:
            self._futures.add(future)

        def done(f: Any) -> None:
            with self._lock:
                self._futures.discard(f)
            if release and requeue is not None and (f.cancelled() or f.exception() is not None):
                requeue(release)
        future.add_done_callback(done)

    def pending(self) -> list[Any]:
        """The futures still on their way (a channel about to close lets them finish first)."""
        with self._lock:
            return list(self._futures)


class GrpcTransport(Transport):
    """`address` is what the worker printed (`unix:/path` or `host:port`). `max_message_bytes` raises
    gRPC's 4 MiB message limits (needed only for big tensors inside messages, placement "inline")."""

    def __init__(self, address: str, *, max_message_bytes: int | None = None) -> None:
        from grpc_health.v1 import health_pb2_grpc

        self.address = address
        self._max_message_bytes = max_message_bytes
        self._channel = grpc.insecure_channel(channel_target(address), options=channel_options(max_message_bytes))
        # Stubs are built once: building one on a closed channel is what crashes grpcio.
        self._stub = pb_grpc.SidecarStub(self._channel)  # type: ignore[no-untyped-call]  # generated, no stub
        self._health_stub = health_pb2_grpc.HealthStub(self._channel)
        self._acks = AcksInFlight()

    def execute(self, call: Call, timeout: float | None = None) -> CallResult:
        req = wire.call_to_request(call)
        try:
            resp = self._stub.Execute(req, timeout=timeout)
        except grpc.RpcError as err:
            raise rpc_failure(err, call.op) from None
        return wire.result_from_response(resp)

    def execute_cancellable(self, call: Call, timeout: float | None, scope: CancelScope) -> CallResult:
        future = self._stub.Execute.future(wire.call_to_request(call), timeout=timeout)
        scope.attach(future.cancel)
        try:
            resp = future.result()
        except grpc.FutureCancelledError:
            raise Cancelled(f"the call of {call.op!r} was cancelled by its caller", op=call.op,
                            request_id=call.request_id) from None
        except grpc.RpcError as err:
            raise rpc_failure(err, call.op) from None
        finally:
            scope.detach()
        return wire.result_from_response(resp)

    def stream(self, call: Call, timeout: float | None = None) -> ChunkStream:
        return _GrpcChunkStream(self._stub, stream_request(call), timeout, self._acks)

    def list_ops(self, timeout: float | None = None) -> list[dict[str, Any]]:
        resp = self._unary(self._stub.ListOps, pb.ListOpsRequest(), "ListOps", timeout)
        return [wire.op_from_pb(o) for o in resp.ops]

    def hardware(self, timeout: float | None = None) -> dict[str, Any]:
        return wire.hardware_from_pb(self._unary(self._stub.GetHardware, pb.HardwareRequest(), "GetHardware",
                                                 timeout))

    def release(self, lease_ids: list[str], timeout: float | None = None) -> tuple[int, list[str]]:
        resp = self._unary(self._stub.Release, pb.ReleaseRequest(leases=lease_ids), "Release", timeout)
        return resp.released, list(resp.unknown)

    def health(self, service: str = "", timeout: float | None = None) -> str:
        from grpc_health.v1 import health_pb2

        resp = self._unary(self._health_stub.Check, health_pb2.HealthCheckRequest(service=service), "Health",
                           timeout)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))

    def watch_telemetry(self, memory_interval_s: float = 0.0, batch_window_ms: int = 20) -> TelemetryWatch:
        request = pb.TelemetryRequest(memory_interval_s=memory_interval_s, batch_window_ms=batch_window_ms)
        return _GrpcTelemetryWatch(self._stub.WatchTelemetry(request))

    def load(self, name: str, loader: str, kwargs: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        request = wire.dict_to_message({"name": name, "loader": loader, "kwargs": kwargs}, pb.LoadRequest())
        resp = self._unary(self._stub.Load, request, "Load", timeout)
        return wire.message_to_dict(resp)["resource"]  # type: ignore[no-any-return]

    def unload(self, name: str, timeout: float | None = None) -> dict[str, Any]:
        return wire.message_to_dict(self._unary(self._stub.Unload, pb.UnloadRequest(name=name), "Unload", timeout))

    def list_resources(self, timeout: float | None = None) -> dict[str, Any]:
        return wire.message_to_dict(self._unary(self._stub.ListResources, pb.ListResourcesRequest(),
                                                "ListResources", timeout))

    def close_session(self, session_id: str, timeout: float | None = None) -> bool:
        resp = self._unary(self._stub.CloseSession, pb.CloseSessionRequest(session_id=session_id), "CloseSession",
                           timeout)
        return bool(resp.closed)

    def reopen(self) -> GrpcTransport:
        return GrpcTransport(self.address, max_message_bytes=self._max_message_bytes)

    def close(self) -> None:
        self._channel.close()

    @staticmethod
    def _unary(method: Any, request: Any, name: str, timeout: float | None) -> Any:
        try:
            return method(request, timeout=timeout)
        except grpc.RpcError as err:
            raise rpc_failure(err, name) from None
