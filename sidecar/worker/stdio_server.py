"""The Erlang port transport: `sidecar serve --stdio`.

An Elixir VM opens the worker with `Port.open({:spawn_executable, python}, [{:packet, 4}, :binary,
:exit_status, ...])`; every message is a 4-byte big-endian length followed by one term in the
External Term Format (`sidecar.etf`). This module only translates terms <-> `Call`/`CallResult`, the
same dispatcher the gRPC servicer uses does the work.

    worker -> host, first:  {:ready, os_pid, %{version:, device:, ops: [names], ...}}
    host -> worker:         {:call, id, op, inputs, attrs}          (opts map as 6th element optional)
                            {:list_ops, id}  {:hardware, id}  {:release, id, [lease_ids]}
                            {:subscribe, id}  {:subscribe, id, %{memory_interval_s: s}}
                            {:unsubscribe, id}  {:cancel, id_of_a_call}   (cancel gets no reply)
    worker -> host:         {:ok, id, result}  |  {:error, id, %{kind: :shape_mismatch, message:, ...}}
                            {:telemetry, [:sidecar | event], measurements, metadata}

Every frame is answered. A malformed one gets an error term with the request's id whenever the id
itself decoded (`:undefined` only when it did not), and the worker carries on; a reply that cannot
be encoded is replaced by an error naming why, and the leases of its outputs are released. Bodies
are read as they arrive, so a header that declares a large frame costs nothing until its bytes come.
The worker exits when stdin closes (the port was closed or the VM died).
"""
from __future__ import annotations

import logging
import os
import struct
import sys
import threading
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import sidecar
from sidecar import etf
from sidecar.errors import Cancelled, InvalidArgument, OpFailed, Overloaded, SidecarError, shorten
from sidecar.etf import Atom
from sidecar.protocol import limits
from sidecar.protocol.calls import Call
from sidecar.protocol.port_codec import (call_from_term, error_to_term, keyed, op_to_term, record_to_term,
                                         result_to_term, telemetry_to_term, text)
from sidecar.worker.dispatcher import new_request_id

log = logging.getLogger(__name__)

__all__ = ["serve_stdio", "StdioServer", "MAX_FRAME"]

# Default largest frame (`--max-frame-bytes`), as received and, for a compressed term, as inflated.
# Tensors belong in shared memory; this only bounds inline payloads (a benchmark sends 100 MB inline
# on purpose). Bigger frames are skipped and answered with an error.
MAX_FRAME = int(os.environ.get("SIDECAR_STDIO_MAX_FRAME", str(limits.DEFAULT_MAX_FRAME_BYTES)))
_FIRST_READ = 1 << 20  # a body buffer starts at this size and at most doubles while bytes arrive
_ID_PEEK = 4096        # bytes of an oversized frame read to find its request id
CONTROL_THREADS = 4
TAINTED_EXIT = 70
EOF_GRACE_S = 5.0    # in-flight calls may finish (and free what they hold) after the host went away
TERM_GRACE_S = 10.0  # SIGTERM: calls in flight finish and are answered before the worker exits
FAST_GRACE_S = 0.5   # the parent died: nobody reads the answers
UNDEFINED = Atom("undefined")
_HEADER = struct.Struct(">I")


def _unexpected(exc: BaseException, op: str = "") -> OpFailed:
    return OpFailed(f"{type(exc).__name__}: {exc}", exception_type=type(exc).__name__,
                    traceback="".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
                    **({"op": op} if op else {}))


# ---------------------------------------------------------------------------------------------------
# The server


