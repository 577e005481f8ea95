"""The template process: it imported torch once and forks ready-to-serve workers on request.

Started by the host's handle (`sidecar.host.template.Template`, over a socketpair: `--fd`) or, in
launch mode, by the Elixir bridge (`--listen-dir-prefix`): `python -m sidecar.host.template_process`.
The records it exchanges are in `sidecar.host.template_protocol`.

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

Workers outlive their template: a child does not die with it (no parent-death signal on the template);
it watches the host instead ($SIDECAR_HOST_PID and its stdin pipe, see sidecar.worker.lifecycle).
When the template dies by accident, the host starts a new one and asks it to watch every live worker.

The template is also the pool's guardian: when the host dies (control socket EOF, or the template is
re-parented), it SIGKILLs every worker it forked or was asked to watch, waits for them, unlinks the
shared memory of the host and of those workers and removes the pool's socket directory, all within
well under a second.
"""
from __future__ import annotations

import argparse
import atexit
import importlib
import json
import os
import pkgutil
import select
import selectors
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
import warnings
from typing import Any, Sequence

from sidecar.host.template_protocol import recv, send

__all__ = ["PRELOAD_MODULES", "main"]

_PARENT_POLL_S = 0.25     # how often the template checks that the host is still its parent
_KILL_WAIT_S = 2.0        # after SIGKILL, how long to wait for workers before reaping anyway
_CUDA_PROBE_S = 60.0      # a first CUDA context can take seconds; past this, forks count as unsafe

# Imported by the template before it forks (missing ones are skipped and reported).
PRELOAD_MODULES: tuple[str, ...] = (
    "numpy", "torch", "pyarrow", "psutil", "grpc", "grpc._server", "google.protobuf", "grpc_status.rpc_status",
    "grpc_health.v1.health", "grpc_reflection.v1alpha.reflection",
    "sidecar.v1.sidecar_pb2", "sidecar.v1.sidecar_pb2_grpc", "sidecar.errors", "sidecar.etf", "sidecar.cli",
)
_PRELOAD_PACKAGES = ("sidecar.protocol", "sidecar.dataplane", "sidecar.worker")
_NEVER_PRELOAD = {"sidecar.worker.debug_ops"}  # registers crash ops on import: opt-in only


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


def _child(msg: dict[str, Any], fds: list[int], to_close: list[int]) -> None:
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
        # No parent-death signal here: a worker outlives its template. It dies with the host, whose
        # pid it watches ($SIDECAR_HOST_PID in msg["env"]) like a cold worker watches its parent.
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
        self.requesters: dict[int, socket.socket] = {}  # pid -> the connection that asked for it
        self.pid = os.getpid()

    def run(self) -> int:
        while True:
            for key, _ in self.sel.select(_PARENT_POLL_S):
                if key.data is None:
                    try:
                        msg, fds = recv(self.sock)
                        if msg is None:
                            return self.host_died()
                        if self.handle(msg, fds):
                            return 0
                    except OSError:
                        # ECONNRESET (the host died with our messages unread) or EPIPE on an answer:
                        # the host is gone just the same.
                        return self.host_died()
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
        elif op == "shutdown":
            self.kill_all()
            return True
        for fd in fds if op != "spawn" else ():
            os.close(fd)
        return False

    def _private_fds(self) -> list[int]:
        """Descriptors of this server besides the host socket, closed in every forked child."""
        return []

    def fork(self, msg: dict[str, Any], fds: list[int], requester: socket.socket | None = None) -> None:
        reply_to = requester or self.sock
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        to_close = [self.sock.fileno(), self.sel.fileno(), *self.children.values(), *self.watched.values(),
                    *self._private_fds()]
        try:
            pid = os.fork()
        except OSError as exc:
            for fd in fds:
                os.close(fd)
            send(reply_to, {"op": "spawn_failed", "id": msg["id"], "error": str(exc)})
            return
        if pid == 0:
            _child(msg, fds, to_close)
        for fd in fds:
            os.close(fd)
        pidfd = os.pidfd_open(pid)  # cannot race: our unreaped child keeps its pid
        self.children[pid] = pidfd
        self.sel.register(pidfd, selectors.EVENT_READ, ("child", pid))
        if requester is not None:
            self.requesters[pid] = requester
        host_pidfd = os.dup(pidfd)
        try:
            send(reply_to, {"op": "spawned", "id": msg["id"], "pid": pid}, [host_pidfd])
        except OSError:  # the requester is gone; its worker runs on (it ends when its stdin closes)
            pass
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
            send(self.requesters.pop(pid, self.sock), {"op": "exit", "pid": pid, "status": status})
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
        for pidfd in self.watched.values():
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


# A unix socket path has room for 107 bytes: a $TMPDIR longer than this leaves too little.
_LISTEN_TMPDIR_MAX = 48


