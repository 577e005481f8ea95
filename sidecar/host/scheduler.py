"""`CallScheduler`: a pool's calls: which worker runs one, what a failure of it means, and whether it
is sent again.

- Routing: the least busy ready serving worker (`Supervisor.acquire`); a call waits for one (until
  its deadline, else `acquire_timeout_s`) unless the start-up breaker says none will come.
- Op breakers: a call of an op whose breaker is open fails fast with `CircuitOpen`; after the
  cool-down one call of it is the probe.
- A failed attempt is a crash once its worker is known dead (`WorkerCrashed` with the exit, whatever
  the transport said); an answer of a live worker (an op error) or the call's own timeout is not.
- Retry: an idempotent call (what ListOps says, unless the caller says otherwise), or one that never
  reached its worker, is sent to another worker, at most `max_attempts` tries, after a jittered
  backoff; a call whose attempt crashed a worker by itself gets one more try at most, and one that
  crashed two is failed with `PoisonCall`.
"""
from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sidecar.errors import Cancelled, CircuitOpen, OpFailed, SidecarError, WorkerCrashed, WorkerUnreachable
from sidecar.host import events
from sidecar.host.breaker import Admission, BreakerState
from sidecar.host.client import Client, ClientClosed, Result
from sidecar.host.crash import ExitInfo, summarize_tail
from sidecar.host.events import EventBus
from sidecar.host.policy import Evidence, SupervisionPolicy
from sidecar.host.settings import PoolSettings
from sidecar.host.supervisor import Supervisor, Worker

log = logging.getLogger(__name__)

__all__ = ["CallScheduler", "PoolClosed", "PoisonCall"]


@dataclass
class _ProbeOutcome:
    crashed_nothing: bool = False  # for a probe: the call/stream ended without crashing any worker


class PoolClosed(Cancelled):
    """The pool was closed (kind CANCELLED)."""


class PoisonCall(WorkerCrashed):
    """A call that crashed two workers by itself (kind WORKER_CRASHED); it is not sent to a third.

    The fields describe the second crash; `crashes` lists both ({"pid", "classification",
    "exit_code", "signal"}), and the message names both.
    """

    crashes: list[dict[str, Any]]


