"""The Erlang port transport: `sidecar serve --stdio`, a framing adapter over the server core.

An Elixir VM opens the worker with `Port.open({:spawn_executable, python}, [{:packet, 4}, :binary,
:exit_status, ...])`; every message is a 4-byte big-endian length followed by one term in the
External Term Format (`sidecar.etf`). This module reads and writes frames; the terms are
`sidecar.protocol.port_codec`'s and the calls are the server core's (`server_core`), as on gRPC.

    worker -> host, first:  {:ready, os_pid, %{version:, device:, ops: [names], ...}}
    host -> worker:         {:call, id, op, inputs, attrs}          (opts map as 6th element optional)
                            {:stream, id, op, inputs, attrs[, opts]}  {:ack, id, n}   (streams, below)
                            {:list_ops, id}  {:hardware, id}  {:release, id, [lease_ids]}
                            {:subscribe, id}  {:subscribe, id, %{memory_interval_s: s}}
                            {:unsubscribe, id}  {:cancel, id_of_a_call}   (cancel gets no reply)
    worker -> host:         {:ok, id, result}  |  {:error, id, %{kind: :shape_mismatch, message:, ...}}
                            {:telemetry, [:sidecar | event], measurements, metadata}
                            {:chunk, id, %{values:, leases:, index:, bytes:}}  (a stream's chunks)

A stream (`sidecar.worker.streams`): `{:stream, ...}` runs a generator op; each chunk it yields is a
`{:chunk, id, chunk}` frame, in order, then the usual `{:ok, id, result}` (no outputs) or
`{:error, id, ...}`. At most `stream_max_chunks` chunks (opts; default 16) are sent and not yet
acknowledged: the host gives credit with `{:ack, id, n}` (n more chunks consumed; no reply).
`{:cancel, id}` closes the generator and reclaims the leases of unacknowledged chunks.

With a subscription, the telemetry events queued before a reply are sent before it: a call's stop or
exception event always precedes its answer.

Every frame is answered. A malformed one gets an error term with the request's id whenever the id
itself decoded (`:undefined` only when it did not), and the worker carries on; a reply that cannot
be encoded is replaced by an error naming why, and the leases of its outputs are released. Bodies
are read as they arrive, so a header that declares a large frame costs nothing until its bytes come.
The worker stops when stdin closes (the port was closed or the VM died): the calls in flight may
still finish for a moment (`limits.HOST_GONE_GRACE_S`); on SIGTERM they get `--grace-period`.
"""
from __future__ import annotations

import logging
import os
import struct
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import sidecar
from sidecar import etf
from sidecar.errors import InvalidArgument, OpFailed, SidecarError, shorten
from sidecar.etf import Atom
from sidecar.protocol import limits
from sidecar.protocol.calls import CallResult, Chunk
from sidecar.protocol.port_codec import (call_from_term, chunk_to_term, error_to_term, keyed, op_to_term,
                                         record_to_term, result_to_term, telemetry_to_term, text)
from sidecar.worker.lifecycle import Shutdown
from sidecar.worker.server_core import CallHandle, ServerCore, serve, unexpected
from sidecar.worker.state_service import state_request
from sidecar.worker.streams import StreamService
from sidecar.worker.telemetry import Subscription

log = logging.getLogger(__name__)

__all__ = ["serve_stdio", "StdioServer", "MAX_FRAME"]

# Default largest frame (`--max-frame-bytes`), as received and, for a compressed term, as inflated.
# Tensors belong in shared memory; this only bounds inline payloads (a benchmark sends 100 MB inline
# on purpose). Bigger frames are skipped and answered with an error.
MAX_FRAME = int(os.environ.get("SIDECAR_STDIO_MAX_FRAME", str(limits.DEFAULT_MAX_FRAME_BYTES)))
_FIRST_READ = 1 << 20  # a body buffer starts at this size and at most doubles while bytes arrive
_ID_PEEK = 4096        # bytes of an oversized frame read to find its request id
CONTROL_THREADS = 4
# Threads beyond max_concurrency + max_queue: a call that arrives while every admitted call holds a
# thread still reaches the dispatcher's gate at once (and is refused OVERLOADED there).
SPARE_CALL_THREADS = 2
UNDEFINED = Atom("undefined")
_CHUNK = Atom("chunk")
_HEADER = struct.Struct(">I")
_IOV_MAX = 1024  # writev takes at most this many buffers per call on Linux (IOV_MAX)