class _LaunchServer(_TemplateServer):
    """Launch mode, for hosts that cannot pass descriptors themselves (the Elixir bridge).

    Each worker's Port runs bridge/c_src/sidecar_launch.c, which connects to our listening socket
    and sends one spawn request with its own stdin, stdout and stderr; that connection gets the
    spawned/exit replies of its worker. The host is whoever holds our stdin: EOF there (it closed
    the Port, or died) ends the template as a host death does. The host's own segments are not
    reaped here (a VM that stopped one pool lives on); only those of the workers.
    """

    def __init__(self, listener: socket.socket, run_id: str, sock_dir: str) -> None:
        super().__init__(listener, run_id, 0, sock_dir)
        self.sel.modify(listener, selectors.EVENT_READ, "listen")
        self.sel.register(sys.stdin.fileno(), selectors.EVENT_READ, "host")
        self.conns: set[socket.socket] = set()

    def _private_fds(self) -> list[int]:
        return [c.fileno() for c in self.conns]

    def run(self) -> int:
        while True:
            for key, _ in self.sel.select():
                if key.data == "host":
                    if not os.read(key.fd, 4096):
                        return self.host_died()
                elif key.data == "listen":
                    conn, _ = self.sock.accept()
                    self.conns.add(conn)
                    self.sel.register(conn, selectors.EVENT_READ, conn)
                elif isinstance(key.data, socket.socket):
                    self.serve(key.data)
                else:
                    self.child_event(*key.data)

    def serve(self, conn: socket.socket) -> None:
        try:
            msg, fds = recv(conn)
        except (OSError, ValueError):
            msg, fds = None, []
        if msg is None:  # the launcher is gone; its worker, if any, ends when its stdin closes
            self.sel.unregister(conn)
            self.conns.discard(conn)
            for pid in [p for p, c in self.requesters.items() if c is conn]:
                del self.requesters[pid]
            conn.close()
            return
        if msg.get("op") == "spawn" and len(fds) == 3:
            self.fork(msg, fds, requester=conn)
            return
        for fd in fds:
            os.close(fd)
        send(conn, {"op": "spawn_failed", "id": msg.get("id"), "error": "expected a spawn with 3 descriptors"})


def _serve_launches(args: argparse.Namespace) -> int:
    hello = _start_up(args)
    tmp = tempfile.gettempdir()
    sock_dir = tempfile.mkdtemp(prefix=args.listen_dir_prefix, dir=tmp if len(tmp) <= _LISTEN_TMPDIR_MAX else "/tmp")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    hello["listen"] = os.path.join(sock_dir, "launch.sock")
    listener.bind(hello["listen"])  # inside a 0700 directory: only this user can connect
    listener.listen(64)
    sys.stdout.write(json.dumps(hello) + "\n")
    sys.stdout.flush()
    return _LaunchServer(listener, args.run_id, sock_dir).run()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sidecar.host.template_process")
    parser.add_argument("--fd", type=int, default=None, help="the host's end of a socketpair (required "
                        "unless --listen-dir-prefix)")
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--host-pid", type=int, required=True)
    parser.add_argument("--preload", action="store_true")
    parser.add_argument("--sock-dir", default=None,
                        help="the pool's directory of worker sockets, removed if the host dies")
    parser.add_argument("--listen-dir-prefix", default=None,
                        help="launch mode (the Elixir bridge): make a private directory with this prefix "
                             "in $TMPDIR, accept spawn requests on a socket in it (one connection per "
                             "worker, see _LaunchServer) and print the ready message as one JSON line on "
                             "stdout; the host is whoever holds our stdin")
    parser.add_argument("--check-cuda-fork", action="store_true",
                        help="if libcuda is mapped after the preload, fork a child that uses CUDA to "
                             "see whether forked workers can")
    args = parser.parse_args(argv)
    if (args.fd is None) == (args.listen_dir_prefix is None):
        parser.error("give exactly one of --fd and --listen-dir-prefix")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the host decides when workers stop
    # Python 3.12+ warns about fork() in a process with threads. Ours are BLAS pools started by the
    # numpy import, which re-create themselves in the child (pthread_atfork); no Python thread runs.
    warnings.filterwarnings("ignore", message=r".*use of fork\(\) may lead to deadlocks",
                            category=DeprecationWarning)
    if args.listen_dir_prefix is not None:
        return _serve_launches(args)
    sock = socket.socket(fileno=args.fd)
    if os.getppid() != args.host_pid:
        return 0
    send(sock, _start_up(args))
    return _TemplateServer(sock, args.run_id, args.host_pid, args.sock_dir).run()


def _start_up(args: argparse.Namespace) -> dict[str, Any]:
    """Caps threads, imports what workers need and returns the ready message for the host."""
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
    return {"op": "ready", "pid": os.getpid(), "preload_s": preload_s, "modules": modules, "failed": failed,
            "cuda_mapped": cuda_mapped, "fork_cuda_ok": fork_cuda_ok,
            "cuda_touched": cuda_mapped and not fork_cuda_ok, "threads": threading.active_count()}


if __name__ == "__main__":
    code = main()
    for _stream in (sys.stdout, sys.stderr):
        _stream.flush()
    # Skip interpreter finalisation: with torch loaded it takes about a second, and a template that
    # lingers that long after its host died would outlive the promise that everything goes at once.
    os._exit(code)
