"""What every transport of a worker shares: one server core under thin framing adapters.

The gRPC servicer (`grpc_server`) and the Erlang port loop (`stdio_server`) only turn their frames
into `Call`s and results back. Everything else about serving calls happens here, once:

- admission: the dispatcher's gate (at most `max_concurrency` calls run and `max_queue` wait; the
  rest are OVERLOADED at once, with the same figures on every transport);
- the life of a call, from the moment it is handed over until its answer is on its way
  (`CallHandle`): a call counts as in flight until then, so a drain waits for the answer too;
- cancellation: the port's `{:cancel, id}` and a gRPC caller going away both end in `cancel()`;
  a call whose caller is gone has its output leases released (nobody will read or release them),
  and so does a call whose answer cannot be built;
- taint: a device error that poisoned the process requests a shutdown with exit code 70 (the
  call that caused it is still answered during the drain);
- shutdown: new calls are refused, telemetry watchers end, calls in flight get the grace period
  (`--grace-period` on SIGTERM, less when the host is gone), then the process exits (`serve`);
- telemetry watchers: at most MAX_WATCHERS at once, all ended at shutdown.
"""
from __future__ import annotations

import logging
import threading
import traceback
from typing import TYPE_CHECKING, Any, Callable, Hashable, Iterable, Protocol

from sidecar.errors import Cancelled, OpFailed, Overloaded, SidecarError
from sidecar.protocol.calls import Call, CallResult
from sidecar.protocol.limits import DEFAULT_MEMORY_INTERVAL_S, FAST_GRACE_S, MAX_WATCHERS
from sidecar.worker.dispatcher import new_request_id
from sidecar.worker.lifecycle import EXIT_TAINTED, Shutdown
from sidecar.worker.telemetry import Subscription

if TYPE_CHECKING:  # runtime.py imports torch and every worker part; the core needs only the type
    from sidecar.worker.runtime import Runtime

log = logging.getLogger(__name__)


class CallHandle:
    """One call between its hand-over and its answer. `cancel()` may come from any thread."""

    __slots__ = ("call", "key", "_core", "_cancelled", "_caller_gone")

    def __init__(self, core: ServerCore, call: Call, key: Hashable, caller_gone: Callable[[], bool] | None) -> None:
        self.call = call
        self.key = key
        self._core = core
        self._cancelled = False
        self._caller_gone = caller_gone
        call.is_cancelled = self.cancelled

    def cancel(self) -> None:
        """The caller withdrew the call: it stops at its next check and its outputs are released."""
        self._cancelled = True

    def cancelled(self) -> bool:
        return self._cancelled or (self._caller_gone is not None and self._caller_gone())


