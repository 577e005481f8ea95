"""GPU tensors through a real CUDA worker (`python -m sidecar serve --device cuda`) and the host Client:
CUDA tensors go in by IPC handle, device-resident results come back by handle, leases free them,
and the worker survives a GPU OOM and is replaced after an illegal address.
"""
from __future__ import annotations

import gc
import statistics
import time
from dataclasses import replace
from typing import Any, Iterator

import psutil
import pytest
import torch

from sidecar.dataplane import cuda_ipc
from sidecar.errors import InvalidTensorRef, OutOfMemory, SidecarError
from sidecar.host import Client
from sidecar.protocol.refs import CudaIpcStorage
from tests.workers import LONG_LIVED_RUNS, assert_run_clean, run_id, shm_of_run, start_worker  # noqa: F401

OPS = ("--device", "cuda", "--ops", "tests.gpu.gpu_ops_module")
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


@pytest.fixture(scope="module")
def run() -> Iterator[str]:
    rid = run_id()
    LONG_LIVED_RUNS.add(rid)
    yield rid
    LONG_LIVED_RUNS.discard(rid)


@pytest.fixture(scope="module")
def worker(run: str) -> Iterator[Any]:
    w = start_worker(*OPS, "--run-id", run, "--max-concurrency", "2", timeout=120)
    yield w
    code = w.stop()
    assert code == 0, w.stderr_text()[-4000:]
    assert_run_clean(run)


@pytest.fixture(scope="module")
def client(worker: Any, run: str) -> Iterator[Client]:
    c = Client(worker.address, run_id=run, timeout=120)
    yield c
    c.close()


def stats(client: Client) -> dict[str, int]:
    return dict(client.call("gpu.ipc_stats"))


def settle(client: Client) -> None:
    """Drop our references, then hand queued leases back to the worker now."""
    gc.collect()
    client.release()


# ---------------------------------------------------------------------------------------------------
# round trips

