"""A pool's resources, sessions and addressing, with real workers, real torch and real SIGKILLs
(Pool defaults: template, health checks, breakers)."""
from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import psutil
import pytest
import torch

from sidecar.errors import ResourceFailed, SessionLost, WorkerCrashed
from sidecar.host.events import PoolEvent
from sidecar.host.pool import Pool, PoolClosed
from tests.resident_ops_module import MLP, saved_mlp
from tests.workers import long_lived_pool, run_id, wait_until

OPS = "tests.resident_ops_module"
MIB = 1 << 20


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[MLP, str]:
    return saved_mlp(tmp_path_factory.mktemp("ckpt"), seed=2)


@pytest.fixture(scope="module")
def pool() -> Iterator[Pool]:
    yield from long_lived_pool(Pool(2, device="cpu", ops=[OPS], run_id=run_id()))


@pytest.fixture()
def events(pool: Pool) -> Iterator[list[PoolEvent]]:
    seen: list[PoolEvent] = []
    unsubscribe = pool.subscribe(seen.append)
    yield seen
    unsubscribe()
    for recipe in pool.resources():  # each test starts from a pool without resources
        pool.unload(recipe["name"])
    assert pool.wait_ready(60)


def expected(m: MLP, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return m(torch.from_numpy(x)).numpy()  # type: ignore[no-any-return]


def kill_and_wait_for_replacement(pool: Pool, pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: pid not in [r.pid for r in pool.status()] and pool.ready_count() == pool.size, 60)


# ---------------------------------------------------------------------------------------------------
# load, replay, unload


def test_loaded_on_every_worker_outputs_equal_in_process(pool: Pool, model: tuple[MLP, str],
                                                         events: list[PoolEvent]) -> None:
    m, path = model
    infos = pool.load("mlp", "test_mlp", checkpoint=Path(path))
    assert sorted(i["pid"] for i in infos) == sorted(r.pid for r in pool.status())
    assert {i["slot"] for i in infos} == {0, 1} and all(i["device"] == "cpu" for i in infos)
    x = np.random.rand(8, 4).astype(np.float32)
    for w in pool.workers():  # each worker's own copy, not just the one a call happens to reach
        np.testing.assert_allclose(w.call("mlp_forward", x), expected(m, x), rtol=1e-6)
    [loaded] = [e for e in events if e.event == "resource_loaded"]
    assert loaded.metadata["name"] == "mlp" and loaded.metadata["workers"] == 2
    assert loaded.metadata["load_ms"] > 0
    [listed] = pool.resources()
    assert listed["loader"] == "test_mlp" and len(listed["workers"]) == 2


def test_sigkill_under_load_replacement_restores_before_serving(pool: Pool, model: tuple[MLP, str],
                                                                events: list[PoolEvent]) -> None:
    m, path = model
    pool.load("mlp", "test_mlp", checkpoint=path)
    x = np.random.rand(4, 4).astype(np.float32)
    want = expected(m, x)
    stop = threading.Event()
    failures: list[BaseException] = []
    done = [0]

    def hammer() -> None:
        while not stop.is_set():
            try:
                np.testing.assert_allclose(pool.call("mlp_forward", x), want, rtol=1e-6)
                done[0] += 1
            except BaseException as exc:  # noqa: BLE001 - counted below
                failures.append(exc)

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()
    wait_until(lambda: done[0] > 10, 30)
    victim = pool.status()[0].pid
    assert victim is not None
    kill_and_wait_for_replacement(pool, victim)
    wait_until(lambda: any(e.event == "resource_restored" for e in events), 30)
    after = done[0]
    wait_until(lambda: done[0] > after + 20, 30)  # calls keep going on both workers
    stop.set()
    for t in threads:
        t.join()
    assert failures == []
    [restored] = [e for e in events if e.event == "resource_restored"]
    new_pid = restored.metadata["pid"]
    assert restored.metadata["resources"] == ["mlp"] and restored.metadata["restore_ms"] > 0
    [restart] = [e for e in events if e.event == "restart"]
    assert restart.metadata["pid"] == new_pid
    assert events.index(restored) < events.index(restart)  # restored before it was routed to
    [fresh] = [w for w in pool.workers() if w.pid == new_pid]
    np.testing.assert_allclose(fresh.call("mlp_forward", x), want, rtol=1e-6)


def test_replacement_that_cannot_restore_is_reported_and_not_used(pool: Pool, model: tuple[MLP, str],
                                                                  events: list[PoolEvent], tmp_path: Path) -> None:
    path = tmp_path / "short-lived.pt"
    torch.save(model[0].state_dict(), path)
    pool.load("mlp", "test_mlp", checkpoint=str(path))
    path.unlink()  # the recipe can no longer be replayed
    victim, survivor = (r.pid for r in pool.status())
    assert victim is not None and survivor is not None
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: any(e.event == "crash" and e.metadata["phase"] == "start" for e in events), 60)
    failed = next(e for e in events if e.event == "restore_failed")
    assert failed.metadata["resource"] == "mlp" and failed.metadata["kind"] == "RESOURCE_FAILED"
    assert "does not exist" in failed.metadata["message"]
    crash = next(e for e in events if e.event == "crash" and e.metadata["phase"] == "start")
    assert crash.metadata["classification"] == "restore_failed"
    x = np.ones((1, 4), np.float32)
    for _ in range(5):  # only the worker that holds the model serves
        assert [w.pid for w in pool.workers()] == [survivor]
        pool.call("mlp_forward", x)
    assert failed.metadata["pid"] not in [r.pid for r in pool.status()]
    pool.unload("mlp")  # nothing left to restore: the slot comes back
    assert pool.wait_ready(60)


