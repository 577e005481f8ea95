"""Streams on the Erlang port transport (`sidecar serve --stdio`), driven with real frames:
`{:stream, ...}` -> `{:chunk, id, chunk}` frames -> `{:ok, id, result}`; credit by `{:ack, id, n}`."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from sidecar.etf import Atom as A
from tests.test_stdio_transport import PortClient
from tests.workers import ROOT, wait_until

STREAM_OPS = str(ROOT / "tests" / "stream_ops_module.py")


@pytest.fixture
def port() -> Iterator[PortClient]:
    client = PortClient("--ops", STREAM_OPS)
    yield client
    client.close()


def call(port: PortClient, rid: Any, op: str, **attrs: Any) -> Any:
    tag, got, body = port.request((A("call"), rid, op.encode(), [], {A(k): v for k, v in attrs.items()}))
    assert (tag, got) == ("ok", rid), body
    return body[A("outputs")][0]


def stats(port: PortClient) -> dict[str, int]:
    return {k.decode(): v for k, v in call(port, 9999, "stream_stats").items()}


def worker_state(port: PortClient) -> dict[str, int]:
    return {k.decode(): v for k, v in call(port, 9998, "worker_state").items()}


def test_1000_chunks_arrive_in_order_then_the_result(port: PortClient) -> None:
    port.send((A("stream"), 1, b"count_up", [], {A("n"): 1000}))
    indices, values = [], []
    while True:
        tag, rid, body = next(port.replies(1))
        assert rid == 1
        if tag != "chunk":
            break
        indices.append(body[A("index")])
        values.extend(body[A("values")])
        if len(indices) % 8 == 0:
            port.send((A("ack"), 1, 8))
    assert tag == "ok", body
    assert indices == list(range(1000)) and values == list(range(1000))
    assert body[A("outputs")] == [] and body[A("timing")][A("total_ns")] > 0


def test_without_acks_the_worker_sends_one_window_and_waits(port: PortClient) -> None:
    before = stats(port)["produced"]
    port.send((A("stream"), 1, b"count_up", [], {A("n"): 1000}, {A("stream_max_chunks"): 3}))
    chunks = [next(port.replies(1)) for _ in range(3)]
    assert [(c[0], c[2][A("index")]) for c in chunks] == [("chunk", 0), ("chunk", 1), ("chunk", 2)]
    for _ in range(5):  # round trips during which the generator would race ahead if it could
        assert stats(port)["produced"] - before == 3
    port.send((A("ack"), 1, 1))
    tag, rid, body = next(port.replies(1))
    assert (tag, rid, body[A("index")]) == ("chunk", 1, 3)
    closed = stats(port)["closed"]
    port.send((A("cancel"), 1))
    tag, rid, body = next(port.replies(1))
    assert (tag, rid, body[A("kind")]) == ("error", 1, "cancelled")
    wait_until(lambda: stats(port)["closed"] == closed + 1)


def test_cancel_after_10_chunks_leaves_no_chunk_lease(port: PortClient) -> None:
    """Chunks the host acknowledged are its to release; the others are reclaimed by the worker."""
    port.send((A("stream"), 7, b"count_up", [], {A("n"): 100_000, A("nbytes"): 200_000}))
    held: list[str] = []
    for k in range(10):
        tag, rid, body = next(port.replies(1))
        assert (tag, rid, body[A("index")]) == ("chunk", 7, k)
        held += [x.decode() for x in body[A("leases")]]
        if k == 7:
            port.send((A("ack"), 7, 8))
    assert len(held) == 10  # a lease per chunk: its 200 kB array lies in the worker's arena
    port.send((A("cancel"), 7))
    while True:  # chunks sent before the cancel arrived, then the end
        tag, rid, body = next(port.replies(1))
        if tag != "chunk":
            break
    assert (tag, rid, body[A("kind")]) == ("error", 7, "cancelled")
    tag, _, body = port.request((A("release"), 8, held[:8]))
    assert tag == "ok" and body[A("released")] == 8  # the acknowledged ones were still the host's
    wait_until(lambda: worker_state(port)["leases"] == 0 and worker_state(port)["running"] == 0)


def test_a_failing_generator_ends_with_its_error_after_the_chunks(port: PortClient) -> None:
    port.send((A("stream"), 3, b"ticks", [], {A("n"): 10, A("fail_at"): 2}))
    frames = [next(port.replies(1)) for _ in range(3)]
    assert [f[0] for f in frames] == ["chunk", "chunk", "error"]
    assert frames[2][2][A("kind")] == "op_failed" and frames[2][2][A("exception_type")] == b"ValueError"


def test_a_bad_ack_is_answered_with_an_error_and_the_worker_goes_on(port: PortClient) -> None:
    tag, rid, body = port.request((A("ack"), 1, -3))
    assert (tag, rid, body[A("kind")]) == ("error", 1, "invalid_argument")
    port.send((A("ack"), 12345, 4))  # a late ack of no stream: no reply, no harm
    assert stats(port)["produced"] >= 0