class StdioServer:
    """Reads request frames on `in_fd`, answers on `out_fd`; calls run on a thread pool."""

    def __init__(self, runtime: Any, in_fd: int, out_fd: int, *, max_frame: int = MAX_FRAME,
                 core: ServerCore | None = None) -> None:
        self.rt = runtime
        self.core = core if core is not None else ServerCore(runtime)
        self.in_fd = in_fd
        self.out_fd = out_fd
        self.max_frame = max_frame
        opts = runtime.options
        threads = int(opts.max_concurrency) + int(opts.max_queue) + SPARE_CALL_THREADS
        self.calls = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="sidecar-stdio-call")
        self.control = ThreadPoolExecutor(max_workers=CONTROL_THREADS, thread_name_prefix="sidecar-stdio-ctl")
        self._write_lock = threading.Lock()
        self._sub_lock = threading.Lock()
        self._sub: Subscription | None = None
        # Taken to send telemetry: by the pump, and by every reply, which first sends the events
        # queued before it, so that a call's stop (or exception) event always precedes its answer.
        self._telemetry_lock = threading.Lock()
        self.host_gone = False
        self.streams = StreamService(self.core)
        self.done = threading.Event()  # the reader stopped (stdin closed)

    # -- lifetime (serve's Transport) ----------------------------------------------------------------

    def start(self) -> None:
        """The ready frame, then requests are read on a thread of their own."""
        self.send(ready_term(self.rt))
        log.info("serving the port protocol on stdio (device %s, pid %d)", self.rt.device, os.getpid())
        threading.Thread(target=self.read_loop, name="sidecar-stdio-reader", daemon=True).start()

    def stop(self, grace_s: float) -> bool:
        """Nothing to stop: frames are still read and answered (new calls are refused by the core)."""
        return True

    def close(self) -> None:
        self._unsubscribe()
        self.calls.shutdown(wait=False, cancel_futures=True)
        self.control.shutdown(wait=False, cancel_futures=True)

    def _host_gone(self, reason: str) -> None:
        """Nobody reads our answers any more: stop, giving the calls in flight a moment."""
        self.core.shutdown.request(reason, max_grace_s=limits.HOST_GONE_GRACE_S)

    # -- frames --------------------------------------------------------------------------------------

    def send(self, term: Any) -> None:
        """One frame of a term we built (raises EncodeError if it has no Erlang form)."""
        self._write(etf.encode_parts(term))

    def reply(self, req_id: Any, tag: str, body: Any, on_replaced: Callable[[], None] | None = None) -> None:
        """Sends `{tag, req_id, body}`.

        A reply that cannot be encoded (an op returned a string with lone surrogates, ...) is
        replaced by an error with the same id, and an id that cannot be sent back by :undefined:
        the host always gets an answer. `on_replaced` runs before the replacement goes out (to
        release the leases the host will never learn of).
        """
        try:
            data = etf.encode_parts((Atom(tag), req_id, body))
        except etf.EncodeError as exc:
            log.error("the %s reply to request %s cannot be encoded: %s", tag, shorten(req_id), exc)
            data = _unencodable_reply(req_id, tag, exc)
            if on_replaced is not None:
                on_replaced()
        self._deliver(data)

    def send_chunk(self, req_id: Any, chunk: Chunk) -> None:
        """One `{:chunk, id, chunk}` frame; a chunk with no term form fails the stream (OP_FAILED)."""
        try:
            data = etf.encode_parts((_CHUNK, req_id, chunk_to_term(chunk)))
        except etf.EncodeError as exc:
            raise OpFailed(f"chunk {chunk.index} has no Erlang term form: {exc}", exception_type="EncodeError") from None
        self._deliver(data)

    def _deliver(self, data: list[bytes]) -> None:
        """Writes an encoded frame, after the telemetry events queued before it."""
        sub = self._sub
        if sub is None:
            self._write(data)
            return
        with self._telemetry_lock:
            self._send_telemetry(sub)
            self._write(data)

    def _send_telemetry(self, sub: Subscription) -> None:
        """Sends every event of `sub` queued so far (the caller holds `_telemetry_lock`)."""
        while (event := sub.get(timeout=0)) is not None:
            try:
                self.send(telemetry_to_term(event))
            except Exception:
                log.exception("sending a telemetry event failed")

    def _write(self, data: list[bytes]) -> None:
        header = _HEADER.pack(sum(map(len, data)))
        with self._write_lock:
            if self.host_gone:
                return
            try:
                _write_all(self.out_fd, header, data)
            except (BrokenPipeError, OSError) as exc:
                log.info("host closed the port (%s); replies are dropped from now on", exc)
                self.host_gone = True
                self._host_gone("host closed the port")

    def _read_exact(self, n: int) -> bytearray | None:
        """`n` bytes, or None at EOF. The buffer grows as bytes arrive (never beyond twice what
        came, plus 1 MiB), so a header that lies about its length allocates nothing."""
        buf = bytearray(min(n, _FIRST_READ))
        got = 0
        while got < n:
            if got == len(buf):
                buf.extend(bytes(min(n, 2 * len(buf)) - len(buf)))
            with memoryview(buf) as view:
                k = os.readv(self.in_fd, [view[got:]])
            if k == 0:
                return None
            got += k
        return buf

    def _skip(self, n: int) -> bool:
        while n > 0:
            chunk = os.read(self.in_fd, min(n, 1 << 20))
            if not chunk:
                return False
            n -= len(chunk)
        return True

    def read_loop(self) -> None:
        """Runs until stdin closes; every frame is answered, none kills the loop."""
        try:
            while True:
                header = self._read_exact(4)
                if header is None:
                    break
                (n,) = _HEADER.unpack(header)
                if n > self.max_frame:
                    # Only the start is read (for the id, which comes first), the rest skipped.
                    head = self._read_exact(min(n, _ID_PEEK))
                    if head is None or not self._skip(n - len(head)):
                        break
                    self._answer_error(_id_of_undecodable(head, 0), InvalidArgument(
                        f"frame of {n} bytes exceeds the {self.max_frame}-byte limit (put tensors in "
                        "shared memory)", field="frame"))
                    continue
                body = self._read_exact(n)
                if body is None:
                    break
                try:
                    self.handle_frame(body)
                except Exception as exc:  # a bug here must not end the loop (the worker would exit 0)
                    log.exception("handling a frame failed")
                    self._answer_error(UNDEFINED, unexpected(exc))
                del body
        except OSError as exc:
            log.error("reading stdin failed: %s", exc)
        finally:
            self.done.set()
            self._host_gone("stdin closed")

    def send_error(self, req_id: Any, err: SidecarError) -> None:
        self.reply(req_id, "error", error_to_term(err))

    def _answer_error(self, req_id: Any, err: SidecarError) -> None:
        try:
            self.send_error(req_id, err)
        except Exception:
            log.exception("answering request %s failed", shorten(req_id))

    # -- requests ------------------------------------------------------------------------------------

    def handle_frame(self, body: bytes | bytearray) -> None:
        try:
            req = etf.decode(body, max_inflated=self.max_frame)
        except etf.DecodeError as exc:
            self.send_error(_id_of_undecodable(body, self.max_frame),
                            InvalidArgument(f"malformed frame: {exc}", field="frame"))
            return
        req_id = _request_id(req)
        try:
            self.dispatch(req, req_id)
        except SidecarError as err:
            self.send_error(req_id, err)
        except Exception as exc:  # a bug here must not end the loop
            log.exception("handling a request failed")
            self.send_error(req_id, unexpected(exc))

    def dispatch(self, req: Any, req_id: Any) -> None:
        tag = req[0] if isinstance(req, tuple) and req and isinstance(req[0], Atom) else None
        arity = len(req) if isinstance(req, tuple) else 0
        if tag == "call" and arity in (5, 6):
            self._submit_call(req, req_id)
        elif tag == "list_ops" and arity == 2:
            self._control(req_id, lambda: [op_to_term(s) for s in self.rt.list_ops()])
        elif tag == "hardware" and arity == 2:
            self._control(req_id, lambda: record_to_term("Hardware", self.rt.hardware()))
        elif tag == "release" and arity == 3:
            ids = req[2]
            if not isinstance(ids, list):
                raise InvalidArgument("release takes a list of lease ids", field="leases")
            names = [text(x, "leases") for x in ids]
            self._control(req_id, lambda: self._release(names))
        elif tag == "subscribe" and arity in (2, 3):
            interval = limits.DEFAULT_MEMORY_INTERVAL_S
            if arity == 3 and req[2] is not None:
                interval = keyed(req[2], "opts").get("memory_interval_s", interval)
                if not isinstance(interval, (int, float)) or isinstance(interval, bool) or not interval > 0:
                    raise InvalidArgument(f"memory_interval_s must be a positive number, got {shorten(interval)}",
                                          field="memory_interval_s")
            self.reply(req_id, "ok", self._subscribe(float(interval)))
        elif tag == "unsubscribe" and arity == 2:
            self._unsubscribe()
            self.reply(req_id, "ok", Atom("unsubscribed"))
        elif tag == "cancel" and arity == 2:
            self.core.cancel(_hashable(req[1]))  # a late cancel (the call already answered) is a no-op
            self.streams.wake(_hashable(req[1]))
        elif tag == "stream" and arity in (5, 6):
            self._submit_call(req, req_id, stream=True)
        elif tag == "ack" and arity == 3:
            n = req[2]
            if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                raise InvalidArgument(f"ack takes a count of chunks, got {shorten(n)}", field="chunks")
            self.streams.ack(_hashable(req[1]), n)  # a late ack (the stream ended) is a no-op
        elif tag is not None and state_request(self, str(tag), req, req_id):
            pass  # resources and sessions (sidecar.worker.state_service)
        else:
            raise InvalidArgument(
                f"unknown request {shorten(req)}: expected {{:call, id, op, inputs, attrs[, opts]}}, "
                "{:list_ops, id}, {:hardware, id}, {:release, id, leases}, {:subscribe, id}, "
                "{:unsubscribe, id}, {:cancel, id}, {:stream, id, op, inputs, attrs[, opts]}, {:ack, id, n}, "
                "{:load, id, name, loader, kwargs}, {:unload, id, name}, {:list_resources, id} or "
                "{:close_session, id, session_id}", field="request")

    def _release(self, ids: list[str]) -> dict[Atom, Any]:
        released, unknown = self.rt.release(ids)
        return record_to_term("ReleaseResponse", {"released": int(released), "unknown": list(unknown)})

    def _control(self, req_id: Any, fn: Callable[[], Any]) -> None:
        def run() -> None:
            try:
                self.reply(req_id, "ok", fn())
            except SidecarError as err:
                self.send_error(req_id, err)
            except Exception as exc:
                log.exception("control request failed")
                self.send_error(req_id, unexpected(exc))
        self.control.submit(run)

    def _submit_call(self, req: tuple[Any, ...], req_id: Any, stream: bool = False) -> None:
        op = text(req[2], "op") if _is_text(req[2]) else None
        try:
            call = call_from_term(req)
        except SidecarError as err:
            if len(req) > 5 and isinstance(req[5], dict):  # piggybacked releases still count
                self.core.release_quietly(_texts(req[5].get(Atom("release"))))
            raise self.core.with_call_ids(err, op, _request_id_of_opts(req)) from None
        handle = self.core.begin(call, key=_hashable(req_id), caller_gone=lambda: self.host_gone)
        self.calls.submit(self._run_stream if stream else self._run_call, handle, req_id)

    def _run_call(self, handle: CallHandle, req_id: Any) -> None:
        self._answer(handle, req_id, lambda: self.core.execute(handle))

    def _run_stream(self, handle: CallHandle, req_id: Any) -> None:
        self._answer(handle, req_id, lambda: self.streams.run(
            handle, _hashable(req_id), lambda chunk: self.send_chunk(req_id, chunk)))

    def _answer(self, handle: CallHandle, req_id: Any, run: Callable[[], CallResult]) -> None:
        """Runs a call or a stream and answers it once: its result, or its structured error."""
        core = self.core
        try:
            try:
                result = run()
            except SidecarError as err:
                self.send_error(req_id, err)
                return
            try:
                body = result_to_term(result)
            except SidecarError as err:
                core.release_quietly(result.leases)  # the host never learns these lease ids
                self.send_error(req_id, err)
                return
            # Replaced by an error, the reply takes its lease ids with it: nobody could release them.
            self.reply(req_id, "ok", body, on_replaced=lambda: core.release_quietly(result.leases))
        finally:
            core.end(handle)

    # -- telemetry -----------------------------------------------------------------------------------

    def _subscribe(self, interval: float) -> Atom:
        with self._sub_lock:
            if self._sub is not None:
                return Atom("already_subscribed")
            sub = self._sub = self.core.watch(interval)

        def pump() -> None:  # events between replies (memory samples, the spans of a long call)
            while sub.wait():
                with self._telemetry_lock:
                    self._send_telemetry(sub)
        threading.Thread(target=pump, name="sidecar-stdio-telemetry", daemon=True).start()
        return Atom("subscribed")

    def _unsubscribe(self) -> None:
        with self._sub_lock:
            sub, self._sub = self._sub, None
        if sub is not None:
            self.core.unwatch(sub)


