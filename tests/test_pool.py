"""Pool basics with real workers: handshake, routing, status, placement, health, spares, events, close."""
from __future__ import annotations

import os
import signal
import stat
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import psutil
import pytest

from sidecar.dataplane import reaper, segments
from sidecar.errors import WorkerCrashed
from sidecar.host.crash import Classification
from sidecar.host.events import PoolEvent
from sidecar.host.pool import Pool, PoolClosed, WorkerState
from sidecar.host.settings import find_gpus
from sidecar.host.spawn import WorkerStartError, start_worker
from tests.workers import long_lived_pool, pid_gone, run_id, wait_until  # noqa: F401

GPUS = ["7", "9"]


def _orphan_segment() -> str:
    """A segment whose owner died without unlinking it (what a crashed host leaves)."""
    run = run_id()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            seg = segments.create_segment(4096, run)
            os.write(1, b"")
            seg.close()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    names = [s.name for s in reaper.list_segments(run)]
    assert len(names) == 1
    return names[0]


@pytest.fixture(scope="module")
def orphan() -> str:
    return _orphan_segment()


@pytest.fixture(scope="module")
def pool(orphan: str) -> Iterator[Pool]:
    yield from long_lived_pool(Pool(2, debug_ops=True, device="cpu", gpus=GPUS, breaker_threshold=1000,
                                    health_interval_s=0.3, health_timeout_s=1.0, health_failures=2))


def test_new_pool_swept_segments_of_dead_owners(pool: Pool, orphan: str) -> None:
    assert not segments.segment_path(orphan).exists()


def test_workers_are_ready_and_described(pool: Pool) -> None:
    rows = pool.status()
    assert [r.slot for r in rows] == [0, 1]
    assert all(r.state is WorkerState.READY and psutil.pid_exists(r.pid) for r in rows)
    assert all(r.address and r.address.startswith("unix:") for r in rows)
    for r in rows:  # unix socket, owner-only
        assert stat.S_IMODE(os.stat(r.address[len("unix:"):]).st_mode) & 0o077 == 0
    assert pool.template_pid is not None and pool.template is not None and pool.template.preload
    assert pool.call("debug.pid") in {r.pid for r in rows}


def test_gpu_placement_sets_cuda_visible_devices_per_worker(pool: Pool) -> None:
    """With several GPUs, worker i sees only GPU i mod n (the env is set; CUDA is never touched here)."""
    pool.wait_ready(15)
    assert [r.gpu for r in pool.status()] == GPUS
    seen = set()
    for _ in range(20):
        seen.add(pool.call("debug.getenv", name="CUDA_VISIBLE_DEVICES"))
        if seen == set(GPUS):
            break
    assert seen == set(GPUS)


def test_find_gpus_rules() -> None:
    assert find_gpus("cpu", None, {"CUDA_VISIBLE_DEVICES": "0,1"}) == []
    assert find_gpus("auto", None, {"CUDA_VISIBLE_DEVICES": "0, 1,"}) == ["0", "1"]
    assert find_gpus("cuda", None, {"CUDA_VISIBLE_DEVICES": "-1"}) == []
    assert find_gpus("auto", 3, {}) == ["0", "1", "2"]
    assert find_gpus("cuda", ["GPU-abc", 4], {}) == ["GPU-abc", "4"]


def test_routes_to_the_least_busy_worker(pool: Pool) -> None:
    pool.wait_ready(15)
    pids = {r.pid for r in pool.status()}
    for _ in range(3):
        t = threading.Thread(target=pool.call, args=("debug.sleep",), kwargs={"seconds": 0.6})
        t.start()
        wait_until(lambda: any(r.inflight for r in pool.status()))
        busy = next(r.pid for r in pool.status() if r.inflight)
        for _ in range(5):
            assert pool.call("debug.pid") == (pids - {busy}).pop()
        t.join()
    assert sum(r.calls for r in pool.status()) >= 18


def test_stopped_worker_is_killed_as_unresponsive(pool: Pool) -> None:
    """A worker that stops answering health checks (SIGSTOP here) is killed and replaced."""
    pool.wait_ready(15)
    events: list[PoolEvent] = []
    unsubscribe = pool.subscribe(events.append)
    try:
        victim = pool.status()[0].pid
        os.kill(victim, signal.SIGSTOP)
        wait_until(lambda: any(e.event == "restart" for e in events), 15)
    finally:
        unsubscribe()
    crash = next(e for e in events if e.event == "crash")
    assert crash.metadata["pid"] == victim and crash.metadata["classification"] == "unresponsive"
    assert pool.wait_ready(15)
    assert victim not in {r.pid for r in pool.status()}
    assert pool.status()[0].last_exit.classification is Classification.UNRESPONSIVE


