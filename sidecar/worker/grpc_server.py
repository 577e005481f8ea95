"""The gRPC transport: the `sidecar.v1.Sidecar` service, `grpc.health.v1.Health` and reflection.

A framing adapter over the server core (`server_core`): the servicer only translates protobuf ->
`Call` -> the core -> `CallResult` -> protobuf (`sidecar.protocol.grpc_codec`), and `SidecarError`
-> a status carrying `sidecar.v1.Error`; what is gRPC's own here is the message size limit and the
batching of telemetry streams. Compute runs on the server's thread pool, which is sized so that
health checks, ListOps, telemetry and new calls up to the concurrency limit still find a free thread
while long ops run.

A call whose caller has gone (deadline, cancellation) but that still runs after the cancel grace
period ($SIDECAR_CANCEL_GRACE_S, default 10 s; 0 = never) holds a slot for nothing: the server then
says NOT_SERVING on the health service, for good, and logs which calls, so that its host recycles it.
"""
from __future__ import annotations

import logging
import os
import queue
import re
import secrets
import socket
import stat
import tempfile
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from sidecar.errors import InvalidArgument, OpFailed, SidecarError
from sidecar.protocol import grpc_codec
from sidecar.protocol.calls import Chunk, Placement
from sidecar.protocol.limits import (CANCEL_GRACE_ENV, DEFAULT_CANCEL_GRACE_S, DEFAULT_MAX_MESSAGE_BYTES,
                                    MAX_BATCH_WINDOW_MS, TELEMETRY_BATCH_MAX)
from sidecar.v1 import sidecar_pb2 as pb
from sidecar.v1 import sidecar_pb2_grpc as pb_grpc
from sidecar.worker.dispatcher import new_request_id
from sidecar.worker.server_core import ServerCore, unexpected
from sidecar.worker.state_service import StateRpcs
from sidecar.worker.streams import StreamService
from sidecar.worker.registry import estimate_output_nbytes

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Sidecar"].full_name  # "sidecar.v1.Sidecar"
CONTROL_THREADS = 8       # health, ListOps, GetHardware, Release, and rejections while calls run


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


_SOCKET_NAME = re.compile(r"^w-(\d+)-[0-9a-f]+\.sock$")


def default_socket_path() -> str:
    """A fresh socket path in a private (0700) directory: $XDG_RUNTIME_DIR/sidecar or /tmp/sidecar-<uid>.

    Sockets left there by workers that died without cleaning up (SIGKILL, a crash) are removed first.
    """
    runtime_dir = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime_dir) / "sidecar" if runtime_dir and os.path.isdir(runtime_dir) \
        else Path(tempfile.gettempdir()) / f"sidecar-{os.getuid()}"
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = base.stat()
    if st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) & 0o077:
        raise PermissionError(f"socket directory {base} must be owned by uid {os.getuid()} with mode 0700")
    remove_stale_sockets(base)
    return str(base / f"w-{os.getpid()}-{secrets.token_hex(4)}.sock")


def remove_stale_sockets(base: Path) -> list[str]:
    """Unlinks `w-<pid>-<rand>.sock` sockets in `base` whose worker is dead and that nobody listens
    on; returns their paths. A socket of a live pid is never touched (it may be a live worker, or a
    recycled pid: either way not provably stale)."""
    removed: list[str] = []
    try:
        entries = list(os.scandir(base))
    except OSError:
        return removed
    for entry in entries:
        m = _SOCKET_NAME.match(entry.name)
        if m is None or int(m.group(1)) == os.getpid() or _pid_alive(int(m.group(1))):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.getuid() or _socket_in_use(entry.path):
                continue
            os.unlink(entry.path)
            removed.append(entry.path)
        except OSError:  # gone meanwhile, or not ours to remove
            continue
    if removed:
        log.info("removed %d stale socket(s) of dead workers in %s", len(removed), base)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another uid's
        return True
    return True


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


