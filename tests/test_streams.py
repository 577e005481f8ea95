"""Streaming ops over gRPC with the blocking host: chunks in order, flow control, cancellation,
failures mid-stream, futures. Real worker processes (`tests/stream_ops_module.py`)."""
from __future__ import annotations

import gc
import os
import signal
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest

from sidecar.errors import Cancelled, InvalidArgument, OpFailed, UnknownOp, WorkerCrashed
from sidecar.host import Client, Pool
from sidecar.protocol import grpc_codec
from sidecar.v1 import sidecar_pb2 as pb
from sidecar.v1 import sidecar_pb2_grpc as pb_grpc
from tests.workers import WorkerProcess, long_lived_run, long_lived_worker, wait_until

OPS = ("--ops", "tests.stream_ops_module", "--ops", "tests.slow_ops_module")
MiB = 1 << 20


@pytest.fixture(scope="module")
def run() -> Iterator[str]:
    yield from long_lived_run()


@pytest.fixture(scope="module")
def worker(run: str) -> Iterator[WorkerProcess]:
    yield from long_lived_worker(run, *OPS)


@pytest.fixture
def client(worker: WorkerProcess, run: str) -> Iterator[Client]:
    with Client(worker.address, run_id=run) as c:
        yield c


def stats(client: Client) -> dict[str, int]:
    return client.call("stream_stats")  # type: ignore[no-any-return]


def state(client: Client) -> dict[str, int]:
    return client.call("worker_state")  # type: ignore[no-any-return]


def idle_and_leaseless(client: Client) -> bool:
    gc.collect()
    client.release()
    s = state(client)
    LAST_STATE.clear()
    LAST_STATE.update(s, pending=client.pending_releases)
    return s["running"] == 0 and s["leases"] == 0


LAST_STATE: dict[str, int] = {}  # what the last check saw (shown when a test fails on it)


@pytest.fixture(autouse=True)
def _show_last_state() -> Iterator[None]:
    LAST_STATE.clear()
    yield
    if LAST_STATE:  # pytest shows it only for a failed test
        print("last worker state:", LAST_STATE)


# -- chunks ------------------------------------------------------------------------------------------


def test_a_generator_of_1000_chunks_arrives_complete_and_in_order(client: Client) -> None:
    before = stats(client)
    stream = client.stream("count_up", n=1000)
    assert list(stream) == list(range(1000))
    assert stream.delivered == 1000 and stream.ended
    assert stream.result is not None and stream.result.timing.total_ns > 0
    assert stats(client)["finished"] == before["finished"] + 1


def test_tensor_chunks_cross_by_shared_memory_under_one_lease_each(client: Client) -> None:
    got = [(i, arr.copy()) for i, arr in client.stream("count_up", n=8, nbytes=256 << 10)]
    assert [i for i, _ in got] == list(range(8))
    for i, arr in got:
        assert arr.shape == (256 << 10,) and arr.dtype == np.uint8 and (arr == i % 251).all()
    assert stream_bytes(client) == 8 * (256 << 10)
    wait_until(lambda: idle_and_leaseless(client))


def stream_bytes(client: Client) -> int:
    stream = client.stream("count_up", n=8, nbytes=256 << 10)
    for _ in stream:
        pass
    assert stream.result is not None
    return stream.result.bytes_out


def test_an_op_that_returns_an_iterator_streams(client: Client) -> None:
    rows = [row.tolist() for row in client.stream("iterates", np.arange(6, dtype=np.int64).reshape(3, 2))]
    assert rows == [[0, 1], [2, 3], [4, 5]]


def test_a_unary_call_of_a_streaming_op_is_refused_and_the_generator_closed(client: Client) -> None:
    before = stats(client)
    with pytest.raises(InvalidArgument, match="streams its results") as info:
        client.call("count_up", n=3)
    assert info.value.fields["op"] == "count_up"
    assert stats(client)["produced"] == before["produced"]  # the generator never ran


def test_a_plain_op_streams_its_outputs_as_one_chunk(client: Client) -> None:
    chunks = list(client.stream("add", np.ones(3), 1.0))
    assert len(chunks) == 1 and chunks[0].tolist() == [2.0, 2.0, 2.0]


def test_an_unknown_op_fails_the_stream_with_unknown_op(client: Client) -> None:
    with pytest.raises(UnknownOp):
        list(client.stream("count_upp"))


# -- flow control -----------------------------------------------------------------------------------


