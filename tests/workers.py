"""Test helper: spawn real `python -m sidecar serve` workers and wait for their ready line.

    with start_worker("--ops", "tests.slow_ops_module") as w:
        client = Client(w.address)

Also: `shm_of_run(run)` lists a run's segments in /dev/shm, and `run_id()` makes a unique run id,
so tests that keep a worker for a whole module can check its memory instead of the per-test guard.
"""
from __future__ import annotations

import os
import secrets
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any, Iterator, Sequence

ROOT = Path(__file__).resolve().parents[1]
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
PYTHON = str(VENV_PYTHON if VENV_PYTHON.exists() else Path(sys.executable))
READY = "SIDECAR_READY"


# Every run id this test session makes up starts with SESSION_PREFIX. It is put in the environment
# ($SIDECAR_RUN_PREFIX), so the pools, workers and Elixir VMs the tests start tag their random run
# ids with it too: on a machine whose /dev/shm other runs share, the guard below blames (and
# removes) only segments of this session's runs or of processes this session started.
SESSION_PREFIX = "t" + secrets.token_hex(3)
os.environ["SIDECAR_RUN_PREFIX"] = SESSION_PREFIX


def session_run(tag: str) -> str:
    """A run id of this session for a fixed tag (e.g. "tarena" -> "t1a2b3ctarena")."""
    return (SESSION_PREFIX + tag)[:32]


# Pids of every worker this process started: the /dev/shm guard below blames only segments owned by
# them or by this process (other test runs may share the machine and its /dev/shm).
STARTED_PIDS: set[int] = set()


class WorkerStartError(RuntimeError):
    pass


class WorkerProcess:
    """A spawned worker: `.address` (dial it), `.pid`, `.proc` (Popen), `.stop()`, `.stderr_text()`."""

    def __init__(self, proc: subprocess.Popen[str], address: str, pid: int, stderr: IO[str]) -> None:
        self.proc = proc
        self.address = address
        self.pid = pid
        self._stderr = stderr

    def stderr_text(self) -> str:
        self._stderr.flush()
        with open(self._stderr.name, errors="replace") as f:
            return f.read()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        """Signal the worker (SIGTERM: drain and exit 0) and wait; SIGKILL if it takes too long."""
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stdout:
            self.proc.stdout.close()
        try:
            self._stderr.close()
            os.unlink(self._stderr.name)
        except OSError:
            pass
        return self.proc.returncode

    def __enter__(self) -> WorkerProcess:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def worker_command(*args: str) -> list[str]:
    return [PYTHON, "-m", "sidecar", "serve", *args]


def start_worker(*args: str, env: dict[str, str] | None = None, timeout: float = 60,
                 command: Sequence[str] | None = None) -> WorkerProcess:
    """Spawn `python -m sidecar serve *args` and return once it printed SIDECAR_READY.

    `env` entries are added to the current environment. Raises WorkerStartError with the
    worker's stderr when it exits or stays silent for `timeout` seconds.
    """
    full_env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                **(env or {})}
    stderr = tempfile.NamedTemporaryFile("w+", prefix="sidecar-worker-", suffix=".log", delete=False)
    proc = subprocess.Popen(list(command or worker_command(*args)), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=stderr, text=True, env=full_env, cwd=ROOT)
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    line = ""
    try:
        while time.monotonic() < deadline:
            if sel.select(timeout=0.1):
                line = proc.stdout.readline()
                if line.startswith(READY) or not line:
                    break
            elif proc.poll() is not None:
                break
    finally:
        sel.close()
    parts = line.split()
    if len(parts) != 3 or parts[0] != READY:
        proc.kill()
        proc.wait(5)
        stderr.flush()
        with open(stderr.name, errors="replace") as f:
            text = f.read()
        os.unlink(stderr.name)
        raise WorkerStartError(f"worker did not get ready (exit {proc.returncode}, stdout {line!r}):\n{text}")
    STARTED_PIDS.add(int(parts[2]))
    return WorkerProcess(proc, parts[1], int(parts[2]), stderr)


def pid_gone(pid: int) -> bool:
    """The process has exited (a zombie awaiting its parent's wait counts as gone)."""
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def run_id() -> str:
    """A fresh run id of this session."""
    return SESSION_PREFIX + secrets.token_hex(5)


