"""How a worker process lives and dies: thread caps, memory limit, parent-death watch, shutdown signals.

Nothing here runs at import time (the pool's pre-forked template imports this module and then calls
`sidecar.cli.main` in a forked child): every function acts on the calling process when called.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import resource
import signal
import sys
import threading
from dataclasses import dataclass, field

# The limit applies to shared-memory segments too: `segments.check_reservable` refuses a segment that
# would not fit under it before reserving any /dev/shm space for it.
from sidecar.dataplane.segments import address_space_bytes
from sidecar.protocol.limits import FAST_GRACE_S, HOST_PID_ENV
from sidecar.threads import cap_thread_env, cpu_count, default_threads

__all__ = ["EXIT_TAINTED", "PDEATH_SIGNAL", "Shutdown", "ParentWatch", "install_signal_handlers", "watch_stdin",
           "warm_threads", "apply_memory_limit", "cap_torch_threads", "cap_thread_env", "cpu_count",
           "default_threads"]

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
EXIT_TAINTED = 70
# The parent-death signal. Not SIGTERM: Linux sends it when the *thread* that forked us exits, which
# can happen while the parent process lives on; the handler therefore checks whether the parent
# really changed before acting, and ignores the signal otherwise.
PDEATH_SIGNAL = signal.SIGHUP


# ---------------------------------------------------------------------------------------------------
# Thread caps (the environment part, which the pool's template applies too, is `sidecar.threads`)


def cap_torch_threads(threads: int) -> None:
    """Cap torch's pools (works after import too, e.g. in a child forked from a template)."""
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(max(1, min(threads, 4)))
    except RuntimeError:
        pass  # already set, or parallel work already ran (a forked child): keep what is there


# ---------------------------------------------------------------------------------------------------
# Memory limit


def warm_threads(executor: object | None = None, workers: int = 0) -> None:
    """Start the threads a worker will need now, while address space is still unlimited.

    Under RLIMIT_AS a thread that starts later may fail to map its stack, which breaks the gRPC
    server or aborts OpenMP; starting the pools up front makes the limit hit only real allocations.
    """
    if executor is not None and workers > 0:
        barrier = threading.Barrier(workers + 1, timeout=10)
        futures = [executor.submit(barrier.wait) for _ in range(workers)]  # type: ignore[attr-defined]
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            log.debug("could not start all %d server threads up front", workers)
        for f in futures:
            try:
                f.result(timeout=10)
            except Exception:
                pass
    if "torch" in sys.modules:
        import torch

        a = torch.ones(256, 256)
        (a @ a).sum()  # starts torch's intra-op (OpenMP) threads


def apply_memory_limit(extra_bytes: int) -> int:
    """Limit the address space to its current size plus `extra_bytes`; returns the limit set.

    The limit is relative to the size at start-up because importing torch alone maps gigabytes of
    virtual memory that it never touches; a user thinks in terms of what the ops may allocate.
    """
    if extra_bytes <= 0:
        raise ValueError("memory limit must be a positive number of bytes")
    limit = address_space_bytes() + int(extra_bytes)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY and limit > hard:
        limit = hard
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    log.info("address-space limit %d bytes (start-up size + %d)", limit, extra_bytes)
    return limit


# ---------------------------------------------------------------------------------------------------
# Shutdown: SIGTERM, SIGINT, parent death


@dataclass
class Shutdown:
    """Why and how the worker should stop; set from signal handlers, the parent watcher, the
    transport (its host went away) and the server core (a tainted device). The first request wins."""

    event: threading.Event = field(default_factory=threading.Event)
    reason: str = ""
    fast: bool = False  # parent gone: nobody waits for answers, so do not drain for long
    exit_code: int = 0  # 70 = tainted (the device needs a fresh process)
    max_grace_s: float | None = None  # a bound on the drain of this kind of stop (the host is gone)

    def request(self, reason: str, fast: bool = False, exit_code: int = 0, max_grace_s: float | None = None) -> None:
        if not self.event.is_set():
            self.reason, self.fast, self.exit_code, self.max_grace_s = reason, fast, exit_code, max_grace_s
            self.event.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self.event.wait(timeout)

    def grace_s(self, grace_period_s: float) -> float:
        """How long the calls in flight may still take: `--grace-period`, at most FAST_GRACE_S for a
        fast stop and at most `max_grace_s` when the request set one."""
        grace = grace_period_s
        if self.fast:
            grace = min(grace, FAST_GRACE_S)
        if self.max_grace_s is not None:
            grace = min(grace, self.max_grace_s)
        return max(grace, 0.0)