def test_a_consumer_that_never_acknowledges_pauses_the_generator_at_the_window(worker: WorkerProcess,
                                                                               client: Client) -> None:
    """A raw ExecuteStream without AckChunks: the worker produces exactly max_chunks chunks and
    stops; an ack of 2 lets exactly 2 more out."""
    before = stats(client)["produced"]
    channel = grpc.insecure_channel(worker.address)
    try:
        stub = pb_grpc.SidecarStub(channel)
        request = grpc_codec.execute_request("count_up", attrs={"n": 1000}, request_id="no-acks",
                                             client_id="raw")
        request.stream_max_chunks = 4
        call = stub.ExecuteStream(request)
        messages = [next(call) for _ in range(4)]
        assert [m.index for m in messages] == [0, 1, 2, 3]
        for _ in range(5):  # each a round trip while the stream would race ahead if it could
            assert stats(client)["produced"] - before == 4
        assert stub.AckChunks(pb.ChunkAck(request_id="no-acks", client_id="raw", chunks=2)).known
        assert [next(call).index for _ in range(2)] == [4, 5]
        wait_until(lambda: stats(client)["produced"] - before == 6)
        for _ in range(3):
            assert stats(client)["produced"] - before == 6
        call.cancel()
    finally:
        channel.close()
    wait_until(lambda: idle_and_leaseless(client))


def test_a_slow_consumer_keeps_the_worker_memory_bounded(worker: WorkerProcess, run: str,
                                                         client: Client) -> None:
    """200 chunks of 1 MiB, read one at a time while the worker is watched: what it holds stays
    within the window (4 chunks), not the stream (200 MiB)."""
    with Client(worker.address, run_id=run) as watcher:
        base = state(watcher)
        peak_ahead = peak_arena = peak_rss = 0
        stream = client.stream("count_up", n=200, nbytes=MiB, max_chunks=4)
        for k, (i, arr) in enumerate(stream):
            assert i == k and arr[0] == i % 251
            del arr
            if k % 10 == 0:  # the consumer is slow: a round trip to the worker per 10 chunks
                s = state(watcher)
                peak_ahead = max(peak_ahead, s["produced"] - base["produced"] - (k + 1))
                peak_arena = max(peak_arena, s["arena_in_use"])
                peak_rss = max(peak_rss, s["rss"] - base["rss"])
        assert stream.delivered == 200
    assert peak_ahead <= 4  # never more than the window ahead of the consumer
    assert peak_arena <= 12 * MiB  # window + the consumer's own unreleased chunks, never 200 MiB
    assert peak_rss < 64 * MiB
    wait_until(lambda: idle_and_leaseless(client))


def test_the_releases_on_an_ack_still_in_flight_when_the_stream_ends_are_not_lost(worker: WorkerProcess,
                                                                                  client: Client) -> None:
    """The worker is stopped (SIGSTOP) while the last ack, carrying the lease of a consumed chunk, is
    on its way and the stream is dropped: once it runs again, every lease is released."""
    before = stats(client)
    it = iter(client.stream("count_up", n=2, nbytes=100_000, max_chunks=2))  # an ack per chunk
    first = next(it)
    del first
    wait_until(lambda: stats(client)["finished"] == before["finished"] + 1)  # all sent, the end too
    os.kill(worker.pid, signal.SIGSTOP)
    try:
        rest = [i for i, _arr in it]  # the ack of chunk 1 goes out with chunk 0's lease
        assert rest == [1]
        del it
        gc.collect()
    finally:
        os.kill(worker.pid, signal.SIGCONT)
    wait_until(lambda: idle_and_leaseless(client))


# -- cancellation -----------------------------------------------------------------------------------


def test_breaking_out_after_10_chunks_closes_the_generator_and_frees_its_leases(client: Client) -> None:
    before = stats(client)
    stream = client.stream("count_up", n=100_000, nbytes=128 << 10)
    for k, (_i, _arr) in enumerate(stream):
        if k == 9:
            break
    del _arr
    stream.close()
    wait_until(lambda: stats(client)["closed"] == before["closed"] + 1)  # GeneratorExit inside the op
    wait_until(lambda: idle_and_leaseless(client))
    assert stats(client)["produced"] - before["produced"] <= 10 + 16  # consumed + one window
    assert client.call("add", np.ones(2), 1.0).tolist() == [2.0, 2.0]  # serving again


def test_a_deadline_ends_a_stream_with_cancelled_and_closes_the_generator(client: Client) -> None:
    before = stats(client)
    got: list[int] = []
    with pytest.raises(Cancelled):
        got.extend(client.stream("ticks", n=1000, every_s=0.05, timeout=0.5))
    assert got == list(range(len(got)))
    wait_until(lambda: idle_and_leaseless(client))
    assert stats(client)["closed"] >= before["closed"]


def test_an_error_mid_stream_comes_after_the_chunks_before_it(client: Client) -> None:
    got: list[int] = []
    with pytest.raises(OpFailed, match="tick 3 failed on purpose") as info:
        got.extend(client.stream("ticks", n=10, fail_at=3))
    assert got == [0, 1, 2]
    assert info.value.fields["exception_type"] == "ValueError"
    wait_until(lambda: idle_and_leaseless(client))


