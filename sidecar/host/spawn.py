"""Start one worker process and wait for its handshake.

A worker is `python -m sidecar serve ...`. It is ready when it prints `SIDECAR_READY <address> <pid>`
on stdout (or, with `--ready-file`, when that file appears). Until then everything it writes is kept,
so a worker that dies or hangs during start-up is reported with the last lines of its output.

Two ways to start one, same handle (`WorkerProcess`) either way:
- cold: `subprocess.Popen`; a thread blocked in `wait()` learns the exit status at once;
- forked by a template process (`sidecar.host.template_process`) that imported torch: the worker is
  the template's child, so its exit status comes over the template's control socket, and a pidfd
  tells us of the death even if the template itself is gone (the status is then lost: the
  classification is read from the worker's last output, see `crash.classify_from_tail`).

Every worker gets a pipe on stdin whose write end only this host holds: when the host dies the
worker sees EOF. Each worker leads its own process group, so a signal to the group also reaches
anything it started.
"""
from __future__ import annotations

import collections
import logging
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

from sidecar.errors import START_ERROR_PREFIX, SidecarError, WorkerCrashed, parse_start_error
from sidecar.host.crash import (Classification, ExitInfo, classify_from_tail, classify_returncode,
                                classify_wait_status, condense_tail)

if TYPE_CHECKING:
    from sidecar.host.template import Template

log = logging.getLogger(__name__)

__all__ = ["WorkerProcess", "WorkerStartError", "start_worker", "READY_PREFIX", "DEFAULT_TAIL_LINES"]

READY_PREFIX = "SIDECAR_READY"
DEFAULT_TAIL_LINES = 40
_PUMP_DRAIN_S = 0.5     # after an exit, how long to wait for the last output still in the pipes
_STATUS_WAIT_S = 1.0    # template path: how long to wait for the status after the pidfd fired
_READY_FILE_POLL_S = 0.002


class WorkerStartError(WorkerCrashed):
    """The worker exited, or never said it was ready, during start-up (kind WORKER_CRASHED)."""


