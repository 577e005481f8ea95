"""The gRPC transport: the `sidecar.v1.Sidecar` service, `grpc.health.v1.Health` and reflection.

The servicer only translates: protobuf -> `Call` -> `runtime.dispatcher.execute` -> `CallResult` ->
protobuf, and `SidecarError` -> a status carrying `sidecar.v1.Error`. Compute runs on the server's
thread pool, which is sized so that health checks, ListOps, telemetry and new calls up to the
concurrency limit still find a free thread while long ops run.

A call whose caller has gone (deadline, cancellation) but that still runs after the cancel grace
period ($SIDECAR_CANCEL_GRACE_S, default 10 s; 0 = never) holds a slot for nothing: the server then
says NOT_SERVING on the health service, for good, and logs which calls, so that its host recycles it.
"""
from __future__ import annotations

import logging
import os
import secrets
import socket
import stat
import tempfile
import threading
import time
import traceback
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from sidecar import wire
from sidecar.errors import InvalidArgument, OpFailed, Overloaded, SidecarError
from sidecar.v1 import sidecar_pb2 as pb
from sidecar.v1 import sidecar_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Sidecar"].full_name  # "sidecar.v1.Sidecar"
CONTROL_THREADS = 8       # health, ListOps, GetHardware, Release, and rejections while calls run
MAX_WATCHERS = 8          # WatchTelemetry streams each hold a server thread for their lifetime
MAX_BATCH_WINDOW_MS = 1000  # a watcher asking for batching waits at most this long per message
TELEMETRY_BATCH_MAX = 1024  # events per message (~100 KB), far below the message limit
DEFAULT_MAX_MESSAGE = 4 << 20
DEFAULT_CANCEL_GRACE_S = 10.0


# ---------------------------------------------------------------------------------------------------
# Addresses


@dataclass(frozen=True)
class ListenAddress:
    """Where to listen: a unix socket path, or a TCP host:port."""

    unix_path: str | None = None
    host: str = ""
    port: int = 0

    @property
    def bind_target(self) -> str:
        return f"unix:{self.unix_path}" if self.unix_path else f"{self.host}:{self.port}"


def default_socket_path() -> str:
    """A fresh socket path in a private (0700) directory: $XDG_RUNTIME_DIR/sidecar or /tmp/sidecar-<uid>."""
    runtime_dir = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime_dir) / "sidecar" if runtime_dir and os.path.isdir(runtime_dir) \
        else Path(tempfile.gettempdir()) / f"sidecar-{os.getuid()}"
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = base.stat()
    if st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) & 0o077:
        raise PermissionError(f"socket directory {base} must be owned by uid {os.getuid()} with mode 0700")
    return str(base / f"w-{os.getpid()}-{secrets.token_hex(4)}.sock")


def parse_listen(listen: str | None) -> ListenAddress:
    """None -> a default unix socket; "unix:PATH" or a path -> unix socket; "HOST:PORT" -> TCP."""
    if not listen:
        return ListenAddress(unix_path=default_socket_path())
    if listen.startswith("unix://"):
        return ListenAddress(unix_path=listen[len("unix://"):])
    if listen.startswith("unix:"):
        return ListenAddress(unix_path=listen[len("unix:"):])
    if listen.startswith(("/", "./", "../")) or listen.endswith(".sock"):
        return ListenAddress(unix_path=listen)
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"--listen wants unix:PATH, a socket path, or HOST:PORT; got {listen!r}")
    return ListenAddress(host=host, port=int(port))


# ---------------------------------------------------------------------------------------------------
# The service