class StdioServer:
    """Reads request frames on `in_fd`, answers on `out_fd`; calls run on a thread pool."""

    def __init__(self, runtime: Any, in_fd: int, out_fd: int, *, max_frame: int = MAX_FRAME) -> None:
        self.rt = runtime
        self.in_fd = in_fd
        self.out_fd = out_fd
        self.max_frame = max_frame
        opts = runtime.options
        # Same admission as the gRPC transport: up to max_concurrency + max_queue calls are handed to
        # the dispatcher (which queues the excess over max_concurrency); beyond that OVERLOADED at once.
        self.limit = int(opts.max_concurrency) + int(opts.max_queue)
        self.calls = ThreadPoolExecutor(max_workers=self.limit, thread_name_prefix="sidecar-stdio-call")
        self.control = ThreadPoolExecutor(max_workers=CONTROL_THREADS, thread_name_prefix="sidecar-stdio-ctl")
        self._write_lock = threading.Lock()
        self._lock = threading.Lock()
        self._in_flight = 0
        self._idle = threading.Condition(self._lock)
        self._active: set[Any] = set()     # ids of calls admitted and not yet answered
        self._cancelled: set[Any] = set()  # the subset the host cancelled
        self._sub: Any = None
        self.done = threading.Event()
        self.exit_code = 0
        self.host_gone = False
        self.closing = ""  # set when shutting down: new calls are refused with this reason

    # -- frames --------------------------------------------------------------------------------------

    def send(self, term: Any) -> None:
        """One frame of a term we built (raises EncodeError if it has no Erlang form)."""
        self._write(etf.encode(term))

    def reply(self, req_id: Any, tag: str, body: Any, on_replaced: Callable[[], None] | None = None) -> None:
        """Sends `{tag, req_id, body}`.

        A reply that cannot be encoded (an op returned a string with lone surrogates, ...) is
        replaced by an error with the same id, and an id that cannot be sent back by :undefined:
        the host always gets an answer. `on_replaced` runs before the replacement goes out (to
        release the leases the host will never learn of).
        """
        try:
            data = etf.encode((Atom(tag), req_id, body))
        except etf.EncodeError as exc:
            log.error("the %s reply to request %s cannot be encoded: %s", tag, shorten(req_id), exc)
            data = _unencodable_reply(req_id, tag, exc)
            if on_replaced is not None:
                on_replaced()
        self._write(data)

    def _write(self, data: bytes) -> None:
        header = _HEADER.pack(len(data))
        with self._write_lock:
            if self.host_gone:
                return
            try:
                _write_all(self.out_fd, header, data)
            except (BrokenPipeError, OSError) as exc:
                log.info("host closed the port (%s); replies are dropped from now on", exc)
                self.host_gone = True
                self.done.set()

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
            while not self.done.is_set():
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
                    self._answer_error(UNDEFINED, _unexpected(exc))
                del body
        except OSError as exc:
            log.error("reading stdin failed: %s", exc)
        finally:
            self.done.set()

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
            self.send_error(req_id, _unexpected(exc))

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
            interval = 1.0
            if arity == 3 and req[2] is not None:
                interval = keyed(req[2], "opts").get("memory_interval_s", 1.0)
                if not isinstance(interval, (int, float)) or isinstance(interval, bool) or not interval > 0:
                    raise InvalidArgument(f"memory_interval_s must be a positive number, got {shorten(interval)}",
                                          field="memory_interval_s")
            self.reply(req_id, "ok", self._subscribe(float(interval)))
        elif tag == "unsubscribe" and arity == 2:
            self._unsubscribe()
            self.reply(req_id, "ok", Atom("unsubscribed"))
        elif tag == "cancel" and arity == 2:
            key = _hashable(req[1])
            with self._lock:
                if key in self._active:  # a late cancel (the call already answered) is a no-op
                    self._cancelled.add(key)
        else:
            raise InvalidArgument(
                f"unknown request {shorten(req)}: expected {{:call, id, op, inputs, attrs[, opts]}}, "
                "{:list_ops, id}, {:hardware, id}, {:release, id, leases}, {:subscribe, id}, "
                "{:unsubscribe, id} or {:cancel, id}", field="request")

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
                self.send_error(req_id, _unexpected(exc))
        self.control.submit(run)

    def _submit_call(self, req: tuple[Any, ...], req_id: Any) -> None:
        if self.closing:
            raise Cancelled(f"worker is shutting down ({self.closing}); call refused",
                            op=text(req[2], "op") if _istext(req[2]) else None)
        key = _hashable(req_id)
        try:
            call = call_from_term(req, is_cancelled=lambda: key in self._cancelled)
        except SidecarError as err:
            if len(req) > 5 and isinstance(req[5], dict):  # piggybacked releases still count
                self._release_quietly(req[5].get("release") or [])
            if err.fields.get("op") is None and _istext(req[2]):
                err.fields["op"] = text(req[2], "op")
            err.fields.setdefault("request_id", _request_id_of_opts(req) or new_request_id())
            raise
        with self._lock:
            admitted = self._in_flight < self.limit
            if admitted:
                self._in_flight += 1
                self._active.add(key)
            depth = self._in_flight
        if not admitted:
            self._release_quietly(call.release)
            opts = self.rt.options
            raise Overloaded(f"worker is at capacity: {depth} calls in flight (concurrency "
                             f"{opts.max_concurrency}, queue {opts.max_queue})", op=call.op,
                             queue_depth=max(0, depth - int(opts.max_concurrency)), limit=int(opts.max_queue))
        self.calls.submit(self._run_call, call, req_id, key)

    def _run_call(self, call: Call, req_id: Any, key: Any) -> None:
        try:
            try:
                result = self.rt.dispatcher.execute(call)
            except SidecarError as err:
                self.send_error(req_id, err)
                return
            except Exception as exc:  # a bug below the dispatcher: still a structured answer
                log.exception("unexpected error in %s", call.op)
                self.send_error(req_id, _unexpected(exc, call.op))
                return
            try:
                body = result_to_term(result)
            except SidecarError as err:
                self._release_quietly(result.leases)
                self.send_error(req_id, err)
                return
            if self.host_gone or key in self._cancelled:
                self._release_quietly(result.leases)  # nobody will read or release them
            # Replaced by an error, the reply takes its lease ids with it: nobody could release them.
            self.reply(req_id, "ok", body, on_replaced=lambda: self._release_quietly(result.leases))
        finally:
            with self._lock:
                self._in_flight -= 1
                self._active.discard(key)
                self._cancelled.discard(key)
                self._idle.notify_all()
            if self.rt.dispatcher.tainted:
                log.error("device tainted (%s): exiting %d for a fresh process", self.rt.dispatcher.tainted,
                          TAINTED_EXIT)
                self.exit_code = TAINTED_EXIT
                self.done.set()

    def _release_quietly(self, ids: Any) -> None:
        try:
            names = [text(x, "leases") for x in ids]
            if names:
                self.rt.release(names)
        except Exception:
            log.exception("releasing leases %s failed", ids)

    # -- telemetry -----------------------------------------------------------------------------------

    def _subscribe(self, interval: float) -> Atom:
        with self._lock:
            if self._sub is not None:
                return Atom("already_subscribed")
            sub = self._sub = self.rt.telemetry.subscribe(interval)

        def pump() -> None:
            for event in sub:
                try:
                    self.send(telemetry_to_term(event))
                except Exception:
                    log.exception("sending a telemetry event failed")
        threading.Thread(target=pump, name="sidecar-stdio-telemetry", daemon=True).start()
        return Atom("subscribed")

    def _unsubscribe(self) -> None:
        with self._lock:
            sub, self._sub = self._sub, None
        if sub is not None:
            sub.close()

    # -- lifetime ------------------------------------------------------------------------------------

    def wait_idle(self, timeout: float) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: self._in_flight == 0, timeout)

    def close(self, grace_s: float) -> None:
        self.wait_idle(grace_s)
        self._unsubscribe()
        self.calls.shutdown(wait=False, cancel_futures=True)
        self.control.shutdown(wait=False, cancel_futures=True)


