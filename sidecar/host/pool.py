"""`Pool`: N sidecar workers behind one call interface, supervised so that nothing they do takes the
host down or leaks.

- Spawn: every worker is `sidecar serve` with the handshake (`sidecar.host.spawn`); replacements are
  forked from a template process that already imported torch (`sidecar.host.template`), or taken
  from warm spares, or started cold.
- Route: each call goes to the least busy ready worker.
- Crash barrier: every exit is classified (`sidecar.host.crash`); calls in flight on a dead worker get
  `WorkerCrashed` (exit code, signal, classification, last stderr lines, pid, whether the call had
  reached the worker), or, when idempotent, are retried on another worker; a call that crashed a
  worker by itself is retried at most once, and one that crashed two is failed with `PoisonCall`;
  the dead worker's shared memory is unlinked (once no call still reads it) and its leases dropped;
  a replacement starts (immediately after a first crash, then with backoff).
- Breakers (`sidecar.host.breaker`): a start-up breaker stops start-up crash loops (calls still run
  on ready workers), and one breaker per op fails calls of an op that keeps crashing workers with
  `CircuitOpen`. External kills of workers count nowhere.
- Health: a worker that fails its health checks is killed ("unresponsive"); one that reports
  NOT_SERVING because a cancelled call is still running past its grace period is recycled: no more
  calls, SIGTERM, SIGKILL after `grace_s` ("stuck").
- The template may die on its own: workers outlive it, and the pool starts a new one.
- Events: crash, restart, retry, recycle, breaker_open/half_open/close, template_restart go to
  subscribers and into the merged telemetry stream (`watch_telemetry`).
- Close: SIGTERM (workers drain), grace, SIGKILL of each process group; then nothing of the run is
  left in /dev/shm. If the host dies instead, the template kills the workers and reaps the run.
- Fork: a Pool belongs to the process that created it; in a forked child every use raises
  `WrongProcess` (and closing it there touches nothing of the parent's); it cannot be pickled.

How it is built (one concept per module): `settings` (the parameters and the workers' command line
and environment), `supervisor` (the one state machine of slots, spares included) with `policy` (what
a death means, when a slot restarts, the breakers), `launcher` (template, spawn, handshake, connect),
`scheduler` (routing, retries, the poison-call guard), `events` (the catalogue of events),
`pool_telemetry` (the merged stream). This module is the shell: it feeds the state machine its inputs
(worker ready, launch failed, worker exited, call finished, health result, timer) under one lock and
carries out the effects it returns once the lock is released.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

from sidecar.dataplane import reaper
from sidecar.dataplane.arena import Arena
from sidecar.errors import SidecarError
from sidecar.host import events, liveness
from sidecar.host.breaker import CircuitBreaker, OpBreakers
from sidecar.host.client import Result, WrongProcess
from sidecar.host.crash import Classification, ExitInfo, oom_kill_count
from sidecar.host.events import EventBus, EventStream, PoolEvent
from sidecar.host.futures import CallFuture, FutureRunner
from sidecar.host.launcher import LAUNCH_ERRORS, Launcher, start_failure
from sidecar.host.leases import empty_in
from sidecar.host.policy import SupervisionPolicy
from sidecar.host.pool_telemetry import PoolTelemetry
from sidecar.host.resources import PoolResources, PoolWorker, Recipe, RestoreFailed, WorkerResult
from sidecar.host.scheduler import CallScheduler, PoisonCall, PoolClosed
from sidecar.host.sessions import Session
from sidecar.host.settings import PoolSettings
from sidecar.host.streams import PoolStream
from sidecar.host.supervisor import (Attach, Dispose, Effect, Launch, Publish, Role, Signal, Slot, StartFailure,
                                     Supervisor, Watch, Worker, WorkerState, WorkerStatus)
from sidecar.host.template import Template
from sidecar.protocol.limits import DEFAULT_INLINE_THRESHOLD

log = logging.getLogger(__name__)

__all__ = ["Pool", "PoolClosed", "PoisonCall", "WorkerState", "WorkerStatus", "PoolTelemetry", "Session",
           "PoolWorker", "WorkerResult", "Recipe"]


class Pool:
    """A supervised pool of sidecar workers. See `guides/crash-barrier.md` for every default.

    Parameters (seconds unless named otherwise):
      workers: how many workers serve calls (default 2).
      device, ops, debug_ops, worker_args: what each worker runs (`sidecar serve --device/--ops/
        --debug-ops ...`); env: the workers' environment (default: this process's); threads: compute
        threads per worker (sets SIDECAR_THREADS; default: $SIDECAR_THREADS, else the CPUs divided
        among the workers).
      gpus: GPUs to spread workers over (a count or CUDA_VISIBLE_DEVICES entries); default: found with
        NVML (or this process's CUDA_VISIBLE_DEVICES) when device is "auto"/"cuda". With more than
        one, worker i sees only GPU i mod len(gpus).
      run_id: the run's segment-name prefix (default: random).
      start_timeout (60): a worker that is not ready in this time is killed and counted as a crash.
      max_attempts (3): tries of an idempotent call whose worker died (first try included); a call
        whose attempt crashed a worker by itself gets one retry at most (a second crash: PoisonCall).
        A call that never reached its worker (the worker was already gone) is retried whatever it is.
      retry_backoff ((0.01, 1.0)): delay before retry n is uniform(0.5, 1) x min(cap, initial x 2^(n-1)).
      restart_backoff ((0.1, 5.0)): a slot's first crash restarts at once; each further crash before a
        worker of that slot served a call (or lived `stable_after_s`, 5) waits initial x 2^(k-1), capped.
      breaker_threshold (5), breaker_window_s (30), breaker_cooldown_s (5): that many start-up
        failures within the window open the start-up breaker (`pool.breaker`): no worker starts,
        calls still run on ready workers (CircuitOpen only when none is); after the cool-down one
        probe worker starts, and once it is ready and healthy the breaker closes. The same settings
        drive one breaker per op (`pool.op_breakers`), counting workers that crashed by themselves
        while running calls of that op: while it is open, calls of that op fail fast with
        CircuitOpen; after the cool-down one call of the op is the probe. Kills from outside count
        nowhere (see `sidecar.host.breaker`).
      use_template (True): fork replacements from a template that imported torch (else start cold).
      spares (None = 1 for a GPU pool, 0 otherwise): warm spare workers kept ready to take a crashed
        worker's place instantly.
      health_interval_s (5; 0 = off), health_timeout_s (2), health_failures (3): a worker that fails
        that many health checks in a row is killed (classification "unresponsive") and replaced; one
        that answers NOT_SERVING is recycled at once (no new calls, SIGTERM, SIGKILL after grace_s).
      cancel_grace_s (10): how long a cancelled call (its caller's timeout passed) may keep running
        in a worker; past it the worker reports NOT_SERVING, and the pool recycles it ("stuck").
      crash_detect_s (1): after a call fails with a transport error, how long to wait for the
        worker's exit status before treating the error as not a crash.
      acquire_timeout_s (default start_timeout): how long a call without timeout waits for a ready
        worker (e.g. while all restart) before `Cancelled`.
      grace_s (5): how long `close()` lets workers drain after SIGTERM before SIGKILL (also passed to
        the workers as --grace-period).
      lease_ttl_s (None = 300), max_leases (None = 10000): the workers' --lease-ttl / --max-leases: an
        output not released within the TTL, or beyond the cap, is reclaimed (unlinked, never reused).
    """

    def __init__(self, workers: int = 2, *, device: str = "auto", ops: Sequence[str] = (),
                 debug_ops: bool = False, run_id: str | None = None, start_timeout: float = 60.0,
                 max_attempts: int = 3, retry_backoff: tuple[float, float] = (0.01, 1.0),
                 restart_backoff: tuple[float, float] = (0.1, 5.0), stable_after_s: float = 5.0,
                 breaker_threshold: int = 5, breaker_window_s: float = 30.0, breaker_cooldown_s: float = 5.0,
                 use_template: bool = True, spares: int | None = None, worker_args: Sequence[str] = (),
                 env: Mapping[str, str] | None = None, gpus: int | Sequence[str | int] | None = None,
                 threads: int | None = None, health_interval_s: float = 5.0, health_timeout_s: float = 2.0,
                 health_failures: int = 3, crash_detect_s: float = 1.0, acquire_timeout_s: float | None = None,
                 grace_s: float = 5.0, inline_threshold: int = DEFAULT_INLINE_THRESHOLD, python: str = sys.executable,
                 tail_lines: int = 40, lease_ttl_s: float | None = None, max_leases: int | None = None,
                 cancel_grace_s: float = 10.0) -> None:
        s = self.settings = PoolSettings.build(
            workers, device=device, ops=ops, debug_ops=debug_ops, run_id=run_id, start_timeout=start_timeout,
            max_attempts=max_attempts, retry_backoff=retry_backoff, restart_backoff=restart_backoff,
            stable_after_s=stable_after_s, breaker_threshold=breaker_threshold, breaker_window_s=breaker_window_s,
            breaker_cooldown_s=breaker_cooldown_s, use_template=use_template, spares=spares,
            worker_args=worker_args, env=env, gpus=gpus, threads=threads, health_interval_s=health_interval_s,
            health_timeout_s=health_timeout_s, health_failures=health_failures, crash_detect_s=crash_detect_s,
            acquire_timeout_s=acquire_timeout_s, grace_s=grace_s, inline_threshold=inline_threshold,
            python=python, tail_lines=tail_lines, lease_ttl_s=lease_ttl_s, max_leases=max_leases,
            cancel_grace_s=cancel_grace_s)
        self.run_id = s.run_id
        self.device = s.device
        self.use_template = s.use_template
        self._owner_pid = os.getpid()
        self._policy = SupervisionPolicy(restart_backoff=s.restart_backoff, stable_after_s=s.stable_after_s,
                                         breaker_threshold=s.breaker_threshold, breaker_window_s=s.breaker_window_s,
                                         breaker_cooldown_s=s.breaker_cooldown_s)
        self.breaker: CircuitBreaker = self._policy.start_breaker
        self.op_breakers: OpBreakers = self._policy.op_breakers
        self._sup = Supervisor(self._policy, s.workers, s.spares, gpu_of_worker=s.gpu_of_worker,
                               gpu_of_spare=s.gpu_of_spare, health_failures=s.health_failures, grace_s=s.grace_s,
                               run_id=s.run_id)
        self.events_bus = EventBus()
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._closed = False
        self._threads: list[threading.Thread] = []
        self._telemetry: list[PoolTelemetry] = []
        self._observer: Any = None       # sidecar.observe.PoolObserver, made on first use
        self._call_observer: Any = None  # its call hook (None: calls are not timed or recorded)
        self._futures = FutureRunner(name="sidecar-pool-future")  # pool.submit's threads

        reaper.reap_dead_owners()  # runs of hosts that died without closing their pools
        self._arena = Arena(self.run_id)
        self._launcher = Launcher(s, self._arena, self._template_died)
        self._scheduler = CallScheduler(s, self._sup, self._policy, self._cond, self.events_bus,
                                        self._unlink_dead)
        self._resources = PoolResources(self)  # recipes replayed on new workers; broadcast; pinning
        try:
            self._launcher.start_template()
            self._start_initial()
        except BaseException:
            self.close()
            raise
        self._spawn_thread(self._timer_loop, "sidecar-pool-timer")
        if s.health_interval_s > 0:
            self._spawn_thread(self._health_loop, "sidecar-pool-health")

    # ---------------------------------------------------------------------------------------------
    # the shell: inputs in, effects out

    def _feed(self, input_: Callable[..., list[Effect]], *args: Any) -> None:
        """Hands one input to the state machine under the lock, then carries out its effects."""
        with self._cond:
            effects = input_(*args)
            self._cond.notify_all()  # callers waiting for a worker, and the timer, look again
        self._apply(effects)

    def _apply(self, effects: list[Effect]) -> None:
        for effect in effects:
            if isinstance(effect, Publish):
                self.events_bus.emit(effect.event)
            elif isinstance(effect, Launch):
                self._spawn_thread(self._launch, f"sidecar-pool-launch-{effect.slot.label}", effect.slot,
                                   effect.probe)
            elif isinstance(effect, Watch):
                w = effect.worker
                w.proc.add_exit_callback(lambda info, w=w: self._worker_exited(w, info))
            elif isinstance(effect, Attach):
                self._telemetry_attach(effect.worker)
            elif isinstance(effect, Signal):
                proc = effect.worker.proc
                if effect.classification is not None:
                    proc.classify_as(effect.classification)
                if effect.kill:
                    proc.kill()
                else:
                    proc.terminate()
            elif isinstance(effect, Dispose):
                self._dispose(effect.worker, effect.kill)

    def _start_initial(self) -> None:
        """The first workers: every serving slot's, at once; the constructor raises the first failure."""
        with self._cond:
            effects = self._sup.start()
        first = [e for e in effects if isinstance(e, Launch) and e.slot.role is Role.SERVING]
        errors: list[BaseException] = []

        def bring_up(launch: Launch) -> None:
            try:
                self._launch(launch.slot, launch.probe, initial=True)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        starters = [threading.Thread(target=bring_up, args=(e,), daemon=True) for e in first]
        self._apply([e for e in effects if e not in first])  # the spares, in the background
        for t in starters:
            t.start()
        for t in starters:
            t.join()
        if errors:
            raise errors[0]

    def _launch(self, slot: Slot, probe: bool, initial: bool = False) -> None:
        """On a launch thread: a ready worker for `slot`, fed to the state machine either way."""
        t0 = time.monotonic()
        try:
            proc, client = self._launcher.launch(slot.gpu, probe=probe)
        except Exception as exc:
            if not isinstance(exc, LAUNCH_ERRORS):  # a bug: still a failed start, or the slot would never restart
                log.exception("pool %s: starting a worker for slot %d failed", self.run_id, slot.index)
            if initial:
                raise
            self._feed(self._sup.launch_failed, slot, start_failure(exc), probe)
            return
        # The cgroup's OOM-kill count now, to confirm an OOM kill when it dies of SIGKILL.
        worker = Worker(pid=proc.pid, via=proc.via, address=proc.address, gpu=slot.gpu, proc=proc, client=client,
                        oom_kills=oom_kill_count())
        # What the pool loaded is replayed before the worker gets a call (sidecar.host.resources);
        # a recipe that changed meanwhile makes it look again, under the lock `launched` runs in.
        ready_at = time.monotonic()
        restored: dict[str, Recipe] = {}
        while True:
            try:
                version = self._resources.restore(worker, restored)
            except Exception as exc:  # noqa: BLE001 - refused, or a bug: either way this worker is not used
                if not isinstance(exc, (RestoreFailed, SidecarError)):
                    log.exception("pool %s: restoring worker pid %d failed", self.run_id, worker.pid)
                self._restore_failed(slot, worker, exc)
                return
            with self._cond:
                if version != self._resources.version:
                    continue
                effects = self._sup.launched(slot, worker, time.monotonic() - t0, probe)
                self._cond.notify_all()
            break
        if restored:
            self.events_bus.emit(events.resource_restored(slot.label, worker.pid, worker.via, sorted(restored),
                                                          time.monotonic() - ready_at, time.monotonic() - t0))
        self._apply(effects)
        self._scheduler.learn_ops(client)

    def _restore_failed(self, slot: Slot, worker: Worker, exc: Exception) -> None:
        """A new worker could not replay the pool's resources: killed, reported, never used."""
        err = exc.error if isinstance(exc, RestoreFailed) else exc
        resource = exc.recipe.name if isinstance(exc, RestoreFailed) else ""
        kind = err.kind.value if isinstance(err, SidecarError) else type(err).__name__
        log.warning("pool %s: worker pid %d could not restore the pool's resources: %s", self.run_id, worker.pid, exc)
        self.events_bus.emit(events.restore_failed(slot.label, worker.pid, worker.via, resource, kind, str(exc)))
        tail = tuple(worker.proc.stderr_tail())
        died = worker.proc.exit_info
        self._launcher.discard(worker.proc, worker.client)  # killed while restoring: that death, not a refusal
        failure = StartFailure(died if died is not None else ExitInfo(Classification.RESTORE_FAILED), worker.pid, tail,
                               f"worker pid {worker.pid}: {str(exc).splitlines()[0]}")
        self._feed(self._sup.launch_failed, slot, failure, False)

    def _worker_exited(self, worker: Worker, info: ExitInfo) -> None:
        """On the worker's watcher thread, as soon as its exit status is known."""
        if info.signal == signal.SIGKILL and worker.oom_kills is not None:
            now = oom_kill_count()
            info = info.with_oom(now is not None and now > worker.oom_kills)
        self._feed(self._sup.exited, worker, info, tuple(worker.proc.stderr_tail()))

    def _timer_loop(self) -> None:
        """Backoffs, probes and grace periods: `tick` whenever the next one is due."""
        with self._cond:
            while not self._stop.is_set():
                due = self._sup.next_due()
                now = time.monotonic()
                if due is None or due > now:
                    self._cond.wait(None if due is None else due - now)
                    continue
                effects = self._sup.tick()
                self._cond.notify_all()
                self._cond.release()
                try:
                    self._apply(effects)
                finally:
                    self._cond.acquire()

    def _health_loop(self) -> None:
        s = self.settings
        while not self._stop.wait(s.health_interval_s):
            with self._cond:
                workers = self._sup.serving_workers()
            for worker in workers:
                if self._stop.is_set():
                    return
                cpu_before, started = liveness.cpu_seconds(worker.pid), time.monotonic()
                try:
                    status: str | None = worker.client.health(timeout=s.health_timeout_s)
                except Exception:  # noqa: BLE001 - unreachable, timed out, or its client closed as it died
                    status = None
                if status is None and liveness.was_busy(cpu_before, liveness.cpu_seconds(worker.pid),
                                                        time.monotonic() - started):
                    status = liveness.BUSY  # computing (the GIL held in C), not hung: never killed for it
                if worker.proc.alive:  # a dead one's exit is the news, not its silence
                    self._feed(self._sup.health, worker, status)

    def _spawn_thread(self, target: Callable[..., Any], name: str, *args: Any) -> threading.Thread:
        t = threading.Thread(target=target, args=args, name=name, daemon=True)
        with self._lock:
            self._threads = [x for x in self._threads if x.is_alive()]
            self._threads.append(t)
        t.start()
        return t

    def _dispose(self, worker: Worker, kill: bool) -> None:
        """Forgets a worker: kill it if asked, drop its connection and leases, unlink its segments.

        The client refuses new calls at once and closes its channel when the calls in flight end; the
        dead worker's segments are unlinked once no call of ours is still reading an output from them
        (an answer that arrived just before the death is then still delivered).
        """
        proc = worker.proc
        if kill:
            proc.kill()
            proc.wait_exit(5.0)
        try:
            worker.client.close()
        except Exception:  # noqa: BLE001 - the worker is gone; nothing to release on its side
            pass
        if proc.alive:
            return
        with self._lock:
            now = self._sup.unlink_later(worker)
        if now:
            self._unlink_dead(worker)

    def _unlink_dead(self, worker: Worker) -> None:
        self._launcher.unlink_dead(worker.proc)

    def _template_died(self) -> None:
        """The template died on its own: its workers live on (they watch the host, not it). A new
        template forks the next replacements and becomes the guardian of every live worker."""
        if self._sup.closing:
            return
        log.warning("pool %s: template process died; starting a new one", self.run_id)

        def live_pids() -> list[int]:
            with self._lock:
                return [w.pid for w in self._sup.live_workers() if w.proc.alive]

        def restart() -> None:
            try:
                pid, dead_pid, watched = self._launcher.restart_template(live_pids)
            except Exception:
                log.exception("pool %s: cannot restart the template; workers start cold", self.run_id)
                return
            self.events_bus.emit(events.template_restart(pid, dead_pid, watched))
        self._spawn_thread(restart, "sidecar-pool-template")

    # ---------------------------------------------------------------------------------------------
    # calls

    def call(self, op: str, *inputs: Any, idempotent: bool | None = None, timeout: float | None = None,
             **kwargs: Any) -> Any:
        """Runs `op` on the least busy worker (see `Client.call` for inputs, `out=`, placement, attrs).

        `idempotent` (default: what the op declares in ListOps) allows retrying the call on another
        worker when its worker crashes. `timeout` bounds the whole call, retries and waiting
        included. Raises the op's structured error, `WorkerCrashed`, `CircuitOpen` or `PoolClosed`.
        """
        return self._invoke("call", op, inputs, idempotent, timeout, kwargs)

    def execute(self, op: str, *inputs: Any, idempotent: bool | None = None, timeout: float | None = None,
                **kwargs: Any) -> Result:
        """Like `call`, but returns the `Result` (outputs, timing, device, leases, bytes)."""
        return self._invoke("execute", op, inputs, idempotent, timeout, kwargs)  # type: ignore[no-any-return]

    def stream(self, op: str, *inputs: Any, idempotent: bool | None = None, timeout: float | None = None,
               **kwargs: Any) -> PoolStream:
        """Runs a streaming op on the least busy worker: an iterator of its chunks (see
        `Client.stream` for max_chunks/max_bytes and what chunks look like). A worker dying
        mid-stream ends it with `WorkerCrashed` after the chunks delivered; it is retried on another
        worker only if idempotent and nothing was delivered yet. `close()` (or leaving `with`)
        cancels it on the worker."""
        self._check_process()
        chunks: Iterator[Any] = self._scheduler.stream(op, inputs, idempotent, timeout, kwargs)
        observer = self._recording()
        if observer is not None:  # the observer times and records the stream when it ends
            chunks = observer.observe_stream(op, chunks)
        return PoolStream(chunks)

    def submit(self, op: str, *inputs: Any, idempotent: bool | None = None, timeout: float | None = None,
               **kwargs: Any) -> CallFuture:
        """Runs `call(op, *inputs, ...)` in the background: a `concurrent.futures.Future` of its
        result. Its `cancel()` also cancels the call on the worker (see `sidecar.host.futures`)."""
        self._check_process()
        return self._futures.submit(
            lambda scope: self.call(op, *inputs, idempotent=idempotent, timeout=timeout, cancel_scope=scope, **kwargs))

    def hardware(self) -> dict[str, Any]:
        """What a ready worker sees (GetHardware): CPU, CUDA devices, MPS and the device it runs ops on."""
        self._check_process()
        return self._scheduler.on_any_worker("GetHardware", lambda client: client.hardware())  # type: ignore[no-any-return]

    def list_ops(self) -> list[Any]:
        """Every op the workers serve (ListOps of a ready worker)."""
        self._check_process()
        return self._scheduler.on_any_worker("ListOps", lambda client: client.list_ops())  # type: ignore[no-any-return]

    def empty(self, shape: int | Sequence[int], dtype: Any = "float32", *, torch: bool = False) -> Any:
        """An array (or CPU torch tensor) in the pool's shared arena: passed to `call`, it crosses to
        whichever worker runs the call as a descriptor only, with no copy (see `Client.empty`)."""
        self._check_process()
        return empty_in(self._arena, shape, dtype, torch=torch)

    def is_idempotent(self, op: str) -> bool:
        """What ListOps says about `op` (False for ops it does not know)."""
        return self._scheduler.is_idempotent(op)

    def _invoke(self, method: str, op: str, inputs: tuple[Any, ...], idempotent: bool | None,
                timeout: float | None, kwargs: dict[str, Any]) -> Any:
        self._check_process()
        hook = self._call_observer
        if hook is not None:  # metrics are on: the observer times and records the call around the run
            return hook(self._scheduler.invoke, method, op, inputs, idempotent, timeout, kwargs)
        return self._scheduler.invoke(method, op, inputs, idempotent, timeout, kwargs)

    # ---------------------------------------------------------------------------------------------
    # resources, sessions, addressing (sidecar.host.resources / sessions; guides/models-and-sessions.md)

    def load(self, name: str, loader: str, *, gpu: str | int | None = None, timeout: float | None = None,
             **kwargs: Any) -> list[dict[str, Any]]:
        """Runs `loader` (a `@sidecar.resource`: its declared name or "module.function") with `kwargs`
        on every worker (or those placed on `gpu`) and keeps its object as `name` (ops:
        `ctx.resource(name)`); replacement workers replay it before they serve. Returns one
        ResourceInfo dict per worker (slot, pid, device, host_bytes, device_bytes, load_ns). All or
        nothing: RESOURCE_FAILED / OUT_OF_MEMORY of the first worker that refused, naming it."""
        self._check_process()
        return self._resources.load(name, loader, kwargs, gpu=gpu, timeout=timeout)

    def unload(self, name: str) -> dict[str, Any]:
        """Forgets the recipe of `name` and frees it on every worker: {name, workers,
        host_bytes_freed, device_bytes_freed, device_reserved_freed, per_worker}."""
        self._check_process()
        return self._resources.unload(name)

    def resources(self) -> list[dict[str, Any]]:
        """The pool's recipes, each with what every live worker holds of it (ResourceInfo dicts)."""
        self._check_process()
        return self._resources.listing()

    def session(self, *, mode: str = "strict", ttl_s: float | None = None,
                restore: Callable[[Session], None] | None = None, timeout: float | None = None) -> Session:
        """A session pinned to the least busy worker: its calls share that worker's `ctx.session`
        (see `sidecar.host.sessions`). `mode` "strict" (default) or "prefer"; `ttl_s`: idle time
        after which the worker frees its state; `restore(session)`: rebuilds the state on another
        worker after a crash (else the session's calls fail with SESSION_LOST)."""
        self._check_process()
        return Session(self, mode=mode, ttl_s=ttl_s, restore=restore, timeout=timeout)

    def broadcast(self, op: str, *inputs: Any, timeout: float | None = None, **kwargs: Any) -> list[WorkerResult]:
        """Runs the call on every serving worker at once: one `WorkerResult` (slot, pid, value or
        error) per worker; a worker's failure (its crash included) is its entry, not an exception."""
        self._check_process()
        return self._resources.broadcast(op, inputs, timeout, kwargs)

    def workers(self) -> list[PoolWorker]:
        """Handles on the serving workers; `w.call(...)` pins a call to one of them."""
        self._check_process()
        return self._resources.workers()

    # ---------------------------------------------------------------------------------------------
    # observing

    def status(self) -> list[WorkerStatus]:
        self._check_process()
        with self._lock:
            return self._sup.rows()

    @property
    def size(self) -> int:
        return self.settings.workers

    def ready_count(self) -> int:
        with self._lock:
            return self._sup.ready_count()

    def wait_ready(self, timeout: float = 30.0, spares: bool = False) -> bool:
        """Blocks until every slot has a ready worker (and, if asked, every spare is up)."""
        self._check_process()
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._sup.all_ready(spares):
                left = deadline - time.monotonic()
                if left <= 0 or self._sup.closing:
                    return False
                self._cond.wait(left)
            return True

    def subscribe(self, callback: Callable[[PoolEvent], None]) -> Callable[[], None]:
        """`callback(event)` for every pool event, on the pool's thread; returns an unsubscribe function."""
        return self.events_bus.subscribe(callback)

    def events(self, maxsize: int = 10_000) -> EventStream:
        """A blocking iterator of the pool events from now on (close it, or use it as a context manager)."""
        return self.events_bus.stream(maxsize)

    def watch_telemetry(self, memory_interval_s: float = 0.0) -> PoolTelemetry:
        """Every worker's telemetry (spans, memory samples) and the pool's events, as one stream of dicts."""
        self._check_process()
        t = PoolTelemetry(self.subscribe, memory_interval_s, self._forget_telemetry)
        with self._lock:
            self._telemetry.append(t)
            workers = self._sup.serving_workers()
        for w in workers:
            t.attach(w)
        return t

    def _forget_telemetry(self, t: PoolTelemetry) -> None:
        with self._lock:
            if t in self._telemetry:
                self._telemetry.remove(t)

    def _telemetry_attach(self, worker: Worker) -> None:
        with self._lock:
            watchers = list(self._telemetry)
        for t in watchers:
            t.attach(worker)

    # ---------------------------------------------------------------------------------------------
    # metrics, dashboard, memory history (sidecar.observe; guides/observability.md)

    @property
    def observer(self) -> Any:
        """The pool's `sidecar.observe.PoolObserver` (made on first use; from then on every call is
        recorded): `profile_memory(...)`, `registry`, `recent_calls`, `timeline`."""
        with self._lock:
            if self._observer is None:
                if self._sup.closing:
                    raise PoolClosed("the pool is closed")
                from sidecar.observe.pool_observer import PoolObserver

                self._observer = PoolObserver(self, self._arena)
                self._call_observer = self._observer.observe_call
            return self._observer

    def _recording(self) -> Any:
        """The observer while it records calls (its call hook installed), else None: what streams
        and the asyncio host (`sidecar.host.aio`) check before they record."""
        return self._observer if self._call_observer is not None else None

    def serve_metrics(self, address: str = "127.0.0.1:9464", *, allow_remote: bool = False) -> str:
        """Serves Prometheus metrics (/metrics) and the live dashboard (/) on `address` (port 0: any
        free port) until `close()`; returns the bound HOST:PORT. Loopback only unless `allow_remote`."""
        return self.observer.serve(address, allow_remote=allow_remote)  # type: ignore[no-any-return]

    def memory_history(self, pid: int | None = None, device: str | None = None) -> list[Any]:
        """The memory history rings (`sidecar.observe.MemorySeries` per worker pid and device, "cpu" or
        "cuda:N"); the first call starts sampling (`observer.profile_memory(...)` sets interval etc.)."""
        return self.observer.memory_history(pid, device)  # type: ignore[no-any-return]

    @property
    def template(self) -> Template | None:
        """The template process (or, with use_template=False, the guardian without preloads)."""
        return self._launcher.template

    @property
    def template_pid(self) -> int | None:
        t = self._launcher.template
        return t.pid if t is not None and t.alive else None

    @property
    def template_startup_s(self) -> float | None:
        return self._launcher.template_startup_s

    # ---------------------------------------------------------------------------------------------
    # processes: a pool belongs to the one that created it

    def _in_owner(self) -> bool:
        return os.getpid() == self._owner_pid

    def _check_process(self) -> None:
        if not self._in_owner():
            raise WrongProcess(
                f"this Pool belongs to process {self._owner_pid} and cannot be used in process {os.getpid()} "
                f"(a fork of it): its workers, template and shared memory are the parent's, and its threads "
                f"did not survive the fork. Create a Pool in this process after the fork, or connect a "
                f"Client to a worker address the parent hands over (row.address for row in pool.status())",
                field="pool")

    def __reduce__(self) -> Any:
        raise WrongProcess(
            f"a Pool cannot be pickled (its workers, template and shared memory belong to process "
            f"{self._owner_pid}): create the Pool in the process that uses it (e.g. in the multiprocessing "
            f"worker, once per worker process), or pass worker addresses (row.address for row in "
            f"pool.status()) and connect sidecar.host.Client(address) there", field="pool")

    # ---------------------------------------------------------------------------------------------
    # closing

    def close(self, grace_s: float | None = None) -> None:
        """SIGTERM every worker (they drain), wait `grace_s`, SIGKILL what is left, then unlink
        everything of the run. Calls waiting for a worker get `PoolClosed`. Idempotent.

        In a forked child this does nothing: the workers and the run's memory are the parent's."""
        if not self._in_owner():
            return
        with self._cond:
            if self._closed:
                return
            self._closed = True
            workers = self._sup.close()
            self._stop.set()
            self._cond.notify_all()
        if self._observer is not None:  # no new one is made once closing: its endpoint stops first
            self._observer.close()
        self._futures.close()
        launcher = getattr(self, "_launcher", None)
        if launcher is not None:
            launcher.stop_starting()
        grace = self.settings.grace_s if grace_s is None else grace_s
        for w in workers:
            w.proc.terminate()
        deadline = time.monotonic() + grace
        for w in workers:
            w.proc.wait_exit(max(0.0, deadline - time.monotonic()))
        for w in workers:
            if w.proc.alive:
                w.proc.kill()
        for t in list(self._threads):
            if t is not threading.current_thread():
                t.join(self.settings.start_timeout if t.name.startswith("sidecar-pool-launch") else 5.0)
        for w in workers:
            w.proc.wait_exit(5.0)
            self._dispose(w, kill=False)
        with self._lock:
            self._sup.closed()
            telemetry, self._telemetry = self._telemetry, []
        for stream in telemetry:
            stream.close()
        if launcher is not None:
            launcher.close()
        self.events_bus.close()
        arena = getattr(self, "_arena", None)
        if arena is not None:
            arena.close()
        reaper.reap_run(self.run_id)

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True) and os.getpid() == getattr(self, "_owner_pid", None):
            log.warning("pool %s was not closed; closing it now", getattr(self, "run_id", "?"))
            try:
                self.close(grace_s=0.5)
            except Exception:  # noqa: BLE001 - interpreter shutdown: best effort
                pass

    def __repr__(self) -> str:
        if not self._in_owner():
            return f"<Pool run={self.run_id} of process {self._owner_pid}>"
        return (f"<Pool run={self.run_id} workers={self.ready_count()}/{self.settings.workers} "
                f"breaker={self.breaker.state.value}>")
