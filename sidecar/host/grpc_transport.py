"""`GrpcTransport`: a worker process over gRPC (the `Sidecar` service and the standard health
service), for a `Client`. The protobuf shapes stay in `sidecar.protocol.grpc_codec`; this module only makes the
RPCs and maps their failures (see `sidecar.host.transport` for the contract)."""
from __future__ import annotations

from typing import Any, Iterator

import grpc

from sidecar.errors import SidecarError
from sidecar.host.transport import TelemetryWatch, Transport
from sidecar.v1 import sidecar_pb2 as pb
from sidecar.v1 import sidecar_pb2_grpc as pb_grpc
from sidecar.protocol import grpc_codec as wire
from sidecar.protocol.calls import Call, CallResult

__all__ = ["GrpcTransport"]


def channel_target(address: str) -> str:
    """What grpc dials for a worker address (`unix:/path`, `host:port`, or a bare socket path)."""
    if address.startswith(("unix:", "dns:", "ipv4:", "ipv6:")) or ":" in address:
        return address
    return f"unix:{address}"


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


class GrpcTransport(Transport):
    """`address` is what the worker printed (`unix:/path` or `host:port`). `max_message_bytes` raises
    gRPC's 4 MiB message limits (needed only for big tensors inside messages, placement "inline")."""

    def __init__(self, address: str, *, max_message_bytes: int | None = None) -> None:
        from grpc_health.v1 import health_pb2_grpc

        self.address = address
        self._max_message_bytes = max_message_bytes
        options: list[tuple[str, Any]] = [("grpc.enable_retries", 0)]
        if max_message_bytes:
            options += [("grpc.max_receive_message_length", max_message_bytes),
                        ("grpc.max_send_message_length", max_message_bytes)]
        self._channel = grpc.insecure_channel(channel_target(address), options=options)
        # Stubs are built once: building one on a closed channel is what crashes grpcio.
        self._stub = pb_grpc.SidecarStub(self._channel)  # type: ignore[no-untyped-call]  # generated, no stub
        self._health_stub = health_pb2_grpc.HealthStub(self._channel)

    def execute(self, call: Call, timeout: float | None = None) -> CallResult:
        req = wire.call_to_request(call)
        try:
            resp = self._stub.Execute(req, timeout=timeout)
        except grpc.RpcError as err:
            raise rpc_failure(err, call.op) from None
        return wire.result_from_response(resp)

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
