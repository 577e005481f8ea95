"""`Pool`: N sidecar workers behind one call interface, supervised so that nothing they do takes the
host down or leaks.

- Spawn: every worker is `sidecar serve` with the handshake (`sidecar.host.spawn`); replacements are
  forked from a template process that already imported torch (`sidecar.host.template`), or taken
  from warm spares, or started cold.
- Route: each call goes to the least busy ready worker.
- Crash barrier: every exit is classified (`sidecar.host.crash`); calls in flight on a dead worker get
  `WorkerCrashed` (exit code, signal, classification, last stderr lines, pid), or, when idempotent,
  are retried on another worker; the dead worker's shared memory is unlinked and its leases dropped
  at once; a replacement starts (immediately after a first crash, then with backoff); a circuit
  breaker (`sidecar.host.breaker`) stops crash loops and fails calls fast with `CircuitOpen`.
- Events: crash, restart, retry, breaker_open/half_open/close go to subscribers and into the merged
  telemetry stream (`watch_telemetry`).
- Close: SIGTERM (workers drain), grace, SIGKILL of each process group; then nothing of the run is
  left in /dev/shm. If the host dies instead, the template kills the workers and reaps the run.
"""
from __future__ import annotations

import itertools
import logging
import os
import queue
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, Iterator, Mapping, Sequence

from sidecar.dataplane import reaper
from sidecar.dataplane.arena import Arena
from sidecar.dataplane.names import new_run_id, validate_run_id
from sidecar.errors import Cancelled, CircuitOpen, InvalidArgument, OpFailed, SidecarError, WorkerCrashed
from sidecar.host.breaker import BreakerState, CircuitBreaker
from sidecar.host.client import Client, Result, empty_in
from sidecar.host.crash import Classification, ExitInfo, oom_kill_count, summarize_tail
from sidecar.host.events import EventBus, EventStream, PoolEvent
from sidecar.host.spawn import WorkerProcess, WorkerStartError, start_worker
from sidecar.host.template import Template, TemplateError
from sidecar.protocol.limits import DEFAULT_INLINE_THRESHOLD

log = logging.getLogger(__name__)

__all__ = ["Pool", "PoolClosed", "WorkerState", "WorkerStatus", "PoolTelemetry"]


class PoolClosed(Cancelled):
    """The pool was closed (kind CANCELLED)."""


class WorkerState(str, Enum):
    STARTING = "starting"        # being spawned (first start)
    READY = "ready"              # serving calls
    RESTARTING = "restarting"    # died; a replacement is (or will be, after backoff/breaker) started
    STOPPING = "stopping"        # the pool is closing it
    STOPPED = "stopped"          # gone for good (pool closed)
    SPARE = "spare"              # a warm spare: started, serving nothing until it replaces a worker


@dataclass(frozen=True)
class WorkerStatus:
    """One row of `Pool.status()`: a worker slot (or a spare) and its history."""

    slot: int                 # -1 for a spare
    pid: int | None
    state: WorkerState
    calls: int                # calls completed by this slot (all its processes)
    crashes: int              # unexpected exits, failed starts included
    restarts: int             # replacements started
    last_exit: ExitInfo | None
    inflight: int = 0
    address: str | None = None
    gpu: str | None = None    # CUDA_VISIBLE_DEVICES given to it, when the pool places workers


class _Worker:
    """One live worker process and its connection."""

    __slots__ = ("proc", "client", "inflight", "served", "ready_at", "gpu", "oom_kills")

    def __init__(self, proc: WorkerProcess, client: Client, gpu: str | None) -> None:
        self.proc = proc
        self.client = client
        self.inflight = 0
        self.served = False  # completed a call: a working configuration, not a crash loop
        self.ready_at = time.monotonic()
        self.gpu = gpu
        self.oom_kills = oom_kill_count()  # the cgroup's count now, to confirm an OOM kill later


class _Slot:
    __slots__ = ("index", "gpu", "worker", "state", "calls", "crashes", "restarts", "last_exit",
                 "consecutive", "launching", "started_once", "health_failures", "died_at")

    def __init__(self, index: int, gpu: str | None) -> None:
        self.index = index
        self.gpu = gpu
        self.worker: _Worker | None = None
        self.state = WorkerState.STARTING
        self.calls = 0
        self.crashes = 0
        self.restarts = 0
        self.last_exit: ExitInfo | None = None
        self.consecutive = 0      # crashes since the slot last had a worker that proved itself
        self.launching = False
        self.started_once = False
        self.health_failures = 0
        self.died_at = 0.0


