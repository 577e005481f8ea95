"""Every error kind over the wire, with its structured fields, and the worker still serving after it.

One real worker (under `--memory-limit`) serves the module; malformed requests are built by hand
with the generated stub, so they reach the worker exactly as a buggy or hostile client would send
them.
"""
from __future__ import annotations

import threading
from typing import Any

import grpc
import numpy as np
import pytest

from sidecar._native import Segment, unlink
from sidecar.dataplane.names import make_name
from sidecar.errors import (DeviceUnavailable, DtypeMismatch, ErrorKind, InvalidArgument, InvalidTensorRef,
                            OpFailed, OutOfMemory, Overloaded, ShapeMismatch, SidecarError, UnknownOp)
from sidecar.host import Client
from sidecar.protocol import grpc_codec, limits
from sidecar.v1 import sidecar_pb2 as pb
from sidecar.v1 import sidecar_pb2_grpc as pb_grpc
from tests.workers import FIXTURE_OPS, long_lived_run, long_lived_worker, start_worker, wait_until  # noqa: F401

SMALL = np.arange(12, dtype=np.float32).reshape(3, 4)


@pytest.fixture(scope="module")
def run() -> Any:
    yield from long_lived_run()


@pytest.fixture(scope="module")
def worker(run: str) -> Any:
    yield from long_lived_worker(run, *FIXTURE_OPS, "--ops", "tests.hold_ops_module", "--memory-limit", "1G")


@pytest.fixture(scope="module")
def client(worker: Any, run: str) -> Any:
    c = Client(worker.address, run_id=run, timeout=30)
    yield c
    c.close()


@pytest.fixture(scope="module")
def stub(worker: Any) -> Any:
    with grpc.insecure_channel(worker.address) as channel:
        yield pb_grpc.SidecarStub(channel)


@pytest.fixture(autouse=True)
def still_serving(request: pytest.FixtureRequest) -> Any:
    """After every test here, the worker answers health and computes correctly."""
    yield
    if "client" in request.fixturenames:
        c = request.getfixturevalue("client")
        w = request.getfixturevalue("worker")
        assert w.alive(), w.stderr_text()[-3000:]
        assert c.health() == "SERVING"
        np.testing.assert_array_equal(c.call("add", SMALL, SMALL), SMALL * 2)


def raw_error(stub: Any, req: pb.ExecuteRequest) -> SidecarError:
    """Send `req` as is; return the structured error the worker answered with."""
    with pytest.raises(grpc.RpcError) as info:
        stub.Execute(req, timeout=30)
    err = grpc_codec.error_from_rpc(info.value)
    assert info.value.code().name == err.grpc_code  # the status code matches DESIGN.md's table
    return err


def tensor_msg(name: str, shape: list[int], dtype: str = "float32", offset: int = 0,
               nbytes: int | None = None, inode: int = 0) -> pb.Value:
    if nbytes is None:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return pb.Value(tensor=pb.Tensor(dtype=dtype, shape=shape, shm=pb.ShmRef(name=name, offset=offset,
                                                                              nbytes=nbytes, inode=inode)))


# ---------------------------------------------------------------------------------------------------
# errors raised by ops


def test_shape_mismatch_checked_before_running(client: Client) -> None:
    with pytest.raises(ShapeMismatch) as info:
        client.call("matmul", np.ones((2, 3), np.float32), np.ones((4, 5), np.float32))
    e = info.value
    assert e.kind is ErrorKind.SHAPE_MISMATCH and e.op == "matmul"
    assert e.input_shapes == [[2, 3], [4, 5]]
    assert e.dim is not None and e.expected and e.got and e.suggestion
    assert e.request_id


def test_shape_mismatch_raised_by_torch_is_parsed(client: Client) -> None:
    with pytest.raises(ShapeMismatch) as info:
        client.call("fixture.torch_shape_error", np.ones((2, 3), np.float32), np.ones((4, 5), np.float32))
    e = info.value
    assert e.op == "fixture.torch_shape_error" and e.input_shapes == [[2, 3], [4, 5]]
    assert e.expected == "3" and e.got == "4"


