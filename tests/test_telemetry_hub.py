"""The telemetry hub: spans reach every watcher, memory samples flow only while someone watches,
a slow watcher loses its oldest events instead of blocking calls, and nobody watching costs nothing."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from sidecar.dataplane import tensors
from sidecar.dataplane.arena import Arena
from sidecar.errors import ShapeMismatch
from sidecar.protocol.calls import Call, OutputSpec, Placement
from sidecar.worker.runtime import WorkerOptions, build_runtime
from sidecar.worker.telemetry import Telemetry
from tests.workers import session_run, wait_until


@pytest.fixture
def rt():
    runtime = build_runtime(WorkerOptions(device="cpu", run_id=session_run("telworker")))
    yield runtime
    runtime.close()


@pytest.fixture
def host_arena():
    arena = Arena(session_run("telhost"))
    yield arena
    arena.close()


def spans(sub, n, timeout=5.0):
    out = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        ev = sub.get(timeout=0.2)
        if ev is not None and ev["type"] == "span":
            out.append(ev)
    return out


def test_no_watchers_means_inactive_and_no_sampler():
    hub = Telemetry()
    assert hub.active is False and hub.watchers == 0
    hub.span_start("add", "r1", 10)  # returns at once: nothing to deliver to
    hub.span_stop("add", "r1", 5, 10, 20, {})
    assert hub._sampler is None  # no thread exists while nobody watches


def test_spans_reach_two_watchers(rt, host_arena):
    a = rt.telemetry.subscribe(memory_interval_s=60)
    b = rt.telemetry.subscribe(memory_interval_s=60)
    assert rt.telemetry.active and rt.telemetry.watchers == 2
    x, block = tensors.to_ref(np.ones(100000, np.float32), host_arena, inline_threshold=0)
    try:
        res = rt.dispatcher.execute(Call(op="identity", inputs=[x], request_id="req-1",
                                         output=OutputSpec(Placement.SHM)))
        rt.release(res.leases)
        with pytest.raises(ShapeMismatch):
            small = tensors.to_ref(np.ones(3, np.float32))[0]  # inline: (100000,) + (3,) cannot broadcast
            rt.dispatcher.execute(Call(op="add", inputs=[x, small], request_id="req-2"))
    finally:
        block.release()
    for sub in (a, b):
        got = spans(sub, 4)
        assert [(e["phase"], e["request_id"]) for e in got] == [
            ("start", "req-1"), ("stop", "req-1"), ("start", "req-2"), ("exception", "req-2")]
        stop, exc = got[1], got[3]
        assert stop["op"] == "identity" and stop["outcome"] == "ok"
        assert stop["bytes_in"] == stop["bytes_out"] == 400000
        assert stop["duration_ns"] > 0 and set(stop["timing"]) >= {"queue_ns", "decode_ns", "compute_ns",
                                                                   "encode_ns", "total_ns"}
        assert exc["outcome"] == "SHAPE_MISMATCH" and exc["op"] == "add"
        assert all(e["pid"] > 0 and e["time_unix_ns"] > 0 for e in got)
    a.close()
    assert rt.telemetry.active and rt.telemetry.watchers == 1
    b.close()
    assert rt.telemetry.active is False


def test_memory_samples_only_while_watched(rt, host_arena):
    sub = rt.telemetry.subscribe(memory_interval_s=0.05)
    x, block = tensors.to_ref(np.ones(100000, np.float32), host_arena, inline_threshold=0)
    res = rt.dispatcher.execute(Call(op="identity", inputs=[x], output=OutputSpec(Placement.SHM)))
    block.release()
    samples = []
    deadline = time.monotonic() + 10
    while len(samples) < 3 and time.monotonic() < deadline:
        ev = sub.get(timeout=0.5)
        if ev is not None and ev["type"] == "memory":
            samples.append(ev)
    assert len(samples) == 3
    last = samples[-1]
    assert last["rss_bytes"] > 0 and last["leases"] == 1 and last["gpus"] == []
    assert last["arena_in_use_bytes"] >= 400000 and last["arena_reserved_bytes"] >= last["arena_in_use_bytes"]
    rt.release(res.leases)
    sub.close()
    wait_until(lambda: rt.telemetry._sampler is None)  # the sampler thread ends with the last watcher


def test_each_watcher_gets_its_own_interval():
    hub = Telemetry(memory_source=lambda: {"rss_bytes": 1})
    fast = hub.subscribe(memory_interval_s=0.02)
    slow = hub.subscribe(memory_interval_s=30)
    n_fast = 0
    while n_fast < 5:
        ev = fast.get(timeout=5)
        assert ev is not None and ev["type"] == "memory"
        n_fast += 1
    first = slow.get(timeout=1)  # one sample on subscribing, then nothing for 30 s
    assert first is not None and first["rss_bytes"] == 1
    assert slow.get(timeout=0.1) is None
    hub.close()
    assert fast.closed and slow.closed and hub.active is False


def test_slow_watcher_drops_oldest_and_never_blocks():
    hub = Telemetry(max_events=4)
    sub = hub.subscribe(memory_interval_s=3600)
    assert sub.get(timeout=5)["type"] == "memory"  # the initial sample
    for i in range(10):
        hub.span_start("add", f"r{i}", i)
    assert sub.dropped == 6
    got = [sub.get(timeout=1) for _ in range(4)]
    assert [e["request_id"] for e in got] == ["r6", "r7", "r8", "r9"]
    assert got[0] == {**got[0], "type": "span", "phase": "start", "op": "add", "bytes_in": 6}
    sub.close()
    hub.close()


def test_iteration_ends_when_closed_from_another_thread():
    hub = Telemetry(memory_source=lambda: {})
    sub = hub.subscribe(memory_interval_s=3600)
    seen = []
    t = threading.Thread(target=lambda: seen.extend(sub))
    t.start()
    hub.span_start("add", "r1")
    wait_until(lambda: any(e["type"] == "span" for e in seen))
    sub.close()  # what a transport does when its client goes away
    t.join(5)
    assert not t.is_alive() and hub.active is False
