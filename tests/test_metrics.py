"""Prometheus metrics of a real pool and of one real worker (`sidecar serve --metrics`), scraped over
HTTP after a known workload and parsed with prometheus-client's own parser: exact counts, histogram
buckets that hold the calls, a real segfault counted by classification, no GPU series on a CPU
machine, loopback-only binding."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sidecar.errors import CircuitOpen, InvalidArgument, ShapeMismatch, UnknownOp, WorkerCrashed
from sidecar.host import Client
from sidecar.host.pool import Pool, PoolClosed
from sidecar.worker.debug_ops import CRASH_FILE_ENV
from tests.workers import start_worker, wait_until, worker_command


def scrape(address: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return {f.name: f for f in text_string_to_metric_families(resp.read().decode())}


def value(families: dict[str, Any], family: str, sample: str | None = None, **labels: str) -> float | None:
    """The value of the one sample of `family` named `sample` (default: the family) with exactly `labels`."""
    name = sample or family
    hits = [s.value for s in families[family].samples if s.name == name and s.labels == labels] \
        if family in families else []
    assert len(hits) <= 1, hits
    return hits[0] if hits else None


def buckets(families: dict[str, Any], family: str, **labels: str) -> list[tuple[float, float]]:
    return [(float(s.labels["le"]), s.value) for s in families[family].samples
            if s.name == family + "_bucket" and {k: v for k, v in s.labels.items() if k != "le"} == labels]


def restarts(families: dict[str, Any]) -> float:
    """Replacements installed, however they started (forked from the template, cold, a spare)."""
    family = families.get("sidecar_worker_restarts")
    return sum(s.value for s in family.samples if s.name.endswith("_total")) if family else 0


def test_pool_metrics_show_exact_counts_after_a_known_workload() -> None:
    a = np.ones(16, np.float32)
    with Pool(2, debug_ops=True) as pool:
        address = pool.serve_metrics("127.0.0.1:0")
        assert re.fullmatch(r"127\.0\.0\.1:\d+", address) and not address.endswith(":0")
        for _ in range(5):
            pool.call("add", a, a)
        for _ in range(2):
            with pytest.raises(ShapeMismatch):
                pool.call("add", a, np.ones(3, np.float32))
        with pytest.raises(UnknownOp):
            pool.call("no.such.op")
        with pytest.raises(WorkerCrashed) as crash:
            pool.call("debug.segfault")
        assert crash.value.fields["classification"] == "segfault"
        assert pool.wait_ready(60)
        wait_until(lambda: restarts(scrape(address)) == 1, 30)

        m = scrape(address)
        assert m["sidecar_calls"].type == "counter"
        assert value(m, "sidecar_calls", "sidecar_calls_total", op="add", outcome="ok") == 5
        assert value(m, "sidecar_calls", "sidecar_calls_total", op="add", outcome="SHAPE_MISMATCH") == 2
        assert value(m, "sidecar_calls", "sidecar_calls_total", op="no.such.op", outcome="UNKNOWN_OP") == 1
        assert value(m, "sidecar_calls", "sidecar_calls_total", op="debug.segfault", outcome="WORKER_CRASHED") == 1
        assert value(m, "sidecar_worker_crashes", "sidecar_worker_crashes_total",
                     classification="segfault", phase="running") == 1
        assert sum(s.value for s in m["sidecar_worker_crashes"].samples if s.name.endswith("_total")) == 1

        # Histograms: every call of `add` (errors too) is in the round-trip histogram, the worker's
        # queue/compute split is there for the 5 that succeeded; buckets are cumulative.
        assert m["sidecar_call_duration_seconds"].type == "histogram"
        total = buckets(m, "sidecar_call_duration_seconds", op="add")
        assert total[-1] == (float("inf"), 7)
        assert [n for _, n in total] == sorted(n for _, n in total)
        assert value(m, "sidecar_call_duration_seconds", "sidecar_call_duration_seconds_count", op="add") == 7
        assert value(m, "sidecar_call_duration_seconds", "sidecar_call_duration_seconds_sum", op="add") > 0
        for split in ("sidecar_call_queue_seconds", "sidecar_call_compute_seconds"):
            assert buckets(m, split, op="add")[-1] == (float("inf"), 5)
        assert value(m, "sidecar_call_bytes", "sidecar_call_bytes_total", op="add", direction="in") == 5 * 2 * 64
        assert value(m, "sidecar_call_bytes", "sidecar_call_bytes_total", op="add", direction="out") == 5 * 64

        assert value(m, "sidecar_workers", state="ready") == 2
        assert value(m, "sidecar_workers", state="restarting") == 0
        assert value(m, "sidecar_breaker_state", state="closed") == 1
        assert value(m, "sidecar_breaker_state", state="open") == 0
        assert value(m, "sidecar_host_arena_reserved_bytes") is not None
        # Per-worker memory gauges once the profiler has a sample of each live worker.
        pids = {str(s.pid) for s in pool.status()}
        wait_until(lambda: {s.labels["pid"] for s in scrape(address)["sidecar_worker_rss_bytes"].samples} == pids, 30)
        m = scrape(address)
        assert all(s.value > 0 for s in m["sidecar_worker_rss_bytes"].samples)
        assert {s.labels["pid"] for s in m["sidecar_worker_leases"].samples} == pids
        # A CPU pool on a machine without an NVIDIA driver has no GPU series at all (never zeros).
        import torch

        if not torch.cuda.is_available():
            assert not [name for name in m if name.startswith("sidecar_gpu_")]
    with pytest.raises(urllib.error.URLError):  # stopped with the pool
        urllib.request.urlopen(f"http://{address}/metrics", timeout=5)
    with pytest.raises(PoolClosed):
        pool.serve_metrics("127.0.0.1:0")


def test_metrics_bind_loopback_only_unless_allowed() -> None:
    with Pool(1) as pool:
        with pytest.raises(InvalidArgument) as err:
            pool.serve_metrics("0.0.0.0:0")
        assert err.value.fields["field"] == "address" and "loopback" in str(err.value)
        with pytest.raises(InvalidArgument):
            pool.serve_metrics("9464")  # no host
        assert pool.serve_metrics("localhost:0").startswith("127.0.0.1:")
        remote = pool.serve_metrics("0.0.0.0:0", allow_remote=True)
        assert remote.startswith("0.0.0.0:")
        port = remote.rsplit(":", 1)[1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            assert b"sidecar_workers" in resp.read()
        two = [pool.serve_metrics("127.0.0.1:0") for _ in range(2)]  # several endpoints, one registry
        assert len(set(two)) == 2


def test_two_pools_in_one_process_have_separate_registries() -> None:
    a = np.ones(4, np.float32)
    with Pool(1) as p1, Pool(1) as p2:
        addr1, addr2 = p1.serve_metrics("127.0.0.1:0"), p2.serve_metrics("127.0.0.1:0")
        for _ in range(3):
            p1.call("add", a, a)
        p2.call("add", a, a)
        assert value(scrape(addr1), "sidecar_calls", "sidecar_calls_total", op="add", outcome="ok") == 3
        assert value(scrape(addr2), "sidecar_calls", "sidecar_calls_total", op="add", outcome="ok") == 1


def test_calls_from_many_threads_are_counted_exactly_and_the_queue_stays_bounded() -> None:
    """The call hook only queues a record; counting happens in bulk (`flush`). Whoever reads the
    figures (a scrape, the registry used directly, the recent-calls API) sees every call made
    before the read, whatever thread made it, and a pool nobody reads keeps no more than FLUSH_AT
    records waiting."""
    from prometheus_client import generate_latest

    from sidecar.observe.pool_observer import FLUSH_AT

    a = np.ones(4, np.float32)
    threads, per = 4, (FLUSH_AT // 4) + 50  # more than FLUSH_AT calls in all
    with Pool(2) as pool:
        observer = pool.observer
        observer.stop_profiling()  # no sampler round to flush on its own: the callers must
        errors: list[BaseException] = []

        def caller() -> None:
            try:
                for _ in range(per):
                    pool.call("add", a, a)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        workers = [threading.Thread(target=caller) for _ in range(threads)]
        for t in workers:
            t.start()
        for t in workers:
            t.join(120)
        assert not errors and not any(t.is_alive() for t in workers)
        assert len(observer._pending) < FLUSH_AT  # the callers flushed once it filled
        with pytest.raises(ShapeMismatch):
            pool.call("add", a, np.ones(3, np.float32))
        text = generate_latest(observer.registry).decode()  # the registry read directly, no HTTP
        m = {f.name: f for f in text_string_to_metric_families(text)}
        assert value(m, "sidecar_calls", "sidecar_calls_total", op="add", outcome="ok") == threads * per
        assert value(m, "sidecar_calls", "sidecar_calls_total", op="add", outcome="SHAPE_MISMATCH") == 1
        assert value(m, "sidecar_call_duration_seconds", "sidecar_call_duration_seconds_count",
                     op="add") == threads * per + 1
        assert not observer._pending
        recent = observer.calls_json()
        assert recent["last"] == threads * per + 1
        assert recent["calls"][-1]["outcome"] == "SHAPE_MISMATCH"
        seqs = [c["seq"] for c in recent["calls"]]
        assert seqs == sorted(seqs) and len(seqs) == len(set(seqs))


def test_pool_streams_are_counted_when_they_end() -> None:
    """A stream is one call of its op: counted when it ends, by outcome (a stream its consumer closed
    early counts as ok), with its round trip; the worker's split and bytes when it ran to its end."""
    from sidecar.errors import OpFailed

    with Pool(1, ops=["tests.stream_ops_module"]) as pool:
        address = pool.serve_metrics("127.0.0.1:0")
        chunks = list(pool.stream("count_up", n=5, nbytes=64))
        assert [i for i, _ in chunks] == list(range(5)) and all(arr.nbytes == 64 for _, arr in chunks)
        del chunks
        with pool.stream("count_up", n=1000) as early:
            assert next(early) == 0  # then closed by leaving `with`
        got = []
        with pytest.raises(OpFailed, match="tick 2 failed"):
            for x in pool.stream("ticks", n=10, fail_at=2):
                got.append(x)
        assert got == [0, 1]
        m = scrape(address)
        assert value(m, "sidecar_calls", "sidecar_calls_total", op="count_up", outcome="ok") == 2
        assert value(m, "sidecar_calls", "sidecar_calls_total", op="ticks", outcome="OP_FAILED") == 1
        assert buckets(m, "sidecar_call_duration_seconds", op="count_up")[-1] == (float("inf"), 2)
        # the worker's split and the bytes: only the stream that ran to its final message has them
        assert buckets(m, "sidecar_call_compute_seconds", op="count_up")[-1] == (float("inf"), 1)
        assert value(m, "sidecar_call_bytes", "sidecar_call_bytes_total", op="count_up", direction="out") >= 5 * 64
        calls = pool.observer.calls_json()["calls"]
        assert [(c["op"], c["outcome"]) for c in calls] == [("count_up", "ok"), ("count_up", "ok"),
                                                            ("ticks", "OP_FAILED")]
        assert "compute_ms" in calls[0] and "compute_ms" not in calls[1]