class SidecarServicer(pb_grpc.SidecarServicer):
    def __init__(self, runtime: Any, max_watchers: int = MAX_WATCHERS) -> None:
        self._rt = runtime
        self._max_watchers = max_watchers
        self._lock = threading.Lock()
        self._subs: set[Any] = set()
        self._closing = False

    # -- Execute ----------------------------------------------------------------------------------

    def Execute(self, request: pb.ExecuteRequest, context: grpc.ServicerContext) -> pb.ExecuteResponse:
        # Admission (max_concurrency running, max_queue waiting, OVERLOADED beyond) is the
        # dispatcher's: the Erlang port transport gets the same behaviour.
        try:
            call = wire.call_from_request(request, is_cancelled=lambda: not context.is_active())
        except SidecarError as err:
            self._release_quietly(request.release)  # the piggybacked releases still count
            self._abort(context, _with_call_ids(err, request))
        try:
            result = self._rt.dispatcher.execute(call)
        except SidecarError as err:  # already carries op and request_id
            self._abort(context, err)
        except Exception as exc:  # a bug below the dispatcher: still a structured answer
            log.exception("unexpected error in %s", request.op)
            self._abort(context, OpFailed(f"{type(exc).__name__}: {exc}", op=request.op,
                                          request_id=request.request_id,
                                          exception_type=type(exc).__name__,
                                          traceback=traceback.format_exc()))
        if not context.is_active():
            # The caller is gone (deadline, cancellation): nobody will release these leases.
            self._release_quietly(result.leases)
        try:
            return wire.result_to_response(result)
        except SidecarError as err:
            self._release_quietly(result.leases)
            self._abort(context, _with_call_ids(err, request))
        raise AssertionError("unreachable")

    def _release_quietly(self, ids: Any) -> None:
        ids = list(ids)
        if not ids:
            return
        try:
            self._rt.release(ids)
        except Exception:
            log.exception("releasing leases %s failed", ids)

    @staticmethod
    def _abort(context: grpc.ServicerContext, err: SidecarError) -> None:
        context.abort_with_status(wire.error_to_status(err))

    # -- control ----------------------------------------------------------------------------------

    def ListOps(self, request: pb.ListOpsRequest, context: grpc.ServicerContext) -> pb.OpList:
        return pb.OpList(ops=[wire.op_to_pb(s) for s in self._rt.list_ops()])

    def GetHardware(self, request: pb.HardwareRequest, context: grpc.ServicerContext) -> pb.Hardware:
        return wire.hardware_to_pb(self._rt.hardware())

    def Release(self, request: pb.ReleaseRequest, context: grpc.ServicerContext) -> pb.ReleaseResponse:
        released, unknown = self._rt.release(list(request.leases))
        return pb.ReleaseResponse(released=int(released), unknown=list(unknown))

    def WatchTelemetry(self, request: pb.TelemetryRequest,
                       context: grpc.ServicerContext) -> Iterator[pb.TelemetryEvent]:
        interval = request.memory_interval_s
        if interval != interval or interval < 0:  # NaN or negative
            self._abort(context, InvalidArgument(f"memory_interval_s must be >= 0, got {interval}",
                                                 field="memory_interval_s"))
        with self._lock:
            if self._closing:
                context.abort(grpc.StatusCode.UNAVAILABLE, "worker is shutting down")
            if len(self._subs) >= self._max_watchers:
                self._abort(context, Overloaded(f"at most {self._max_watchers} telemetry watchers",
                                                queue_depth=len(self._subs), limit=self._max_watchers))
            sub = self._rt.telemetry.subscribe(interval or 1.0)
            self._subs.add(sub)
        context.add_callback(sub.close)  # the client cancelled or went away
        window_s = min(request.batch_window_ms, MAX_BATCH_WINDOW_MS) / 1000.0
        try:
            while True:
                event = sub.get()  # blocks until an event, or None once closed
                if event is None:
                    return
                if not window_s:
                    yield wire.telemetry_to_pb(event)
                    continue
                # Batch: instead of one stream message (and one wake-up that takes the interpreter
                # from a running call) per span, wait a moment and send what piled up as one message.
                time.sleep(window_s)
                events = [wire.telemetry_to_pb(event)]
                while len(events) < TELEMETRY_BATCH_MAX and (event := sub.get(timeout=0)) is not None:
                    events.append(wire.telemetry_to_pb(event))
                yield pb.TelemetryEvent(batch=events)
        finally:
            sub.close()
            with self._lock:
                self._subs.discard(sub)

    def close_watchers(self) -> None:
        """End every telemetry stream (at shutdown they would otherwise hold the drain open)."""
        with self._lock:
            self._closing = True
            subs = list(self._subs)
        for sub in subs:
            sub.close()