def test_unload_gives_memory_back_on_every_worker(pool: Pool, events: list[PoolEvent]) -> None:
    infos = pool.load("ballast", "ballast", mib=64)
    assert all(i["host_bytes"] >= 60 * MIB for i in infos)
    rss = {i["pid"]: psutil.Process(i["pid"]).memory_info().rss for i in infos}
    report = pool.unload("ballast")
    assert report["workers"] == 2 and report["host_bytes_freed"] >= 120 * MIB
    for pid, before in rss.items():
        assert before - psutil.Process(pid).memory_info().rss >= 60 * MIB
    assert pool.resources() == []
    assert any(e.event == "resource_unloaded" and e.metadata["name"] == "ballast" for e in events)
    with pytest.raises(ResourceFailed) as e:
        pool.unload("ballast")
    assert e.value.cause == "not_loaded"


def test_a_failed_load_is_all_or_nothing(pool: Pool, model: tuple[MLP, str], events: list[PoolEvent]) -> None:
    with pytest.raises(ResourceFailed) as e:
        pool.load("x", "failing")
    assert e.value.cause == "loader_failed" and "worker pid" in e.value.message
    with pytest.raises(ResourceFailed) as e:
        pool.load("x", "no_such_loader")
    assert e.value.cause == "unknown_loader"
    assert pool.resources() == []
    assert not any(e.event == "resource_loaded" for e in events)
    pool.load("mlp", "test_mlp", checkpoint=model[1])
    with pytest.raises(ResourceFailed) as e:
        pool.load("mlp", "test_mlp", checkpoint=model[1], dtype="float16")
    assert e.value.cause == "already_loaded"


def test_load_on_a_closed_pool() -> None:
    p = Pool(1, device="cpu", ops=[OPS], run_id=run_id())
    p.close()
    with pytest.raises(PoolClosed):
        p.load("ballast", "ballast", mib=1)


# ---------------------------------------------------------------------------------------------------
# sessions


def test_session_state_persists_and_is_lost_with_its_worker(pool: Pool, events: list[PoolEvent]) -> None:
    one = np.ones(2, np.float32)
    with pool.session() as s:
        pids = {s.call("whoami") for _ in range(6)}
        assert pids == {s.pid}  # strict affinity
        assert s.call("kv_append", one).tolist() == [1, 1]
        assert s.call("kv_append", one).tolist() == [1, 1, 1, 1]
        victim = s.pid
        kill_and_wait_for_replacement(pool, victim)
        for _ in range(2):  # the next call, and every later one
            with pytest.raises(SessionLost) as e:
                s.call("kv_append", one)
            assert e.value.session_id == s.id and e.value.pid == victim
            assert e.value.classification == "killed"
    [lost] = [e for e in events if e.event == "session_lost"]
    assert lost.metadata == {"session_id": s.id, "pid": victim, "classification": "killed", "restored": False,
                             "restore_ms": None}
    with pool.session() as fresh:  # a new session works on the new workers
        assert fresh.call("kv_append", one).tolist() == [1, 1]


