"""`sidecar.host.Client` against a real worker: conversions, leases, aliasing, errors, lifetime."""
from __future__ import annotations

import gc
import os
import subprocess
import textwrap
import threading
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch

from sidecar.dataplane.arena import Arena
from sidecar.errors import Cancelled, InvalidArgument, ShapeMismatch, WorkerCrashed
from sidecar.host import Client, WorkerUnreachable
from sidecar.host.client import ClientClosed
from tests.workers import (FIXTURE_OPS, PYTHON, ROOT, long_lived_run, long_lived_worker,  # noqa: F401
                           session_run, shm_of_run, start_worker)

BIG = np.arange(256 * 1024, dtype=np.float32).reshape(512, 512)  # 1 MiB: crosses through shm


@pytest.fixture(scope="module")
def run() -> Any:
    yield from long_lived_run()


@pytest.fixture(scope="module")
def worker(run: str) -> Any:
    yield from long_lived_worker(run, *FIXTURE_OPS)


@pytest.fixture
def client(worker: Any, run: str) -> Any:
    c = Client(worker.address, run_id=run, timeout=30)
    yield c
    c.close()


def mine(run: str) -> set[str]:
    return {n for n in shm_of_run(run) if f"-{os.getpid()}-" in n}


def test_importing_the_client_does_not_import_torch(worker: Any) -> None:
    code = textwrap.dedent(f"""
        import sys
        import numpy as np
        from sidecar.host import Client
        with Client({worker.address!r}) as c:
            y = c.call("add", np.ones(100_000, np.float32), 1.0)
            assert float(y[0]) == 2.0, y
        assert "torch" not in sys.modules, "torch was imported"
        print("ok")
    """)
    proc = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_output_aliasing_a_copied_input_survives_later_calls(client: Client) -> None:
    """identity answers with a view of the input; the client's temporary copy must stay put."""
    y = client.call("identity", BIG)  # BIG is not arena memory: it is copied into a block first
    for i in range(3):  # later calls would reuse a released block
        client.call("mul", np.full_like(BIG, -1.0), float(i))
    np.testing.assert_array_equal(y, BIG)


def test_output_aliasing_an_arena_input_keeps_it_alive(client: Client) -> None:
    x = client.empty(BIG.shape, "float32")
    x[:] = BIG
    y = client.call("transpose", x, dim0=0, dim1=1)
    del x
    gc.collect()
    for _ in range(3):
        z = client.empty(BIG.shape, "float32")
        z[:] = -1
    np.testing.assert_array_equal(y, BIG.T)


def test_without_aliasing_every_output_is_a_leased_copy(worker: Any, run: str) -> None:
    with Client(worker.address, run_id=run, allow_alias=False) as c:
        x = c.empty(BIG.shape, "float32")
        x[:] = BIG
        res = c.execute("identity", x)
        assert len(res.leases) == 1
        y = res.outputs[0]
        x[:] = 0  # the output is a copy: unaffected
        np.testing.assert_array_equal(y, BIG)


def test_zero_copy_input_from_empty(client: Client) -> None:
    t = client.empty((512, 512), "float32", torch=True)
    t.copy_(torch.from_numpy(BIG))
    misses = client.arena.stats().misses
    hits = client.arena.stats().hits
    y = client.call("relu", t)
    assert isinstance(y, torch.Tensor)
    assert client.arena.stats().misses == misses and client.arena.stats().hits == hits  # nothing allocated
    torch.testing.assert_close(y, torch.relu(torch.from_numpy(BIG)))


def test_leases_are_released_once_outputs_are_collected(client: Client) -> None:
    res = client.execute("relu", BIG, placement="shm")
    (lease,) = res.leases
    col = res.outputs[0][:, 0]  # a view keeps the lease
    del res
    gc.collect()
    assert client.pending_releases == 0
    del col
    gc.collect()
    assert client.pending_releases == 1
    client.call("add", np.ones(2), 1.0)  # piggybacks the release
    assert client.pending_releases == 0
    assert client.release([lease]) == (0, [lease])  # already gone on the worker


def test_torch_view_keeps_the_lease(client: Client) -> None:
    t = torch.from_numpy(BIG.copy())
    y = client.call("relu", t)[:10]  # only a slice of the output survives
    gc.collect()
    client.call("mul", np.full_like(BIG, -1.0), 1.0, placement="inline")  # would reuse a freed block
    assert client.pending_releases == 0
    torch.testing.assert_close(y, torch.relu(t)[:10])


def test_arrow_columns_keep_the_lease(client: Client) -> None:
    table = pa.table({"v": pa.array(np.arange(50_000, dtype=np.int64))})
    col = client.call("fixture.table_total", table).column("doubled")
    gc.collect()
    assert client.pending_releases == 0
    assert col[49_999].as_py() == 99_998
    del col
    gc.collect()
    assert client.pending_releases == 1


def test_several_outputs_and_out_refs(client: Client) -> None:
    a, b = client.call("fixture.split", BIG, parts=2)
    np.testing.assert_array_equal(a, BIG[:256])
    np.testing.assert_array_equal(b, BIG[256:])
    outs = (client.empty((256, 512), "float32"), np.zeros((256, 512), np.float32))  # arena and plain
    assert client.call("fixture.split", BIG, parts=2, out=outs) == outs
    np.testing.assert_array_equal(outs[0], BIG[:256])
    np.testing.assert_array_equal(outs[1], BIG[256:])
    t_out = torch.zeros(512, 512)
    assert client.call("relu", torch.from_numpy(BIG), out=t_out) is t_out
    torch.testing.assert_close(t_out, torch.relu(torch.from_numpy(BIG)))


