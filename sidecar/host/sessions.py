"""Sessions of a pool: calls with affinity to one worker, sharing that worker's `ctx.session` state.

    with pool.session() as s:             # pinned to the least busy worker
        s.call("kv_append", tokens)       # every call of `s` runs on that worker, same ctx.session
        s.call("kv_append", more)

- Strict affinity (the default): every call goes to the session's worker and waits there if it is
  busy. `mode="prefer"`: a call of an op that takes no context (ListOps `takes_context` false: it
  cannot see session state) goes to the least busy worker when the session's worker is busy.
- The worker frees the session's state when the session closes (`close()`, leaving the `with`) or
  after `ttl_s` without a call (default: the worker's --session-ttl).
- When the session's worker dies (or is recycled), its state is gone: the next call, and a call
  that was running when it died, fail with SESSION_LOST (session id, the worker's pid and the
  crash's classification), and so does every later call of the session. Unless the session has a
  `restore` hook: then it is pinned to another worker, `restore(session)` rebuilds the state
  (through `session.call`), and the calls go on; a call that was running when the worker died
  still fails with its WORKER_CRASHED. Either way a `session_lost` event is published.
"""
from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from typing_extensions import Self  # typing.Self is 3.11+; the package supports 3.10

from sidecar.errors import InvalidArgument, SessionLost, SidecarError, WorkerCrashed
from sidecar.host import events
from sidecar.host.supervisor import Worker

if TYPE_CHECKING:
    from sidecar.host.client import Result
    from sidecar.host.pool import Pool

log = logging.getLogger(__name__)

__all__ = ["SESSION_MODES", "Session"]

SESSION_MODES = ("strict", "prefer")