def test_a_chunk_too_big_for_a_message_ends_the_stream_with_a_structured_error(client: Client) -> None:
    """A chunk that no gRPC message can carry (a 5 MB plain value, the worker's limit 4 MiB) ends the
    stream with InvalidArgument saying so, after the chunks before it; the op is stopped, every
    lease goes back, the worker serves on."""
    before = stats(client)
    got: list[Any] = []
    with pytest.raises(InvalidArgument, match=r"chunk 2 of its stream is \d+ bytes, over this worker's "
                                              r"--max-message-bytes") as info:
        for i, arr in client.stream("big_value_at", at=2, n=100_000, nbytes=128 << 10):
            got.append(i)
            del arr
    assert got == [0, 1]
    assert info.value.fields["got"].endswith(" bytes") and "--max-message-bytes" in info.value.fields["expected"]
    wait_until(lambda: stats(client)["closed"] == before["closed"] + 1)  # the generator was stopped
    wait_until(lambda: idle_and_leaseless(client))
    assert client.call("add", np.ones(2), 1.0).tolist() == [2.0, 2.0]


# -- futures ----------------------------------------------------------------------------------------


def test_a_future_resolves_with_the_result_or_the_error(client: Client) -> None:
    assert client.submit("add", np.ones(2), 2.0).result(30).tolist() == [3.0, 3.0]
    with pytest.raises(InvalidArgument):
        client.submit("add", 1.0, 2.0).result(30)


def test_cancelling_a_running_future_cancels_the_call_in_the_worker(client: Client) -> None:
    before = client.call("finished_count")
    future = client.submit("slow", np.ones(2), seconds=60)
    wait_until(lambda: state(client)["running"] == 1)  # it runs in the worker
    assert future.cancel() and future.cancelled()
    wait_until(lambda: client.call("finished_count") == before + 1)  # the op saw ctx.is_cancelled()
    wait_until(lambda: idle_and_leaseless(client))


# -- the pool ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pool() -> Iterator[Pool]:
    from tests.workers import long_lived_pool

    yield from long_lived_pool(Pool(2, device="cpu", ops=["tests.stream_ops_module", "tests.slow_ops_module"]))


def test_pool_stream_arrives_complete_and_in_order(pool: Pool) -> None:
    assert pool.wait_ready(60)
    assert list(pool.stream("count_up", n=1000)) == list(range(1000))


def test_a_worker_killed_mid_stream_ends_it_with_worker_crashed_after_the_delivered_chunks(pool: Pool) -> None:
    assert pool.wait_ready(60)
    stream = pool.stream("ticks", n=100_000, every_s=0.001)
    got = [next(stream) for _ in range(5)]
    busy = [row.pid for row in pool.status() if row.inflight and row.pid]
    assert len(busy) == 1
    os.kill(busy[0], signal.SIGKILL)
    with pytest.raises(WorkerCrashed) as info:
        got.extend(stream)
    assert got == list(range(len(got))) and len(got) >= 5
    assert info.value.fields["pid"] == busy[0]
    assert pool.wait_ready(60)


def test_an_idempotent_stream_that_crashed_before_its_first_chunk_is_retried(pool: Pool, tmp_path: Any) -> None:
    assert pool.wait_ready(60)
    retries: list[Any] = []
    unsubscribe = pool.subscribe(lambda e: retries.append(e) if e.event == "retry" else None)
    try:
        assert list(pool.stream("crash_once", marker=str(tmp_path / "m"), n=5)) == [0, 1, 2, 3, 4]
    finally:
        unsubscribe()
    assert len(retries) == 1
    assert pool.wait_ready(60)


def test_a_stream_that_is_not_idempotent_is_not_retried(pool: Pool, tmp_path: Any) -> None:
    assert pool.wait_ready(60)
    with pytest.raises(WorkerCrashed):
        list(pool.stream("crash_once", marker=str(tmp_path / "m"), n=5, idempotent=False))
    assert pool.wait_ready(60)


def test_pool_futures_resolve_and_cancel_in_the_worker(pool: Pool) -> None:
    assert pool.wait_ready(60)
    futures = [pool.submit("add", np.full(2, float(i)), 1.0) for i in range(8)]
    assert [f.result(30).tolist() for f in futures] == [[i + 1.0, i + 1.0] for i in range(8)]
    slow = pool.submit("slow", np.ones(1), seconds=60)
    wait_until(lambda: any(row.inflight for row in pool.status()))
    (row,) = [row for row in pool.status() if row.inflight]
    with Client(str(row.address)) as direct:
        before = direct.call("finished_count")
        assert slow.cancel() and slow.cancelled()
        wait_until(lambda: direct.call("finished_count") == before + 1)  # the op saw ctx.is_cancelled()
    wait_until(lambda: not any(row.inflight for row in pool.status()))
