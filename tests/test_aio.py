"""The asyncio host (`sidecar.host.aio`) against real workers: awaited calls, async streams in
order, cancellation reaching the worker, crashes mid-stream, and the shared data plane."""
from __future__ import annotations

import asyncio
import gc
import os
import signal
from typing import Any

import numpy as np
import pytest

from sidecar.errors import Cancelled, OpFailed, WorkerCrashed
from sidecar.host import Client
from sidecar.host.client import ClientClosed
from sidecar.host.aio import AsyncClient, AsyncPool
from tests import test_streams
from tests.workers import WorkerProcess, wait_until

run = test_streams.run        # the same module-scoped worker fixtures (a worker of this module's own)
worker = test_streams.worker


def idle_and_leaseless(address: str, run: str) -> bool:
    gc.collect()
    with Client(address, run_id=run) as c:
        s = c.call("worker_state")
        return s["running"] == 0 and s["leases"] == 0  # type: ignore[no-any-return]


def test_awaited_calls_share_the_blocking_hosts_data_plane(worker: WorkerProcess, run: str) -> None:
    async def main() -> None:
        async with AsyncClient(worker.address, run_id=run) as client:
            x = np.arange(300_000, dtype=np.float32)  # over the inline threshold: shared memory both ways
            ys = await asyncio.gather(*(client.call("add", x, float(i)) for i in range(8)))
            for i, y in enumerate(ys):
                assert y.shape == x.shape and y[10] == 10 + i
            assert (await client.list_ops()) and await client.health() == "SERVING"
            del ys, y
    asyncio.run(main())
    wait_until(lambda: idle_and_leaseless(worker.address, run))


def test_async_for_1000_chunks_in_order(worker: WorkerProcess, run: str) -> None:
    async def main() -> list[Any]:
        async with AsyncClient(worker.address, run_id=run) as client:
            return [x async for x in client.stream("count_up", n=1000)]
    assert asyncio.run(main()) == list(range(1000))


def test_leaving_an_async_stream_early_closes_the_generator(worker: WorkerProcess, run: str) -> None:
    with Client(worker.address, run_id=run) as probe:
        before = probe.call("stream_stats")["closed"]

        async def main() -> None:
            async with AsyncClient(worker.address, run_id=run) as client, \
                    client.stream("count_up", n=100_000, nbytes=100_000) as chunks:
                async for i, _arr in chunks:
                    if i == 9:
                        break
        asyncio.run(main())
        wait_until(lambda: probe.call("stream_stats")["closed"] == before + 1)
    wait_until(lambda: idle_and_leaseless(worker.address, run))


def test_a_cancelled_stream_hands_its_leases_back_without_blocking_the_loop(worker: WorkerProcess, run: str) -> None:
    """The consumed chunks' leases of a stream left early go back on grpc.aio (never a blocking RPC
    on the event loop's thread); a stream dropped unfinished is cancelled and no longer holds the
    client in use; a closed client refuses new streams and calls."""
    blocking_on_loop: list[list[str]] = []

    async def main() -> None:
        client = AsyncClient(worker.address, run_id=run)
        transport = client.client.transport
        blocking_release = transport.release

        def release(ids: list[str], timeout: float | None = None) -> tuple[int, list[str]]:
            try:
                asyncio.get_running_loop()
                blocking_on_loop.append(ids)  # a blocking RPC from the loop's own thread
            except RuntimeError:
                pass
            return blocking_release(ids, timeout)
        transport.release = release  # type: ignore[method-assign]

        async with client.stream("count_up", n=100_000, nbytes=100_000) as chunks:
            async for i, arr in chunks:  # 100 kB chunks: shared memory, each under a lease
                assert arr.nbytes == 100_000
                if i == 20:
                    break
        del arr
        gc.collect()
        dropped = client.stream("count_up", n=100_000, nbytes=100_000)
        assert (await dropped.__anext__())[0] == 0
        del dropped
        gc.collect()
        assert client.client._active == 0  # the dropped stream let go of the client
        await client.close()
        with pytest.raises(ClientClosed):
            client.stream("count_up", n=3)
        with pytest.raises(ClientClosed):
            await client.call("add", np.ones(2), 1.0)

    asyncio.run(main())
    assert blocking_on_loop == []
    wait_until(lambda: idle_and_leaseless(worker.address, run))


