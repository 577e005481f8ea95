"""The gRPC transport end to end: a real `python -m sidecar serve` process, a real unix socket.

Every built-in op against NumPy, a user ops module, ListOps/GetHardware/health/reflection,
zero-copy transfers both ways, telemetry, and liveness while a long op runs.
"""
from __future__ import annotations

import gc
import itertools
import math
import threading
import time
from typing import Any, Callable

import grpc
import numpy as np
import pyarrow as pa
import pytest
import torch

from sidecar.errors import Cancelled
from sidecar.host import Client
from tests.workers import FIXTURE_OPS, long_lived_run, long_lived_worker, wait_until  # noqa: F401


@pytest.fixture(scope="module")
def run() -> Any:
    yield from long_lived_run()


@pytest.fixture(scope="module")
def worker(run: str) -> Any:
    yield from long_lived_worker(run, *FIXTURE_OPS, "--ops", "tests.hold_ops_module", "--max-concurrency", "4")


@pytest.fixture(scope="module")
def client(worker: Any, run: str) -> Any:
    c = Client(worker.address, run_id=run, timeout=30)
    yield c
    c.close()


def rng_array(*shape: int, dtype: Any = np.float32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _gelu(x: np.ndarray) -> np.ndarray:
    erf = np.vectorize(math.erf)
    return (0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))).astype(x.dtype)


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


# A (256, 128) float32 tensor is 128 KiB: above the inline threshold, so it crosses through shm.
A = rng_array(256, 128, seed=1)
B = rng_array(256, 128, seed=2)
POS = np.abs(B) + 0.5
SMALL = rng_array(3, 4, seed=3)
W, BIAS = rng_array(128, seed=4), rng_array(128, seed=5)