def test_events_reach_the_merged_telemetry_stream(pool: Pool) -> None:
    pool.wait_ready(15)
    with pool.watch_telemetry() as stream:
        pool.call("add", np.ones(2), np.ones(2))
        with pytest.raises(WorkerCrashed):
            pool.call("debug.abort")
        kinds: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + 15
        while not {"span", "crash", "restart"} <= set(kinds) and time.monotonic() < deadline:
            ev = stream.get(timeout=0.5)
            if ev is not None:
                kinds.setdefault(ev["event"] if ev["type"] == "pool" else ev["type"], ev)
    assert kinds["crash"]["metadata"]["classification"] == "abort"
    assert kinds["crash"]["pid"] == os.getpid()  # pool events come from the host
    assert kinds["span"]["op"] in ("add", "debug.abort")
    assert pool.wait_ready(15)


def test_ready_file_handshake(pool: Pool) -> None:
    run = run_id()
    proc = start_worker(["--run-id", run, "--watch-stdin"], template=pool.template, use_ready_file=True)
    try:
        assert proc.address and proc.address.startswith("unix:") and proc.via == "template"
    finally:
        proc.terminate()
        info = proc.wait_exit(15)
    assert info is not None and info.classification is Classification.CLEAN


def test_start_failure_carries_the_stderr_tail() -> None:
    with pytest.raises(WorkerStartError) as err:
        Pool(1, ops=["no_such_ops_module_xyz"], health_interval_s=0)
    e = err.value
    assert e.classification == "python_error" and e.exit_code == 1
    assert any("no_such_ops_module_xyz" in line for line in e.stderr_tail)
    assert "no_such_ops_module_xyz" in e.message


def test_start_timeout_kills_a_silent_worker(tmp_path: Path) -> None:
    script = tmp_path / "hangs.sh"
    script.write_text("#!/bin/sh\necho 'loading something slow' >&2\nexec sleep 60\n")
    script.chmod(0o755)
    with pytest.raises(WorkerStartError) as err:
        start_worker(python=str(script), start_timeout=0.5)
    e = err.value
    assert e.classification == "start_timeout" and "did not report ready" in e.message
    assert e.stderr_tail == ["loading something slow"]
    assert pid_gone(e.pid)


def test_warm_spare_takes_over_and_is_refilled() -> None:
    # A GPU pool gets one warm spare by default (gpus=1 says "one GPU"; on a CPU-only machine the
    # worker still runs on the CPU, with CUDA_VISIBLE_DEVICES unchanged: one GPU needs no placement).
    with Pool(1, gpus=1, debug_ops=True, health_interval_s=0) as pool:
        assert pool.wait_ready(30, spares=True)
        rows = pool.status()
        assert [r.state for r in rows] == [WorkerState.READY, WorkerState.SPARE]
        spare_pid = rows[1].pid
        events: list[PoolEvent] = []
        pool.subscribe(events.append)
        os.kill(rows[0].pid, signal.SIGKILL)
        wait_until(lambda: any(e.event == "restart" for e in events), 15)
        restart = next(e for e in events if e.event == "restart")
        assert restart.metadata["via"] == "spare" and restart.metadata["pid"] == spare_pid
        assert pool.status()[0].pid == spare_pid
        assert pool.call("debug.pid") == spare_pid
        assert pool.wait_ready(30, spares=True)
        assert pool.status()[1].state is WorkerState.SPARE and pool.status()[1].pid != spare_pid


def test_close_leaves_nothing_and_refuses_calls() -> None:
    pool = Pool(2, debug_ops=True, use_template=False, health_interval_s=0)
    run = pool.run_id
    x = np.ones(1 << 18, np.float32)
    held = pool.call("identity", x, placement="shm")  # a worker-owned output under a lease
    assert reaper.list_segments(run)
    pids = [r.pid for r in pool.status()] + [pool.template_pid]
    sockdir = Path(pool.status()[0].address[len("unix:"):]).parent
    pool.close()
    assert all(pid_gone(p) for p in pids)
    assert not reaper.list_segments(run)
    assert not sockdir.exists()
    assert (held == 1).all()  # still mapped in the host
    with pytest.raises(PoolClosed):
        pool.call("add", np.ones(2), np.ones(2))
    assert all(r.state is WorkerState.STOPPED for r in pool.status())
    pool.close()  # idempotent