def test_cancelling_the_awaiting_task_cancels_the_call_in_the_worker(worker: WorkerProcess, run: str) -> None:
    with Client(worker.address, run_id=run) as probe:
        before = probe.call("finished_count")

        async def main() -> None:
            async with AsyncClient(worker.address, run_id=run) as client:
                task = asyncio.ensure_future(client.call("slow", np.ones(2), seconds=60))
                while probe.call("worker_state")["running"] < 1:
                    await asyncio.sleep(0.01)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
        asyncio.run(main())
        wait_until(lambda: probe.call("finished_count") == before + 1)


def test_an_error_mid_stream_and_a_deadline(worker: WorkerProcess, run: str) -> None:
    async def main() -> None:
        async with AsyncClient(worker.address, run_id=run) as client:
            got: list[int] = []
            with pytest.raises(OpFailed, match="tick 2 failed"):
                async for x in client.stream("ticks", n=10, fail_at=2):
                    got.append(x)
            assert got == [0, 1]
            with pytest.raises(Cancelled):
                async for _ in client.stream("ticks", n=1000, every_s=0.05, timeout=0.3):
                    pass
    asyncio.run(main())
    wait_until(lambda: idle_and_leaseless(worker.address, run))


def test_async_pool_calls_streams_and_a_crash_mid_stream() -> None:
    async def main() -> None:
        async with AsyncPool(2, device="cpu", ops=["tests.stream_ops_module"]) as pool:
            assert await pool.wait_ready(60)
            assert (await pool.call("add", np.ones(3), 1.0)).tolist() == [2.0, 2.0, 2.0]
            assert [x async for x in pool.stream("count_up", n=1000)] == list(range(1000))
            got: list[int] = []
            stream = pool.stream("ticks", n=100_000, every_s=0.001)
            for _ in range(5):
                got.append(await stream.__anext__())
            (busy,) = [row.pid for row in pool.status() if row.inflight and row.pid]
            os.kill(busy, signal.SIGKILL)
            with pytest.raises(WorkerCrashed):
                async for x in stream:
                    got.append(x)
            assert got == list(range(len(got))) and len(got) >= 5
            assert await pool.wait_ready(60)
            assert (await pool.call("add", np.ones(1), 1.0)).tolist() == [2.0]
    asyncio.run(main())


def test_async_pool_calls_are_admitted_by_the_op_breaker_and_recorded_by_metrics(tmp_path: Any) -> None:
    """An op that keeps crashing workers is refused to awaited calls and streams too (CircuitOpen, no
    worker asked), and the asyncio host's calls and streams show in the pool's metrics."""
    from sidecar.errors import CircuitOpen

    bug = tmp_path / "bug"
    bug.write_text("")

    async def main() -> dict[str, Any]:
        async with AsyncPool(2, device="cpu", ops=["tests.pool_ops_module", "tests.stream_ops_module",
                                                   "tests.slow_ops_module"]) as pool:
            pool.pool.observer.stop_profiling()  # metrics on; no memory sampling needed here
            assert await pool.wait_ready(60)
            assert (await pool.call("add", np.ones(2), 1.0)).tolist() == [2.0, 2.0]
            assert [x async for x in pool.stream("count_up", n=3)] == [0, 1, 2]
            for _ in range(5):  # the default threshold: 5 crashes within 30 s
                assert await pool.wait_ready(60)
                with pytest.raises(WorkerCrashed):
                    await pool.call("crash_while", path=str(bug), idempotent=False)
            asked = sum(r.calls + r.inflight for r in pool.pool.status())
            with pytest.raises(CircuitOpen):
                await pool.call("crash_while", path=str(bug))
            with pytest.raises(CircuitOpen):
                async for _ in pool.stream("crash_while", path=str(bug)):
                    pass
            assert sum(r.calls + r.inflight for r in pool.pool.status()) == asked  # no worker was asked
            task = asyncio.ensure_future(pool.call("slow", np.ones(2), seconds=60))
            wait = asyncio.ensure_future(pool.wait_ready(60))
            await wait
            while not any(r.inflight for r in pool.pool.status()):
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return {(c["op"], c["outcome"]): c for c in pool.pool.observer.calls_json()["calls"]}

    calls = asyncio.run(main())
    assert set(calls) == {("add", "ok"), ("count_up", "ok"), ("crash_while", "WORKER_CRASHED"),
                          ("crash_while", "CIRCUIT_OPEN"), ("slow", "CANCELLED")}
    assert "compute_ms" in calls[("add", "ok")] and "compute_ms" in calls[("count_up", "ok")]