class Session:
    """A pool session (see the module doc); made by `Pool.session()`. Thread-safe; its calls may
    run concurrently (they then share `ctx.session` concurrently, the ops' concern)."""

    def __init__(self, pool: Pool, *, mode: str = "strict", ttl_s: float | None = None,
                 restore: Callable[[Session], None] | None = None, timeout: float | None = None) -> None:
        if mode not in SESSION_MODES:
            raise InvalidArgument(f"session mode must be one of {', '.join(SESSION_MODES)}, got {mode!r}",
                                  field="mode", expected=" or ".join(SESSION_MODES), got=str(mode))
        if ttl_s is not None and not ttl_s > 0:
            raise InvalidArgument(f"ttl_s must be > 0 seconds, got {ttl_s!r}", field="ttl_s")
        self.id = secrets.token_hex(8)
        self.mode = mode
        self.ttl_s = float(ttl_s or 0.0)
        self._pool = pool
        self._restore = restore
        self._lock = threading.RLock()  # a restore hook's own calls come back through it
        self._closed = False
        self._lost: SessionLost | None = None
        self._restoring = False
        self._worker = self._pick(timeout)

    # -- what it is pinned to ----------------------------------------------------------------------

    @property
    def pid(self) -> int:
        """The pid of the session's worker (another one after a restore)."""
        return self._worker.pid

    @property
    def lost(self) -> bool:
        return self._lost is not None

    def _pick(self, timeout: float | None) -> Worker:
        deadline = None if timeout is None else time.monotonic() + timeout
        worker, token = self._pool._scheduler.acquire("<session>", deadline, set())
        self._pool._scheduler.release(worker, token, ok=False)
        return worker

    # -- calls -------------------------------------------------------------------------------------

    def call(self, op: str, *inputs: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        """Runs `op` on the session's worker, in the session (see `Client.call`)."""
        return self._invoke("call", op, inputs, timeout, kwargs)

    def execute(self, op: str, *inputs: Any, timeout: float | None = None, **kwargs: Any) -> Result:
        return self._invoke("execute", op, inputs, timeout, kwargs)  # type: ignore[no-any-return]

    def _invoke(self, method: str, op: str, inputs: tuple[Any, ...], timeout: float | None,
                kwargs: dict[str, Any]) -> Any:
        pool = self._pool
        pool._check_process()
        if self._closed:
            raise InvalidArgument(f"session {self.id} is closed", field="session_id", session_id=self.id)
        worker = self._current(op)
        if self.mode == "prefer" and not self._restoring and worker.inflight > 0 \
                and not pool._resources.takes_context(op):
            return pool._scheduler.invoke(method, op, inputs, None, timeout, kwargs)  # stateless: anywhere
        try:
            return pool._scheduler.invoke_on(worker, method, op, inputs, timeout,
                                             dict(kwargs, session_id=self.id, session_ttl_s=self.ttl_s))
        except WorkerCrashed as crash:
            if self._serves(worker):
                raise  # never reached it, or unreachable for a moment: not dead, the state is still there
            self._worker_died(worker, crash)  # raises SessionLost, unless restored
            raise  # restored: the call that was running when the worker died still failed

    def _serves(self, worker: Worker) -> bool:
        with self._pool._lock:
            return self._pool._sup.serves(worker)

    def _current(self, op: str) -> Worker:
        """The session's worker, restored onto another one first if it died; SessionLost if it is
        gone and the session has no restore hook."""
        with self._lock:
            if self._lost is not None:
                raise self._lost_again()
            worker = self._worker
        if self._restoring or self._serves(worker):
            return worker
        self._worker_died(worker, None)
        return self._worker

    def _worker_died(self, worker: Worker, crash: WorkerCrashed | None) -> None:
        with self._lock:
            if self._lost is not None:
                raise self._lost_again()
            if self._worker is not worker:
                return  # another call of this session restored it already
            info = worker.proc.wait_exit(self._pool.settings.crash_detect_s)
            classification = info.classification.value if info is not None else (
                str(crash.fields.get("classification")) if crash is not None and crash.fields.get("classification")
                else "recycled")
            fields: dict[str, Any] = {"session_id": self.id, "pid": worker.pid, "classification": classification}
            if info is not None:
                fields.update({k: v for k, v in info.as_fields().items() if k in ("exit_code", "signal")})
            what = info.describe() if info is not None else "no longer serves (recycled)"
            if self._restore is None:
                self._lost = SessionLost(f"session {self.id} lost: its worker pid {worker.pid} {what}; its state "
                                         f"(ctx.session) is gone. Open a new session, or give pool.session() a "
                                         f"restore hook that rebuilds it", **fields)
                self._pool.events_bus.emit(events.session_lost(self.id, worker.pid, classification, False, None))
                raise self._lost_again() from crash
            t0 = time.monotonic()
            self._restoring = True
            try:
                self._worker = self._pick(None)
                self._restore(self)
            except Exception as exc:
                self._lost = SessionLost(f"session {self.id} lost: its worker pid {worker.pid} {what}, and its "
                                         f"restore hook failed: {type(exc).__name__}: {exc}", **fields)
                self._pool.events_bus.emit(events.session_lost(self.id, worker.pid, classification, False, None))
                raise self._lost_again() from exc
            finally:
                self._restoring = False
            log.info("session %s restored on worker pid %d after pid %d %s", self.id, self._worker.pid, worker.pid,
                     what)
            self._pool.events_bus.emit(events.session_lost(self.id, worker.pid, classification, True,
                                                           time.monotonic() - t0))

    def _lost_again(self) -> SessionLost:
        """A fresh copy of the loss (each raise gets its own traceback)."""
        assert self._lost is not None
        return SessionLost(self._lost.message, **self._lost.fields)

    # -- closing -----------------------------------------------------------------------------------

    def close(self) -> None:
        """Frees the session's state on its worker (if it still lives). Idempotent."""
        if self._closed:
            return
        self._closed = True
        worker = self._worker
        if self._lost is None and self._serves(worker):
            try:
                worker.client.close_session(self.id)
            except SidecarError as err:  # the worker died meanwhile: its state went with it
                log.debug("closing session %s on pid %d: %s", self.id, worker.pid, err)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "lost" if self._lost else f"pid {self._worker.pid}"
        return f"<Session {self.id} {self.mode} {state}>"
