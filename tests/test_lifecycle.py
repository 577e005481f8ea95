"""How a worker process starts, listens and ends: real processes, real signals, real sockets."""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sidecar.errors import WorkerCrashed
from sidecar.host import Client, WorkerUnreachable
from tests.workers import PYTHON, ROOT, pid_gone, run_id, shm_of_run, start_worker, worker_command  # noqa: F401

SMALL = np.arange(12, dtype=np.float32).reshape(3, 4)
BIG = np.ones((512, 512), np.float32)  # 1 MiB: comes back in the worker's arena under a lease


def wait_gone(pid: int, timeout: float) -> float | None:
    """Seconds until `pid` exited, or None if it still runs after `timeout`."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pid_gone(pid):
            return time.monotonic() - t0
        time.sleep(0.01)
    return None


def test_sigterm_drains_in_flight_calls() -> None:
    w = start_worker("--device", "cpu", "--ops", "tests.slow_ops_module", "--max-concurrency", "4", "--threads", "1")
    try:
        c = Client(w.address, timeout=30)
        results: list[Any] = []
        errors: list[BaseException] = []

        def call() -> None:
            try:
                results.append(c.call("slow", SMALL, seconds=1.0))
            except BaseException as exc:  # noqa: BLE001 - counted below
                errors.append(exc)

        threads = [threading.Thread(target=call) for _ in range(4)]
        # Each call's span starts as it arrives; a first memory sample shows the watch is subscribed.
        with c.watch_telemetry(memory_interval_s=0.05, batch_window_ms=0) as watch:
            events = iter(watch)
            while next(events).get("type") != "memory":
                pass
            for t in threads:
                t.start()
            started = 0
            while started < 4:  # all four are in the worker (4 slots: none waits) before SIGTERM
                event = next(events)
                started += event.get("type") == "span" and event.get("phase") == "start"
        w.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(30)
        assert errors == [] and len(results) == 4  # none lost
        for r in results:
            np.testing.assert_array_equal(r, SMALL)
        assert w.proc.wait(30) == 0
        assert "draining" in w.stderr_text()
        with pytest.raises(WorkerUnreachable) as info:  # a dead peer: a crash-kind error a pool handles
            c.call("add", SMALL, SMALL, timeout=5)
        assert isinstance(info.value, WorkerCrashed) and info.value.classification == "unreachable"
        c.close()
        assert not Path(w.address.removeprefix("unix:")).exists()  # the socket file is removed
    finally:
        w.stop()


def test_tainted_worker_answers_then_exits_70() -> None:
    w = start_worker("--device", "cpu", "--ops", "tests.slow_ops_module", "--threads", "1")
    try:
        with Client(w.address, timeout=30) as c:
            assert c.call("taint_self") == "tainted"  # the call that tainted it is still answered
        assert w.proc.wait(15) == 70
        assert "tainted" in w.stderr_text()
    finally:
        w.stop()


PARENT = textwrap.dedent("""
    import subprocess, sys, time
    proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    print(proc.stdout.readline().strip(), flush=True)
    time.sleep(600)