def shm_of_run(run: str) -> set[str]:
    return {p.name for p in Path("/dev/shm").iterdir() if p.name.startswith(f"sc-{run}-")}


# ---------------------------------------------------------------------------------------------------
# Long-lived (module-scoped) workers and the /dev/shm guard
#
# `no_shm_leaks` (autouse, through conftest) fails a test that leaves an sc-* segment behind, but a
# worker shared by a whole module legitimately keeps its warm arena between tests: segments of runs
# in LONG_LIVED_RUNS are exempt per test and checked instead when the module's fixture stops the
# worker (`assert_run_clean`).

LONG_LIVED_RUNS: set[str] = set()


def _sc_segments() -> set[str]:
    return {p.name for p in Path("/dev/shm").iterdir() if p.name.startswith("sc-")}


def _ours(name: str) -> bool:
    """A segment this session created: of one of its runs, or owned by this process, a worker it
    started, or a live descendant (a template's forked workers). Segments of long-lived runs are
    checked when their fixture ends instead."""
    parts = name.split("-")
    if len(parts) != 4 or not parts[2].isdigit():
        return False  # not our naming scheme: not ours to blame or to remove
    run, pid = parts[1], int(parts[2])
    if run in LONG_LIVED_RUNS:
        return False
    if run.startswith(SESSION_PREFIX) or pid == os.getpid() or pid in STARTED_PIDS:
        return True
    import psutil

    try:
        return pid in {c.pid for c in psutil.Process().children(recursive=True)}
    except psutil.Error:
        return False


# The test ops modules the gRPC end-to-end workers load (tests/ops_fixture_module.py, tests/slow_ops_module.py).
FIXTURE_OPS = ("--ops", "tests.ops_fixture_module", "--ops", "tests.slow_ops_module")


def wait_until(pred: Any, timeout: float = 10.0) -> None:
    """Polls a condition (not a timing assertion: the deadline only stops a hung test)."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.005)


def long_lived_run() -> Iterator[str]:
    """Body of a module-scoped `run` fixture: a run id exempt from the per-test guard meanwhile."""
    rid = run_id()
    LONG_LIVED_RUNS.add(rid)
    yield rid
    LONG_LIVED_RUNS.discard(rid)


def long_lived_pool(pool: Any) -> Iterator[Any]:
    """Body of a module-scoped pool fixture (`yield from long_lived_pool(Pool(...))`): the pool's
    run is exempt from the per-test guard; closing the pool must leave none of its segments."""
    LONG_LIVED_RUNS.add(pool.run_id)
    try:
        yield pool
    finally:
        pool.close()
        LONG_LIVED_RUNS.discard(pool.run_id)
        assert_run_clean(pool.run_id)


def long_lived_worker(run: str, *args: str) -> Iterator[WorkerProcess]:
    """Body of a module-scoped worker fixture: a CPU worker in `run` (one torch thread) with `args`;
    at the end it must still be alive, stop with exit 0 and leave none of the run's segments."""
    w = start_worker("--device", "cpu", "--run-id", run, "--threads", "1", *args)
    yield w
    assert w.alive(), w.stderr_text()
    assert w.stop() == 0
    assert_run_clean(run)


def assert_run_clean(run: str, timeout: float = 5.0) -> None:
    """Every segment of `run` is gone (waits briefly: a worker unlinks its arena while exiting)."""
    deadline = time.monotonic() + timeout
    while shm_of_run(run) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = shm_of_run(run)
    for name in left:
        try:
            os.unlink(Path("/dev/shm") / name)
        except FileNotFoundError:
            pass
    assert not left, f"segments of run {run} leaked: {sorted(left)}"


try:
    import pytest

    @pytest.fixture(autouse=True)
    def no_shm_leaks():
        """Fails the test if it leaves behind a new sc-* segment that this session created (see
        `_ours`); removes only those, so one leak does not fail every later test."""
        before = _sc_segments()
        yield
        left = {n for n in _sc_segments() - before if _ours(n)}
        for name in left:
            try:
                os.unlink(Path("/dev/shm") / name)
            except FileNotFoundError:
                pass
        if left:
            pytest.fail(f"shared-memory segments leaked: {sorted(left)}")
except ImportError:  # used outside pytest (benchmarks)
    pass