def _pair(value: tuple[float, float] | float, name: str) -> tuple[float, float]:
    first, cap = (value, value * 50) if isinstance(value, (int, float)) else value
    if first < 0 or cap < first:
        raise ValueError(f"{name} wants (initial >= 0, cap >= initial), got {value!r}")
    return float(first), float(cap)


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
      max_attempts (3): tries of an idempotent call whose worker crashed (first try included).
      retry_backoff ((0.01, 1.0)): delay before retry n is uniform(0.5, 1) x min(cap, initial x 2^(n-1)).
      restart_backoff ((0.1, 5.0)): a slot's first crash restarts at once; each further crash before a
        worker of that slot served a call (or lived `stable_after_s`, 5) waits initial x 2^(k-1), capped.
      breaker_threshold (5), breaker_window_s (30), breaker_cooldown_s (5): that many crashes within
        the window open the breaker: calls fail fast with CircuitOpen and no worker starts; after the
        cool-down one probe worker starts; once it is ready and healthy the breaker closes.
      use_template (True): fork replacements from a template that imported torch (else start cold).
      spares (None = 1 for a GPU pool, 0 otherwise): warm spare workers kept ready to take a crashed
        worker's place instantly.
      health_interval_s (5; 0 = off), health_timeout_s (2), health_failures (3): a worker that fails
        that many health checks in a row is killed (classification "unresponsive") and replaced.
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
                 tail_lines: int = 40, lease_ttl_s: float | None = None, max_leases: int | None = None) -> None:
        if workers < 1:
            raise InvalidArgument(f"a pool needs at least one worker, got {workers}", field="workers")
        if max_attempts < 1:
            raise InvalidArgument(f"max_attempts must be >= 1, got {max_attempts}", field="max_attempts")
        if spares is not None and spares < 0:
            raise InvalidArgument(f"spares must be >= 0, got {spares}", field="spares")
        self.run_id = validate_run_id(run_id) if run_id else new_run_id()
        self.device = device
        self._ops = list(ops)
        self._debug_ops = debug_ops
        self._worker_args = list(worker_args)
        self._python = python
        self._start_timeout = float(start_timeout)
        self._max_attempts = int(max_attempts)
        self._retry_backoff = _pair(retry_backoff, "retry_backoff")
        self._restart_backoff = _pair(restart_backoff, "restart_backoff")
        self._stable_after_s = float(stable_after_s)
        self._spares_target = 0  # set once the GPUs are known (below)
        self._health = (float(health_interval_s), float(health_timeout_s), int(health_failures))
        self._crash_detect_s = float(crash_detect_s)
        self._acquire_timeout_s = float(acquire_timeout_s if acquire_timeout_s is not None else start_timeout)
        self._grace_s = float(grace_s)
        self._inline_threshold = int(inline_threshold)
        # the workers' output-lease limits (sidecar serve --lease-ttl / --max-leases); None: their defaults
        if lease_ttl_s is not None and not lease_ttl_s > 0:
            raise InvalidArgument(f"lease_ttl_s must be > 0 seconds, got {lease_ttl_s!r}", field="lease_ttl_s")
        if max_leases is not None and max_leases < 1:
            raise InvalidArgument(f"max_leases must be >= 1, got {max_leases!r}", field="max_leases")
        self._lease_flags = ([] if lease_ttl_s is None else ["--lease-ttl", repr(float(lease_ttl_s))]) + (
            [] if max_leases is None else ["--max-leases", str(int(max_leases))])
        self._tail_lines = int(tail_lines)
        self.use_template = use_template

        base_env = dict(os.environ if env is None else env)
        if threads is not None:
            base_env["SIDECAR_THREADS"] = str(int(threads))
        elif "SIDECAR_THREADS" not in base_env:
            # N workers on one machine: split the CPUs instead of each taking half of them.
            base_env["SIDECAR_THREADS"] = str(max(1, (len(os.sched_getaffinity(0)) or 1) // workers))
        # A native crash then leaves a Python traceback in the worker's stderr tail.
        base_env.setdefault("PYTHONFAULTHANDLER", "1")
        self._env = base_env
        self._gpus = self._find_gpus(device, gpus, base_env)
        # A forked worker replaces a CPU worker in tens of ms, but a GPU worker first has to create its
        # CUDA context (~0.4 s on an H200): there only a warm spare meets the < 100 ms target.
        uses_gpu = device.startswith("cuda") or (device == "auto" and bool(self._gpus))
        self._spares_target = int(spares) if spares is not None else (1 if uses_gpu else 0)

        self.breaker = CircuitBreaker(breaker_threshold, breaker_window_s, breaker_cooldown_s)
        self.events_bus = EventBus()
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._closing = False
        self._closed = False
        self._rr = 0
        self._listen_ids = itertools.count()
        self._slots = [_Slot(i, self._gpus[i % len(self._gpus)] if len(self._gpus) > 1 else None)
                       for i in range(workers)]
        self._spares: list[_Worker] = []
        self._spares_launching = 0
        self._spare_consecutive = 0
        self._starting: set[WorkerProcess] = set()
        self._threads: list[threading.Thread] = []
        self._op_idempotent: dict[str, bool] | None = None
        self._telemetry: list[PoolTelemetry] = []
        self._last_crash: tuple[ExitInfo, int | None, list[str]] | None = None
        self._template: Template | None = None
        self.template_startup_s: float | None = None
        self._observer: Any = None       # sidecar.observe.PoolObserver, made on first use
        self._call_observer: Any = None  # its call hook (None: calls are not timed or recorded)

        reaper.reap_dead_owners()  # runs of hosts that died without closing their pools
        self._sockdir = tempfile.mkdtemp(prefix=f"sidecar-pool-{self.run_id}-")
        self._arena = Arena(self.run_id)
        try:
            self._start_template()
            self._start_initial()
        except BaseException:
            self.close()
            raise
        if self._health[0] > 0:
            self._spawn_thread(self._health_loop, "sidecar-pool-health")

    # ---------------------------------------------------------------------------------------------
    # set-up

    @staticmethod
    def _find_gpus(device: str, gpus: int | Sequence[str | int] | None, env: Mapping[str, str]) -> list[str]:
        if isinstance(gpus, int):
            return [str(i) for i in range(gpus)]
        if gpus is not None:
            return [str(g) for g in gpus]
        if device not in ("auto", "cuda"):
            return []
        visible = env.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:
            return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
        try:  # NVML counts GPUs without initialising CUDA in this process
            import pynvml

            pynvml.nvmlInit()
            try:
                return [str(i) for i in range(pynvml.nvmlDeviceGetCount())]
            finally:
                pynvml.nvmlShutdown()
        except Exception:  # no driver, no library: no GPUs to place
            return []

    def _start_template(self) -> None:
        env = dict(self._env)
        try:
            self._template = Template(run_id=self.run_id, python=self._python, env=env,
                                      preload=self.use_template, start_timeout=self._start_timeout,
                                      check_cuda_fork=self.device not in ("cpu", "mps"),
                                      sock_dir=self._sockdir, on_death=self._template_died)
        except (TemplateError, OSError) as exc:
            if not self.use_template:
                raise
            log.warning("template process failed (%s); starting workers cold", exc)
            self._template = Template(run_id=self.run_id, python=self._python, env=env, preload=False,
                                      start_timeout=self._start_timeout, sock_dir=self._sockdir,
                                      on_death=self._template_died)
        self.template_startup_s = self._template.startup_s
        if self._template.preload and self._template.failed:
            log.debug("template could not preload: %s", self._template.failed)
        if self._template.preload and self._template.cuda_touched and self.device not in ("cpu", "mps"):
            log.warning("pool %s: CUDA does not work in processes forked from the template; GPU workers "
                        "start cold (slow replacement: consider spares)", self.run_id)

    def _template_died(self) -> None:
        if self._closing:
            return
        log.warning("pool %s: template process died; starting a new one", self.run_id)
        self.events_bus.publish("template_restart")

        def restart() -> None:
            try:
                self._start_template()
            except Exception:
                log.exception("pool %s: cannot restart the template; workers start cold", self.run_id)
        self._spawn_thread(restart, "sidecar-pool-template")

    def _start_initial(self) -> None:
        for slot in self._slots:
            slot.launching = True
        errors: list[BaseException] = []

        def first(slot: _Slot) -> None:
            try:
                self._bring_up(slot, initial=True)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        starters = [threading.Thread(target=first, args=(s,), daemon=True) for s in self._slots]
        for _ in range(self._spares_target):
            self._launch_spare()
        for t in starters:
            t.start()
        for t in starters:
            t.join()
        if errors:
            raise errors[0]

    def _worker_command(self) -> list[str]:
        sock = os.path.join(self._sockdir, f"w{next(self._listen_ids)}.sock")
        args = ["--run-id", self.run_id, "--device", self.device, "--watch-stdin", "--listen", f"unix:{sock}",
                "--inline-threshold", str(self._inline_threshold), "--grace-period", f"{self._grace_s:g}"]
        for module in self._ops:
            args += ["--ops", module]
        if self._debug_ops:
            args.append("--debug-ops")
        return args + self._lease_flags + self._worker_args

    def _spawn_process(self, gpu: str | None) -> WorkerProcess:
        env = dict(self._env)
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        template = self._template
        if template is not None and (not template.preload or not template.alive
                                     or (template.cuda_touched and self.device != "cpu")):
            template = None  # no fork: not preloaded, gone, or CUDA already touched in it
        proc = start_worker(self._worker_command(), python=self._python, env=env,
                            start_timeout=self._start_timeout, template=template,
                            tail_lines=self._tail_lines, on_spawn=self._track_starting)
        with self._lock:
            self._starting.discard(proc)
        if proc.via == "cold" and self._template is not None:
            self._template.watch(proc.pid)  # so that it dies with the host even if started cold
        return proc

    def _track_starting(self, proc: WorkerProcess) -> None:
        with self._lock:
            if self._closing:
                proc.kill()
            self._starting.add(proc)

    def _connect(self, proc: WorkerProcess, gpu: str | None) -> _Worker:
        assert proc.address is not None
        client = Client(proc.address, arena=self._arena, run_id=self.run_id,
                        inline_threshold=self._inline_threshold)
        return _Worker(proc, client, gpu)

    # ---------------------------------------------------------------------------------------------
    # bringing workers up

    def _spawn_thread(self, target: Callable[..., Any], name: str, *args: Any) -> threading.Thread:
        t = threading.Thread(target=target, args=args, name=name, daemon=True)
        with self._lock:
            self._threads = [x for x in self._threads if x.is_alive()]
            self._threads.append(t)
        t.start()
        return t

    def _launch(self, slot: _Slot, delay: float = 0.0, probe: bool = False) -> None:
        """Starts a worker for `slot` in the background (after `delay`); the caller holds no lock."""
        with self._lock:
            if slot.launching or self._closing:
                return
            slot.launching = True
        self._spawn_thread(self._bring_up_later, f"sidecar-pool-launch-{slot.index}", slot, delay, probe)

    def _bring_up_later(self, slot: _Slot, delay: float, probe: bool) -> None:
        if delay > 0 and self._stop.wait(delay):
            with self._lock:
                slot.launching = False
            return
        if not probe and self.breaker.state is not BreakerState.CLOSED:
            with self._lock:  # the breaker opened meanwhile: its probe restarts this slot
                slot.launching = False
            return
        try:
            self._bring_up(slot, probe=probe)
        except Exception:
            log.exception("pool %s: starting a worker for slot %d failed", self.run_id, slot.index)

    def _bring_up(self, slot: _Slot, initial: bool = False, probe: bool = False) -> None:
        """Spawns, connects and installs a worker in `slot` (slot.launching is set by the caller)."""
        t0 = time.monotonic()
        died_at = slot.died_at
        proc: WorkerProcess | None = None
        worker: _Worker | None = None
        try:
            proc = self._spawn_process(slot.gpu)
            worker = self._connect(proc, slot.gpu)
            if probe:
                status = worker.client.health(timeout=self._health[1])
                if status != "SERVING":
                    raise WorkerStartError(f"probe worker pid {proc.pid} answered health {status}",
                                           pid=proc.pid, classification="unresponsive")
        except (WorkerStartError, TemplateError, OSError, SidecarError) as exc:
            if worker is not None:  # started but failed its probe: it must not linger
                self._dispose(worker, kill=True)
            elif proc is not None:
                proc.kill()
                proc.wait_exit(5.0)
                reaper.reap_owner(self.run_id, proc.pid)
            with self._lock:
                slot.launching = False
            if initial:
                raise
            if self._closing:  # killed by close() while starting: not a crash
                return
            self._start_failed(slot, exc)
            return
        with self._lock:
            slot.launching = False
            if self._closing:
                closing = True
            else:
                closing = False
                restarted = slot.started_once
                slot.started_once = True
                if restarted:
                    slot.restarts += 1
                slot.worker = worker
                slot.state = WorkerState.READY
                slot.health_failures = 0
                self._cond.notify_all()
        if closing:
            self._dispose(worker, kill=True)
            return
        proc.add_exit_callback(lambda info, s=slot, w=worker: self._on_exit(s, w, info))
        if self._op_idempotent is None:
            self._load_op_flags(worker.client)
        now = time.monotonic()
        meta: dict[str, Any] = {"slot": slot.index, "pid": proc.pid, "via": proc.via,
                                "start_ms": round((now - t0) * 1000, 2)}
        if died_at and restarted:
            meta["since_crash_ms"] = round((now - died_at) * 1000, 2)
        self.events_bus.publish("restart" if restarted else "worker_started", **meta)
        self._telemetry_attach(worker)
        if probe and self.breaker.record_success() is BreakerState.CLOSED:
            self._breaker_closed()

    def _start_failed(self, slot: _Slot, exc: BaseException) -> None:
        info = _exit_of_error(exc)
        tail = list(getattr(exc, "stderr_tail", None) or [])
        pid = getattr(exc, "pid", None)
        with self._lock:
            slot.crashes += 1
            slot.consecutive += 1
            slot.last_exit = info
            slot.state = WorkerState.RESTARTING
            slot.died_at = time.monotonic()
            self._last_crash = (info, pid, tail)
            self._cond.notify_all()
        log.warning("pool %s: slot %d failed to start: %s", self.run_id, slot.index, exc)
        self.events_bus.publish("crash", slot=slot.index, pid=pid, phase="start",
                                classification=info.classification.value, exit_code=info.exit_code,
                                signal=info.signal, stderr_tail=tail, message=str(exc).split("\n")[0])
        self._after_crash(slot)

    def _load_op_flags(self, client: Client) -> None:
        try:
            flags = {o["name"]: bool(o.get("idempotent")) for o in client.list_ops()}
        except (SidecarError, KeyError, TypeError) as exc:
            log.debug("ListOps failed (%s); ops count as not idempotent", exc)
            return
        with self._lock:
            if self._op_idempotent is None:
                self._op_idempotent = flags

    # ---------------------------------------------------------------------------------------------
    # spares

    def _launch_spare(self, delay: float = 0.0) -> None:
        with self._lock:
            if self._closing or len(self._spares) + self._spares_launching >= self._spares_target:
                return
            self._spares_launching += 1
            gpu = self._gpus[(len(self._spares) + self._spares_launching) % len(self._gpus)] \
                if len(self._gpus) > 1 else None
        self._spawn_thread(self._bring_up_spare, "sidecar-pool-spare", gpu, delay)

    def _bring_up_spare(self, gpu: str | None, delay: float) -> None:
        worker: _Worker | None = None
        failure: BaseException | None = None
        try:
            if delay > 0 and self._stop.wait(delay):
                return
            if self.breaker.state is not BreakerState.CLOSED:
                return
            proc = self._spawn_process(gpu)
            worker = self._connect(proc, gpu)
        except (WorkerStartError, TemplateError, OSError, SidecarError) as exc:
            failure = exc
        finally:
            with self._lock:
                self._spares_launching -= 1
                closing = self._closing
                if worker is not None and not closing:
                    self._spares.append(worker)
                    self._cond.notify_all()
        if failure is not None and not closing:
            log.warning("pool %s: spare failed to start: %s", self.run_id, failure)
            with self._lock:
                self._spare_consecutive += 1
            self._spare_crashed(_exit_of_error(failure), getattr(failure, "pid", None),
                                list(getattr(failure, "stderr_tail", None) or []))
            return
        if worker is None:  # failed while closing, or the start was skipped
            return
        if closing:
            self._dispose(worker, kill=True)
            return
        worker.proc.add_exit_callback(lambda info, w=worker: self._on_exit(None, w, info))
        with self._lock:
            self._spare_consecutive = 0
        if self._op_idempotent is None:
            self._load_op_flags(worker.client)

    def _spare_crashed(self, info: ExitInfo, pid: int | None, tail: list[str]) -> None:
        with self._lock:
            self._last_crash = (info, pid, tail)
        self.events_bus.publish("crash", slot=-1, pid=pid, phase="spare", classification=info.classification.value,
                                exit_code=info.exit_code, signal=info.signal, stderr_tail=tail)
        if self.breaker.record_failure() is BreakerState.OPEN:
            self._breaker_opened()
            return
        k = self._spare_consecutive
        self._launch_spare(0.0 if k <= 1 else self._restart_delay(k))

    def _take_spare(self, gpu: str | None) -> _Worker | None:
        """A ready spare (one placed on `gpu` when workers are placed); the caller holds the lock."""
        for i, w in enumerate(self._spares):
            if w.proc.alive and (gpu is None or w.gpu == gpu):
                return self._spares.pop(i)
        return None

    # ---------------------------------------------------------------------------------------------
    # crashes

    def _on_exit(self, slot: _Slot | None, worker: _Worker, info: ExitInfo) -> None:
        """Runs on the worker's watcher thread as soon as its exit status is known."""
        proc = worker.proc
        if info.signal == signal.SIGKILL and worker.oom_kills is not None:
            now = oom_kill_count()
            info = info.with_oom(now is not None and now > worker.oom_kills)
        with self._lock:
            if slot is None:  # a spare
                was_spare = worker in self._spares
                if was_spare:
                    self._spares.remove(worker)
                expected = self._closing or not was_spare
            else:
                if slot.worker is not worker:
                    return
                expected = self._closing or slot.state is WorkerState.STOPPING
                slot.worker = None
                slot.last_exit = info
                slot.died_at = time.monotonic()
                if expected:
                    slot.state = WorkerState.STOPPED
                else:
                    slot.state = WorkerState.RESTARTING
                    slot.crashes += 1
                    proven = worker.served or (slot.died_at - worker.ready_at) >= self._stable_after_s
                    slot.consecutive = 1 if proven else slot.consecutive + 1
                self._cond.notify_all()
            if not expected:
                self._last_crash = (info, proc.pid, proc.stderr_tail())
        if expected:
            self._dispose(worker, kill=False)
            return
        tail = proc.stderr_tail()
        log.warning("pool %s: worker pid %d %s", self.run_id, proc.pid, info.describe())
        self.events_bus.publish(
            "crash", slot=-1 if slot is None else slot.index, pid=proc.pid, phase="running",
            classification=info.classification.value, exit_code=info.exit_code, signal=info.signal,
            description=info.describe(), uptime_s=round(time.monotonic() - worker.ready_at, 3),
            inflight=worker.inflight, stderr_tail=tail)
        # Replacement first (it has the most latency to hide), then the clean-up of the dead one.
        if slot is None:
            self._spare_crashed_after_ready()
        else:
            self._after_crash(slot)
        reaped = self._dispose(worker, kill=False)
        if reaped:
            log.debug("pool %s: unlinked %d segment(s) of dead worker %d", self.run_id, len(reaped), proc.pid)

    def _spare_crashed_after_ready(self) -> None:
        if self.breaker.record_failure() is BreakerState.OPEN:
            self._breaker_opened()
            return
        self._launch_spare()

    def _dispose(self, worker: _Worker, kill: bool) -> list[str]:
        """Forgets a worker: kill it if asked, drop its connection and leases, unlink its segments."""
        proc = worker.proc
        if kill:
            proc.kill()
            proc.wait_exit(5.0)
        try:
            worker.client.close()
        except Exception:  # noqa: BLE001 - the worker is gone; nothing to release on its side
            pass
        reaped: list[str] = []
        if not proc.alive:
            reaped = reaper.reap_owner(self.run_id, proc.pid)
            address = proc.address or ""
            if address.startswith("unix:"):
                try:
                    os.unlink(address[len("unix:"):])
                except OSError:
                    pass
        return reaped

    def _restart_delay(self, consecutive: int) -> float:
        first, cap = self._restart_backoff
        return min(cap, first * 2 ** max(0, consecutive - 2))

    def _after_crash(self, slot: _Slot) -> None:
        if self.breaker.record_failure() is BreakerState.OPEN:
            self._breaker_opened()
            return
        if self.breaker.state is not BreakerState.CLOSED or self._closing:
            return
        with self._lock:
            spare = self._take_spare(slot.gpu) if slot.consecutive <= 1 and not slot.launching else None
            if spare is not None:
                slot.worker = spare
                slot.state = WorkerState.READY
                slot.restarts += 1
                slot.started_once = True
                died_at = slot.died_at
                self._cond.notify_all()
        if spare is not None:
            spare.proc.add_exit_callback(lambda info, s=slot, w=spare: self._on_exit(s, w, info))
            self.events_bus.publish("restart", slot=slot.index, pid=spare.proc.pid, via="spare",
                                    since_crash_ms=round((time.monotonic() - died_at) * 1000, 2))
            self._telemetry_attach(spare)  # watchers follow the slot, as they do a started replacement
            self._launch_spare()
            return
        delay = 0.0 if slot.consecutive <= 1 else self._restart_delay(slot.consecutive)
        self._launch(slot, delay)

    # ---------------------------------------------------------------------------------------------
    # circuit breaker

    def _breaker_opened(self) -> None:
        with self._lock:
            self._cond.notify_all()  # waiting callers fail fast now
            last = self._last_crash
        b = self.breaker
        log.warning("pool %s: circuit breaker open (%d crashes within %g s); probing in %g s",
                    self.run_id, b.recent_failures(), b.window_s, b.cooldown_s)
        self.events_bus.publish("breaker_open", crashes=b.recent_failures(), window_s=b.window_s,
                                cooldown_s=b.cooldown_s,
                                classification=last[0].classification.value if last else None)
        self._schedule_probe(b.cooldown_s)

    def _schedule_probe(self, delay: float) -> None:
        def later() -> None:
            if not self._stop.wait(delay):
                self._probe()
        self._spawn_thread(later, "sidecar-pool-probe")

    def _probe(self) -> None:
        if self._closing:
            return
        if not self.breaker.try_probe():
            if self.breaker.state is BreakerState.OPEN:
                self._schedule_probe(max(0.01, self.breaker.retry_after()))
            return
        self.events_bus.publish("breaker_half_open")
        with self._lock:
            slot = next((s for s in self._slots if s.state is WorkerState.RESTARTING and not s.launching), None)
        if slot is None:  # every slot has a live worker: nothing to probe, the pool works
            if self.breaker.record_success() is BreakerState.CLOSED:
                self._breaker_closed()
            return
        self._launch(slot, probe=True)

    def _breaker_closed(self) -> None:
        log.info("pool %s: circuit breaker closed", self.run_id)
        self.events_bus.publish("breaker_close")
        with self._lock:
            self._cond.notify_all()
            dead = [s for s in self._slots if s.state is WorkerState.RESTARTING and not s.launching]
            for s in dead:
                s.consecutive = 0
        for s in dead:
            self._launch(s)
        self._launch_spare()

    # ---------------------------------------------------------------------------------------------
    # health

    def _health_loop(self) -> None:
        interval, timeout, limit = self._health
        while not self._stop.wait(interval):
            with self._lock:
                ready = [(s, s.worker) for s in self._slots if s.state is WorkerState.READY and s.worker]
            for slot, worker in ready:
                if self._stop.is_set():
                    return
                try:
                    ok = worker.client.health(timeout=timeout) == "SERVING"
                except SidecarError:
                    ok = False
                with self._lock:
                    if slot.worker is not worker:
                        continue
                    slot.health_failures = 0 if ok else slot.health_failures + 1
                    kill = slot.health_failures >= limit
                if kill and worker.proc.alive:
                    log.warning("pool %s: worker pid %d failed %d health checks; killing it",
                                self.run_id, worker.proc.pid, limit)
                    worker.proc.classify_as(Classification.UNRESPONSIVE)
                    worker.proc.kill()

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
        return self._invoke("execute", op, inputs, idempotent, timeout, kwargs)

    def hardware(self) -> dict[str, Any]:
        """What a ready worker sees (GetHardware): CPU, CUDA devices, MPS and the device it runs ops on."""
        return self._on_any_worker("GetHardware", lambda client: client.hardware())

    def list_ops(self) -> list[Any]:
        """Every op the workers serve (ListOps of a ready worker)."""
        return self._on_any_worker("ListOps", lambda client: client.list_ops())

    def empty(self, shape: int | Sequence[int], dtype: Any = "float32", *, torch: bool = False) -> Any:
        """An array (or CPU torch tensor) in the pool's shared arena: passed to `call`, it crosses to
        whichever worker runs the call as a descriptor only, with no copy (see `Client.empty`)."""
        return empty_in(self._arena, shape, dtype, torch=torch)

    def _on_any_worker(self, what: str, fn: Callable[[Client], Any]) -> Any:
        slot, worker = self._acquire(what, None, set())
        try:
            return fn(worker.client)
        finally:
            self._release(slot, worker, ok=False)

    def is_idempotent(self, op: str) -> bool:
        """What ListOps says about `op` (False for ops it does not know)."""
        return bool((self._op_idempotent or {}).get(op, False))

    def _invoke(self, method: str, op: str, inputs: tuple[Any, ...], idempotent: bool | None,
                timeout: float | None, kwargs: dict[str, Any]) -> Any:
        hook = self._call_observer
        if hook is not None:  # metrics are on: the observer times and records the call around the run
            return hook(self._invoke_unobserved, method, op, inputs, idempotent, timeout, kwargs)
        return self._invoke_unobserved(method, op, inputs, idempotent, timeout, kwargs)

    def _invoke_unobserved(self, method: str, op: str, inputs: tuple[Any, ...], idempotent: bool | None,
                           timeout: float | None, kwargs: dict[str, Any]) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        retryable = self.is_idempotent(op) if idempotent is None else bool(idempotent)
        excluded: set[int] = set()
        attempt = 0
        while True:
            attempt += 1
            slot, worker = self._acquire(op, deadline, excluded)
            left = None if deadline is None else max(0.001, deadline - time.monotonic())
            try:
                out = getattr(worker.client, method)(op, *inputs, timeout=left, idempotent=retryable, **kwargs)
            except Exception as exc:
                self._release(slot, worker, ok=False)
                crash = self._as_crash(exc, worker, op)
                if crash is None:
                    raise
                if not retryable or attempt >= self._max_attempts or self._closing:
                    raise crash from (None if crash is exc else exc)
                delay = self._retry_delay(attempt)
                if deadline is not None and time.monotonic() + delay >= deadline:
                    raise crash from (None if crash is exc else exc)
                self.events_bus.publish("retry", op=op, attempt=attempt + 1, pid=worker.proc.pid,
                                        classification=crash.fields.get("classification"),
                                        delay_ms=round(delay * 1000, 2))
                excluded.add(worker.proc.pid)
                if delay > 0:
                    time.sleep(delay)
                continue
            self._release(slot, worker, ok=True)
            return out

    def _retry_delay(self, attempt: int) -> float:
        first, cap = self._retry_backoff
        return min(cap, first * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)

    def _acquire(self, op: str, deadline: float | None, excluded: set[int]) -> tuple[_Slot, _Worker]:
        wait_until = deadline if deadline is not None else time.monotonic() + self._acquire_timeout_s
        with self._cond:
            while True:
                if self._closing:
                    raise PoolClosed("the pool is closed", op=op)
                if self.breaker.state is not BreakerState.CLOSED:
                    raise self._circuit_open_error(op)
                ready = [s for s in self._slots if s.state is WorkerState.READY and s.worker is not None
                         and s.worker.proc.pid not in excluded]
                if ready:
                    n = len(ready)
                    start = self._rr % n
                    self._rr += 1
                    slot = min((ready[(start + i) % n] for i in range(n)), key=lambda s: s.worker.inflight)
                    worker = slot.worker
                    assert worker is not None
                    worker.inflight += 1
                    return slot, worker
                left = wait_until - time.monotonic()
                if left <= 0:
                    what = "the call's timeout" if deadline is not None else f"{self._acquire_timeout_s:g} s"
                    raise Cancelled(f"no worker became ready within {what}", op=op)
                self._cond.wait(left)

    def _release(self, slot: _Slot, worker: _Worker, ok: bool) -> None:
        with self._lock:
            worker.inflight -= 1
            if ok:
                worker.served = True
                slot.calls += 1
                if slot.worker is worker:
                    slot.consecutive = 0

    def _as_crash(self, exc: Exception, worker: _Worker, op: str) -> SidecarError | None:
        """The WorkerCrashed error for a failed call if its worker died (None: an ordinary error)."""
        proc = worker.proc
        transport = isinstance(exc, WorkerCrashed) or (
            isinstance(exc, OpFailed) and str(exc.fields.get("exception_type", "")).startswith("grpc."))
        info = proc.wait_exit(self._crash_detect_s if transport else 0.0)
        if info is None:
            # Alive: an unreachable worker still counts as a failed attempt for a retry.
            return exc if isinstance(exc, WorkerCrashed) else None
        tail = proc.stderr_tail()
        message = f"worker pid {proc.pid} {info.describe()} while running {op!r}"
        summary = summarize_tail(tail)
        if summary:
            message += f"; last output: {summary}"
        fields = info.as_fields()
        if isinstance(exc, SidecarError) and exc.fields.get("request_id"):
            fields["request_id"] = exc.fields["request_id"]
        return WorkerCrashed(message, op=op, pid=proc.pid, stderr_tail=tail, **fields)

    def _circuit_open_error(self, op: str) -> CircuitOpen:
        b = self.breaker
        fields: dict[str, Any] = {"op": op}
        text = ""
        if self._last_crash is not None:
            info, pid, tail = self._last_crash
            fields.update(info.as_fields(), pid=pid, stderr_tail=tail)
            text = f"; last crash: worker pid {pid} {info.describe()}"
        return CircuitOpen(f"circuit breaker {b.state.value} after {b.recent_failures()} worker crashes within "
                           f"{b.window_s:g} s; next probe in {b.retry_after():.1f} s{text}", **fields)

    # ---------------------------------------------------------------------------------------------
    # observing

    def status(self) -> list[WorkerStatus]:
        with self._lock:
            rows = [WorkerStatus(s.index, s.worker.proc.pid if s.worker else None, s.state, s.calls, s.crashes,
                                 s.restarts, s.last_exit, s.worker.inflight if s.worker else 0,
                                 s.worker.proc.address if s.worker else None, s.gpu) for s in self._slots]
            rows += [WorkerStatus(-1, w.proc.pid, WorkerState.SPARE, 0, 0, 0, None, 0, w.proc.address, w.gpu)
                     for w in self._spares]
        return rows

    @property
    def size(self) -> int:
        return len(self._slots)

    def ready_count(self) -> int:
        with self._lock:
            return sum(1 for s in self._slots if s.state is WorkerState.READY)

    def wait_ready(self, timeout: float = 30.0, spares: bool = False) -> bool:
        """Blocks until every slot has a ready worker (and, if asked, every spare is up)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                done = all(s.state is WorkerState.READY for s in self._slots)
                if done and spares:
                    done = len(self._spares) >= self._spares_target
                if done:
                    return True
                left = deadline - time.monotonic()
                if left <= 0 or self._closing:
                    return False
                self._cond.wait(min(left, 0.05) if spares else left)

    def subscribe(self, callback: Callable[[PoolEvent], None]) -> Callable[[], None]:
        """`callback(event)` for every pool event, on the pool's thread; returns an unsubscribe function."""
        return self.events_bus.subscribe(callback)

    def events(self, maxsize: int = 10_000) -> EventStream:
        """A blocking iterator of the pool events from now on (close it, or use it as a context manager)."""
        return self.events_bus.stream(maxsize)

    def watch_telemetry(self, memory_interval_s: float = 0.0) -> PoolTelemetry:
        """Every worker's telemetry (spans, memory samples) and the pool's events, as one stream of dicts."""
        t = PoolTelemetry(self, memory_interval_s)
        with self._lock:
            self._telemetry.append(t)
            workers = [s.worker for s in self._slots if s.worker is not None]
        for w in workers:
            t.attach(w)
        return t

    def _telemetry_attach(self, worker: _Worker) -> None:
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
                if self._closing:
                    raise PoolClosed("the pool is closed")
                from sidecar.observe.pool_observer import PoolObserver

                self._observer = PoolObserver(self, self._arena)
                self._call_observer = self._observer.observe_call
            return self._observer

    def serve_metrics(self, address: str = "127.0.0.1:9464", *, allow_remote: bool = False) -> str:
        """Serves Prometheus metrics (/metrics) and the live dashboard (/) on `address` (port 0: any
        free port) until `close()`; returns the bound HOST:PORT. Loopback only unless `allow_remote`."""
        return self.observer.serve(address, allow_remote=allow_remote)

    def memory_history(self, pid: int | None = None, device: str | None = None) -> list[Any]:
        """The memory history rings (`sidecar.observe.MemorySeries` per worker pid and device, "cpu" or
        "cuda:N"); the first call starts sampling (`observer.profile_memory(...)` sets interval etc.)."""
        return self.observer.memory_history(pid, device)

    @property
    def template(self) -> Template | None:
        """The template process (or, with use_template=False, the guardian without preloads)."""
        return self._template

    @property
    def template_pid(self) -> int | None:
        t = self._template
        return t.pid if t is not None and t.alive else None

    # ---------------------------------------------------------------------------------------------
    # closing

    def close(self, grace_s: float | None = None) -> None:
        """SIGTERM every worker (they drain), wait `grace_s`, SIGKILL what is left, then unlink
        everything of the run. Calls waiting for a worker get `PoolClosed`. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = self._closing = True
            self._cond.notify_all()
            workers = [s.worker for s in self._slots if s.worker is not None] + list(self._spares)
            for s in self._slots:
                s.state = WorkerState.STOPPING if s.worker is not None else WorkerState.STOPPED
            starting = list(self._starting)
        if self._observer is not None:  # no new one is made once closing: its endpoint stops first
            self._observer.close()
        self._stop.set()
        for proc in starting:
            proc.kill()
        grace = self._grace_s if grace_s is None else grace_s
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
                t.join(self._start_timeout if t.name.startswith("sidecar-pool-launch") else 5.0)
        for w in workers:
            w.proc.wait_exit(5.0)
            self._dispose(w, kill=False)
        with self._lock:
            for s in self._slots:
                s.state = WorkerState.STOPPED
                s.worker = None
            self._spares.clear()
            telemetry, self._telemetry = self._telemetry, []
        for t in telemetry:
            t.close()
        if self._template is not None:
            self._template.close()
        self.events_bus.close()
        self._arena.close()
        reaper.reap_run(self.run_id)
        shutil.rmtree(self._sockdir, ignore_errors=True)

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            log.warning("pool %s was not closed; closing it now", getattr(self, "run_id", "?"))
            try:
                self.close(grace_s=0.5)
            except Exception:  # noqa: BLE001 - interpreter shutdown: best effort
                pass

    def __repr__(self) -> str:
        return (f"<Pool run={self.run_id} workers={self.ready_count()}/{len(self._slots)} "
                f"breaker={self.breaker.state.value}>")


def _exit_of_error(exc: BaseException) -> ExitInfo:
    """The ExitInfo carried by a WorkerStartError (or a plain failure to start)."""
    fields = getattr(exc, "fields", {}) or {}
    try:
        cls = Classification(fields.get("classification", "other"))
    except ValueError:
        cls = Classification.OTHER
    return ExitInfo(cls, fields.get("exit_code"), fields.get("signal"))


class PoolTelemetry:
    """Merged telemetry of a pool: worker events (dicts as `Client.watch_telemetry` yields them, with
    `slot`-independent `pid`) and pool events ({"type": "pool", "event", "metadata", ...})."""

    _END = object()

    def __init__(self, pool: Pool, memory_interval_s: float) -> None:
        self._pool = pool
        self._interval = memory_interval_s
        self._queue: queue.Queue[Any] = queue.Queue(10_000)
        self._watches: list[Any] = []
        self._lock = threading.Lock()
        self._closed = False
        self._unsubscribe = pool.subscribe(lambda ev: self._put(_pool_event_dict(ev)))

    def _put(self, item: Any) -> None:
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            pass

    def attach(self, worker: _Worker) -> None:
        with self._lock:
            if self._closed:
                return
            try:
                watch = worker.client.watch_telemetry(self._interval)
            except SidecarError:
                return
            self._watches.append(watch)

        def pump() -> None:
            try:
                for ev in watch:
                    self._put(ev)
            except SidecarError:
                pass  # the worker went away; its replacement gets its own pump
        threading.Thread(target=pump, name=f"sidecar-pool-telemetry-{worker.proc.pid}", daemon=True).start()

    def get(self, timeout: float | None = None) -> dict[str, Any] | None:
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            return None
        return None if item is self._END else item

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            item = self._queue.get()
            if item is self._END:
                return
            yield item

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            watches, self._watches = self._watches, []
        with self._pool._lock:  # forgotten by the pool, or every watch ever opened would stay listed
            if self in self._pool._telemetry:
                self._pool._telemetry.remove(self)
        self._unsubscribe()
        for w in watches:
            try:
                w.close()
            except Exception:  # noqa: BLE001
                pass
        self._put(self._END)

    def __enter__(self) -> PoolTelemetry:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _pool_event_dict(ev: PoolEvent) -> dict[str, Any]:
    return {"type": "pool", "time_unix_ns": ev.time_unix_ns, "pid": os.getpid(), "event": ev.event,
            "metadata": ev.string_metadata()}