def test_dtype_mismatch(client: Client) -> None:
    with pytest.raises(DtypeMismatch) as info:
        client.call("softmax", np.arange(6, dtype=np.int64))
    e = info.value
    assert e.op == "softmax" and e.got == "int64" and "float" in e.expected


def test_out_of_memory_under_memory_limit(client: Client) -> None:
    a = np.ones((40_000, 1), np.float64)  # inputs of 320 KB; the broadcast product is 12.8 GB
    with pytest.raises(OutOfMemory) as info:
        client.call("mul", a, a.T.copy())
    e = info.value
    assert e.kind is ErrorKind.OUT_OF_MEMORY and e.device == "cpu"
    assert e.requested_bytes >= 40_000 * 40_000 * 8
    assert e.total_bytes > 0 and e.free_bytes is not None


def test_unknown_op_with_close_names(client: Client) -> None:
    with pytest.raises(UnknownOp) as info:
        client.call("softmx", SMALL)
    assert info.value.op == "softmx" and "softmax" in info.value.close_names


def test_user_exception_keeps_type_and_traceback(client: Client) -> None:
    with pytest.raises(OpFailed) as info:
        client.call("fixture.fail", SMALL)
    e = info.value
    assert e.exception_type.endswith("ValueError")
    assert "refuses a tensor of shape (3, 4)" in e.message
    assert "raise ValueError" in e.traceback and "ops_fixture_module.py" in e.traceback
    with pytest.raises(OpFailed) as info:
        client.call("boom", message="custom")
    assert info.value.exception_type.endswith("KeyError") and "custom" in info.value.message


def test_str_of_an_error_carries_what_to_do(client: Client) -> None:
    """An uncaught error prints more than its message: the remote exception type and the file/line it
    was raised at (not the whole traceback), the close names, the suggestion, the figures."""
    with pytest.raises(OpFailed) as info:
        client.call("fixture.fail", SMALL)
    text = str(info.value)
    assert text.startswith("fixture op refuses a tensor of shape (3, 4)\n")
    assert "ValueError raised at " in text and "ops_fixture_module.py:" in text and " in fail: raise ValueError" in text
    assert "Traceback (most recent call last)" not in text and "op=fixture.fail" in text
    with pytest.raises(UnknownOp) as info:
        client.call("softmx", SMALL)
    assert "did you mean: softmax" in str(info.value)
    with pytest.raises(ShapeMismatch) as info:
        client.call("matmul", np.ones((2, 3), np.float32), np.ones((4, 5), np.float32))
    text = str(info.value)
    assert f"suggestion: {info.value.suggestion}" in text
    assert "input_shapes=[[2, 3], [4, 5]], dim=1, expected=3, got=4" in text


def test_device_unavailable_for_device_placement(client: Client) -> None:
    with pytest.raises(DeviceUnavailable) as info:
        client.call("identity", SMALL, placement="device")
    assert info.value.device == "cuda" and info.value.available == ["cpu"]


def test_a_float_dim_beyond_int64_is_invalid_argument(client: Client) -> None:
    """`dim=1e300` used to fail with UNKNOWN "Value out of range": the error overflowed Error.dim."""
    with pytest.raises(InvalidArgument) as info:
        client.call("sum", SMALL, dim=1e300)
    assert info.value.field == "attrs.dim" and info.value.request_id


def test_bad_attr_and_arity(client: Client) -> None:
    with pytest.raises(InvalidArgument) as info:
        client.call("softmax", SMALL, dimm=1)
    assert info.value.field == "attrs" and "dim" in info.value.close_names
    with pytest.raises(InvalidArgument) as info:
        client.call("add", SMALL)
    assert info.value.field == "inputs"


# ---------------------------------------------------------------------------------------------------
# malformed requests: structured errors, never a crash