def _set_pdeathsig(sig: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(ctypes.get_errno()))
            return False
        return True
    except OSError as exc:
        log.warning("prctl unavailable: %s", exc)
        return False


# Set by the Python pool in every worker's environment.


class ParentWatch:
    """Requests a fast shutdown when the process that started us goes away.

    Two mechanisms: PR_SET_PDEATHSIG (immediate on Linux) and a thread that polls getppid() (covers
    the race before prctl, other platforms, and a parent that is itself a forked template).

    A worker forked by the pool's template has the template as its parent, but must outlive it and
    die with the host: the pool puts the host's pid in $SIDECAR_HOST_PID, and that process is
    watched instead (a pidfd, so a recycled pid cannot fool it). The parent-death signal of the
    template is then ignored.
    """

    def __init__(self, shutdown: Shutdown, interval_s: float = 0.1, parent_pid: int | None = None) -> None:
        self._shutdown = shutdown
        self._interval = interval_s
        if parent_pid is None:
            host = os.environ.get(HOST_PID_ENV, "")
            parent_pid = int(host) if host.isdigit() else os.getppid()
        self.parent_pid = parent_pid
        self._pidfd: int | None = None
        if parent_pid > 1 and parent_pid != os.getppid():  # not our parent: getppid() cannot tell
            try:
                self._pidfd = os.pidfd_open(parent_pid)
            except (OSError, AttributeError):
                self._pidfd = None  # already gone (ProcessLookupError) or no pidfd: polled by pid
                if not _pid_exists(parent_pid):
                    self.parent_pid = 0
        self._thread: threading.Thread | None = None

    def parent_alive(self) -> bool:
        if self._pidfd is not None:
            import select

            return not select.select([self._pidfd], [], [], 0)[0]  # readable once it has exited
        if self.parent_pid != os.getppid() and self.parent_pid > 1:
            return _pid_exists(self.parent_pid)
        return os.getppid() == self.parent_pid

    def start(self) -> bool:
        """Returns False when there is no parent to watch (started by init, e.g. a daemon)."""
        if self.parent_pid == 0:  # the host to watch was gone before we started
            self._shutdown.request("host exited", fast=True)
            return True
        if self.parent_pid <= 1:
            return False
        _set_pdeathsig(PDEATH_SIGNAL)
        if not self.parent_alive():  # died before prctl took effect
            self._shutdown.request("parent exited", fast=True)
        self._thread = threading.Thread(target=self._run, name="sidecar-parent-watch", daemon=True)
        self._thread.start()
        return True

    def _run(self) -> None:
        while not self._shutdown.wait(self._interval):
            if not self.parent_alive():
                log.warning("parent %d is gone; shutting down", self.parent_pid)
                self._shutdown.request("parent exited", fast=True)
                return

    def on_signal(self, signum: int, _frame: object) -> None:
        if not self.parent_alive():
            self._shutdown.request("parent exited", fast=True)
        else:
            log.debug("signal %d but parent %d is alive; ignored", signum, self.parent_pid)


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def install_signal_handlers(shutdown: Shutdown, watch: ParentWatch | None) -> None:
    """SIGTERM/SIGINT drain then exit 0; the parent-death signal exits fast if the parent is gone."""
    def term(signum: int, _frame: object) -> None:
        shutdown.request(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, term)
    signal.signal(signal.SIGINT, term)
    if watch is not None:
        signal.signal(PDEATH_SIGNAL, watch.on_signal)


def watch_stdin(shutdown: Shutdown) -> None:
    """Request a fast shutdown when stdin reaches EOF (a host that holds our stdin pipe has died)."""
    def run() -> None:
        try:
            while os.read(0, 65536):
                pass
        except OSError:
            pass
        shutdown.request("stdin closed", fast=True)

    threading.Thread(target=run, name="sidecar-stdin-watch", daemon=True).start()