def test_plain_values_in_and_out(client: Client) -> None:
    np.testing.assert_array_equal(client.call("fixture.scale", np.ones(3, np.float32), 2, offset=0.5),
                                  np.full(3, 2.5, np.float32))
    stats = client.call("fixture.stats", np.ones((2, 2), np.float32))
    assert stats["n"] == 4 and stats["mean"] == 1.0


def test_structured_error_and_bad_placement(client: Client) -> None:
    with pytest.raises(ShapeMismatch) as info:
        client.call("add", np.ones((2, 3)), np.ones((4, 5)))
    assert info.value.input_shapes == [[2, 3], [4, 5]]
    with pytest.raises(InvalidArgument):
        client.call("relu", BIG, placement="somewhere")


def test_default_timeout_cancels(worker: Any, run: str) -> None:
    with Client(worker.address, run_id=run, timeout=0.2) as c:
        with pytest.raises(Cancelled):
            c.call("slow", BIG, seconds=30)


def test_close_unlinks_the_clients_own_segments(worker: Any, run: str) -> None:
    before = mine(run)
    c = Client(worker.address, run_id=run)
    c.call("relu", BIG)
    assert mine(run) - before  # the client's arena holds a segment
    c.close()
    assert mine(run) <= before
    with pytest.raises(InvalidArgument):
        c.call("relu", BIG)


def test_shared_arena_is_left_to_its_owner(worker: Any, run: str) -> None:
    with Arena(run) as arena:
        with Client(worker.address, arena=arena) as c:
            assert c.run_id == run
            c.call("relu", BIG)
        assert not arena.closed


def test_telemetry_watch_closes(client: Client) -> None:
    watch = client.watch_telemetry(memory_interval_s=0.05)
    # The module's worker is shared: a span from an earlier test's call may still be in flight,
    # so the memory sample need not be the very first event.
    kinds = []
    for event in watch:
        kinds.append(event["type"])
        if event["type"] == "memory" or len(kinds) == 50:
            break
    assert kinds[-1] == "memory" and set(kinds) <= {"span", "memory"}, kinds
    watch.close()
    assert list(watch) == []


def test_dead_worker_is_unreachable() -> None:
    w = start_worker("--device", "cpu", "--threads", "1")
    c = Client(w.address, timeout=5)
    try:
        assert c.health() == "SERVING"
        w.proc.kill()
        w.proc.wait(10)
        with pytest.raises(WorkerUnreachable) as info:
            c.call("add", 1, 2)
        assert isinstance(info.value, WorkerCrashed) and info.value.classification == "unreachable"
        assert info.value.call_started is False  # no connection: the call never reached a worker
        with pytest.raises(WorkerUnreachable):
            c.health()
    finally:
        c.close()
        w.stop()


def test_every_method_of_a_closed_client_refuses_without_reaching_grpc(worker: Any, run: str) -> None:
    c = Client(worker.address, run_id=run)
    c.call("relu", BIG)
    c.close()
    assert c.closed
    for use in (c.health, c.list_ops, c.hardware, lambda: c.call("relu", BIG), lambda: c.release(["x"]),
                c.watch_telemetry):
        with pytest.raises(ClientClosed) as info:
            use()
        assert isinstance(info.value, InvalidArgument) and info.value.field == "client"


def _hammer_health_while_closing(address: str, run: str, kill: Any = None) -> Counter[str]:
    """Four threads call health() in a loop while the client is closed under them (what the pool's
    health thread does when a worker dies); returns what they saw, by type."""
    seen: Counter[str] = Counter()
    lock = threading.Lock()
    c = Client(address, run_id=run)
    started = threading.Barrier(5)

    def loop() -> None:
        started.wait()
        closed_seen = 0
        while closed_seen < 200:
            try:
                outcome = c.health(timeout=5)
            except ClientClosed:
                outcome = "ClientClosed"
                closed_seen += 1
            except Exception as exc:  # noqa: BLE001 - counted: only the dead worker's errors may appear
                outcome = type(exc).__name__
            with lock:
                seen[outcome] += 1

    threads = [threading.Thread(target=loop) for _ in range(4)]
    for t in threads:
        t.start()
    started.wait()
    if kill is not None:
        kill()
    c.close()
    for t in threads:
        t.join(60)
    return seen


def test_hammering_health_on_a_client_closed_under_it(worker: Any, run: str) -> None:
    for _ in range(10):
        seen = _hammer_health_while_closing(worker.address, run)
        assert set(seen) <= {"SERVING", "ClientClosed"}, seen  # never grpc's ValueError on a closed channel
        assert seen["ClientClosed"] == 4 * 200


def test_hammering_health_on_a_closed_client_of_a_dead_worker() -> None:
    w = start_worker("--device", "cpu", "--threads", "1")
    try:
        seen = _hammer_health_while_closing(w.address, session_run("hammer"), kill=lambda: (w.proc.kill(), w.proc.wait(10)))
    finally:
        w.stop()
    assert set(seen) <= {"SERVING", "WorkerUnreachable", "ClientClosed"}, seen
    assert seen["ClientClosed"] == 4 * 200