def _name(run: str) -> str:
    return make_name(run)


MALFORMED: list[tuple[str, Any, type[SidecarError], str]] = [
    ("empty op", lambda run: pb.ExecuteRequest(op=""), InvalidArgument, "op"),
    ("value without kind", lambda run: pb.ExecuteRequest(op="relu", inputs=[pb.Value()]), InvalidArgument,
     "kind"),
    ("tensor without storage", lambda run: pb.ExecuteRequest(
        op="relu", inputs=[pb.Value(tensor=pb.Tensor(dtype="float32", shape=[2]))]), InvalidTensorRef, "storage"),
    ("unknown placement", lambda run: pb.ExecuteRequest(
        op="relu", output=pb.OutputSpec(placement=99)), InvalidArgument, "output.placement"),
    ("path outside the pattern", lambda run: pb.ExecuteRequest(
        op="relu", inputs=[tensor_msg("/etc/passwd", [2])]), InvalidTensorRef, "name"),
    ("path traversal", lambda run: pb.ExecuteRequest(
        op="relu", inputs=[tensor_msg("/sc-../../etc/passwd", [2])]), InvalidTensorRef, "name"),
    ("missing segment", lambda run: pb.ExecuteRequest(
        op="relu", inputs=[tensor_msg(_name(run), [2])]), InvalidTensorRef, "name"),
    ("negative shape", lambda run: pb.ExecuteRequest(
        op="relu", inputs=[tensor_msg(_name(run), [-2, 4], nbytes=32)]), InvalidTensorRef, "shape"),
    ("absurd shape", lambda run: pb.ExecuteRequest(
        op="relu", inputs=[tensor_msg(_name(run), [1 << 40, 1 << 40], nbytes=64)]), InvalidTensorRef, "shape"),
    ("unknown dtype", lambda run: pb.ExecuteRequest(
        op="relu", inputs=[tensor_msg(_name(run), [2], dtype="float128", nbytes=32)]), InvalidTensorRef,
     "dtype"),
    ("nbytes disagrees with shape", lambda run: pb.ExecuteRequest(
        op="relu", inputs=[tensor_msg(_name(run), [4], nbytes=8)]), InvalidTensorRef, "nbytes"),
    ("inline bytes too short", lambda run: pb.ExecuteRequest(
        op="relu", inputs=[pb.Value(tensor=pb.Tensor(dtype="float32", shape=[1000], inline_data=b"abc"))]),
     InvalidTensorRef, "nbytes"),
    ("empty tensor whose other dimensions overflow", lambda run: pb.ExecuteRequest(
        op="relu", inputs=[tensor_msg(_name(run), [0, 2**62, 4], nbytes=0)]), InvalidTensorRef, "shape"),
    ("out ref without storage", lambda run: pb.ExecuteRequest(
        op="relu", inputs=[pb.Value(tensor=pb.Tensor(dtype="float32", shape=[1], inline_data=b"\0" * 4))],
        output=pb.OutputSpec(placement=pb.PLACEMENT_OUT, out=[pb.Tensor(dtype="float32", shape=[1])])),
     InvalidTensorRef, "storage"),
]