class WorkerProcess:
    """One running (or finished) worker: its pid, address, output tail and exit status."""

    def __init__(self, pid: int, *, via: str, stdin_fd: int, stdout_fd: int, stderr_fd: int,
                 tail_lines: int = DEFAULT_TAIL_LINES, popen: subprocess.Popen[bytes] | None = None,
                 pidfd: int | None = None) -> None:
        self.pid = pid
        self.via = via  # "cold" or "template"
        self.address: str | None = None
        self.ready_at: float | None = None
        self._popen = popen
        self._pidfd = pidfd  # template path: a pidfd of the worker, sent by the template
        self._stdin_fd: int | None = stdin_fd
        # Keep much more than we report: a native crash dumps every thread's stack, and the part
        # that matters (the fatal line, the crashing thread) must not be pushed out.
        self._tail_lines = tail_lines
        self._tail: collections.deque[str] = collections.deque(maxlen=max(500, tail_lines * 10))
        self._cond = threading.Condition()
        self._exit: ExitInfo | None = None
        self._finished = False  # exit known and every exit callback has run
        self._status: int | None = None          # raw wait status reported by the template (None: lost)
        self._status_event = threading.Event()
        self._callbacks: list[Callable[[ExitInfo], None]] = []
        self._override: Classification | None = None
        self._pump = threading.Thread(target=self._pump_output, args=(stdout_fd, stderr_fd),
                                      name=f"sidecar-worker-{pid}-output", daemon=True)
        self._pump.start()
        self._watcher = threading.Thread(target=self._watch, name=f"sidecar-worker-{pid}-wait", daemon=True)
        self._watcher.start()

    # -- state ------------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.address is not None

    @property
    def exit_info(self) -> ExitInfo | None:
        return self._exit

    @property
    def alive(self) -> bool:
        return self._exit is None

    def stderr_tail(self, n: int | None = None) -> list[str]:
        """The last lines the worker wrote (stderr, and stdout other than the ready line)."""
        with self._cond:
            lines = list(self._tail)
        return condense_tail(lines, self._tail_lines if n is None else n)

    def wait_exit(self, timeout: float | None = None) -> ExitInfo | None:
        """Blocks until the worker is gone, its output drained and its exit callbacks done (so a
        pool already knows of the death when this returns); None on timeout."""
        if threading.current_thread() is self._watcher:  # from an exit callback: do not wait on ourselves
            return self._exit
        with self._cond:
            self._cond.wait_for(lambda: self._finished, timeout)
            return self._exit if self._finished else None

    def add_exit_callback(self, callback: Callable[[ExitInfo], None]) -> None:
        """`callback(info)` runs once the worker is gone (at once if it already is)."""
        with self._cond:
            if self._exit is None:
                self._callbacks.append(callback)
                return
            info = self._exit
        callback(info)

    def classify_as(self, classification: Classification) -> None:
        """The pool killed this worker on purpose (start timeout, unresponsive): say so in its exit."""
        self._override = classification

    # -- signals ----------------------------------------------------------------------------------
    def signal(self, signum: int) -> bool:
        """Sends `signum` to the worker's process group; False when it is already gone."""
        if self._exit is not None:
            return False
        try:
            os.killpg(self.pid, signum)
            return True
        except ProcessLookupError:
            pass
        except PermissionError:
            pass
        try:  # not (or no longer) a group leader: the process alone
            os.kill(self.pid, signum)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    def terminate(self) -> bool:
        return self.signal(signal.SIGTERM)

    def kill(self) -> bool:
        return self.signal(signal.SIGKILL)

    def close_stdin(self) -> None:
        fd, self._stdin_fd = self._stdin_fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    # -- called by the template reader --------------------------------------------------------------
    def report_status(self, status: int | None) -> None:
        """The raw wait status, or None: the template died, no status will come."""
        if not self._status_event.is_set():
            self._status = status
            self._status_event.set()

    # -- internals --------------------------------------------------------------------------------
    def _pump_output(self, stdout_fd: int, stderr_fd: int) -> None:
        """Reads both pipes line by line until EOF: finds the ready line, keeps the tail."""
        partial = {stdout_fd: b"", stderr_fd: b""}
        open_fds = [stdout_fd, stderr_fd]
        try:
            while open_fds:
                readable, _, _ = select.select(open_fds, [], [])
                for fd in readable:
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        open_fds.remove(fd)
                        if partial[fd]:
                            self._line(fd == stdout_fd, partial[fd])
                            partial[fd] = b""
                        continue
                    data = partial[fd] + chunk
                    *lines, partial[fd] = data.split(b"\n")
                    for line in lines:
                        self._line(fd == stdout_fd, line)
        finally:
            for fd in (stdout_fd, stderr_fd):
                try:
                    os.close(fd)
                except OSError:
                    pass

    def _line(self, is_stdout: bool, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace").rstrip("\r")
        if is_stdout and self.address is None and text.startswith(READY_PREFIX + " "):
            parts = text.split()
            if len(parts) >= 2:
                self._mark_ready(parts[1])
                return
        if text:
            log.debug("worker %d: %s", self.pid, text)
            with self._cond:
                self._tail.append(text)

    def _mark_ready(self, address: str) -> None:
        with self._cond:
            if self.address is None:
                self.address = address
                self.ready_at = time.monotonic()
            self._cond.notify_all()

    def _watch(self) -> None:
        """Learns the exit status (Popen.wait, or pidfd + template report), then finishes up."""
        if self._popen is not None:
            info = classify_returncode(self._popen.wait())
        else:
            info = self._wait_forked()
        self._pump.join(_PUMP_DRAIN_S)
        if self._override is not None:
            info = ExitInfo(self._override, info.exit_code, info.signal)
        self.close_stdin()
        with self._cond:
            self._exit = info
            callbacks, self._callbacks = self._callbacks, []
            self._cond.notify_all()
        for cb in callbacks:
            try:
                cb(info)
            except Exception:  # a broken callback must not hide the exit from the others
                log.exception("exit callback of worker %d failed", self.pid)
        with self._cond:
            self._finished = True
            self._cond.notify_all()

    def _wait_forked(self) -> ExitInfo:
        pidfd, self._pidfd = self._pidfd, None
        if pidfd is not None:
            try:  # until it is gone (the pidfd fires) or its template reported its status
                while self._status is None:
                    readable, _, _ = select.select([pidfd], [], [], 0.5)
                    if readable:
                        break
            finally:
                os.close(pidfd)
        if not self._status_event.wait(_STATUS_WAIT_S) or self._status is None:
            # Its template died before it: init reaped it. faulthandler's report may still say why.
            self._pump.join(_PUMP_DRAIN_S)
            with self._cond:
                lines = list(self._tail)
            log.info("worker %d is gone and its template with it: exit status lost", self.pid)
            return classify_from_tail(lines)
        return classify_wait_status(self._status)

    def __repr__(self) -> str:
        state = "ready" if self.ready else "starting"
        if self._exit is not None:
            state = f"exited {self._exit.classification.value}"
        return f"<WorkerProcess pid={self.pid} {state} via={self.via} address={self.address}>"


def _serve_argv(args: Sequence[str], ready_file: Path | None) -> list[str]:
    argv = ["serve", *args]
    if ready_file is not None:
        argv += ["--ready-file", str(ready_file)]
    return argv


def _read_ready_file(path: Path) -> str | None:
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    if not text:
        return None
    first = text.split()
    # The file holds the address; tolerate the ready-line form ("SIDECAR_READY addr pid") too.
    return first[1] if first[0] == READY_PREFIX and len(first) > 1 else first[0]


def start_worker(args: Sequence[str] = (), *, python: str = sys.executable,
                 env: Mapping[str, str] | None = None, start_timeout: float = 60.0,
                 template: Template | None = None, use_ready_file: bool = False,
                 tail_lines: int = DEFAULT_TAIL_LINES, cwd: str | None = None,
                 on_spawn: Callable[[WorkerProcess], None] | None = None) -> WorkerProcess:
    """Starts `sidecar serve <args>` and returns once it is ready.

    `env` is the worker's whole environment (default: this process's). With `template`, the worker
    is forked from it instead of started cold. Raises `WorkerStartError` (exit code, signal,
    classification, the worker's last output lines) when it exits or stays silent for
    `start_timeout` seconds; a silent worker is killed first. `on_spawn(proc)` is called as soon as
    the process exists, before the handshake (a pool uses it to kill starting workers on close).
    """
    ready_file: Path | None = None
    tmpdir: str | None = None
    if use_ready_file:
        tmpdir = tempfile.mkdtemp(prefix="sidecar-ready-")
        ready_file = Path(tmpdir) / "ready"
    argv = _serve_argv(args, ready_file)
    stdin_r, stdin_w = os.pipe()
    stdout_r, stdout_w = os.pipe()
    stderr_r, stderr_w = os.pipe()
    child_ends = (stdin_r, stdout_w, stderr_w)
    try:
        if template is not None:
            proc = template.spawn(argv, env=dict(os.environ if env is None else env),
                                  fds=child_ends, cwd=cwd,
                                  make=lambda pid, pidfd: WorkerProcess(
                                      pid, via="template", stdin_fd=stdin_w, stdout_fd=stdout_r,
                                      stderr_fd=stderr_r, tail_lines=tail_lines, pidfd=pidfd))
        else:
            popen = subprocess.Popen(
                [python, "-m", "sidecar", *argv], stdin=stdin_r, stdout=stdout_w, stderr=stderr_w,
                env=None if env is None else dict(env), cwd=cwd, start_new_session=True)
            proc = WorkerProcess(popen.pid, via="cold", stdin_fd=stdin_w, stdout_fd=stdout_r,
                                 stderr_fd=stderr_r, tail_lines=tail_lines, popen=popen)
    except BaseException:
        for fd in (stdin_w, stdout_r, stderr_r):
            os.close(fd)
        raise
    finally:
        for fd in child_ends:  # the child has its copies now; ours would hide its EOF
            os.close(fd)
    if on_spawn is not None:
        on_spawn(proc)
    try:
        _await_ready(proc, start_timeout, ready_file)
    finally:
        if tmpdir is not None:
            for p in Path(tmpdir).iterdir():
                p.unlink(missing_ok=True)
            os.rmdir(tmpdir)
    return proc


def _reported_start_error(proc: WorkerProcess) -> SidecarError | None:
    """The structured error a worker wrote on stderr when it could not start (`SIDECAR_START_ERROR`)."""
    with proc._cond:
        lines = list(proc._tail)
    for line in reversed(lines):
        err = parse_start_error(line)
        if err is not None:
            err.fields["stderr_tail"] = [x for x in proc.stderr_tail() if not x.startswith(START_ERROR_PREFIX)]
            return err
    return None


def _await_ready(proc: WorkerProcess, start_timeout: float, ready_file: Path | None) -> None:
    deadline = time.monotonic() + start_timeout
    step = _READY_FILE_POLL_S if ready_file is not None else None
    with proc._cond:
        while proc.address is None and proc._exit is None:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if ready_file is not None:
                address = _read_ready_file(ready_file)
                if address is not None:
                    proc.address, proc.ready_at = address, time.monotonic()
                    break
            proc._cond.wait(left if step is None else min(step, left))
    if proc.address is not None:
        return
    if proc.exit_info is None:
        proc.classify_as(Classification.START_TIMEOUT)
        proc.kill()
        info = proc.wait_exit(5.0) or ExitInfo(Classification.START_TIMEOUT)
        message = f"worker pid {proc.pid} did not report ready within {start_timeout:g} s and was killed"
    else:
        info = proc.exit_info
        message = f"worker pid {proc.pid} {info.describe()} during start-up"
        reported = _reported_start_error(proc)
        if reported is not None:  # e.g. DeviceUnavailable naming the devices that exist
            reported.fields.update(pid=proc.pid, **info.as_fields())
            raise reported
    tail = proc.stderr_tail()
    if tail:
        message += "; last output:\n  " + "\n  ".join(tail[-10:])
    raise WorkerStartError(message, pid=proc.pid, stderr_tail=tail, **info.as_fields())