class SidecarServicer(StateRpcs, pb_grpc.SidecarServicer):
    """The Sidecar service: protobuf in and out; calls, cancellation and watchers are the core's;
    resources and sessions are `StateRpcs`'."""

    def __init__(self, core: ServerCore, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self._core = core
        self._rt = core.runtime
        self._max_message = max_message_bytes
        self._streams = StreamService(core)
        opts = self._rt.options
        self._producers = futures.ThreadPoolExecutor(
            max_workers=int(opts.max_concurrency) + int(opts.max_queue), thread_name_prefix="sidecar-stream")

    # -- Execute ----------------------------------------------------------------------------------

    def Execute(self, request: pb.ExecuteRequest, context: grpc.ServicerContext) -> pb.ExecuteResponse:
        core = self._core
        try:
            call = grpc_codec.call_from_request(request)
            if call.output.placement == Placement.INLINE:
                self._refuse_oversized_inline(call)
            handle = core.begin(call, caller_gone=lambda: not context.is_active())
        except SidecarError as err:
            core.release_quietly(request.release)  # the piggybacked releases still count
            self._abort(context, core.with_call_ids(err, request.op, request.request_id))
        try:
            try:
                result = core.execute(handle)
            except SidecarError as err:
                self._abort(context, err)
            try:
                response = grpc_codec.result_to_response(result)
                size = response.ByteSize()
                if size > self._max_message:  # gRPC would fail it with a bare RESOURCE_EXHAUSTED
                    raise self._too_big_for_a_message(request.op, f"its response is {size} bytes", size)
                return response
            except SidecarError as err:
                core.release_quietly(result.leases)  # the caller never learns these lease ids
                self._abort(context, core.with_call_ids(err, request.op, request.request_id))
            except Exception as exc:  # a bug in the encoding: still a structured answer, and nothing held
                log.exception("encoding the response of %s failed", request.op)
                core.release_quietly(result.leases)
                self._abort(context, core.with_call_ids(OpFailed(
                    f"the outputs of {request.op!r} cannot be sent: {type(exc).__name__}: {exc}",
                    exception_type=type(exc).__name__), request.op, request.request_id))
        finally:
            core.end(handle)
        raise AssertionError("unreachable")

    def _refuse_oversized_inline(self, call: Any) -> None:
        """An inline output bigger than a message can hold is refused before the op runs, when the
        op's output size follows from its inputs (the built-ins: `estimate_output_nbytes`)."""
        try:
            spec = self._rt.registry.get(call.op)
        except SidecarError:
            return  # the dispatcher reports the unknown op
        nbytes = estimate_output_nbytes(spec, call.inputs, call.attrs)
        if nbytes is not None and nbytes > self._max_message:
            raise self._too_big_for_a_message(call.op, f"it would return {nbytes} bytes inline", nbytes)

    def _too_big_for_a_message(self, op: str, what: str, nbytes: int) -> InvalidArgument:
        limit = self._max_message
        return InvalidArgument(
            f"op {op!r}: {what}, over this worker's --max-message-bytes ({limit} bytes)", op=op,
            field="output.placement", expected=f"at most {limit} bytes in the response (--max-message-bytes)",
            got=f"{nbytes} bytes", suggestion="let big outputs travel by shared memory (placement auto or shm), "
            "or raise --max-message-bytes on the worker and max_message_bytes on the client")

    @staticmethod
    def _abort(context: grpc.ServicerContext, err: SidecarError) -> None:
        context.abort_with_status(grpc_codec.error_to_status(err))

    # -- ExecuteStream (sidecar.worker.streams) ----------------------------------------------------

    def ExecuteStream(self, request: pb.ExecuteRequest, context: grpc.ServicerContext) -> Iterator[pb.ExecuteChunk]:
        """The stream runs on a producer thread of its own (gRPC pulls messages from this generator);
        between them, a queue holding at most one window of chunks."""
        core = self._core
        try:
            call = grpc_codec.call_from_request(request)
            call.request_id = call.request_id or new_request_id()
            handle = core.begin(call, caller_gone=lambda: not context.is_active())
        except SidecarError as err:
            core.release_quietly(request.release)
            self._abort(context, core.with_call_ids(err, request.op, request.request_id))
        key = (call.client_id, call.request_id)  # what the client's AckChunks name
        messages: queue.SimpleQueue[Any] = queue.SimpleQueue()

        def caller_left() -> None:
            handle.cancel()
            self._streams.wake(key)
        context.add_callback(caller_left)

        def produce() -> None:
            try:
                messages.put(self._streams.run(handle, key, messages.put))
            except SidecarError as err:
                messages.put(err)
            except BaseException as exc:  # a bug below the core: still a structured end
                log.exception("stream of %s failed", call.op)
                messages.put(unexpected(exc, call.op))
            finally:
                core.end(handle)
        self._producers.submit(produce)
        while True:
            item = messages.get()
            if isinstance(item, Chunk):
                message = grpc_codec.chunk_to_pb(item)
                size = message.ByteSize()
                if size > self._max_message:  # gRPC would fail the stream with a bare RESOURCE_EXHAUSTED
                    handle.cancel()  # the op stops at its next chunk; the leases it still holds go back
                    self._streams.wake(key)
                    core.release_quietly(item.leases)  # the caller never learns these lease ids
                    self._abort(context, core.with_call_ids(self._too_big_for_a_message(
                        call.op, f"chunk {item.index} of its stream is {size} bytes", size), call.op,
                        call.request_id))
                yield message
            elif isinstance(item, SidecarError):
                self._abort(context, item)
            else:
                yield pb.ExecuteChunk(end=grpc_codec.result_to_response(item))
                return

    def AckChunks(self, request: pb.ChunkAck, context: grpc.ServicerContext) -> pb.ChunkAckResponse:
        if request.release:
            self._rt.release(list(request.release))
        return pb.ChunkAckResponse(known=self._streams.ack((request.client_id, request.request_id),
                                                           request.chunks))

    # -- control ----------------------------------------------------------------------------------

    def ListOps(self, request: pb.ListOpsRequest, context: grpc.ServicerContext) -> pb.OpList:
        return pb.OpList(ops=[grpc_codec.op_to_pb(s) for s in self._rt.list_ops()])

    def GetHardware(self, request: pb.HardwareRequest, context: grpc.ServicerContext) -> pb.Hardware:
        return grpc_codec.hardware_to_pb(self._rt.hardware())

    def Release(self, request: pb.ReleaseRequest, context: grpc.ServicerContext) -> pb.ReleaseResponse:
        released, unknown = self._rt.release(list(request.leases))
        return pb.ReleaseResponse(released=int(released), unknown=list(unknown))

    def WatchTelemetry(self, request: pb.TelemetryRequest,
                       context: grpc.ServicerContext) -> Iterator[pb.TelemetryEvent]:
        interval = request.memory_interval_s
        if interval != interval or interval < 0:  # NaN or negative
            self._abort(context, InvalidArgument(f"memory_interval_s must be >= 0, got {interval}",
                                                 field="memory_interval_s"))
        if self._core.closing:
            context.abort(grpc.StatusCode.UNAVAILABLE, "worker is shutting down")
        try:
            sub = self._core.watch(interval)
        except SidecarError as err:
            self._abort(context, err)
        context.add_callback(sub.close)  # the client cancelled or went away
        window_s = min(request.batch_window_ms, MAX_BATCH_WINDOW_MS) / 1000.0
        try:
            while True:
                event = sub.get()  # blocks until an event, or None once closed
                if event is None:
                    return
                if not window_s:
                    yield grpc_codec.telemetry_to_pb(event)
                    continue
                # Batch: instead of one stream message (and one wake-up that takes the interpreter
                # from a running call) per span, wait a moment and send what piled up as one message.
                time.sleep(window_s)
                events = [grpc_codec.telemetry_to_pb(event)]
                while len(events) < TELEMETRY_BATCH_MAX and (event := sub.get(timeout=0)) is not None:
                    events.append(grpc_codec.telemetry_to_pb(event))
                yield pb.TelemetryEvent(batch=events)
        finally:
            self._core.unwatch(sub)


def sidecar_handlers(servicer: SidecarServicer) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
    """The Sidecar methods, registered with an identity request deserializer.

    grpcio leaks ~20 KB per request whose body its deserializer rejects (grpc/grpc#36908), so a
    flood of undecodable requests would grow the worker without bound, and the caller would get a
    bare INTERNAL "Exception deserializing request!". Taking the raw bytes and parsing them here
    avoids that path and answers a structured INVALID_ARGUMENT naming the message instead.
    """
    service = pb.DESCRIPTOR.services_by_name["Sidecar"]
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in service.methods:
        request_cls = getattr(pb, method.input_type.name)
        response_cls = getattr(pb, method.output_type.name)
        make = (grpc.unary_stream_rpc_method_handler if method.server_streaming
                else grpc.unary_unary_rpc_method_handler)
        handlers[method.name] = make(_parsing(getattr(servicer, method.name), request_cls),
                                     request_deserializer=None,
                                     response_serializer=response_cls.SerializeToString)
    return handlers


def _parsing(behaviour: Any, request_cls: Any) -> Any:
    def handle(raw: bytes, context: grpc.ServicerContext) -> Any:
        try:
            request = request_cls.FromString(raw)
        except DecodeError as exc:
            name = request_cls.DESCRIPTOR.full_name
            context.abort_with_status(grpc_codec.error_to_status(InvalidArgument(
                f"the request body ({len(raw)} bytes) is not a valid {name}: {exc}",
                field=request_cls.DESCRIPTOR.name, expected=name, request_id=new_request_id())))
        return behaviour(request, context)
    return handle


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: not provably loopback
        return False


def _cancel_grace_s() -> float:
    text = os.environ.get(CANCEL_GRACE_ENV, "")
    try:
        return max(0.0, float(text)) if text else DEFAULT_CANCEL_GRACE_S
    except ValueError:
        log.warning("ignoring %s=%r (not a number of seconds)", CANCEL_GRACE_ENV, text)
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
    """The gRPC transport of one server core (`server_core.serve` runs it): `start()` binds and
    serves, `stop()` lets in-flight calls finish."""

    def __init__(self, core: ServerCore, listen: str | None = None, *,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self.core = core
        self.runtime = core.runtime
        self.listen = parse_listen(listen)
        opts = self.runtime.options
        self.threads = int(opts.max_concurrency) + int(opts.max_queue) + CONTROL_THREADS + core.max_watchers
        self.executor = futures.ThreadPoolExecutor(max_workers=self.threads,
                                                   thread_name_prefix="sidecar-rpc")
        self.servicer = SidecarServicer(core, max_message_bytes=max_message_bytes)
        self.health = health.HealthServicer()
        options = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.so_reuseport", 0)]
        self.server = grpc.server(self.executor, options=options)
        handlers = sidecar_handlers(self.servicer)
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
        self.server.add_registered_method_handlers(SERVICE_NAME, handlers)
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
            if not _is_loopback(self.listen.host):
                log.warning("listening on %s without authentication or TLS: anyone who can reach it can run "
                            "ops and name this uid's segments (guides/security.md)", self.address)
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
        done = self.server.stop(grace_s)
        return done.wait(grace_s + 5)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        if self.listen.unix_path:
            try:
                os.unlink(self.listen.unix_path)
            except FileNotFoundError:
                pass