""")


def test_worker_exits_when_its_parent_is_killed() -> None:
    run = run_id()
    command = worker_command("--device", "cpu", "--run-id", run, "--threads", "1")
    parent = subprocess.Popen([PYTHON, "-c", PARENT, *command],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert parent.stdout is not None
        line = parent.stdout.readline().split()
        assert line[0] == "SIDECAR_READY", line
        address, pid = line[1], int(line[2])
        c = Client(address, run_id=run, timeout=30)
        kept = c.call("relu", BIG)  # a leased output: the worker's arena now holds a segment
        assert any(f"-{pid}-" in n for n in shm_of_run(run))
        parent.kill()
        parent.wait(10)
        elapsed = wait_gone(pid, 10)
        assert elapsed is not None, "worker outlived its parent by 10 s"
        print(f"worker exited {elapsed * 1000:.0f} ms after its parent was killed")
        del kept
        c.close()
        assert not shm_of_run(run)  # the worker unlinked its arena on the way out
    finally:
        parent.kill()
        parent.wait(10)


def test_ready_file_and_private_unix_socket(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    with start_worker("--device", "cpu", "--ready-file", str(ready), "--threads", "1") as w:
        text = ready.read_text()
        assert text == f"SIDECAR_READY {w.address} {w.pid}\n"
        assert not (tmp_path / "ready.tmp").exists()
        sock = Path(w.address.removeprefix("unix:"))
        assert stat.S_ISSOCK(sock.stat().st_mode)
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
        with Client(w.address) as c:
            assert c.health() == "SERVING"
        assert w.stop() == 0
    assert not ready.exists() and not sock.exists()


def test_tcp_listen_and_thread_cap() -> None:
    with start_worker("--device", "cpu", "--listen", "127.0.0.1:0", "--ops", "tests.slow_ops_module", "--threads", "1",
                      env={"OMP_NUM_THREADS": ""}) as w:
        host, port = w.address.rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0
        with Client(w.address) as c:
            assert c.health() == "SERVING"
            np.testing.assert_array_equal(c.call("add", SMALL, SMALL), SMALL * 2)
            assert c.call("num_threads")["torch"] == 1
        assert w.stop() == 0


def test_default_thread_cap_leaves_user_settings_alone() -> None:
    with start_worker("--device", "cpu", "--ops", "tests.slow_ops_module", env={"OMP_NUM_THREADS": "3"}) as w:
        with Client(w.address) as c:
            assert c.call("num_threads")["omp"] == "3"


def test_stdin_eof_ends_a_worker_that_watches_it() -> None:
    proc = subprocess.Popen(worker_command("--device", "cpu", "--watch-stdin", "--threads", "1"), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline().startswith("SIDECAR_READY")
        proc.stdin.close()
        assert proc.wait(10) == 0
    finally:
        proc.kill()
        proc.wait(10)


def test_bad_ops_module_fails_the_start_with_a_message() -> None:
    proc = subprocess.run(worker_command("--ops", "tests.no_such_module_here"), capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert proc.returncode == 1
    assert "SIDECAR_READY" not in proc.stdout
    assert "tests.no_such_module_here" in proc.stderr


def test_usage_errors_exit_2() -> None:
    from sidecar.cli import main

    assert main(["serve", "--max-concurrency", "0"]) == 2
    assert main(["bogus"]) == 2


def test_hardware_command_json() -> None:
    proc = subprocess.run([PYTHON, "-m", "sidecar", "hardware", "--json"], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    hw = json.loads(proc.stdout)
    assert hw["cpu"]["threads"] >= 1 and hw["identity"] and hw["device"] in ("cpu", "cuda:0", "mps")
    text = subprocess.run([PYTHON, "-m", "sidecar", "hardware"], capture_output=True, text=True, cwd=ROOT,
                          timeout=60)
    assert text.returncode == 0 and "identity" in text.stdout


FORKED = textwrap.dedent("""
    import os, sys
    import torch  # the template has imported the heavy modules before forking
    import sidecar.cli
    pid = os.fork()
    if pid == 0:
        os._exit(sidecar.cli.main(["serve", "--device", "cpu", "--threads", "1"]))
    print("CHILD", pid, flush=True)
    _, status = os.waitpid(pid, 0)
    print("EXIT", os.waitstatus_to_exitcode(status), flush=True)
""")


def test_main_runs_in_a_child_forked_after_torch_import() -> None:
    proc = subprocess.Popen([PYTHON, "-c", FORKED], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline().split() for _ in range(2)]
        child = next(int(words[1]) for words in lines if words[0] == "CHILD")
        ready = next(words for words in lines if words[0] == "SIDECAR_READY")
        assert int(ready[2]) == child
        with Client(ready[1]) as c:
            np.testing.assert_array_equal(c.call("add", SMALL, SMALL), SMALL * 2)
        os.kill(child, signal.SIGTERM)
        assert proc.stdout.readline().split() == ["EXIT", "0"]
    finally:
        proc.kill()
        proc.wait(10)


def test_a_live_workers_socket_is_not_taken_over(tmp_path: Path) -> None:
    sock = tmp_path / "w.sock"
    with start_worker("--device", "cpu", "--listen", f"unix:{sock}", "--threads", "1") as w:
        assert w.address == f"unix:{sock}"
        proc = subprocess.run(worker_command("--device", "cpu", "--listen", f"unix:{sock}", "--threads", "1"),
                              capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert proc.returncode == 1 and "another process is listening" in proc.stderr
        with Client(w.address) as c:
            assert c.health() == "SERVING"
