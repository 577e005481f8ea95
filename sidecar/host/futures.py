"""Futures of calls: `pool.submit(...)` / `client.submit(...)` return a `concurrent.futures.Future`
whose `cancel()` also stops the call in its worker.

A `CallFuture` stays *pending* while its call runs (`running()` is False until it is done): that is
what lets `cancel()` succeed at any moment before the result is in, as a user of `Future` expects
of a call that a worker runs. Cancelling marks the future cancelled (its callbacks and waiters
see it at once) and cancels the RPC through the call's `CancelScope`: the worker sees its caller
gone (`ctx.is_cancelled()` turns True, a paused or queued call ends) and releases whatever the
call produced. A result that arrives anyway is dropped (its outputs' leases are released when they
are collected).
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from typing import Any

__all__ = ["CallFuture", "CancelScope", "FutureRunner"]

DEFAULT_FUTURE_THREADS = 32  # calls a host runs in the background at once (more wait their turn)


class CancelScope:
    """Lets another thread cancel the RPC one call is waiting on. Thread-safe; cancel is sticky."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cancelled = False
        self._cancel_rpc: Callable[[], Any] | None = None

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def attach(self, cancel_rpc: Callable[[], Any]) -> None:
        """The call's RPC is out: `cancel_rpc()` ends it (at once if the scope is already cancelled)."""
        with self._lock:
            self._cancel_rpc = cancel_rpc
            now = self._cancelled
        if now:
            cancel_rpc()

    def detach(self) -> None:
        with self._lock:
            self._cancel_rpc = None

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            cancel_rpc = self._cancel_rpc
        if cancel_rpc is not None:
            cancel_rpc()


class CallFuture(Future[Any]):
    """A `Future` of one call; see the module doc for what `cancel()` does."""

    def __init__(self, scope: CancelScope) -> None:
        super().__init__()
        self.scope = scope

    def cancel(self) -> bool:
        if not super().cancel():
            return False  # done already
        self.scope.cancel()
        return True


class FutureRunner:
    """The threads that run submitted calls (started on first use); `close()` ends them."""

    def __init__(self, max_workers: int = DEFAULT_FUTURE_THREADS, name: str = "sidecar-future") -> None:
        self._max_workers = max_workers
        self._name = name
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._pending: set[CallFuture] = set()  # cancelled at close(), so that none waits for ever

    def submit(self, fn: Callable[[CancelScope], Any]) -> CallFuture:
        """`fn(scope)` on a background thread; its result or exception resolves the future."""
        scope = CancelScope()
        future = CallFuture(scope)

        def run() -> None:
            if future.cancelled():
                return
            try:
                value = fn(scope)
            except BaseException as exc:  # noqa: BLE001 - whatever the call raised is the future's
                try:
                    future.set_exception(exc)
                except InvalidStateError:  # cancelled meanwhile: the error is the cancellation's
                    pass
                return
            try:
                future.set_result(value)
            except InvalidStateError:  # cancelled meanwhile: the result is dropped
                pass

        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self._max_workers, thread_name_prefix=self._name)
            self._pending.add(future)
            self._executor.submit(run)
        future.add_done_callback(self._forget)
        return future

    def _forget(self, future: Future[Any]) -> None:
        with self._lock:
            self._pending.discard(future)  # type: ignore[arg-type,unused-ignore]

    def close(self) -> None:
        """Cancels the futures not done yet (their calls are cancelled in the workers) and ends the threads."""
        with self._lock:
            executor, self._executor = self._executor, None
            pending, self._pending = list(self._pending), set()
        for future in pending:
            future.cancel()
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