def _metrics_address(w: Any) -> str:
    found: list[str] = []

    def logged() -> bool:
        found[:] = re.findall(r"metrics on http://(\S+)/metrics", w.stderr_text())
        return bool(found)
    wait_until(logged, 30)
    return found[0]


def test_single_worker_serves_its_own_metrics() -> None:
    a = np.ones(16, np.float32)
    with start_worker("--device", "cpu", "--metrics", "127.0.0.1:0") as w:
        address = _metrics_address(w)
        with Client(w.address) as client:
            for _ in range(3):
                client.call("add", a, a)
            with pytest.raises(ShapeMismatch):
                client.call("add", a, np.ones(3, np.float32))

            # Spans reach the exporter through the worker's telemetry hub, right after the replies.
            wait_until(lambda: value(scrape(address), "sidecar_calls", "sidecar_calls_total",
                                     op="add", outcome="SHAPE_MISMATCH") == 1, 10)
            m = scrape(address)
            assert value(m, "sidecar_calls", "sidecar_calls_total", op="add", outcome="ok") == 3
            assert buckets(m, "sidecar_call_duration_seconds", op="add")[-1] == (float("inf"), 4)
            assert buckets(m, "sidecar_call_compute_seconds", op="add")[-1] == (float("inf"), 3)
            assert value(m, "sidecar_call_bytes", "sidecar_call_bytes_total", op="add", direction="out") == 3 * 64
            assert value(m, "sidecar_worker_info", pid=str(w.pid), device="cpu", version="0.1.0") == 1
            assert value(m, "sidecar_worker_tainted") == 0
            assert value(m, "sidecar_worker_rss_bytes") > 0
            assert value(m, "process_resident_memory_bytes") > 0
            assert not [name for name in m if name.startswith("sidecar_gpu_")]
            with urllib.request.urlopen(f"http://{address}/api/status", timeout=10) as resp:
                assert b'"device":"cpu"' in resp.read()
        assert w.alive()