def _with_call_ids(err: SidecarError, request: pb.ExecuteRequest) -> SidecarError:
    """Fill in op and request id when the raiser did not know them."""
    missing = {k: v for k, v in (("op", request.op), ("request_id", request.request_id))
               if v and err.fields.get(k) is None}
    if missing:
        err.fields.update(missing)
    return err


def _cancel_grace_s() -> float:
    text = os.environ.get("SIDECAR_CANCEL_GRACE_S", "")
    try:
        return max(0.0, float(text)) if text else DEFAULT_CANCEL_GRACE_S
    except ValueError:
        log.warning("ignoring SIDECAR_CANCEL_GRACE_S=%r (not a number of seconds)", text)
        return DEFAULT_CANCEL_GRACE_S


def _socket_in_use(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(path)
        except OSError:
            return False
        return True


# ---------------------------------------------------------------------------------------------------
# The server


class SidecarServer:
    """A started gRPC server for one runtime; `stop()` drains in-flight calls."""

    def __init__(self, runtime: Any, listen: str | None = None, *,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE) -> None:
        self.runtime = runtime
        self.listen = parse_listen(listen)
        opts = runtime.options
        self.threads = int(opts.max_concurrency) + int(opts.max_queue) + CONTROL_THREADS + MAX_WATCHERS
        self.executor = futures.ThreadPoolExecutor(max_workers=self.threads,
                                                   thread_name_prefix="sidecar-rpc")
        self.servicer = SidecarServicer(runtime)
        self.health = health.HealthServicer()
        options = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.so_reuseport", 0)]
        self.server = grpc.server(self.executor, options=options)
        pb_grpc.add_SidecarServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        self.address = ""
        self._stopped = threading.Event()

    def start(self) -> str:
        """Bind, start serving, mark SERVING; returns the address clients dial."""
        target = self.listen.bind_target
        path = self.listen.unix_path
        if path:
            if os.path.exists(path):
                if not stat.S_ISSOCK(os.lstat(path).st_mode):
                    raise FileExistsError(f"{path} exists and is not a socket")
                if _socket_in_use(path):
                    raise OSError(f"another process is listening on {path}")
                os.unlink(path)  # a stale socket of a dead worker
            old = os.umask(0o177)  # the socket is born 0600: no window where others may connect
            try:
                self._bind(target)
            finally:
                os.umask(old)
            os.chmod(path, 0o600)
            self.address = f"unix:{path}"
        else:
            port = self._bind(target)
            self.address = f"{self.listen.host}:{port}"
        self.server.start()
        for service in ("", SERVICE_NAME):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        grace = _cancel_grace_s()
        if grace > 0:
            threading.Thread(target=self._watch_stuck, args=(grace,), name="sidecar-stuck-watch",
                             daemon=True).start()
        return self.address

    def _watch_stuck(self, grace_s: float) -> None:
        """NOT_SERVING, for good, once a cancelled call outlives the grace period."""
        while not self._stopped.wait(min(1.0, grace_s / 3)):
            stuck = self.runtime.dispatcher.stuck_calls(grace_s)
            if stuck:
                log.warning("cancelled calls still running after %g s: %s; reporting NOT_SERVING so that "
                            "the host recycles this worker", grace_s, "; ".join(stuck))
                for service in ("", SERVICE_NAME):
                    self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
                return

    def _bind(self, target: str) -> int:
        try:
            port = self.server.add_insecure_port(target)
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {target}: {exc}") from exc
        if port == 0 and not self.listen.unix_path:
            raise OSError(f"cannot listen on {target}")
        return port

    def stop(self, grace_s: float) -> bool:
        """Refuse new calls, let in-flight ones finish for up to `grace_s`; True if all finished."""
        self._stopped.set()
        self.health.enter_graceful_shutdown()
        self.servicer.close_watchers()
        done = self.server.stop(grace_s)
        finished = done.wait(grace_s + 5)
        self.executor.shutdown(wait=False, cancel_futures=True)
        if self.listen.unix_path:
            try:
                os.unlink(self.listen.unix_path)
            except FileNotFoundError:
                pass
        return finished
