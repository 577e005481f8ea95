"""The template: a process that imported torch once and forks ready-to-serve workers on request.

A cold `python -m sidecar serve` spends most of its start-up importing torch, numpy, grpc and our
worker modules. The template pays that once per pool; a fork of it only has to build the server,
which is how a crashed worker is replaced in milliseconds.

Rules that keep the fork safe:
- the template never initialises CUDA (it sets PYTORCH_NVML_BASED_CUDA_CHECK=1 so that even
  `torch.cuda.is_available()` in an imported module asks NVML, not the driver); it reports whether
  libcuda got mapped anyway, and the pool then stops forking GPU workers from it;
- it runs no torch op and starts no Python thread, and forks from its main thread;
- it does not import `sidecar.worker.debug_ops` or user `--ops` modules: the child imports those,
  so crash-at-import modules crash the child, not the template, and debug ops stay opt-in.

Each child runs `sidecar.cli.main(["serve", ...])` with the stdin/stdout/stderr pipes the host sent
(SCM_RIGHTS) and the host's environment for it. The template is the child's parent, so the template
reaps it and sends the raw wait status to the host, together with a pidfd at spawn time so the host
learns of the death even if the template is gone.

The template is also the pool's guardian: when the host dies (control socket EOF, or the template is
re-parented), it SIGKILLs every worker it forked or was asked to watch, waits for them, unlinks the
shared memory of the host and of those workers and removes the pool's socket directory, all within
well under a second.

Control protocol: one JSON object per SOCK_SEQPACKET record, file descriptors as ancillary data.
  host -> template: {"op": "spawn", "id", "argv", "env", "cwd"} + fds [stdin, stdout, stderr];
                    {"op": "watch"|"unwatch", "pid"}; {"op": "shutdown"}
  template -> host: {"op": "ready", "pid", "preload_s", "modules", "failed", "cuda_mapped",
                     "fork_cuda_ok", "cuda_touched", "threads"};
                    {"op": "spawned", "id", "pid"} + fds [pidfd]; {"op": "spawn_failed", "id", "error"};
                    {"op": "exit", "pid", "status"}
"""
from __future__ import annotations

import argparse
import atexit
import ctypes
import importlib
import itertools
import json
import logging
import os
import pkgutil
import select
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import warnings
from typing import Any, Callable, Mapping, Sequence

log = logging.getLogger(__name__)

__all__ = ["Template", "TemplateError", "PRELOAD_MODULES"]

_MSG_MAX = 1 << 20
_PR_SET_PDEATHSIG = 1
_PARENT_POLL_S = 0.25     # how often the template checks that the host is still its parent
_KILL_WAIT_S = 2.0        # after SIGKILL, how long to wait for workers before reaping anyway
_SPAWN_REPLY_S = 30.0
_CUDA_PROBE_S = 60.0      # a first CUDA context can take seconds; past this, forks count as unsafe

# Imported by the template before it forks (missing ones are skipped and reported).
PRELOAD_MODULES: tuple[str, ...] = (
    "numpy", "torch", "pyarrow", "psutil", "grpc", "grpc._server", "google.protobuf", "grpc_status.rpc_status",
    "grpc_health.v1.health", "grpc_reflection.v1alpha.reflection",
    "sidecar.v1.sidecar_pb2", "sidecar.v1.sidecar_pb2_grpc", "sidecar.errors", "sidecar.etf", "sidecar.cli",
)
_PRELOAD_PACKAGES = ("sidecar.protocol", "sidecar.dataplane", "sidecar.worker")
_NEVER_PRELOAD = {"sidecar.worker.debug_ops"}  # registers crash ops on import: opt-in only


class TemplateError(RuntimeError):
    """The template could not be started, or it refused/failed a spawn."""


def _send(sock: socket.socket, obj: Mapping[str, Any], fds: Sequence[int] = ()) -> None:
    data = json.dumps(obj).encode()
    if fds:
        sent = socket.send_fds(sock, [data], list(fds))
    else:
        sent = sock.send(data)
    if sent != len(data):  # a SEQPACKET record is all or nothing; this is a bug, not a condition
        raise TemplateError(f"short send on the template socket ({sent} of {len(data)} bytes)")