class ServerCore:
    """Serves one runtime's calls for any number of transports (see the module doc)."""

    def __init__(self, runtime: Runtime, shutdown: Shutdown | None = None, *, max_watchers: int = MAX_WATCHERS) -> None:
        self.runtime = runtime
        self.dispatcher = runtime.dispatcher
        self.shutdown = shutdown if shutdown is not None else Shutdown()
        self.max_watchers = max_watchers
        self.closing = ""  # why new calls are refused, once shutting down
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._in_flight = 0
        self._by_key: dict[Hashable, CallHandle] = {}
        self._watchers: set[Subscription] = set()
        self.dispatcher.on_taint.append(self._tainted)

    # -- calls ---------------------------------------------------------------------------------------

    def begin(self, call: Call, *, key: Hashable = None, caller_gone: Callable[[], bool] | None = None) -> CallHandle:
        """Takes a call over; it is in flight until `end()`. `key` (the port's request id) lets
        `cancel(key)` reach it; `caller_gone` says when the caller left (a gRPC context).

        Refused with CANCELLED once the worker is shutting down (the piggybacked releases still count).
        """
        if self.closing:
            self.release_quietly(call.release)
            raise self.with_call_ids(Cancelled(f"worker is shutting down ({self.closing}); call refused"),
                                     call.op, call.request_id)
        handle = CallHandle(self, call, key, caller_gone)
        with self._lock:
            self._in_flight += 1
            if key is not None:
                self._by_key[key] = handle
        return handle

    def execute(self, handle: CallHandle, body: Any = None) -> CallResult:
        """Runs the call (admission, queueing and all: the dispatcher's); raises SidecarError.
        `body` replaces the unary one (`Dispatcher.run`: a stream's loop, `sidecar.worker.streams`).

        If the caller has gone by the time the result exists, its leases are released now."""
        call = handle.call
        try:
            result: CallResult = self.dispatcher.execute(call) if body is None else self.dispatcher.run(call, body)
        except SidecarError:
            raise  # already carries op and request_id
        except Exception as exc:  # a bug below the dispatcher: still a structured answer
            log.exception("unexpected error in %s", call.op)
            raise self.with_call_ids(unexpected(exc, call.op), call.op, call.request_id) from None
        if handle.cancelled():
            self.release_quietly(result.leases)  # nobody will read or release them
        return result

    def end(self, handle: CallHandle) -> None:
        """The call's answer is on its way (or will never be): it no longer counts as in flight."""
        with self._lock:
            self._in_flight -= 1
            if handle.key is not None and self._by_key.get(handle.key) is handle:
                del self._by_key[handle.key]
            if self._in_flight == 0:
                self._idle.notify_all()

    def cancel(self, key: Hashable) -> bool:
        """Cancels the call in flight under `key`; False when there is none (already answered)."""
        with self._lock:
            handle = self._by_key.get(key)
        if handle is None:
            return False
        handle.cancel()
        return True

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def release_quietly(self, ids: Iterable[object] | None) -> None:
        """Releases leases nobody will ever release (the caller is gone, or never learnt their ids)."""
        names = [str(x) for x in ids or ()]
        if not names:
            return
        try:
            self.runtime.release(names)
        except Exception:
            log.exception("releasing leases %s failed", names)

    @staticmethod
    def with_call_ids(err: SidecarError, op: object, request_id: object) -> SidecarError:
        """Fills in op and request id when the raiser did not know them (a request refused before the
        dispatcher saw it gets a fresh id, as the dispatcher gives one to a call that has none)."""
        if op and isinstance(op, str) and err.fields.get("op") is None:
            err.fields["op"] = op
        err.fields.setdefault("request_id", request_id or new_request_id())
        return err

    # -- telemetry -----------------------------------------------------------------------------------

    def watch(self, memory_interval_s: float = 0.0) -> Subscription:
        """A telemetry stream for one watcher (memory every `memory_interval_s`, 0 = the default).

        OVERLOADED beyond `max_watchers`; CANCELLED once shutting down. The caller closes it."""
        with self._lock:
            if self.closing:
                raise Cancelled(f"worker is shutting down ({self.closing})")
            if len(self._watchers) >= self.max_watchers:
                raise Overloaded(f"at most {self.max_watchers} telemetry watchers", queue_depth=len(self._watchers),
                                 limit=self.max_watchers)
            sub = self.runtime.telemetry.subscribe(memory_interval_s or DEFAULT_MEMORY_INTERVAL_S)
            self._watchers.add(sub)
        return sub

    def unwatch(self, sub: Subscription) -> None:
        sub.close()
        with self._lock:
            self._watchers.discard(sub)

    # -- shutdown ------------------------------------------------------------------------------------

    def _tainted(self, reason: str) -> None:
        log.error("device tainted (%s): exiting %d for a fresh process", reason, EXIT_TAINTED)
        self.shutdown.request(f"tainted: {reason}", fast=True, exit_code=EXIT_TAINTED)

    def start_closing(self, reason: str) -> None:
        """New calls and watchers are refused from now on; the watchers there are end."""
        with self._lock:
            self.closing = reason or "shutting down"
            watchers = list(self._watchers)
        for sub in watchers:
            sub.close()  # a stream would otherwise hold the drain open

    def wait_idle(self, timeout: float) -> bool:
        """Blocks until no call is in flight; False when `timeout` passed first."""
        with self._idle:
            return self._idle.wait_for(lambda: self._in_flight == 0, timeout)


def unexpected(exc: BaseException, op: str = "") -> OpFailed:
    """An exception that is no SidecarError (a bug of ours) as a structured OP_FAILED."""
    return OpFailed(f"{type(exc).__name__}: {exc}", exception_type=type(exc).__name__,
                    traceback="".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
                    **({"op": op} if op else {}))


class Transport(Protocol):
    """A framing adapter over a `ServerCore`, started (and its readiness announced) by its caller;
    `serve` stops it."""

    def stop(self, grace_s: float) -> bool:
        """Stops taking requests; the calls in flight may finish for up to `grace_s`."""

    def close(self) -> None:
        """Frees what the transport holds (after the calls in flight were given their grace)."""


def serve(core: ServerCore, transport: Transport, grace_period_s: float) -> int:
    """Serves on the started `transport` until the core's shutdown is requested (SIGTERM, parent
    death, the host gone, a tainted device), then drains: returns the exit code."""
    shutdown = core.shutdown
    shutdown.wait()
    grace = shutdown.grace_s(grace_period_s)
    reason = shutdown.reason or "shutdown requested"
    log.info("%s: stopping, draining %d calls in flight (up to %.1f s)", reason, core.in_flight, grace)
    core.start_closing(reason)
    finished = transport.stop(grace)
    finished = core.wait_idle(grace if finished else FAST_GRACE_S) and finished
    if not finished:
        log.warning("grace period over with %d calls in flight; they end unanswered", core.in_flight)
    transport.close()
    log.info("stopped (exit %d)", shutdown.exit_code)
    return shutdown.exit_code