@pytest.mark.parametrize("nbytes", [KiB, MiB, 64 * MiB, GiB], ids=["1KiB", "1MiB", "64MiB", "1GiB"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_round_trip_by_handle(client: Client, dtype: torch.dtype, nbytes: int) -> None:
    n = nbytes // torch.tensor([], dtype=dtype).element_size()
    t = torch.randn(n, dtype=dtype, device="cuda")
    res = client.execute("gpu.negate", t, placement="device")
    out = res.outputs[0]
    assert res.device == "cuda:0"
    assert out.is_cuda and out.dtype == dtype and out.shape == t.shape
    assert torch.equal(out, -t)  # the worker read our memory; we read its result through its handle
    assert out.data_ptr() != t.data_ptr()
    del out, res
    settle(client)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_cuda_input_shared_memory_output(client: Client, dtype: torch.dtype) -> None:
    t = torch.randn(MiB, dtype=dtype, device="cuda")
    total, device, _ = client.call("gpu.checksum", t)
    assert device == "cuda:0"
    assert total == pytest.approx(float(t.double().sum().item()), rel=1e-9, abs=1e-6)


def test_identity_hands_our_own_memory_back(client: Client) -> None:
    t = torch.randn(1000, device="cuda")
    view = t[100:900:2]  # strided view inside the allocation
    out = client.call("identity", view, placement="device")
    assert out.data_ptr() == view.data_ptr() and out.stride() == view.stride()
    assert torch.equal(out, view)
    del out
    settle(client)


def test_two_tensors_in_one_allocation(client: Client) -> None:
    base = torch.arange(2 * 65536, dtype=torch.float32, device="cuda")
    a, b = base[:65536], base[65536:]
    s0 = stats(client)
    out = client.call("add", a, b, placement="device")
    assert torch.equal(out, a + b)
    del out
    settle(client)
    s1 = stats(client)
    # one handle, opened once for both inputs, closed when the call's tensors were gone
    assert s1["opens"] == s0["opens"] + 1 and s1["hits"] == s0["hits"] + 1
    assert s1["open_handles"] == s0["open_handles"] and s1["close_errors"] == 0


def test_region_beyond_the_allocation_is_rejected(client: Client) -> None:
    t = torch.ones(1024, device="cuda")
    ref = cuda_ipc.tensor_to_ref(t)
    s = ref.storage
    assert isinstance(s, CudaIpcStorage)
    before = stats(client)["open_handles"]
    for offset, field in ((s.alloc_nbytes + 4096, "offset"), (s.alloc_nbytes - 16, "nbytes")):
        bad = replace(ref, storage=replace(s, offset=offset, alloc_nbytes=0))  # 0: "size unknown"
        with pytest.raises(InvalidTensorRef) as ei:
            client.call("gpu.checksum", bad)
        assert ei.value.field == field and ei.value.input_index == 0, ei.value
    assert client.call("gpu.checksum", t)[0] == 1024.0  # still serving
    assert stats(client)["open_handles"] == before  # each refused open was closed again


def test_a_handle_reused_across_calls_is_served_from_the_cache(client: Client) -> None:
    t = torch.randn(MiB, device="cuda")
    s0 = stats(client)
    kept = client.call("gpu.same", t, placement="device")  # the worker's output is its mapping of t
    assert kept.data_ptr() == t.data_ptr()  # our own handle came back: a view of t
    s1 = stats(client)
    assert s1["opens"] == s0["opens"] + 1 and s1["reexports"] == s0["reexports"] + 1
    assert s1["open_handles"] == s0["open_handles"] + 1  # the lease keeps the mapping open
    total, _, worker_ptr = client.call("gpu.checksum", t)
    assert total == pytest.approx(float(t.double().sum().item()), rel=1e-9)
    s2 = stats(client)
    assert s2["opens"] == s1["opens"] and s2["hits"] == s1["hits"] + 1  # served from the cache
    del kept
    settle(client)
    s3 = stats(client)
    assert s3["open_handles"] == s0["open_handles"] and s3["closes"] >= s0["closes"] + 1


def test_device_results_are_released_and_memory_given_back(client: Client) -> None:
    settle(client)
    m0 = client.call("gpu.memory")["allocated"]
    out = client.call("gpu.fill", nbytes=256 * MiB, value=3.0, placement="device")
    assert out.is_cuda and out.numel() == 64 * MiB and float(out[:10].sum().item()) == 30.0
    m1 = client.call("gpu.memory")["allocated"]
    assert m1 >= m0 + 256 * MiB, (m0, m1)  # held under the lease while we hold the tensor
    view = out[::2]
    del out
    settle(client)
    assert client.call("gpu.memory")["allocated"] >= m0 + 256 * MiB  # a view keeps it too
    del view
    settle(client)
    m2 = client.call("gpu.memory")["allocated"]
    assert m2 <= m0, (m0, m1, m2)  # given back once the last view is gone


def test_gpu_out_of_memory_is_structured_and_survived(client: Client) -> None:
    total = torch.cuda.get_device_properties(0).total_memory
    with pytest.raises(OutOfMemory) as ei:
        client.call("gpu.alloc", nbytes=4 * total)
    e = ei.value
    print(repr(e))
    assert e.device == "cuda:0"
    assert e.requested_bytes == pytest.approx(4 * total, rel=0.01)
    assert 0 < e.free_bytes <= e.total_bytes and e.total_bytes == pytest.approx(total, rel=0.01)
    assert e.allocated_bytes is not None and e.reserved_bytes is not None
    t = torch.randn(4096, device="cuda")
    assert torch.equal(client.call("gpu.negate", t, placement="device"), -t)  # still serving


def test_no_host_copy_on_the_path(client: Client, worker: Any, run: str) -> None:
    """1 GiB crosses both ways by handle: no host memory grows, no shared memory appears, and the
    round trip takes a fraction of what one device-to-host copy of the same bytes takes."""
    big = torch.randn(GiB // 4, device="cuda")
    small = torch.randn(MiB // 4, device="cuda")
    me, wp = psutil.Process(), psutil.Process(worker.pid)
    for _ in range(2):  # warm: the worker opens the handles once
        client.call("identity", big, placement="device")
        client.call("identity", small, placement="device")
    settle(client)
    shm0, rss_me0, rss_w0 = shm_of_run(run), me.memory_info().rss, wp.memory_info().rss

    def median_round_trip(t: torch.Tensor, n: int = 9) -> float:
        times = []
        keep = None
        for _ in range(n):
            t0 = time.perf_counter()
            keep = client.call("identity", t, placement="device")
            times.append(time.perf_counter() - t0)
        del keep
        return statistics.median(times)

    t_big, t_small = median_round_trip(big), median_round_trip(small)
    settle(client)
    # Measured before the reference copy below: its pinned 1 GiB stays in torch's host cache.
    grew_me = me.memory_info().rss - rss_me0
    grew_w = wp.memory_info().rss - rss_w0
    host = torch.empty(big.shape, dtype=big.dtype, pin_memory=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    host.copy_(big)
    torch.cuda.synchronize()
    t_copy = time.perf_counter() - t0
    del host
    print(f"identity round trip by handle: 1 GiB {t_big * 1e6:.0f} us, 1 MiB {t_small * 1e6:.0f} us; "
          f"one 1 GiB device-to-host copy: {t_copy * 1e6:.0f} us; RSS growth host {grew_me >> 20} MiB, "
          f"worker {grew_w >> 20} MiB")
    assert shm_of_run(run) == shm0  # nothing was staged through shared memory
    assert grew_w < 256 * MiB and grew_me < 256 * MiB
    assert t_big < t_copy / 4, (t_big, t_copy)  # bytes did not move: far below one copy's time


# ---------------------------------------------------------------------------------------------------
# a sticky CUDA error

def test_illegal_address_taints_the_worker_and_it_exits_70() -> None:
    rid = run_id()
    w = start_worker(*OPS, "--run-id", rid, timeout=120)
    try:
        c = Client(w.address, run_id=rid, timeout=60)
        try:
            t = torch.randn(1024, device="cuda")
            assert torch.equal(c.call("gpu.negate", t, placement="device"), -t)
            with pytest.raises(SidecarError) as ei:
                c.call("gpu.illegal_address")
            print(repr(ei.value))
        finally:
            c.close()
        assert w.proc.wait(60) == 70, w.stderr_text()[-4000:]
    finally:
        w.stop()
    assert_run_clean(rid)


def test_pool_replaces_a_tainted_cuda_worker() -> None:
    from sidecar.host.pool import Pool

    pool = Pool(1, device="cuda", ops=["tests.gpu.gpu_ops_module"], health_interval_s=0, start_timeout=120)
    LONG_LIVED_RUNS.add(pool.run_id)
    try:
        assert pool.wait_ready(120), pool.status()
        t = torch.randn(4096, device="cuda")
        assert torch.equal(pool.call("gpu.negate", t, placement="device"), -t)
        pid = pool.status()[0].pid
        with pytest.raises(SidecarError) as ei:
            pool.call("gpu.illegal_address")
        print(repr(ei.value))
        assert pool.wait_ready(120), pool.status()
        deadline = time.monotonic() + 60
        while pool.status()[0].pid in (pid, None) and time.monotonic() < deadline:
            time.sleep(0.05)
        row = pool.status()[0]
        assert row.pid != pid and row.last_exit is not None
        assert row.last_exit.classification.value == "tainted" and row.last_exit.exit_code == 70
        assert torch.equal(pool.call("gpu.negate", t, placement="device"), -t)  # the replacement serves
    finally:
        pool.close()
        LONG_LIVED_RUNS.discard(pool.run_id)
    assert_run_clean(pool.run_id)