def _recv(sock: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    data, fds, _flags, _addr = socket.recv_fds(sock, _MSG_MAX, 8)
    if not data:
        for fd in fds:
            os.close(fd)
        return None, []
    return json.loads(data), fds


# ==================================================================================================
# Host side


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
            cmd = [python, "-m", "sidecar.host.template", "--fd", str(child.fileno()), "--run-id", run_id,
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
        msg = _recv(self._sock)[0] if readable else None
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
              make: Callable[..., Any]) -> Any:
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
            _send(self._sock, {"op": "spawn", "id": rid, "argv": list(argv), "env": dict(env), "cwd": cwd}, fds)
        if not event.wait(_SPAWN_REPLY_S):
            with self._lock:
                self._pending.pop(rid, None)
            raise TemplateError("the template did not answer a spawn request")
        result = slot[2]
        if isinstance(result, BaseException):
            raise result
        return result

    def watch(self, pid: int) -> None:
        """Asks the template to kill `pid` (a worker started cold) if the host dies."""
        self._command({"op": "watch", "pid": pid})

    def unwatch(self, pid: int) -> None:
        self._command({"op": "unwatch", "pid": pid})

    def _command(self, msg: Mapping[str, Any]) -> None:
        with self._lock:
            if self.alive:
                try:
                    _send(self._sock, msg)
                except OSError:
                    pass

    def _read_loop(self) -> None:
        while True:
            try:
                msg, fds = _recv(self._sock)
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
        for slot in pending.values():
            slot[2] = TemplateError("the template process died")
            slot[1].set()
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
                    _send(self._sock, {"op": "shutdown"})
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


# ==================================================================================================
# Template process


def _preload() -> tuple[list[str], dict[str, str]]:
    loaded: list[str] = []
    failed: dict[str, str] = {}

    def load(name: str) -> None:
        if name in _NEVER_PRELOAD:
            return
        try:
            importlib.import_module(name)
            loaded.append(name)
        except BaseException as exc:  # noqa: BLE001 - a module that fails here fails in the child too
            failed[name] = f"{type(exc).__name__}: {exc}"

    for name in PRELOAD_MODULES:
        load(name)
    for pkg_name in _PRELOAD_PACKAGES:
        try:
            pkg = importlib.import_module(pkg_name)
        except BaseException as exc:  # noqa: BLE001
            failed[pkg_name] = f"{type(exc).__name__}: {exc}"
            continue
        for info in pkgutil.iter_modules(pkg.__path__, pkg_name + "."):
            load(info.name)
    return loaded, failed


def _libcuda_loaded() -> bool:
    try:
        with open("/proc/self/maps") as f:
            return any("libcuda.so" in line for line in f)
    except OSError:
        return False


def _probe_cuda_fork(timeout: float) -> bool:
    """Can a child forked from this process use CUDA? (It cannot if CUDA was initialised here.)

    libcuda can be mapped by an import without cuInit having run; the only reliable answer is to
    fork and try, so a child creates a context and touches the GPU once, then exits.
    """
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    pid = os.fork()
    if pid == 0:
        ok = False
        try:
            import torch

            ok = bool((torch.ones(1, device="cuda") + 1).item() == 2.0)
        except BaseException:  # noqa: BLE001 - any failure means "not usable after fork"
            traceback.print_exc()
        os._exit(0 if ok else 1)
    pidfd = os.pidfd_open(pid)
    try:
        readable, _, _ = select.select([pidfd], [], [], timeout)
        if not readable:
            os.kill(pid, signal.SIGKILL)
    finally:
        os.close(pidfd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


def _child(msg: dict[str, Any], fds: list[int], template_pid: int, to_close: list[int]) -> None:
    """Runs in the forked worker: becomes `sidecar serve` and never returns."""
    code = 1
    try:
        os.setsid()  # own process group: the pool signals the group, a terminal's ^C does not reach it
        for target, fd in enumerate(fds[:3]):
            os.dup2(fd, target)
        for fd in set(fds) | set(to_close):
            if fd > 2:
                try:
                    os.close(fd)
                except OSError:
                    pass
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        # Die with the template (it only dies with the host, or by accident): never an orphan worker.
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != template_pid:
            os._exit(1)
        os.environ.clear()
        os.environ.update(msg["env"])
        if os.environ.get("PYTHONFAULTHANDLER"):  # what the variable does at a cold interpreter start
            import faulthandler

            faulthandler.enable()
        if msg.get("cwd"):
            os.chdir(msg["cwd"])
        argv = list(msg["argv"])
        sys.argv = ["sidecar", *argv]
        from sidecar.cli import main

        rc = main(argv)
        code = rc if isinstance(rc, int) else 0
    except SystemExit as exc:
        if isinstance(exc.code, int) or exc.code is None:
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - reported like an uncaught exception in a normal process
        traceback.print_exc()
        code = 1
    finally:
        try:
            atexit._run_exitfuncs()  # what a normal interpreter exit would run (log flush, cleanups)
        except BaseException:  # noqa: BLE001
            pass
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:  # noqa: BLE001
                pass
        os._exit(code)


class _TemplateServer:
    def __init__(self, sock: socket.socket, run_id: str, host_pid: int, sock_dir: str | None = None) -> None:
        self.sock = sock
        self.run_id = run_id
        self.host_pid = host_pid
        self.sock_dir = sock_dir
        self.sel = selectors.DefaultSelector()
        self.sel.register(sock, selectors.EVENT_READ, None)
        self.children: dict[int, int] = {}  # pid -> pidfd of workers we forked
        self.watched: dict[int, int] = {}   # pid -> pidfd of workers the host started cold
        self.pid = os.getpid()

    def run(self) -> int:
        while True:
            for key, _ in self.sel.select(_PARENT_POLL_S):
                if key.data is None:
                    msg, fds = _recv(self.sock)
                    if msg is None:
                        return self.host_died()
                    if self.handle(msg, fds):
                        return 0
                else:
                    self.child_event(*key.data)
            if os.getppid() != self.host_pid:  # host gone (someone else may hold our socket)
                return self.host_died()

    def handle(self, msg: dict[str, Any], fds: list[int]) -> bool:
        op = msg.get("op")
        if op == "spawn":
            self.fork(msg, fds)
        elif op == "watch":
            try:
                pidfd = os.pidfd_open(int(msg["pid"]))
            except ProcessLookupError:
                return False
            self.watched[int(msg["pid"])] = pidfd
            self.sel.register(pidfd, selectors.EVENT_READ, ("watched", int(msg["pid"])))
        elif op == "unwatch":
            pidfd = self.watched.pop(int(msg["pid"]), None)
            if pidfd is not None:
                self.sel.unregister(pidfd)
                os.close(pidfd)
        elif op == "shutdown":
            self.kill_all()
            return True
        for fd in fds if op != "spawn" else ():
            os.close(fd)
        return False

    def fork(self, msg: dict[str, Any], fds: list[int]) -> None:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        to_close = [self.sock.fileno(), self.sel.fileno(), *self.children.values(), *self.watched.values()]
        try:
            pid = os.fork()
        except OSError as exc:
            for fd in fds:
                os.close(fd)
            _send(self.sock, {"op": "spawn_failed", "id": msg["id"], "error": str(exc)})
            return
        if pid == 0:
            _child(msg, fds, self.pid, to_close)
        for fd in fds:
            os.close(fd)
        pidfd = os.pidfd_open(pid)  # cannot race: our unreaped child keeps its pid
        self.children[pid] = pidfd
        self.sel.register(pidfd, selectors.EVENT_READ, ("child", pid))
        host_pidfd = os.dup(pidfd)
        try:
            _send(self.sock, {"op": "spawned", "id": msg["id"], "pid": pid}, [host_pidfd])
        finally:
            os.close(host_pidfd)

    def child_event(self, kind: str, pid: int) -> None:
        if kind == "watched":
            pidfd = self.watched.pop(pid)
            self.sel.unregister(pidfd)
            os.close(pidfd)
            return
        done, status = os.waitpid(pid, os.WNOHANG)
        if done == 0:
            return
        pidfd = self.children.pop(pid)
        self.sel.unregister(pidfd)
        os.close(pidfd)
        try:
            _send(self.sock, {"op": "exit", "pid": pid, "status": status})
        except OSError:
            pass

    def kill_all(self) -> list[int]:
        """SIGKILLs every worker (group) we know of and waits for them; returns their pids."""
        pids = list(self.children) + list(self.watched)
        for pid in self.children:
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        for pid, pidfd in self.watched.items():
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            except OSError:
                pass
        deadline = time.monotonic() + _KILL_WAIT_S
        fds = list(self.children.values()) + list(self.watched.values())
        while fds and time.monotonic() < deadline:
            readable, _, _ = select.select(fds, [], [], max(0.0, deadline - time.monotonic()))
            fds = [fd for fd in fds if fd not in readable]
        for pid in list(self.children):
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
        return pids

    def host_died(self) -> int:
        pids = self.kill_all()
        try:
            from sidecar.dataplane import reaper

            for pid in (self.host_pid, *pids):
                reaper.reap_owner(self.run_id, pid)
            reaper.reap_dead_owners(self.run_id)
        except BaseException:  # noqa: BLE001 - best effort; the next pool sweeps dead owners too
            traceback.print_exc()
        if self.sock_dir:
            shutil.rmtree(self.sock_dir, ignore_errors=True)
        return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sidecar.host.template")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--host-pid", type=int, required=True)
    parser.add_argument("--preload", action="store_true")
    parser.add_argument("--sock-dir", default=None,
                        help="the pool's directory of worker sockets, removed if the host dies")
    parser.add_argument("--check-cuda-fork", action="store_true",
                        help="if libcuda is mapped after the preload, fork a child that uses CUDA to "
                             "see whether forked workers can")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the host decides when workers stop
    # Python 3.12+ warns about fork() in a process with threads. Ours are BLAS pools started by the
    # numpy import, which re-create themselves in the child (pthread_atfork); no Python thread runs.
    warnings.filterwarnings("ignore", message=r".*use of fork\(\) may lead to deadlocks",
                            category=DeprecationWarning)
    sock = socket.socket(fileno=args.fd)
    if os.getppid() != args.host_pid:
        return 0
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    # BLAS/OpenMP read their thread counts when loaded, i.e. here, not in the forked worker: cap
    # them as a cold worker would (from $SIDECAR_THREADS, which the pool sets).
    from sidecar import threads

    threads.cap_thread_env(threads.default_threads())
    started = time.perf_counter()
    modules, failed = _preload() if args.preload else ([], {})
    preload_s = time.perf_counter() - started
    cuda_mapped = _libcuda_loaded()
    fork_cuda_ok: bool | None = None
    if cuda_mapped and args.check_cuda_fork:
        fork_cuda_ok = _probe_cuda_fork(_CUDA_PROBE_S)
    hello = {"op": "ready", "pid": os.getpid(), "preload_s": preload_s, "modules": modules, "failed": failed,
             "cuda_mapped": cuda_mapped, "fork_cuda_ok": fork_cuda_ok,
             "cuda_touched": cuda_mapped and not fork_cuda_ok, "threads": threading.active_count()}
    _send(sock, hello)
    return _TemplateServer(sock, args.run_id, args.host_pid, args.sock_dir).run()


if __name__ == "__main__":
    code = main()
    for _stream in (sys.stdout, sys.stderr):
        _stream.flush()
    # Skip interpreter finalisation: with torch loaded it takes about a second, and a template that
    # lingers that long after its host died would outlive the promise that everything goes at once.
    os._exit(code)
