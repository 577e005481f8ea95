"""Host objects and fork(): a Client used in parent and forked children at the same time gives every
process its own connection and arena (no value is ever wrong); a Pool belongs to the process that
made it (a forked child gets WrongProcess and cannot harm the parent's workers or memory); neither
can be pickled, and the errors say what works instead (multiprocessing with fork and spawn)."""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import threading
import traceback
from typing import Any, Callable, Iterator

import numpy as np
import pytest

from sidecar.dataplane import reaper
from sidecar.host import Client
from sidecar.host.client import WrongProcess
from sidecar.host.pool import Pool
from tests.workers import FIXTURE_OPS, long_lived_pool, long_lived_run, long_lived_worker  # noqa: F401

N = 64 * 1024  # float32 elements: 256 KiB inputs and outputs, through shared memory both ways
CALLS = 40


@pytest.fixture(scope="module")
def run() -> Iterator[str]:
    yield from long_lived_run()


@pytest.fixture(scope="module")
def worker(run: str) -> Iterator[Any]:
    yield from long_lived_worker(run, *FIXTURE_OPS)


@pytest.fixture()
def pool() -> Iterator[Pool]:
    # One per test, closed after it: a live Pool's health checks are gRPC calls of this process's own
    # threads, and a Client forked while one is in flight can hang inside grpcio (guides/crash-barrier.md).
    # The tests that fork Clients run with no pool alive.
    yield from long_lived_pool(Pool(2, debug_ops=True, device="cpu"))


def calls_are_right(call: Callable[..., Any], tag: int, calls: int = CALLS) -> int:
    """`calls` adds whose inputs and answers differ per process and per call; returns the wrong ones."""
    wrong = 0
    for i in range(calls):
        x = np.full(N, float(tag * 1000 + i), np.float32)
        y = call("add", x, 1.0)
        wrong += int(not (y.shape == (N,) and (y == x + 1).all()))
    return wrong


def in_child(work: Callable[[], int]) -> tuple[int, int]:
    """Forks; the child runs `work` (its result is the exit code, 99 with a traceback on stderr if it
    raised). Returns (pid, read end of a pipe with the child's message)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 99
        try:
            code = work()
        except BaseException:  # noqa: BLE001 - reported to the parent
            os.write(w, traceback.format_exc().encode()[-4000:])
        finally:
            os._exit(code)
    os.close(w)
    return pid, r


def join_child(pid: int, r: int, timeout: float = 120) -> tuple[int, str]:
    import select
    import signal
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            message = b""
            while select.select([r], [], [], 0)[0] and (chunk := os.read(r, 65536)):
                message += chunk
            os.close(r)
            return os.waitstatus_to_exitcode(status), message.decode(errors="replace")
        select.select([r], [], [], 0.02)  # wakes early when the child writes
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    os.close(r)
    return -signal.SIGKILL, "the child hung"


def test_client_used_in_parent_and_forked_children_at_once(worker: Any, run: str) -> None:
    client = Client(worker.address, run_id=run, timeout=60)
    try:
        assert calls_are_right(client.call, 0, 5) == 0  # the parent's arena and free list are warm
        wrong_in_parent: list[int] = []
        parent = threading.Thread(target=lambda: wrong_in_parent.append(calls_are_right(client.call, 0)))

        def child(tag: int) -> Callable[[], int]:
            def work() -> int:
                wrong = calls_are_right(client.call, tag)
                client.close()  # the child's own arena and connection; the parent's stay
                return min(wrong, 50)
            return work

        # The forks come first, while no RPC is under way (forking during another thread's gRPC call
        # is outside grpcio's support: the child can hang, guides/crash-barrier.md); then the parent
        # calls at the same time as its three children.
        children = [in_child(child(tag)) for tag in (1, 2, 3)]
        parent.start()
        results = [join_child(pid, r, timeout=60) for pid, r in children]
        parent.join(120)
        assert results == [(0, "")] * 3, results  # exit code = wrong answers in that child
        assert wrong_in_parent == [0]
        assert calls_are_right(client.call, 4, 5) == 0  # the parent's client still works
        # The children's segments are gone with their close(); the parent's are still there.
        owners = {s.pid for s in reaper.list_segments(run)}
        assert os.getpid() in owners and not owners & {pid for pid, _ in children}
    finally:
        client.close()


def test_pool_in_a_forked_child_says_what_to_do_and_leaves_the_parent_alone(pool: Pool) -> None:
    pids = {r.pid for r in pool.status()}
    segments_before = {s.name for s in reaper.list_segments(pool.run_id) if s.pid == os.getpid()}

    def work() -> int:
        try:
            pool.call("add", np.ones(N, np.float32), 1.0)
        except WrongProcess as exc:
            ok = f"belongs to process {os.getppid()}" in str(exc) and "Create a Pool" in str(exc)
            pool.close()  # nothing of the parent's may be stopped or unlinked from here
            return 0 if ok else 2
        return 1

    result = join_child(*in_child(work))
    assert result == (0, ""), result
    assert {r.pid for r in pool.status()} == pids  # no worker was stopped by the child
    assert segments_before <= {s.name for s in reaper.list_segments(pool.run_id)}  # nor memory unlinked
    assert calls_are_right(pool.call, 5, 5) == 0


def _child_with_client(client: Client, tag: int, out: Any) -> None:
    out.put(calls_are_right(client.call, tag, 10))
    client.close()


def _child_with_pool(pool: Pool, out: Any) -> None:
    try:
        pool.call("add", np.ones(4), 1.0)
        out.put("no error")
    except WrongProcess as exc:
        out.put(str(exc))


def _child_with_address(address: str, run: str, tag: int, out: Any) -> None:
    with Client(address, run_id=run) as client:
        out.put(calls_are_right(client.call, tag, 10))


def test_multiprocessing_fork(worker: Any, run: str) -> None:
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    with Client(worker.address, run_id=run) as client:
        assert calls_are_right(client.call, 0, 2) == 0
        procs = [ctx.Process(target=_child_with_client, args=(client, tag, out)) for tag in (6, 7)]
        for p in procs:
            p.start()
        answers = [out.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(60)
        assert calls_are_right(client.call, 8, 5) == 0
    assert answers == [0, 0], answers  # every value right in both client children
    assert [p.exitcode for p in procs] == [0, 0]


def test_multiprocessing_fork_of_a_pool_says_what_to_do(pool: Pool) -> None:
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    p = ctx.Process(target=_child_with_pool, args=(pool, out))
    p.start()
    message = out.get(timeout=120)
    p.join(60)
    assert isinstance(message, str) and "cannot be used in process" in message and "Create a Pool" in message
    assert p.exitcode == 0


def test_multiprocessing_spawn_refuses_to_pickle_and_the_address_works(worker: Any, run: str, pool: Pool) -> None:
    ctx = mp.get_context("spawn")
    with pytest.raises(WrongProcess, match="create the Pool in the process that uses it"):
        ctx.Process(target=_child_with_pool, args=(pool, None)).start()
    with Client(worker.address, run_id=run) as client:
        with pytest.raises(TypeError, match=r"pass its address .* create Client\(address\)"):
            pickle.dumps(client)
    out = ctx.Queue()
    p = ctx.Process(target=_child_with_address, args=(worker.address, run, 9, out))
    p.start()
    assert out.get(timeout=120) == 0
    p.join(60)
    assert p.exitcode == 0