def _request_id_of_opts(req: tuple[Any, ...]) -> str | None:
    rid = req[5].get(Atom("request_id")) if len(req) > 5 and isinstance(req[5], dict) else None
    return text(rid, "request_id") if _is_text(rid) else None


def _unencodable_reply(req_id: Any, tag: str, reason: Exception) -> list[bytes]:
    """The error frame that stands in for a reply with no Erlang form."""
    error = {Atom("kind"): Atom(OpFailed.kind.value.lower()), Atom("exception_type"): "EncodeError",
             Atom("message"): f"the worker's {tag} reply has no Erlang term form: {reason}"}
    try:
        return etf.encode_parts((Atom("error"), req_id, error))
    except etf.EncodeError as exc:
        error[Atom("message")] += f"; the request id cannot be sent back either ({exc})"
        return etf.encode_parts((Atom("error"), UNDEFINED, error))


def _request_id(req: Any) -> Any:
    """The id of `{:tag, id, ...}`; :undefined for any other term."""
    return req[1] if isinstance(req, tuple) and len(req) >= 2 and isinstance(req[0], Atom) else UNDEFINED


def _id_of_undecodable(body: bytes | bytearray, max_inflated: int) -> Any:
    """The id of a frame `etf.decode` refused (a pid in its inputs, ...), when the id itself decodes."""
    try:
        return _request_id(etf.decode_prefix(body, 2, max_inflated=max_inflated))
    except etf.DecodeError:
        return UNDEFINED