def _request_id_of_opts(req: tuple[Any, ...]) -> str | None:
    rid = req[5].get(Atom("request_id")) if len(req) > 5 and isinstance(req[5], dict) else None
    return text(rid, "request_id") if _istext(rid) else None


def _unencodable_reply(req_id: Any, tag: str, reason: Exception) -> bytes:
    """The error frame that stands in for a reply with no Erlang form."""
    error = {Atom("kind"): Atom(OpFailed.kind.value.lower()), Atom("exception_type"): "EncodeError",
             Atom("message"): f"the worker's {tag} reply has no Erlang term form: {reason}"}
    try:
        return etf.encode((Atom("error"), req_id, error))
    except etf.EncodeError as exc:
        error[Atom("message")] += f"; the request id cannot be sent back either ({exc})"
        return etf.encode((Atom("error"), UNDEFINED, error))


def _request_id(req: Any) -> Any:
    """The id of `{:tag, id, ...}`; :undefined for any other term."""
    return req[1] if isinstance(req, tuple) and len(req) >= 2 and isinstance(req[0], Atom) else UNDEFINED


def _id_of_undecodable(body: bytes | bytearray, max_inflated: int) -> Any:
    """The id of a frame `etf.decode` refused (a pid in its inputs, ...), when the id itself decodes."""
    try:
        return _request_id(etf.decode_prefix(body, 2, max_inflated=max_inflated))
    except etf.DecodeError:
        return UNDEFINED


def _istext(v: Any) -> bool:
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


def _write_all(fd: int, header: bytes, data: bytes) -> None:
    """One frame, header and body, without joining them (bodies can be 100 MB)."""
    bufs = [memoryview(header), memoryview(data)]
    while bufs:
        n = os.writev(fd, bufs)
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


def serve_stdio(runtime: Any, shutdown: Any = None, *, max_frame: int = MAX_FRAME) -> int:
    """Serve the port protocol on stdin/stdout until stdin closes; returns the exit code.

    `shutdown` (a `lifecycle.Shutdown`): once requested (SIGTERM, parent death) new calls are refused
    and the calls in flight finish and are answered (briefly when the parent is gone) before the
    return. A tainted device ends the loop with exit code 70.
    """
    in_fd, out_fd = _take_stdio()
    server = StdioServer(runtime, in_fd, out_fd, max_frame=max_frame)
    server.send(ready_term(runtime))
    log.info("serving the port protocol on stdio (device %s, pid %d)", runtime.device, os.getpid())
    reader = threading.Thread(target=server.read_loop, name="sidecar-stdio-reader", daemon=True)
    reader.start()
    reason, grace, code = "stdin closed", EOF_GRACE_S, 0
    while not server.done.wait(0.2):
        if shutdown is not None and shutdown.event.is_set():
            reason = shutdown.reason or "shutdown requested"
            grace = FAST_GRACE_S if shutdown.fast else TERM_GRACE_S
            code = int(getattr(shutdown, "exit_code", 0) or 0)
            break
    if server.exit_code == TAINTED_EXIT:
        reason, code = "device tainted", TAINTED_EXIT
    server.closing = reason
    log.info("%s: stopping (%d calls in flight, up to %.1f s to finish)", reason, server._in_flight, grace)
    server.close(grace)
    return code
