"""`InProcessTransport`: a worker `Runtime` in this process (worker code: it imports the worker; the host
package never does), called directly (no socket, no copy of the
descriptors), for a `Client`.

It runs a call the way a worker's server does: the dispatcher admits, decodes, runs and encodes it;
a call whose timeout passed is cancelled (and, if it had already produced outputs, their leases are
released, as a server does for a caller that has gone); a bug below the dispatcher is an `OpFailed`.
Inputs and outputs still cross through real shared memory: the Client puts inputs in its arena and
maps outputs from the runtime's arena, exactly as it does with a worker process. What the answers
look like (ops, hardware, telemetry dicts) is the same as over gRPC.

Used by the tests of the dispatcher and the built-in ops, and by anyone who wants a worker's ops
without a process:

    from sidecar.host import Client
    from sidecar.worker.local_transport import InProcessTransport
    from sidecar.worker.runtime import WorkerOptions, build_runtime

    with build_runtime(WorkerOptions(device="cpu")) as runtime:
        with Client(transport=InProcessTransport(runtime)) as client:
            client.call("add", np.ones(3), 1.0)
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
import traceback
from typing import Any, Iterator

from sidecar.errors import Cancelled, OpFailed, SidecarError
from sidecar.host.transport import TelemetryWatch, Transport
from sidecar.protocol import grpc_codec as wire
from sidecar.protocol.calls import Call, CallResult
from sidecar.v1 import sidecar_pb2 as pb
from sidecar.worker.runtime import Runtime
from sidecar.worker.telemetry import Subscription

log = logging.getLogger(__name__)

__all__ = ["InProcessTransport"]


class _LocalTelemetryWatch(TelemetryWatch):
    def __init__(self, subscription: Subscription) -> None:
        self._sub = subscription

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for event in self._sub:
            yield wire.telemetry_from_pb(wire.telemetry_to_pb(event))

    def close(self) -> None:
        self._sub.close()


class InProcessTransport(Transport):
    """Calls `runtime` (built by `sidecar.worker.runtime.build_runtime`) in this process. The caller
    keeps the runtime and closes it; `close()` here only stops using it."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.address = f"in-process:{os.getpid()}"
        self._pid = os.getpid()

    def execute(self, call: Call, timeout: float | None = None) -> CallResult:
        if timeout is not None:
            deadline = time.monotonic() + timeout
            call = dataclasses.replace(call, is_cancelled=lambda: time.monotonic() >= deadline)
        try:
            result = self.runtime.dispatcher.execute(call)
        except SidecarError:
            raise
        except Exception as exc:  # a bug below the dispatcher: still a structured answer
            log.exception("unexpected error in %s", call.op)
            raise OpFailed(f"{type(exc).__name__}: {exc}", op=call.op, request_id=call.request_id,
                           exception_type=type(exc).__name__, traceback=traceback.format_exc()) from exc
        if timeout is not None and time.monotonic() >= deadline:
            # The caller's deadline passed while the outputs were made: nobody will release them.
            self.runtime.release(result.leases)
            raise Cancelled(f"the call of {call.op!r} did not finish within its timeout of {timeout:g} s",
                            op=call.op, request_id=result.request_id)
        return result

    # Ops, hardware and telemetry take the proto's shape by a round trip through it: the `.proto` is
    # the one description of these dicts, so both transports answer alike without a second one.

    def list_ops(self, timeout: float | None = None) -> list[dict[str, Any]]:
        return [wire.op_from_pb(wire.op_to_pb(spec)) for spec in self.runtime.list_ops()]

    def hardware(self, timeout: float | None = None) -> dict[str, Any]:
        return wire.hardware_from_pb(wire.hardware_to_pb(self.runtime.hardware()))

    def release(self, lease_ids: list[str], timeout: float | None = None) -> tuple[int, list[str]]:
        released, unknown = self.runtime.release(list(lease_ids))
        return int(released), list(unknown)

    def health(self, service: str = "", timeout: float | None = None) -> str:
        return "NOT_SERVING" if self.runtime.tainted else "SERVING"

    def watch_telemetry(self, memory_interval_s: float = 0.0, batch_window_ms: int = 20) -> TelemetryWatch:
        return _LocalTelemetryWatch(self.runtime.telemetry.subscribe(memory_interval_s or 1.0))

    # Resources and sessions: the runtime's records, through the proto like the rest.

    def load(self, name: str, loader: str, kwargs: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        info = self.runtime.load(name, loader, kwargs)
        return wire.message_to_dict(wire.dict_to_message(info, pb.ResourceInfo()))

    def unload(self, name: str, timeout: float | None = None) -> dict[str, Any]:
        return wire.message_to_dict(wire.dict_to_message(self.runtime.unload(name), pb.UnloadResponse()))

    def list_resources(self, timeout: float | None = None) -> dict[str, Any]:
        return wire.message_to_dict(wire.dict_to_message(self.runtime.list_resources(), pb.ResourceList()))

    def close_session(self, session_id: str, timeout: float | None = None) -> bool:
        return self.runtime.close_session(session_id)

    def reopen(self) -> Transport:
        from sidecar.host.client import WrongProcess

        raise WrongProcess(f"the in-process worker runtime belongs to process {self._pid}; a forked child "
                           f"builds its own runtime (or connects to a worker process)", field="transport")

    def close(self) -> None:
        pass  # the runtime is its owner's to close