CASES: list[tuple[str, tuple[Any, ...], dict[str, Any], Callable[[], np.ndarray]]] = [
    ("identity", (A,), {}, lambda: A),
    ("add", (A, B), {}, lambda: A + B),
    ("add_scalar", (A, 2.5), {}, lambda: A + np.float32(2.5)),
    ("sub", (A, B), {}, lambda: A - B),
    ("mul", (A, B), {}, lambda: A * B),
    ("div", (A, POS), {}, lambda: A / POS),
    ("matmul", (A, B.T.copy()), {}, lambda: A @ B.T),
    ("sum", (A,), {}, lambda: np.asarray(A.sum(dtype=np.float32))),
    ("sum_dim", (A,), {"dim": 1, "keepdim": True}, lambda: A.sum(1, keepdims=True)),
    ("mean", (A,), {"dim": 0}, lambda: A.mean(0)),
    ("max", (A,), {}, lambda: np.asarray(A.max())),
    ("max_pair", (A, B), {}, lambda: np.maximum(A, B)),
    ("softmax", (A,), {"dim": -1}, lambda: _softmax(A, -1)),
    ("relu", (A,), {}, lambda: np.maximum(A, 0)),
    ("gelu", (SMALL,), {}, lambda: _gelu(SMALL)),
    ("layer_norm", (A, W, BIAS), {"normalized_shape": [128]}, lambda: _layer_norm(A, W, BIAS)),
    ("reshape", (A,), {"shape": [128, 256]}, lambda: A.reshape(128, 256)),
    ("transpose", (A,), {"dim0": 0, "dim1": 1}, lambda: A.T),
    ("cast", (A,), {"dtype": "int32"}, lambda: A.astype(np.int32)),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_builtin_op_matches_numpy(client: Client, case: Any) -> None:
    name, inputs, attrs, expected = case
    op = {"add_scalar": "add", "sum_dim": "sum", "max_pair": "max"}.get(name, name)
    got = client.call(op, *inputs, **attrs)
    want = expected()
    assert isinstance(got, np.ndarray)
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_every_builtin_op_is_covered(client: Client) -> None:
    builtin = {o["name"] for o in client.list_ops() if o["module"] == "sidecar.worker.builtin_ops"}
    tested = {{"add_scalar": "add", "sum_dim": "sum", "max_pair": "max"}.get(c[0], c[0]) for c in CASES}
    assert builtin == tested


def test_user_ops_module(client: Client) -> None:
    from tests.ops_fixture_module import reference_weights

    x = rng_array(5, 4, seed=7)
    w, b = reference_weights()
    np.testing.assert_allclose(client.call("fixture.predict", x), x @ w.numpy().T + b.numpy(), rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(client.call("fixture.scale", x, 3.0, offset=1.0), x * 3 + 1, rtol=1e-6)
    parts = client.call("fixture.split", x, parts=2)
    assert isinstance(parts, tuple) and len(parts) == 2
    np.testing.assert_array_equal(np.concatenate(parts), x)
    stats = client.call("fixture.stats", x)
    assert stats == {"device": "cpu", "n": 20, "mean": pytest.approx(float(x.mean()), rel=1e-5)}
    table = pa.table({"v": pa.array(np.arange(20_000, dtype=np.int64))})  # ~160 KB: an shm stream
    out = client.call("fixture.table_total", table)
    assert isinstance(out, pa.Table)
    assert out.column("doubled").to_pylist() == [2 * i for i in range(20_000)]
    assert out.column("total")[0].as_py() == sum(range(20_000))


def test_list_ops_describes_every_op(client: Client) -> None:
    ops = {o["name"]: o for o in client.list_ops()}
    assert {"identity", "add", "matmul", "fixture.predict", "slow"} <= set(ops)
    assert all(o["doc"] for o in ops.values())
    assert ops["identity"]["max_inputs"] == -1
    assert ops["add"]["min_inputs"] == ops["add"]["max_inputs"] == 2
    assert ops["fixture.scale"]["idempotent"] is False and ops["add"]["idempotent"] is True
    assert "dim" in ops["softmax"]["attrs"]
    assert ops["fixture.predict"]["module"] == "tests.ops_fixture_module"


def test_hardware(client: Client, worker: Any) -> None:
    hw = client.hardware()
    assert hw["pid"] == worker.pid
    assert hw["device"] == "cpu"
    assert hw["cpu"]["threads"] >= 1 and hw["cpu"]["memory_total"] > 0
    assert hw["identity"] and hw["torch_version"] == torch.__version__
    assert hw["cuda"]["available"] == torch.cuda.is_available()


def test_health_serving(client: Client) -> None:
    assert client.health() == "SERVING"
    assert client.health("sidecar.v1.Sidecar") == "SERVING"


def test_reflection_lists_the_service(worker: Any) -> None:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(worker.address) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert {"sidecar.v1.Sidecar", "grpc.health.v1.Health"} <= services
        method_names = {m.name for m in db.FindFileContainingSymbol("sidecar.v1.Sidecar").service[0].method}
        assert "Execute" in method_names


def test_large_tensor_zero_copy_both_ways(client: Client) -> None:
    n = 8 << 20  # 32 MB of float32
    x = client.empty(n, "float32")
    x[:] = np.arange(n, dtype=np.float32)
    misses = client.arena.stats().misses
    res = client.execute("identity", x, placement="shm")
    assert client.arena.stats().misses == misses  # the input was described in place, never copied
    y = res.outputs[0]
    assert len(res.leases) == 1 and res.bytes_in == res.bytes_out == 4 * n
    np.testing.assert_array_equal(y, x)
    # The caller's `out` buffer, in the arena: the worker writes straight into it.
    out = client.empty(n, "float32")
    assert client.call("mul", x, 2.0, out=out) is out
    np.testing.assert_array_equal(out, x * 2)
    # Outputs are writable views of the leased block; the lease goes back once they are collected.
    y[0] = -1.0
    del y, res
    gc.collect()
    assert client.pending_releases == 1
    released, unknown = client.release()
    assert (released, unknown) == (1, [])


def test_out_into_plain_numpy_array(client: Client) -> None:
    out = np.zeros_like(A)
    assert client.call("relu", A, out=out) is out
    np.testing.assert_array_equal(out, np.maximum(A, 0))


def test_inline_placement(client: Client) -> None:
    res = client.execute("add", A, B, placement="inline")
    assert res.leases == []
    np.testing.assert_allclose(res.outputs[0], A + B)


def test_torch_in_torch_out(client: Client) -> None:
    t = torch.randn(300, 200)
    y = client.call("softmax", t, dim=1)
    assert isinstance(y, torch.Tensor)
    torch.testing.assert_close(y, torch.softmax(t, 1))
    bf = torch.randn(300, 200).to(torch.bfloat16)
    z = client.call("identity", bf)
    assert z.dtype == torch.bfloat16 and torch.equal(z, bf)
    z.add_(1)  # in place on the leased view: must not crash the host


def test_dlpack_object(client: Client) -> None:
    class OnlyDlpack:
        def __init__(self, a: np.ndarray) -> None:
            self._a = a

        def __dlpack__(self, **kw: Any) -> Any:
            return self._a.__dlpack__(**kw)

        def __dlpack_device__(self) -> Any:
            return self._a.__dlpack_device__()

    y = client.call("mul", OnlyDlpack(A), 3.0)
    np.testing.assert_allclose(y, A * 3)


def test_telemetry_spans_and_memory(client: Client) -> None:
    events: list[dict[str, Any]] = []
    done = threading.Event()
    watch = client.watch_telemetry(memory_interval_s=0.05)

    def read() -> None:
        for ev in watch:
            events.append(ev)
            kinds = {(e["type"], e.get("phase"), e.get("request_id")) for e in events}
            if ("span", "stop", "tel-1") in kinds and any(e["type"] == "memory" for e in events):
                done.set()
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + 10
    while not done.is_set() and time.monotonic() < deadline:
        client.call("add", A, B, request_id="tel-1")  # the stream may attach after the first call
        done.wait(0.2)
    watch.close()
    reader.join(5)
    assert done.is_set(), events
    spans = [e for e in events if e["type"] == "span" and e["request_id"] == "tel-1"]
    assert {"start", "stop"} <= {s["phase"] for s in spans}
    stop = next(s for s in spans if s["phase"] == "stop")
    assert stop["op"] == "add" and stop["outcome"] == "ok" and stop["duration_ns"] > 0
    assert stop["bytes_in"] == A.nbytes + B.nbytes and stop["timing"]["compute_ns"] > 0
    mem = next(e for e in events if e["type"] == "memory")
    assert mem["rss_bytes"] > 0 and mem["pid"] > 0


def test_raw_stream_sends_one_event_per_message_unless_batching_is_asked(worker: Any, client: Client) -> None:
    """A plain gRPC client that knows nothing of batching gets one TelemetryEvent per message."""
    from sidecar.v1 import sidecar_pb2 as pb
    from sidecar.v1 import sidecar_pb2_grpc as pb_grpc

    with grpc.insecure_channel(worker.address) as channel:
        stub = pb_grpc.SidecarStub(channel)
        for window_ms in (0, 50):
            stream = stub.WatchTelemetry(pb.TelemetryRequest(memory_interval_s=60, batch_window_ms=window_ms))
            got: list[Any] = []
            reader = threading.Thread(target=lambda got=got, stream=stream: got.extend(itertools.islice(stream, 1)),
                                      daemon=True)
            reader.start()
            deadline = time.monotonic() + 10
            while reader.is_alive() and time.monotonic() < deadline:
                client.call("add", A, B, request_id=f"raw-{window_ms}")
                reader.join(0.1)
            stream.cancel()
            assert got, "no telemetry message arrived"
            first = got[0]
            if window_ms == 0:  # a single event: its own fields are set, no batch
                assert not first.batch and first.WhichOneof("event") in ("span", "memory")
            else:  # batched: the events sit in `batch`, each a complete event
                assert first.WhichOneof("event") is None and first.batch
                assert all(e.WhichOneof("event") in ("span", "memory") for e in first.batch)


def test_timing_in_every_response(client: Client) -> None:
    res = client.execute("matmul", A, B.T.copy())
    t = res.timing
    assert t.total_ns >= t.queue_ns + t.decode_ns + t.compute_ns + t.encode_ns > 0
    assert res.device == "cpu"


def _holding(client: Client, tmp_path: Any, names: list[str]) -> tuple[list[threading.Thread], list[Any]]:
    """Starts one `hold` call per name (tests/hold_ops_module.py): each runs until tmp_path/release exists."""
    results: list[Any] = []
    threads = [threading.Thread(target=lambda n=n: results.append(client.call(
        "hold", SMALL, started=str(tmp_path / n), release=str(tmp_path / "release")))) for n in names]
    for t in threads:
        t.start()
    return threads, results


def test_control_plane_answers_while_long_op_runs(client: Client, tmp_path: Any) -> None:
    """Health, ListOps, telemetry and another call are answered while an op runs (until released)."""
    threads, result = _holding(client, tmp_path, ["long"])
    wait_until((tmp_path / "long").exists, timeout=30)
    other = Client(client.address, run_id=client.run_id, timeout=30)
    try:
        assert other.health() == "SERVING"
        assert len(other.list_ops()) > 10
        np.testing.assert_allclose(other.call("add", SMALL, SMALL), SMALL * 2)
        with other.watch_telemetry() as w:
            assert next(iter(w))["type"] in ("memory", "span")
        assert not result  # all of the above happened while the op was still running
    finally:
        other.close()
        (tmp_path / "release").touch()
        threads[0].join(30)
    np.testing.assert_array_equal(result[0], SMALL)


def test_calls_up_to_the_concurrency_limit_run_together(client: Client, tmp_path: Any) -> None:
    names = [f"call{i}" for i in range(4)]
    threads, results = _holding(client, tmp_path, names)
    # --max-concurrency 4: all four run at once (each marks its start only once it runs), none waits
    wait_until(lambda: all((tmp_path / n).exists() for n in names), timeout=30)
    assert not results
    (tmp_path / "release").touch()
    for t in threads:
        t.join(30)
    assert len(results) == 4


def test_deadline_cancels_the_call(client: Client) -> None:
    n_before = client.call("finished_count")
    with pytest.raises(Cancelled):
        client.call("slow", SMALL, seconds=60.0, timeout=0.3)
    # The op sees ctx.is_cancelled() and stops early instead of running its 60 s.
    wait_until(lambda: client.call("finished_count") == n_before + 1, timeout=30)
    assert client.health() == "SERVING"


# ---------------------------------------------------------------------------------------------------
# undecodable requests


def _flood_undecodable(channel: Any, n: int) -> grpc.RpcError:
    execute = channel.unary_unary("/sidecar.v1.Sidecar/Execute")  # raw bytes in, raw bytes out
    last: grpc.RpcError | None = None
    for _ in range(n):
        try:
            execute(b"\xff\xff\xff", timeout=30)
        except grpc.RpcError as err:
            last = err
    assert last is not None, "an undecodable request was answered with success"
    return last


def test_undecodable_requests_get_a_structured_error_and_leave_rss_flat(worker: Any, client: Client) -> None:
    """grpcio leaks ~20 KB per request its deserializer rejects (grpc/grpc#36908): 3,000 of them
    grew a worker by ~57 MiB. The worker parses bodies itself, so its RSS stays flat."""
    import psutil

    from sidecar.errors import InvalidArgument
    from sidecar.protocol import grpc_codec

    proc = psutil.Process(worker.pid)
    with grpc.insecure_channel(worker.address) as channel:
        _flood_undecodable(channel, 300)  # warm-up: thread stacks, allocator arenas
        before = proc.memory_info().rss
        err = _flood_undecodable(channel, 3000)
        grown = proc.memory_info().rss - before
    assert grown < 16 << 20, f"RSS grew by {grown >> 20} MiB over 3,000 undecodable requests"
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    structured = grpc_codec.error_from_rpc(err)
    assert isinstance(structured, InvalidArgument) and structured.field == "ExecuteRequest" and structured.request_id
    assert "sidecar.v1.ExecuteRequest" in structured.message
    assert client.health() == "SERVING"


def test_every_method_refuses_an_undecodable_body(worker: Any) -> None:
    from sidecar.protocol import grpc_codec

    with grpc.insecure_channel(worker.address) as channel:
        for method, message in (("Release", "ReleaseRequest"), ("ListOps", "ListOpsRequest"),
                                ("GetHardware", "HardwareRequest"), ("WatchTelemetry", "TelemetryRequest")):
            path = f"/sidecar.v1.Sidecar/{method}"
            rpc = channel.unary_stream(path) if method == "WatchTelemetry" else channel.unary_unary(path)
            with pytest.raises(grpc.RpcError) as info:
                reply = rpc(b"\xff\xff\xff", timeout=30)
                if method == "WatchTelemetry":
                    next(iter(reply))
            err = grpc_codec.error_from_rpc(info.value)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, info.value)
            assert err.field == message, (method, err)


# ---------------------------------------------------------------------------------------------------
# sockets of dead workers


def test_a_new_worker_removes_sockets_of_dead_workers_and_never_a_live_one(tmp_path: Any) -> None:
    import os
    import signal
    import stat

    from tests.workers import start_worker

    env = {"XDG_RUNTIME_DIR": str(tmp_path)}
    sock_dir = tmp_path / "sidecar"

    def socket_of(w: Any) -> str:
        assert w.address.startswith(f"unix:{sock_dir}/w-{w.pid}-")
        return w.address[len("unix:"):]

    live = start_worker("--device", "cpu", "--threads", "1", env=env)
    killed = start_worker("--device", "cpu", "--threads", "1", env=env)
    try:
        stale = socket_of(killed)
        assert killed.stop(signal.SIGKILL) == -signal.SIGKILL
        assert stat.S_ISSOCK(os.lstat(stale).st_mode)  # SIGKILL leaves the socket file behind
        stranger = sock_dir / "w-1-notours.sock"  # not our naming: left alone
        stranger.write_text("")
        with start_worker("--device", "cpu", "--threads", "1", env=env) as new:
            assert not os.path.exists(stale)
            assert os.path.exists(socket_of(live)) and os.path.exists(socket_of(new)) and stranger.exists()
            with Client(live.address, timeout=30) as c:
                assert c.health() == "SERVING"
    finally:
        live.stop()


def test_tcp_beyond_loopback_warns_that_it_has_no_authentication() -> None:
    from tests.workers import start_worker

    with start_worker("--device", "cpu", "--threads", "1", "--listen", "0.0.0.0:0") as w:
        wait_until(lambda: "without authentication or TLS" in w.stderr_text())
        with Client(w.address.replace("0.0.0.0", "127.0.0.1"), timeout=30) as c:
            assert c.health() == "SERVING"


# ---------------------------------------------------------------------------------------------------
# nested values


def test_lists_and_dicts_of_arrays_go_in_and_come_back_decoded(client: Client) -> None:
    """HuggingFace-style inputs: {"input_ids": ..., "attention_mask": ...}, lists of arrays, both nested;
    big arrays travel by shared memory, small ones inline, and the outputs come back decoded."""
    ids = np.arange(64 * 1024, dtype=np.int64).reshape(64, 1024)  # 512 KiB: shared memory
    mask = np.ones((4, 8), np.int64)                                # small: inline
    batch = {"input_ids": ids, "attention_mask": mask, "meta": {"lengths": [ids[0], 3], "name": "b"}}
    res = client.execute("identity", batch)
    out = res.outputs[0]
    assert set(out) == {"input_ids", "attention_mask", "meta"} and out["meta"]["name"] == "b"
    np.testing.assert_array_equal(out["input_ids"], ids)
    np.testing.assert_array_equal(out["attention_mask"], mask)
    np.testing.assert_array_equal(out["meta"]["lengths"][0], ids[0])
    assert out["meta"]["lengths"][1] == 3 and res.bytes_in >= ids.nbytes
    pair = client.call("identity", [A, (B, SMALL)])  # an op returning a list has one output per item
    assert isinstance(pair, tuple) and isinstance(pair[1], list)
    for got, want in ((pair[0], A), (pair[1][0], B), (pair[1][1], SMALL)):
        assert isinstance(got, np.ndarray)
        np.testing.assert_array_equal(got, want)
    t = client.call("identity", {"x": torch.from_numpy(A)})  # a torch tensor inside: torch out
    assert isinstance(t["x"], torch.Tensor) and torch.equal(t["x"], torch.from_numpy(A))
    del out, res, pair, t
    gc.collect()
    client.release()  # every leased output of these calls is collected and handed back
    assert client.pending_releases == 0


def test_an_output_protobuf_cannot_carry_is_a_structured_error_and_its_lease_released(tmp_path: Any) -> None:
    from sidecar.errors import InvalidArgument
    from tests.workers import start_worker

    (tmp_path / "unsendable_ops.py").write_text(
        "import torch\nimport sidecar\n\n"
        "@sidecar.op('unsendable')\n"
        "def unsendable():\n"
        "    return torch.ones(1 << 16), '\\udc80'  # a leased output, and a str with no UTF-8 form\n\n"
        "@sidecar.op('lease_count')\n"
        "def lease_count(ctx=None):\n"
        "    return ctx.runtime.leases.count\n")
    with start_worker("--device", "cpu", "--threads", "1", "--ops", str(tmp_path / "unsendable_ops.py")) as w:
        with Client(w.address, timeout=30) as c:
            with pytest.raises(InvalidArgument) as info:
                c.call("unsendable")
            assert "is not valid Unicode" in info.value.message and info.value.op == "unsendable"
            assert c.call("lease_count") == 0