def test_worker_refuses_a_non_loopback_metrics_address() -> None:
    run = subprocess.run(worker_command("--device", "cpu", "--metrics", "0.0.0.0:0"), capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 1
    assert "cannot serve metrics" in run.stderr and "not a loopback address" in run.stderr
    assert "SIDECAR_READY" not in run.stdout


def test_breaker_state_transitions_and_start_crashes_are_counted(tmp_path: Path) -> None:
    """A crash loop at start-up (non-default breaker settings, to open it quickly) shows in the
    breaker gauges and counters; calls failed fast count as CIRCUIT_OPEN."""
    crash_file = tmp_path / "crash-at-start"
    env = {**os.environ, CRASH_FILE_ENV: str(crash_file)}
    with Pool(1, debug_ops=True, env=env, breaker_threshold=3, breaker_cooldown_s=0.5,
              restart_backoff=(0.05, 0.2)) as pool:
        address = pool.serve_metrics("127.0.0.1:0")
        crash_file.write_text("3")
        os.kill(pool.status()[0].pid, signal.SIGKILL)  # its replacements now exit 3 at start-up
        wait_until(lambda: value(scrape(address), "sidecar_breaker_state", state="open") == 1, 30)
        with pytest.raises(CircuitOpen):
            pool.call("debug.pid")
        m = scrape(address)
        assert value(m, "sidecar_calls", "sidecar_calls_total", op="debug.pid", outcome="CIRCUIT_OPEN") == 1
        assert value(m, "sidecar_breaker_transitions", "sidecar_breaker_transitions_total", state="open") >= 1
        assert value(m, "sidecar_worker_crashes", "sidecar_worker_crashes_total",
                     classification="killed", phase="running") == 1  # SIGKILL, no OOM kill counted
        assert value(m, "sidecar_worker_crashes", "sidecar_worker_crashes_total",
                     classification="other", phase="start") >= 2
        assert value(m, "sidecar_workers", state="restarting") == 1
        crash_file.unlink()  # fixed: the probe closes the breaker
        wait_until(lambda: value(scrape(address), "sidecar_breaker_state", state="closed") == 1, 30)
        # The gauge reads the breaker itself; the counter counts its breaker_close event, which the
        # pool publishes just after the state changed: wait for it too.
        wait_until(lambda: value(scrape(address), "sidecar_breaker_transitions", "sidecar_breaker_transitions_total",
                                 state="close") is not None, 30)
        m = scrape(address)
        assert value(m, "sidecar_breaker_transitions", "sidecar_breaker_transitions_total", state="close") == 1
        assert value(m, "sidecar_breaker_transitions", "sidecar_breaker_transitions_total", state="half_open") >= 1


def test_a_retried_call_is_counted_once_and_its_retry_too() -> None:
    with Pool(2, debug_ops=True) as pool:
        address = pool.serve_metrics("127.0.0.1:0")
        box: dict[str, Any] = {}

        def slow() -> None:
            box["out"] = pool.call("debug.sleep", seconds=2.0, idempotent=True)
        t = threading.Thread(target=slow)
        t.start()
        wait_until(lambda: any(s.inflight for s in pool.status()), 30)
        busy = next(s.pid for s in pool.status() if s.inflight)
        os.kill(busy, signal.SIGKILL)  # the call is retried on the other worker
        t.join(60)
        assert box["out"] == 2.0
        m = scrape(address)
        assert value(m, "sidecar_call_retries", "sidecar_call_retries_total", op="debug.sleep") == 1
        assert value(m, "sidecar_calls", "sidecar_calls_total", op="debug.sleep", outcome="ok") == 1
        assert value(m, "sidecar_call_duration_seconds", "sidecar_call_duration_seconds_count", op="debug.sleep") == 1
