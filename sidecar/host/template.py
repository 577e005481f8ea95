"""`Template`: the host's handle on a template process (`sidecar.host.template_process`), which
imported torch once and forks ready-to-serve workers on request.

The handle starts the process over a socketpair and waits for its ready record (what it imported,
whether CUDA got mapped), then one reader thread takes the template's records: the answer to each
spawn request (`spawn` blocks until it comes, and builds the worker's handle on the reader thread so
that no exit report can overtake it), and each worker's raw wait status (`WorkerProcess.report_status`).
`watch(pid)` asks the template to kill a worker it did not fork (one started cold) if the host dies.
When the template dies on its own, `on_death` is called (the pool starts a new one); its workers live on.
The records themselves are in `sidecar.host.template_protocol`.
"""
from __future__ import annotations

import itertools
import logging
import os
import select
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Mapping, Sequence, TypeVar

from sidecar.host.template_protocol import TEMPLATE_MODULE, recv, send

log = logging.getLogger(__name__)

_Handle = TypeVar("_Handle")  # what a spawn's `make` builds (the host's WorkerProcess)

__all__ = ["Template", "TemplateError"]

_SPAWN_REPLY_S = 30.0


class TemplateError(RuntimeError):
    """The template could not be started, or it refused/failed a spawn."""


class Template:
    """Starts and talks to one template process (see module doc). Thread-safe."""

    def __init__(self, *, run_id: str, python: str = sys.executable, env: Mapping[str, str] | None = None,
                 preload: bool = True, start_timeout: float = 60.0, check_cuda_fork: bool = False,
                 sock_dir: str | None = None, on_death: Callable[[], None] | None = None) -> None:
        self.run_id = run_id
        self.preload = preload
        self._on_death = on_death
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._pending: dict[int, list[Any]] = {}          # id -> [make, event, proc | error]
        self._procs: dict[int, Any] = {}                   # pid -> WorkerProcess
        self._closed = False
        self.dead = False
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        started = time.monotonic()
        try:
            cmd = [python, "-m", TEMPLATE_MODULE, "--fd", str(child.fileno()), "--run-id", run_id,
                   "--host-pid", str(os.getpid())]
            if preload:
                cmd.append("--preload")
            if preload and check_cuda_fork:
                cmd.append("--check-cuda-fork")
            if sock_dir:
                cmd += ["--sock-dir", sock_dir]
            self._popen = subprocess.Popen(cmd, pass_fds=[child.fileno()], stdin=subprocess.DEVNULL,
                                           stdout=subprocess.DEVNULL, env=None if env is None else dict(env),
                                           start_new_session=True)
        finally:
            child.close()
        self._sock = parent
        self.pid = self._popen.pid
        hello = self._await_hello(start_timeout)
        self.startup_s = time.monotonic() - started
        self.preload_s: float = hello.get("preload_s", 0.0)
        self.modules: list[str] = hello.get("modules", [])
        self.failed: dict[str, str] = hello.get("failed", {})
        # libcuda mapped by an import, and whether a forked child could still use CUDA (None: not
        # checked); cuda_touched: forked workers must not be used for CUDA.
        self.cuda_mapped: bool = bool(hello.get("cuda_mapped"))
        self.fork_cuda_ok: bool | None = hello.get("fork_cuda_ok")
        self.cuda_touched: bool = bool(hello.get("cuda_touched"))
        self._reader = threading.Thread(target=self._read_loop, name=f"sidecar-template-{self.pid}", daemon=True)
        self._reader.start()

    def _await_hello(self, timeout: float) -> dict[str, Any]:
        readable, _, _ = select.select([self._sock], [], [], timeout)
        msg = recv(self._sock)[0] if readable else None
        if msg is None or msg.get("op") != "ready":
            rc = self._popen.poll()
            self._popen.kill()
            self._popen.wait()
            self._sock.close()
            why = "timed out" if not readable else f"exited with {rc}" if rc is not None else "sent garbage"
            raise TemplateError(f"template process {self.pid} did not start ({why})")
        return msg

    @property
    def alive(self) -> bool:
        return not self.dead and not self._closed

    def spawn(self, argv: Sequence[str], *, env: Mapping[str, str], fds: Sequence[int], cwd: str | None,
              make: Callable[[int, int], _Handle]) -> _Handle:
        """Forks a worker running `sidecar.cli.main(argv)` with `fds` as its stdin/stdout/stderr.

        `make(pid, pidfd)` builds the host's handle for it; it is called on the reader thread before
        any exit report of that pid is handled, so no exit can be missed.
        """
        event = threading.Event()
        with self._lock:
            if not self.alive:
                raise TemplateError("the template process is gone")
            rid = next(self._ids)
            slot: list[Any] = [make, event, None]
            self._pending[rid] = slot
            send(self._sock, {"op": "spawn", "id": rid, "argv": list(argv), "env": dict(env), "cwd": cwd}, fds)
        if not event.wait(_SPAWN_REPLY_S):
            with self._lock:
                self._pending.pop(rid, None)
            raise TemplateError("the template did not answer a spawn request")
        result = slot[2]
        if isinstance(result, BaseException):
            raise result
        handle: _Handle = result  # what make() returned on the reader thread
        return handle

    def watch(self, pid: int) -> None:
        """Asks the template to kill `pid` (a worker started cold) if the host dies."""
        self._command({"op": "watch", "pid": pid})

    def _command(self, msg: Mapping[str, Any]) -> None:
        with self._lock:
            if self.alive:
                try:
                    send(self._sock, msg)
                except OSError:
                    pass

    def _read_loop(self) -> None:
        while True:
            try:
                msg, fds = recv(self._sock)
            except OSError:
                msg, fds = None, []
            if msg is None:
                break
            op = msg.get("op")
            if op == "spawned":
                with self._lock:
                    slot = self._pending.pop(msg["id"], None)
                pidfd = fds[0] if fds else None
                if slot is None:  # the requester gave up; the child will be killed with the pool
                    if pidfd is not None:
                        os.close(pidfd)
                    continue
                try:
                    proc = slot[0](msg["pid"], pidfd)
                    self._procs[msg["pid"]] = proc
                    slot[2] = proc
                except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
                    slot[2] = exc
                slot[1].set()
            elif op == "spawn_failed":
                with self._lock:
                    slot = self._pending.pop(msg["id"], None)
                if slot is not None:
                    slot[2] = TemplateError(f"template could not fork a worker: {msg.get('error')}")
                    slot[1].set()
            elif op == "exit":
                proc = self._procs.pop(msg["pid"], None)
                if proc is not None:
                    proc.report_status(int(msg["status"]))
            for fd in fds if op != "spawned" else ():
                os.close(fd)
        with self._lock:
            was_closed = self._closed
            self.dead = True
            pending, self._pending = self._pending, {}
            orphans, self._procs = self._procs, {}
        for slot in pending.values():
            slot[2] = TemplateError("the template process died")
            slot[1].set()
        for proc in orphans.values():  # nobody will report their wait status now
            proc.report_status(None)
        if not was_closed:
            log.warning("template process %d died", self.pid)
            if self._on_death is not None:
                self._on_death()

    def close(self, timeout: float = 5.0) -> None:
        """Asks the template to kill what is left of its children and exit; waits for it."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if not self.dead:
                try:
                    send(self._sock, {"op": "shutdown"})
                except OSError:
                    pass
        try:
            self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self._popen.kill()
            self._popen.wait()
        self._reader.join(timeout)
        self._sock.close()

    def __repr__(self) -> str:
        return f"<Template pid={self.pid} preload={self.preload} alive={self.alive}>"
