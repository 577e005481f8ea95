"""A worker answers while it computes: health, ListOps and telemetry during long ops in every
concurrency slot; a worker that holds the GIL in C is BUSY to its pool, never killed as unresponsive
(one that is really frozen still is: tests/test_pool.py's SIGSTOP test). Real workers.

Latencies are printed (run with -s), not asserted beyond the pool's own contract: a health check
answered within the default health timeout is what keeps a worker alive. benchmarks/bench_stream.py
has the figures."""
from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from typing import Any

import pytest

from sidecar.host import Client, Pool
from sidecar.host.liveness import BUSY
from sidecar.host.settings import PoolSettings
from tests.workers import WorkerProcess, long_lived_run, long_lived_worker

OPS = ("--ops", "tests.busy_ops_module")
SLOTS = 2
DEFAULT_HEALTH_TIMEOUT_S = PoolSettings.build(1).health_timeout_s


@pytest.fixture(scope="module")
def run() -> Iterator[str]:
    yield from long_lived_run()


@pytest.fixture(scope="module")
def worker(run: str) -> Iterator[WorkerProcess]:
    yield from long_lived_worker(run, *OPS, "--max-concurrency", str(SLOTS))


def percentile(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1] if len(xs) > 1 else xs[0]


@pytest.mark.parametrize("op", ["spin", "matmuls"])
def test_health_list_ops_and_telemetry_answer_while_every_slot_computes(worker: WorkerProcess, run: str,
                                                                       op: str) -> None:
    with Client(worker.address, run_id=run) as client, \
            client.watch_telemetry(memory_interval_s=0.1, batch_window_ms=0) as watch:
        spans = iter(watch)
        while next(spans).get("type") != "memory":  # subscribed: no span of the calls can be missed
            pass
        # Long enough for every check below however loaded the machine is; cancelled after them.
        busy = [client.submit(op, seconds=120.0) for _ in range(SLOTS)]
        started = 0
        while started < SLOTS:  # both calls run in the worker (their start spans)
            event = next(spans)
            started += event.get("type") == "span" and event.get("phase") == "start" and event.get("op") == op
        latencies = []
        for _ in range(40):
            t = time.perf_counter()
            assert client.health(timeout=DEFAULT_HEALTH_TIMEOUT_S) == "SERVING"
            latencies.append(time.perf_counter() - t)
        assert any(o["name"] == op for o in client.list_ops())
        samples = 0
        while samples < 2:  # memory samples keep coming while the ops run
            samples += next(spans).get("type") == "memory"
        assert not any(f.done() for f in busy)  # all of it happened while every slot computed
        print(f"\n{op}: health p50 {percentile(latencies, 50) * 1e3:.1f} ms, "
              f"p99 {percentile(latencies, 99) * 1e3:.1f} ms over {len(latencies)} checks")
        for f in busy:
            assert f.cancel()  # reaches the op (ctx.is_cancelled), which stops at once
        # The cancelled ops stopped: two short calls return (behind the 120 s ones they could not in 60 s).
        assert all(f.result(60) > 0 for f in [client.submit(op, seconds=0.05) for _ in range(SLOTS)])


def fast_health_pool(**kwargs: Any) -> Pool:
    """Health checks every 0.2 s with a 0.2 s timeout, 2 failures kill: seconds, not a minute."""
    return Pool(1, device="cpu", ops=["tests.busy_ops_module"], health_interval_s=0.2, health_timeout_s=0.2,
                health_failures=2, **kwargs)


def test_a_worker_holding_the_gil_in_c_is_busy_not_killed() -> None:
    with fast_health_pool() as pool:
        assert pool.wait_ready(60)
        crashes: list[Any] = []
        unsubscribe = pool.subscribe(lambda e: crashes.append(e) if e.event == "crash" else None)
        (pid,) = [row.pid for row in pool.status()]
        future = pool.submit("hold_gil", seconds=2.0)
        seen: set[str] = set()
        while not future.done():
            seen |= {row.health for row in pool.status()}
            time.sleep(0.02)
        took = future.result()
        unsubscribe()
        assert took >= 1.0  # one C call held the GIL for over a second: no health check got in
        assert BUSY in seen, seen
        assert not crashes and [row.pid for row in pool.status()] == [pid]