@pytest.mark.parametrize("case", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_request(stub: Any, client: Client, run: str, case: Any) -> None:
    _, make, cls, field = case
    err = raw_error(stub, make(run))
    assert isinstance(err, cls), repr(err)
    assert err.field == field, repr(err)
    assert err.request_id, repr(err)  # refused before dispatch, and still correlatable
    if isinstance(err, InvalidTensorRef) and field not in ("storage",) and "out" not in case[0]:
        assert err.input_index == 0


def test_offset_beyond_the_segment(stub: Any, client: Client, run: str) -> None:
    seg = Segment.create(make_name(run), 4096)
    try:
        err = raw_error(stub, pb.ExecuteRequest(op="relu", inputs=[tensor_msg(seg.name, [16], offset=4090)]))
        assert isinstance(err, InvalidTensorRef) and err.input_index == 0
        assert err.field in ("offset", "nbytes")
        err = raw_error(stub, pb.ExecuteRequest(op="relu", inputs=[
            tensor_msg(seg.name, [4], offset=(1 << 64) - 8, nbytes=16)]))
        assert isinstance(err, InvalidTensorRef)
    finally:
        seg.close()
        unlink(seg.name)


def test_segment_unlinked_before_the_call(stub: Any, client: Client, run: str) -> None:
    seg = Segment.create(make_name(run), 4096)
    name, inode = seg.name, seg.inode
    seg.close()
    unlink(name)
    err = raw_error(stub, pb.ExecuteRequest(op="relu", inputs=[tensor_msg(name, [4], inode=inode)]))
    assert isinstance(err, InvalidTensorRef) and err.field == "name"


def test_recreated_segment_is_not_served_stale(stub: Any, client: Client, run: str) -> None:
    name = make_name(run)
    seg = Segment.create(name, 4096)
    np.frombuffer(seg, np.float32, 4)[:] = 1.0
    ok = stub.Execute(pb.ExecuteRequest(op="sum", inputs=[tensor_msg(name, [4], inode=seg.inode)]), timeout=30)
    assert grpc_codec.read_value(ok.outputs[0]).storage.data == np.float32(4).tobytes()
    old_inode = seg.inode
    seg.close()
    unlink(name)
    seg = Segment.create(name, 4096)  # same name, new file, new contents
    try:
        assert seg.inode != old_inode
        np.frombuffer(seg, np.float32, 4)[:] = 2.0
        for inode in (seg.inode, 0):  # told the new inode, or not told at all
            resp = stub.Execute(pb.ExecuteRequest(op="sum", inputs=[tensor_msg(name, [4], inode=inode)]),
                                timeout=30)
            assert grpc_codec.read_value(resp.outputs[0]).storage.data == np.float32(8).tobytes()
    finally:
        seg.close()
        unlink(name)


def test_segment_unlinked_mid_flight(client: Client, run: str, tmp_path: Any) -> None:
    """The worker keeps its mapping: a segment unlinked while an op reads it is not a crash."""
    x = client.empty((256, 256), "float32")
    x[:] = 3.0
    name = client.arena.find(x.__array_interface__["data"][0], x.nbytes)[0].name
    result: list[Any] = []
    started, release = tmp_path / "started", tmp_path / "release"
    t = threading.Thread(target=lambda: result.append(client.call("hold", x, started=str(started),
                                                                  release=str(release))))
    t.start()
    wait_until(started.exists, timeout=30)  # the op runs, on the mapped input
    unlink(name)  # the host's own segment, gone while the worker holds it mapped
    release.touch()
    t.join(30)
    assert result and float(np.asarray(result[0]).sum()) == 3.0 * 256 * 256
    # The worker's mapping stayed valid for that call; a later call naming the unlinked segment is
    # refused (the worker drops mappings of unlinked segments instead of pinning their memory).
    with pytest.raises(InvalidTensorRef, match="does not exist") as ei:
        client.call("relu", x)
    assert ei.value.field == "name"


def test_release_of_unknown_leases_is_not_an_error(client: Client) -> None:
    released, unknown = client.release(["l-doesnotexist", ""])
    assert released == 0 and set(unknown) == {"l-doesnotexist", ""}


def test_oversized_inline_message_is_refused(client: Client) -> None:
    big = np.ones(2 << 20, np.float32)  # 8 MB inline: above the worker's 4 MiB message limit
    with pytest.raises(SidecarError) as info:
        Client(client.address, inline_threshold=1 << 30, run_id=client.run_id).call("relu", big)
    assert "larger than max" in info.value.message or "RESOURCE_EXHAUSTED" in info.value.message


def test_an_out_ref_of_the_wrong_shape_says_what_would_fit(client: Client) -> None:
    with pytest.raises(ShapeMismatch) as info:
        client.call("relu", SMALL, out=np.zeros((4, 3), np.float32))
    e = info.value
    assert (e.field, e.input_shapes, e.expected, e.got) == ("out[0]", [[3, 4]], "[4, 3]", "[3, 4]")
    assert "shape [3, 4] and dtype float32" in e.suggestion and e.request_id


BIG = np.ones((1024, 1280), np.float32)  # 5 MiB: in by shared memory, but too big for a 4 MiB response


@pytest.mark.parametrize("op, inputs", [("identity", (BIG,)), ("mul", (BIG, 2.0)), ("add", (BIG, BIG[:1]))],
                         ids=["identity", "mul by a number", "add with broadcasting"])
def test_an_oversized_inline_output_is_refused_before_the_op_runs(client: Client, op: str, inputs: Any) -> None:
    with pytest.raises(InvalidArgument) as info:
        client.call(op, *inputs, placement="inline")
    e = info.value
    assert "it would return 5242880 bytes inline" in e.message and "--max-message-bytes" in e.message
    assert (e.field, e.got) == ("output.placement", "5242880 bytes") and "shared memory" in e.suggestion


def test_an_oversized_response_of_a_user_op_is_a_structured_error(client: Client) -> None:
    """Its size is known only once it ran: still refused with the same error, never a bare status."""
    n_before = client.call("finished_count")
    with pytest.raises(InvalidArgument) as info:
        client.call("slow", BIG, seconds=0.0, placement="inline")
    assert "its response is" in info.value.message and "--max-message-bytes" in info.value.message
    assert info.value.field == "output.placement"
    assert client.call("finished_count") == n_before + 1


# ---------------------------------------------------------------------------------------------------
# overload


def test_overloaded_beyond_concurrency_and_queue(tmp_path: Any) -> None:
    with start_worker("--device", "cpu", "--ops", "tests.hold_ops_module", "--max-concurrency", "1",
                      "--max-queue", "1", "--threads", "1") as w:
        c = Client(w.address, timeout=30)
        release = tmp_path / "release"
        outcomes: list[Any] = []

        def hold(name: str) -> None:
            try:
                outcomes.append(c.call("hold", SMALL, started=str(tmp_path / name), release=str(release)))
            except Overloaded as err:
                outcomes.append(err)

        try:
            first = threading.Thread(target=hold, args=("first",))
            first.start()
            wait_until((tmp_path / "first").exists, timeout=30)  # it holds the only slot
            # Two more: one waits in the queue (max 1), the other is refused at once.
            others = [threading.Thread(target=hold, args=(name,)) for name in ("second", "third")]
            for t in others:
                t.start()
            wait_until(lambda: any(isinstance(o, Overloaded) for o in outcomes), timeout=30)
            (err,) = [o for o in outcomes if isinstance(o, Overloaded)]
            assert err.queue_depth == 1 and err.limit == 1
            release.touch()
            for t in (first, *others):
                t.join(30)
            assert sum(isinstance(o, np.ndarray) for o in outcomes) == 2  # the admitted calls completed
            np.testing.assert_array_equal(c.call("add", SMALL, SMALL), SMALL * 2)
        finally:
            c.close()


def test_unavailable_device_stops_the_start() -> None:
    from tests.workers import WorkerStartError

    with pytest.raises(WorkerStartError) as info:
        start_worker("--device", "cuda:99", timeout=60)
    assert "DeviceUnavailable" in str(info.value) and "cuda:99" in str(info.value)


# ---------------------------------------------------------------------------------------------------
# errors that echo long input still fit gRPC's metadata limit (8 KiB soft, 16 KiB hard by default)

LONG = 10_000


def _raw_execute(c: Client, request: pb.ExecuteRequest) -> Any:
    """An ExecuteRequest as given, on a channel of its own to the client's worker."""
    with grpc.insecure_channel(c.address) as channel:
        return pb_grpc.SidecarStub(channel).Execute(request, timeout=30)


LONG_INPUT: list[tuple[str, Any, type[SidecarError], str]] = [
    ("op name", lambda c: c.call("x" * LONG, SMALL), UnknownOp, None),
    ("cast dtype attr", lambda c: c.call("cast", SMALL, dtype="f" * LONG), InvalidArgument, "attrs.dtype"),
    ("10,000 unknown attrs", lambda c: c.call("relu", SMALL, **{f"a{i}": 1 for i in range(LONG)}),
     InvalidArgument, "attrs"),
    ("200 unknown attrs", lambda c: c.call("relu", SMALL, **{f"a{i}": 1 for i in range(200)}),
     InvalidArgument, "attrs"),
    ("a 10 KB attr name", lambda c: c.call("relu", SMALL, **{"n" * LONG: 1}), InvalidArgument, "attrs"),
    ("segment name", lambda c: _raw_execute(c, pb.ExecuteRequest(op="relu", inputs=[
        tensor_msg("/sc-" + "a" * LONG, [4])])), InvalidTensorRef, "name"),
    ("tensor dtype", lambda c: _raw_execute(c, pb.ExecuteRequest(op="relu", inputs=[pb.Value(tensor=pb.Tensor(
        dtype="q" * LONG, shape=[4], inline_data=bytes(16)))])), InvalidTensorRef, "dtype"),
    ("a user's 100 KB message", lambda c: c.call("boom", message="m" * 100_000), OpFailed, None),
]


@pytest.mark.parametrize("case", LONG_INPUT, ids=[c[0] for c in LONG_INPUT])
def test_errors_echoing_long_input_keep_their_details(client: Client, case: Any) -> None:
    _, send, cls, field = case
    with pytest.raises((SidecarError, grpc.RpcError)) as info:
        send(client)
    err = info.value if isinstance(info.value, SidecarError) else grpc_codec.error_from_rpc(info.value)
    assert type(err) is cls, repr(err)[:300]  # not a bare RESOURCE_EXHAUSTED without details
    assert err.field == field and err.request_id
    assert len(err.message.encode()) <= limits.ERROR_MESSAGE_BYTES
    assert all(len(str(v).encode()) <= limits.ERROR_TRACEBACK_BYTES for v in err.fields.values())


def test_an_absent_device_is_device_unavailable_for_the_host_that_spawned_the_worker() -> None:
    """Not a WorkerStartError ("uncaught Python exception"): the worker reports DEVICE_UNAVAILABLE on
    stderr and the host raises it, with what exists and how the worker ended."""
    from sidecar.host.spawn import start_worker as spawn

    with pytest.raises(DeviceUnavailable) as info:
        spawn(["--device", "cuda:99", "--threads", "1"], start_timeout=60)
    e = info.value
    assert e.device == "cuda:99" and e.available[0] == "cpu" and "cuda:99" not in e.available
    assert e.exit_code == 1 and e.pid and e.classification
    assert not any(line.startswith("SIDECAR_START_ERROR") for line in e.stderr_tail)
    assert "DeviceUnavailable" in "\n".join(e.stderr_tail)


def test_a_pool_on_an_absent_device_raises_device_unavailable() -> None:
    from sidecar.host import Pool

    with pytest.raises(DeviceUnavailable) as info:
        Pool(workers=1, device="cuda:99")  # absent here and on any GPU machine we test on
    assert info.value.device == "cuda:99" and info.value.available[0] == "cpu"


def test_the_demo_on_an_absent_device_prints_a_clean_message() -> None:
    import subprocess
    import sys

    from tests.workers import ROOT

    run = subprocess.run([sys.executable, "-m", "sidecar.demo", "--device", "cuda:99"], capture_output=True,
                         text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 2
    assert "Traceback" not in run.stderr and "Traceback" not in run.stdout
    assert "cannot run the demo on --device cuda:99: device 'cuda:99' is not available" in run.stderr
    assert "devices this machine has: cpu" in run.stderr