def _is_text(v: Any) -> bool:
    try:
        text(v, "op")
        return True
    except SidecarError:
        return False


def _hashable(v: Any) -> Any:
    try:
        hash(v)
        return v
    except TypeError:
        return repr(v)


def _write_all(fd: int, header: bytes, data: list[bytes]) -> None:
    """One frame, header and body parts, without joining them (bodies can be 100 MB)."""
    bufs = [memoryview(header)] + [memoryview(part) for part in data]
    while bufs:
        n = os.writev(fd, bufs[:_IOV_MAX])
        while bufs and n >= len(bufs[0]):
            n -= len(bufs[0])
            bufs.pop(0)
        if bufs and n:
            bufs[0] = bufs[0][n:]


def _take_stdio() -> tuple[int, int]:
    """Private copies of fd 0/1 for the protocol; fd 1 then points at stderr and fd 0 at /dev/null,
    so a print() in an op or a library writing to stdout cannot corrupt the frame stream."""
    in_fd, out_fd = os.dup(0), os.dup(1)
    os.dup2(2, 1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    sys.stdout = sys.stderr
    return in_fd, out_fd


def _texts(ids: Any) -> list[str]:
    """The lease ids of a malformed call's opts that are text (for a release that still counts)."""
    return [text(x, "release") for x in ids if _is_text(x)] if isinstance(ids, list) else []


def ready_term(runtime: Any) -> tuple[Any, ...]:
    specs = runtime.list_ops()
    opts = runtime.options
    return (Atom("ready"), os.getpid(), {
        Atom("version"): sidecar.__version__,
        Atom("device"): str(runtime.device),
        Atom("ops"): [s.name for s in specs],
        Atom("idempotent"): [s.name for s in specs if s.idempotent],
        Atom("max_concurrency"): int(opts.max_concurrency),
        Atom("max_queue"): int(opts.max_queue),
        Atom("inline_threshold"): int(opts.inline_threshold),
        Atom("run_id"): getattr(runtime.arena, "run_id", None) or opts.run_id,
    })


def serve_stdio(runtime: Any, shutdown: Shutdown | None = None, *, max_frame: int = MAX_FRAME,
                grace_period_s: float = limits.DEFAULT_GRACE_PERIOD_S) -> int:
    """Serve the port protocol on stdin/stdout until stdin closes or `shutdown` is requested
    (SIGTERM, parent death, a tainted device: exit code 70); returns the exit code."""
    in_fd, out_fd = _take_stdio()
    core = ServerCore(runtime, shutdown)
    server = StdioServer(runtime, in_fd, out_fd, max_frame=max_frame, core=core)
    server.start()
    return serve(core, server, grace_period_s)