def test_a_restore_hook_rebuilds_the_state_on_another_worker(pool: Pool, events: list[PoolEvent]) -> None:
    history = [np.full(2, float(i), np.float32) for i in range(3)]

    def rebuild(session: Any) -> None:
        for chunk in history:
            session.call("kv_append", chunk)

    with pool.session(restore=rebuild) as s:
        for chunk in history:
            s.call("kv_append", chunk)
        victim = s.pid
        kill_and_wait_for_replacement(pool, victim)
        out = s.call("kv_append", np.full(2, 9.0, np.float32))
        assert s.pid != victim
        assert out.tolist() == [0, 0, 1, 1, 2, 2, 9, 9]
    [lost] = [e for e in events if e.event == "session_lost"]
    assert lost.metadata["restored"] is True and lost.metadata["restore_ms"] >= 0


def test_session_state_is_freed_on_close_and_after_its_ttl(pool: Pool) -> None:
    with pool.session() as s:
        s.call("kv_append", np.ones(1, np.float32))
        [w] = [w for w in pool.workers() if w.pid == s.pid]
        assert s.id in [x["session_id"] for x in w.resources()["sessions"]]
    assert s.id not in [x["session_id"] for x in w.resources()["sessions"]]
    brief = pool.session(ttl_s=0.2)
    brief.call("kv_append", np.ones(1, np.float32))
    [w] = [w for w in pool.workers() if w.pid == brief.pid]
    wait_until(lambda: brief.id not in [x["session_id"] for x in w.resources()["sessions"]])
    assert brief.call("session_calls") == 0  # a new, empty state
    brief.close()


def test_prefer_mode_moves_stateless_calls_off_a_busy_worker(pool: Pool, tmp_path: Path) -> None:
    flag = tmp_path / "busy"
    flag.touch()
    with pool.session(mode="prefer") as s, pool.session() as strict:
        home = s.pid
        busy = threading.Thread(target=s.call, args=("busy_while",), kwargs={"path": str(flag)})
        busy.start()
        wait_until(lambda: any(w.pid == home and pool.status()[w.slot].inflight > 0 for w in pool.workers()))
        assert s.call("whoami") != home             # stateless (no ctx): may move
        flag.unlink()
        assert s.call("session_calls") == 0         # takes ctx: stays home (waits for its turn)
        busy.join()
        assert {strict.call("whoami") for _ in range(3)} == {strict.pid}


def test_session_modes_are_checked(pool: Pool) -> None:
    with pytest.raises(Exception) as e:
        pool.session(mode="loose")
    assert "strict" in str(e.value)


# ---------------------------------------------------------------------------------------------------
# addressing


def test_broadcast_returns_each_workers_result_or_error(pool: Pool) -> None:
    results = pool.broadcast("set_config", key="temperature", value=0.5)
    assert sorted(r.value for r in results) == sorted(r.pid for r in pool.status())
    victim = pool.status()[1].pid
    results = pool.broadcast("crash_if_pid", pid=victim)
    by_pid = {r.pid: r for r in results}
    assert by_pid[victim].ok is False and isinstance(by_pid[victim].error, WorkerCrashed)
    assert by_pid[victim].error.classification == "segfault"
    [other] = [r for r in results if r.pid != victim]
    assert other.ok and other.value == other.pid
    assert pool.wait_ready(60)


def test_pinned_workers(pool: Pool) -> None:
    workers = pool.workers()
    assert len(workers) == 2
    for w in workers:
        assert {w.call("whoami") for _ in range(3)} == {w.pid}
    victim = workers[0]
    kill_and_wait_for_replacement(pool, victim.pid)
    with pytest.raises(WorkerCrashed) as e:
        victim.call("whoami")
    assert e.value.classification == "killed" and getattr(e.value, "call_started", None) is False
    assert not victim.serving


def test_load_on_the_workers_of_one_gpu_only_and_replayed_there() -> None:
    """`gpu=` narrows a load to the workers placed on that GPU (CUDA_VISIBLE_DEVICES entries; the
    placement works on CPU workers too, which is what this checks)."""
    with Pool(2, device="cpu", ops=[OPS], gpus=["7", "9"], run_id=run_id()) as p:
        [info] = p.load("ballast", "ballast", mib=1, gpu="9")
        [on9] = [w for w in p.workers() if w.gpu == "9"]
        [on7] = [w for w in p.workers() if w.gpu == "7"]
        assert info["pid"] == on9.pid and info["slot"] == on9.slot
        assert [r["name"] for r in on9.resources()["resources"]] == ["ballast"]
        assert on7.resources()["resources"] == []
        kill_and_wait_for_replacement(p, on9.pid)
        [fresh] = [w for w in p.workers() if w.gpu == "9"]
        assert [r["name"] for r in fresh.resources()["resources"]] == ["ballast"]
        assert [w for w in p.workers() if w.gpu == "7"][0].resources()["resources"] == []