class CallScheduler:
    def __init__(self, settings: PoolSettings, supervisor: Supervisor, policy: SupervisionPolicy,
                 cond: threading.Condition, bus: EventBus, unlink: Callable[[Worker], None]) -> None:
        self.settings = settings
        self._sup = supervisor
        self._policy = policy
        self._cond = cond  # the pool's lock: the supervisor's state is read and changed under it
        self._bus = bus
        self._unlink = unlink  # the shell's: unlink a dead worker's segments
        self._op_idempotent: dict[str, bool] | None = None

    # -- what ops are ------------------------------------------------------------------------------

    def is_idempotent(self, op: str) -> bool:
        """What ListOps says about `op` (False for ops it does not know)."""
        return bool((self._op_idempotent or {}).get(op, False))

    def learn_ops(self, client: Client) -> None:
        """ListOps of the first worker that comes up: which ops may be retried."""
        if self._op_idempotent is not None:
            return
        try:
            flags = {o["name"]: bool(o.get("idempotent")) for o in client.list_ops()}
        except (SidecarError, KeyError, TypeError) as exc:
            log.debug("ListOps failed (%s); ops count as not idempotent", exc)
            return
        with self._cond:
            if self._op_idempotent is None:
                self._op_idempotent = flags

    # -- calls -------------------------------------------------------------------------------------

    def invoke(self, method: str, op: str, inputs: tuple[Any, ...], idempotent: bool | None,
               timeout: float | None, kwargs: dict[str, Any]) -> Any:
        """`Client.<method>(op, *inputs, **kwargs)` on a pool worker, with retries (see module doc)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        retryable = self.is_idempotent(op) if idempotent is None else bool(idempotent)
        excluded: set[int] = set()
        work_crashes: list[tuple[WorkerCrashed, ExitInfo]] = []  # attempts that crashed their worker
        first_crash: int | None = None  # the attempt that first crashed its worker
        attempt = 0
        with self._admitted(op) as outcome:
            while True:
                attempt += 1
                worker, token = self.acquire(op, deadline, excluded)
                left = None if deadline is None else max(0.001, deadline - time.monotonic())
                try:
                    out = getattr(worker.client, method)(op, *inputs, timeout=left, idempotent=retryable, **kwargs)
                except Exception as exc:
                    found = self._failed_attempt(exc, worker, token, op, work_crashes, outcome)
                    if found is None:  # the worker answered (an op error), or the call's own timeout
                        raise
                    crash, info = found
                    if info is not None and info.blames_work:
                        first_crash = first_crash or attempt
                    # A call whose attempt crashed a worker by itself gets one more try at most.
                    tries_left = first_crash is None or attempt == first_crash
                    if not tries_left or not self._may_resend(crash, retryable, attempt):
                        raise crash from (None if crash is exc else exc)
                    delay = self._retry_delay(attempt)
                    if deadline is not None and time.monotonic() + delay >= deadline:
                        raise crash from (None if crash is exc else exc)
                    self._bus.emit(events.retry(op, attempt + 1, worker.pid, crash.fields.get("classification"),
                                                delay))
                    excluded.add(worker.pid)
                    if delay > 0:
                        time.sleep(delay)
                    continue
                self.release(worker, token, ok=True)
                outcome.crashed_nothing = not work_crashes
                return out

    @contextmanager
    def _admitted(self, op: str) -> Iterator[_ProbeOutcome]:
        """The op breaker's admission of one call or stream: refused while open (CircuitOpen); when it
        is the half-open probe, its outcome (set `crashed_nothing`) closes or reopens the breaker."""
        admission = self._policy.op_breakers.admit(op)
        if admission is Admission.REFUSE:
            raise self._op_circuit_open_error(op)
        if admission is Admission.PROBE:
            self._bus.emit(events.breaker_half_open("op", op))
        outcome = _ProbeOutcome()
        try:
            yield outcome
        finally:
            if admission is Admission.PROBE and \
                    self._policy.op_breakers.probe_done(op, outcome.crashed_nothing) is BreakerState.CLOSED:
                log.info("pool %s: circuit breaker of op %r closed", self.settings.run_id, op)
                self._bus.emit(events.breaker_close("op", op))

    def invoke_on(self, worker: Worker, method: str, op: str, inputs: tuple[Any, ...], timeout: float | None,
                  kwargs: dict[str, Any]) -> Any:
        """`Client.<method>(op, *inputs, **kwargs)` on this very worker (a pinned call): no retry
        elsewhere. A worker that no longer serves fails it with `WorkerCrashed` (call_started False);
        a death during it with the classified `WorkerCrashed`, as any call."""
        with self._cond:
            if self._sup.closing:
                raise PoolClosed("the pool is closed", op=op)
            token = self._sup.acquire_worker(worker, op)
        if token is None:
            raise self.gone(worker, op)
        try:
            out = getattr(worker.client, method)(op, *inputs, timeout=timeout, **kwargs)
        except Exception as exc:
            found = self._failed_attempt(exc, worker, token, op, [])  # one attempt: never poison
            if found is None:
                raise
            raise found[0] from (None if found[0] is exc else exc)
        self.release(worker, token, ok=True)
        return out

    def gone(self, worker: Worker, op: str) -> WorkerCrashed:
        """The error of a call pinned to a worker that no longer serves (its exit, when known)."""
        info = worker.proc.exit_info
        if info is not None:
            err = WorkerCrashed(f"worker pid {worker.pid} {info.describe()}; the call of {op!r} pinned to it was not "
                                f"sent", op=op, pid=worker.pid, stderr_tail=list(worker.proc.stderr_tail()),
                                **info.as_fields())
        else:
            err = WorkerCrashed(f"worker pid {worker.pid} no longer serves (recycled or the pool is closing); the "
                                f"call of {op!r} pinned to it was not sent", op=op, pid=worker.pid,
                                classification="recycled")
        err.call_started = False  # type: ignore[attr-defined]
        return err

    def stream(self, op: str, inputs: tuple[Any, ...], idempotent: bool | None, timeout: float | None,
               kwargs: dict[str, Any]) -> Generator[Any, None, Result | None]:
        """`Client.stream(op, *inputs, **kwargs)` on a pool worker, as a generator of its chunks that
        returns the stream's final `Result` (worker timing and bytes).

        A failure is classified as for a call (a dead worker: `WorkerCrashed`, after the chunks
        already delivered). The stream is sent to another worker only while nothing of it was
        delivered, and only if it is idempotent (or never reached its worker), within
        `max_attempts`. Closing the generator cancels the stream on its worker.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        retryable = self.is_idempotent(op) if idempotent is None else bool(idempotent)
        excluded: set[int] = set()
        work_crashes: list[tuple[WorkerCrashed, ExitInfo]] = []  # a stream that crashes two is poison
        attempt = 0
        with self._admitted(op) as outcome:
            while True:
                attempt += 1
                worker, token = self.acquire(op, deadline, excluded)
                left = None if deadline is None else max(0.001, deadline - time.monotonic())
                delivered = 0
                chunks: Any = None
                try:
                    chunks = worker.client.stream(op, *inputs, timeout=left, idempotent=retryable, **kwargs)
                    for value in chunks:
                        delivered += 1
                        yield value
                except GeneratorExit:  # the consumer stopped early: cancel on the worker
                    if chunks is not None:
                        chunks.close()
                    self.release(worker, token, ok=True)
                    outcome.crashed_nothing = not work_crashes
                    raise
                except Exception as exc:
                    found = self._failed_attempt(exc, worker, token, op, work_crashes, outcome)
                    if found is None:  # the worker answered (an op error), or the stream's own timeout
                        raise
                    crash, _info = found
                    if delivered or not self._may_resend(crash, retryable, attempt):
                        raise crash from (None if crash is exc else exc)
                    self._bus.emit(events.retry(op, attempt + 1, worker.pid, crash.fields.get("classification"), 0.0))
                    excluded.add(worker.pid)
                    continue
                self.release(worker, token, ok=True)
                outcome.crashed_nothing = not work_crashes
                return chunks.result  # type: ignore[no-any-return]

    def _failed_attempt(self, exc: Exception, worker: Worker, token: int, op: str,
                        work_crashes: list[tuple[WorkerCrashed, ExitInfo]],
                        outcome: _ProbeOutcome | None = None) -> tuple[WorkerCrashed, ExitInfo | None] | None:
        """After an attempt failed: the crash it was (None: an answer of a live worker, or the call's own
        timeout, which crashed nothing: so `outcome` says), the worker released; raises `PoisonCall`
        once the call crashed two workers by itself."""
        # Still registered as running on the worker while we look: a crash is counted against this
        # op (the exit input reads `worker.running`).
        try:
            found = self._as_crash(exc, worker, op)
        finally:
            gave_up = isinstance(exc, Cancelled) and worker.proc.alive
            self.release(worker, token, ok=False, abandoned=gave_up)
        if found is not None and found[1] is not None and found[1].blames_work:
            work_crashes.append((found[0], found[1]))
            if len(work_crashes) >= 2:
                raise self._poison(op, work_crashes) from None
        if found is None and outcome is not None:
            outcome.crashed_nothing = True
        return found

    def _may_resend(self, crash: WorkerCrashed, retryable: bool, attempt: int) -> bool:
        """A failed attempt may go to another worker: the call is idempotent, or it never reached its
        worker (safe to send again), within `max_attempts`, while the pool is open."""
        never_sent = getattr(crash, "call_started", None) is False
        return (retryable or never_sent) and attempt < self.settings.max_attempts and not self._sup.closing

    def on_any_worker(self, what: str, fn: Callable[[Client], Any]) -> Any:
        worker, token = self.acquire(what, None, set())
        try:
            return fn(worker.client)
        finally:
            self.release(worker, token, ok=False)

    def _retry_delay(self, attempt: int) -> float:
        first, cap = self.settings.retry_backoff
        return min(cap, first * 2.0 ** (attempt - 1)) * random.uniform(0.5, 1.0)

    def acquire(self, op: str, deadline: float | None, excluded: set[int]) -> tuple[Worker, int]:
        """A ready worker and a token for `release`; waits for one (until the deadline) unless the
        start-up breaker says none will come."""
        wait_until = deadline if deadline is not None else time.monotonic() + self.settings.acquire_timeout_s
        with self._cond:
            while True:
                if self._sup.closing:
                    raise PoolClosed("the pool is closed", op=op)
                got = self._sup.acquire(op, excluded)
                if got is not None:
                    return got
                if not self._policy.may_start():
                    raise self._circuit_open_error(op)  # no worker is ready and none is being started
                left = wait_until - time.monotonic()
                if left <= 0:
                    what = "the call's timeout" if deadline is not None else f"{self.settings.acquire_timeout_s:g} s"
                    raise Cancelled(f"no worker became ready within {what}", op=op)
                self._cond.wait(left)

    def release(self, worker: Worker, token: int, ok: bool, abandoned: bool = False) -> None:
        with self._cond:
            unlink = self._sup.finished(worker, token, ok, abandoned)
        if unlink:  # the last call reading a dead worker's outputs is done with them
            self._unlink(worker)

    # -- failures ----------------------------------------------------------------------------------

    def _as_crash(self, exc: Exception, worker: Worker, op: str) -> tuple[WorkerCrashed, ExitInfo | None] | None:
        """The WorkerCrashed error (and the exit) for a failed call if its worker died; None when the
        failure is an answer of a live worker (an op error) or the call's own timeout.

        Whatever the transport said (UNAVAILABLE, a reset stream, a client closed under the call, a
        deadline passed while the worker died) becomes WORKER_CRASHED once the worker is known dead.
        """
        proc = worker.proc
        transport = isinstance(exc, (WorkerCrashed, ClientClosed)) or (
            isinstance(exc, OpFailed) and str(exc.fields.get("exception_type", "")).startswith("grpc."))
        if isinstance(exc, SidecarError) and not transport and not isinstance(exc, Cancelled):
            return None  # the worker's own answer (an op error), even if it died right after
        wait = self.settings.crash_detect_s if transport or proc.exit_info is not None else 0.0
        info = proc.wait_exit(wait)
        started = getattr(exc, "call_started", None)
        if info is None:
            if not transport:
                return None
            # Alive but unreachable: still a failed attempt that may be retried.
            crash = exc if isinstance(exc, WorkerCrashed) else WorkerUnreachable(
                f"worker pid {proc.pid} could not be reached while running {op!r}: {exc}", op=op, pid=proc.pid,
                classification="unreachable")
            crash.call_started = started  # type: ignore[attr-defined]
            return crash, None
        tail = proc.stderr_tail()
        message = f"worker pid {proc.pid} {info.describe()} while running {op!r}"
        summary = summarize_tail(tail)
        if summary:
            message += f"; last output: {summary}"
        message += ("; the call had not reached the worker" if started is False else
                    "; the call had been sent to the worker, which may have started it")
        fields = info.as_fields()
        if isinstance(exc, SidecarError) and exc.fields.get("request_id"):
            fields["request_id"] = exc.fields["request_id"]
        crash = WorkerCrashed(message, op=op, pid=proc.pid, stderr_tail=tail, **fields)
        crash.call_started = started  # type: ignore[attr-defined]
        return crash, info

    def _poison(self, op: str, crashes: list[tuple[WorkerCrashed, ExitInfo]]) -> PoisonCall:
        named = ", ".join(f"pid {c.pid} ({i.classification.value}"
                          f"{', ' + i.signal_name if i.signal_name else ''})" for c, i in crashes)
        last, info = crashes[-1]
        summary = summarize_tail(last.stderr_tail or [])
        err = PoisonCall(f"the call of {op!r} crashed {len(crashes)} workers: {named}; it is not sent to "
                         f"another worker{'; last output: ' + summary if summary else ''}",
                         op=op, pid=last.pid, stderr_tail=last.stderr_tail, request_id=last.request_id,
                         **info.as_fields())
        err.crashes = [{"pid": c.pid, **i.as_fields()} for c, i in crashes]
        err.call_started = None  # type: ignore[attr-defined]
        return err

    def _circuit_open_error(self, op: str) -> CircuitOpen:
        b = self._policy.start_breaker
        return _circuit_open(f"start-up circuit breaker {b.state.value} after {b.recent_failures()} start-up "
                             f"failures within {b.window_s:g} s, and no worker is ready; next probe in "
                             f"{b.retry_after():.1f} s", op, self._policy.start_evidence)

    def _op_circuit_open_error(self, op: str) -> CircuitOpen:
        b = self._policy.op_breakers.get(op)
        assert b is not None
        return _circuit_open(f"circuit breaker of op {op!r} {b.state.value} after {b.recent_failures()} workers "
                             f"crashed running it within {b.window_s:g} s; next try in {b.retry_after():.1f} s",
                             op, self._policy.op_evidence.get(op))


def _circuit_open(message: str, op: str, last: Evidence | None) -> CircuitOpen:
    """CircuitOpen for `op`, naming the last crash the breaker counted (its exit fields and output)."""
    if last is None:
        return CircuitOpen(message, op=op)
    return CircuitOpen(f"{message}; last crash: worker pid {last.pid} {last.exit.describe()}", op=op, pid=last.pid,
                       stderr_tail=list(last.stderr_tail), **last.exit.as_fields())
