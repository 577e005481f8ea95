"""`Launcher`: how a pool gets a ready worker, and nothing about when or why.

It owns the template process (`sidecar.host.template`; started cold-only when preloading fails, and
started again when it dies on its own) and the pool's directory of worker sockets. `launch(gpu)`
spawns one `sidecar serve` (forked from the template when that is safe, else cold; see `spawn`),
waits for its handshake and connects a `Client` to it; a probe must also answer a health check.
It blocks (the pool calls it on a launch thread) and either returns the ready worker or raises,
having killed and cleaned up whatever it had started. The decisions (when to launch, what a failure
means) are the pool's state machine's (`sidecar.host.supervisor`).
"""
from __future__ import annotations

import functools
import itertools
import logging
import os
import shutil
import tempfile
import threading
from typing import Callable

from sidecar.dataplane import reaper
from sidecar.dataplane.arena import Arena
from sidecar.errors import SidecarError
from sidecar.host.client import Client
from sidecar.host.crash import Classification, ExitInfo
from sidecar.host.settings import PoolSettings
from sidecar.host.spawn import WorkerProcess, WorkerStartError, start_worker
from sidecar.host.supervisor import StartFailure
from sidecar.host.template import Template, TemplateError

log = logging.getLogger(__name__)

__all__ = ["Launcher", "LAUNCH_ERRORS", "start_failure"]

# What a failed launch raises (anything else is a bug, logged as such).
LAUNCH_ERRORS = (WorkerStartError, TemplateError, OSError, SidecarError)


def start_failure(exc: BaseException) -> StartFailure:
    """The state machine's view of a failed launch (a WorkerStartError carries the worker's exit)."""
    fields = getattr(exc, "fields", {}) or {}
    try:
        cls = Classification(fields.get("classification", "other"))
    except ValueError:
        cls = Classification.OTHER
    return StartFailure(ExitInfo(cls, fields.get("exit_code"), fields.get("signal")), getattr(exc, "pid", None),
                        tuple(getattr(exc, "stderr_tail", None) or ()), str(exc).split("\n")[0])


class Launcher:
    def __init__(self, settings: PoolSettings, arena: Arena, on_template_death: Callable[[], None]) -> None:
        self.settings = settings
        self._arena = arena
        self._on_template_death = on_template_death
        self.sock_dir = tempfile.mkdtemp(prefix=f"sidecar-pool-{settings.run_id}-")
        self._listen_ids = itertools.count()
        self._lock = threading.Lock()
        self._starting: set[WorkerProcess] = set()
        self._closing = False
        self.template: Template | None = None
        self.template_startup_s: float | None = None

    # -- the template ------------------------------------------------------------------------------

    def start_template(self) -> None:
        s = self.settings
        start = functools.partial(Template, run_id=s.run_id, python=s.python, env=dict(s.env),
                                  start_timeout=s.start_timeout, sock_dir=self.sock_dir,
                                  on_death=self._on_template_death)
        try:
            template = start(preload=s.use_template, check_cuda_fork=s.device not in ("cpu", "mps"))
        except (TemplateError, OSError) as exc:
            if not s.use_template:
                raise
            log.warning("template process failed (%s); starting workers cold", exc)
            template = start(preload=False)  # no preloads: workers start cold; it still guards them
        self.template = template
        self.template_startup_s = template.startup_s
        if template.preload and template.failed:
            log.debug("template could not preload: %s", template.failed)
        if template.preload and template.cuda_touched and s.device not in ("cpu", "mps"):
            log.warning("pool %s: CUDA does not work in processes forked from the template; GPU workers "
                        "start cold (slow replacement: consider spares)", s.run_id)

    def restart_template(self, live_pids: Callable[[], list[int]]) -> tuple[int | None, int | None, int]:
        """After the template died on its own: a new one, which forks the next workers and becomes
        the guardian of every live worker. Returns (new pid, dead pid, workers it watches)."""
        dead = self.template
        self.start_template()
        if dead is not None:
            dead.close()  # reap the dead process, close its socket
        template = self.template
        pids = live_pids()
        if template is not None:
            for pid in pids:  # killed and reaped by the new template if the host dies
                template.watch(pid)
        return (template.pid if template is not None and template.alive else None,
                dead.pid if dead is not None else None, len(pids))

    # -- workers -----------------------------------------------------------------------------------

    def launch(self, gpu: str | None, probe: bool = False) -> tuple[WorkerProcess, Client]:
        """A ready, connected worker (placed on `gpu`); raises one of LAUNCH_ERRORS."""
        proc = self._spawn(gpu)
        assert proc.address is not None
        client = Client(proc.address, arena=self._arena, run_id=self.settings.run_id,
                        inline_threshold=self.settings.inline_threshold)
        if probe:
            try:
                status = client.health(timeout=self.settings.health_timeout_s)
            except SidecarError as exc:
                status = f"no answer ({exc})"
            if status != "SERVING":
                self.discard(proc, client)
                raise WorkerStartError(f"probe worker pid {proc.pid} answered health {status}", pid=proc.pid,
                                       classification="unresponsive")
        return proc, client

    def _spawn(self, gpu: str | None) -> WorkerProcess:
        s = self.settings
        template = self.template
        if template is not None and (not template.preload or not template.alive
                                     or (template.cuda_touched and s.device != "cpu")):
            template = None  # no fork: not preloaded, gone, or CUDA already touched in it
        sock = os.path.join(self.sock_dir, f"w{next(self._listen_ids)}.sock")
        proc: WorkerProcess | None = None

        def track(started: WorkerProcess) -> None:
            nonlocal proc
            proc = started
            with self._lock:
                if self._closing:
                    started.kill()
                self._starting.add(started)

        try:
            worker = start_worker(s.serve_args(sock), python=s.python, env=s.worker_env(gpu),
                                  start_timeout=s.start_timeout, template=template, tail_lines=s.tail_lines,
                                  on_spawn=track)
        except BaseException:
            if proc is not None:  # it exists but never became ready: it must not linger
                proc.kill()
                proc.wait_exit(5.0)
                reaper.reap_owner(s.run_id, proc.pid)
            raise
        finally:
            if proc is not None:
                with self._lock:
                    self._starting.discard(proc)
        if worker.via == "cold" and self.template is not None:
            self.template.watch(worker.pid)  # so that it dies with the host even if started cold
        return worker

    def discard(self, proc: WorkerProcess, client: Client | None) -> None:
        """Kills a worker the pool will not use, and cleans up after it."""
        proc.kill()
        proc.wait_exit(5.0)
        if client is not None:
            client.close()
        self.unlink_dead(proc)

    def unlink_dead(self, proc: WorkerProcess) -> None:
        """Unlinks what a dead worker left: its segments and its socket file."""
        reaped = reaper.reap_owner(self.settings.run_id, proc.pid)
        if reaped:
            log.debug("pool %s: unlinked %d segment(s) of dead worker %d", self.settings.run_id, len(reaped),
                      proc.pid)
        address = proc.address or ""
        if address.startswith("unix:"):
            try:
                os.unlink(address[len("unix:"):])
            except OSError:
                pass

    # -- closing -----------------------------------------------------------------------------------

    def stop_starting(self) -> None:
        """No worker started from now on gets going; those starting now are killed."""
        with self._lock:
            self._closing = True
            starting = list(self._starting)
        for proc in starting:
            proc.kill()

    def close(self) -> None:
        if self.template is not None:
            self.template.close()
        shutil.rmtree(self.sock_dir, ignore_errors=True)
