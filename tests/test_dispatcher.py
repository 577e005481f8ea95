"""The transport-free dispatcher and runtime: user ops modules and start-up hooks, placements and
leases over real shared memory, admission control, cancellation, structured errors, thread safety.

Calls come from a real `Client` over the in-process transport (`tests/in_process.py`), which keeps
the descriptors that crossed (`transport.last_call`, `transport.last`) for the checks on them."""
from __future__ import annotations

import importlib
import sys
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from sidecar.dataplane import tensors
from sidecar.errors import (Cancelled, DeviceUnavailable, InvalidArgument, InvalidTensorRef, OpFailed,
                            Overloaded, ShapeMismatch)
from sidecar.protocol.calls import Call, OutputSpec, Placement
from sidecar.worker.local_transport import InProcessTransport
from sidecar.protocol.refs import ArrowRef, CudaIpcStorage, InlineStorage, ShmStorage, TensorRef
from sidecar.worker.registry import OpsModuleError, Registry, make_spec
from sidecar.worker.runtime import WorkerOptions, build_runtime
from tests.in_process import in_process_client
from tests.workers import session_run, wait_until

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `tests.ops_fixture_module` is imported by name, as --ops would
    sys.path.insert(0, str(ROOT))
FIXTURE = "tests.ops_fixture_module"
RUN = session_run("dispworker")


@pytest.fixture
def make_rt():
    made = []

    def make(**kw):
        kw.setdefault("device", "cpu")
        kw.setdefault("run_id", RUN)
        rt = build_runtime(WorkerOptions(**kw))
        made.append(rt)
        return rt

    yield make
    for rt in made:
        rt.close()


@pytest.fixture
def rt(make_rt):
    return make_rt(ops_modules=[FIXTURE])


@pytest.fixture
def connect():
    """connect(rt, **client_options) -> (client, transport): a Client of the runtime `rt`, inputs in
    shared memory."""
    made = []

    def make(rt, **options):
        client, transport = in_process_client(rt, "disphost", shm_inputs_only=False, **options)
        made.append(client)
        return client, transport

    yield make
    for client in made:
        client.close()


@pytest.fixture
def host(rt, connect):
    return connect(rt)


def in_arena(client, x):
    """`x` copied into an array of the client's arena: it crosses as a descriptor of where it lies."""
    arr = client.empty(x.shape, x.dtype)
    arr[...] = x
    return arr


def run(rt, op, *inputs, placement=Placement.AUTO, out=(), is_cancelled=None, **attrs):
    """A Call handed to the transport as it is (plain values or descriptors), e.g. with `is_cancelled`."""
    return InProcessTransport(rt).execute(Call(op=op, inputs=list(inputs), attrs=attrs,
                                               output=OutputSpec(placement, tuple(out)),
                                               is_cancelled=is_cancelled))


# ---------------------------------------------------------------------------------------------------
# user ops modules


def test_user_module_loaded_by_name_with_startup_hook_run_once(make_rt, connect):
    mod = importlib.import_module(FIXTURE)
    before = mod.LOADS
    rt = make_rt(ops_modules=[FIXTURE])
    assert mod.LOADS == before + 1  # the hook ran before build_runtime returned (before "ready")
    client, _ = connect(rt)
    w, b = mod.reference_weights()
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    for _ in range(3):
        np.testing.assert_allclose(client.call("fixture.predict", x), x @ w.numpy().T + b.numpy(), rtol=1e-5,
                                   atol=1e-5)
    assert mod.LOADS == before + 1  # calls reuse the loaded state
    assert rt.registry.run_startup_hooks(rt) == 0  # and asking again runs nothing


def test_list_ops_describes_user_ops(rt):
    specs = {s.name: s for s in rt.list_ops()}
    scale = specs["fixture.scale"]
    assert scale.module == FIXTURE and scale.idempotent is False and scale.doc == "x * factor + offset."
    assert (scale.min_inputs, scale.max_inputs, scale.attrs) == (1, 2, ("factor", "offset"))
    assert specs["fixture.stats"].accepts_ctx and "ctx" not in specs["fixture.stats"].attrs
    assert specs["fixture.predict"].idempotent is True
    assert "add" in specs  # built-ins are there too


def test_user_op_attrs_outputs_and_values(host):
    client, _ = host
    x = np.arange(6, dtype=np.float32)
    np.testing.assert_array_equal(client.call("fixture.scale", x, factor=3.0, offset=1.0), x * 3 + 1)
    parts = client.call("fixture.split", x, parts=3)
    assert [p.tolist() for p in parts] == [[0, 1], [2, 3], [4, 5]]
    assert client.call("fixture.stats", x) == {"device": "cpu", "n": 6, "mean": 2.5}


def test_arrow_table_in_and_out(rt, host):
    client, transport = host
    table = pa.table({"v": pa.array(np.arange(20000, dtype=np.int64))})
    res = client.execute("fixture.table_total", table, placement="shm")
    assert isinstance(transport.last_call.inputs[0].storage, ShmStorage)
    out = transport.last.outputs[0]
    assert isinstance(out, ArrowRef) and isinstance(out.storage, ShmStorage) and res.leases
    got = res.outputs[0]
    assert got.column("total")[0].as_py() == sum(range(20000))
    assert got.column("doubled").to_pylist()[:3] == [0, 2, 4]
    assert client.release(res) == (1, []) and rt.leases.count == 0


def test_user_exception_keeps_type_and_traceback(host):
    client, _ = host
    with pytest.raises(OpFailed) as info:
        client.call("fixture.fail", np.zeros((2, 2), np.float32))
    e = info.value
    assert e.exception_type == "ValueError" and "refuses a tensor of shape (2, 2)" in e.message
    assert "ops_fixture_module.py" in e.traceback and "raise ValueError" in e.traceback
    assert e.op == "fixture.fail"
    assert client.call("identity", 5) == 5  # still serving


def test_torch_raised_shape_error_is_parsed(host):
    client, _ = host
    with pytest.raises(ShapeMismatch) as info:
        client.call("fixture.torch_shape_error", np.ones((2, 3), np.float32), np.ones((4, 5), np.float32))
    e = info.value
    assert (e.dim, e.expected, e.got) == (1, "3", "4") and e.input_shapes == [[2, 3], [4, 5]]
    assert e.op == "fixture.torch_shape_error"


def test_bad_ops_module_is_a_clear_error():
    reg = Registry()
    with pytest.raises(OpsModuleError, match="no_such_ops_module"):
        reg.load_module("no_such_ops_module")


def test_duplicate_op_name_is_refused():
    reg = Registry()
    reg.load_module("sidecar.worker.builtin_ops")
    with pytest.raises(OpsModuleError, match="already defined"):
        reg.add(make_spec(lambda x: x, "add"))


# ---------------------------------------------------------------------------------------------------
# placements and leases


def test_leases_hold_arena_blocks_until_released(rt, host):
    client, transport = host
    x = np.ones((256, 256), np.float32)
    res = client.execute("identity", x, placement="shm")
    assert isinstance(transport.last.outputs[0].storage, ShmStorage) and len(res.leases) == 1
    assert rt.arena.stats().in_use_bytes >= x.nbytes and rt.leases.count == 1
    np.testing.assert_array_equal(res.outputs[0], x)
    assert client.release(res) == (1, [])
    assert rt.arena.stats().in_use_bytes == 0 and rt.leases.count == 0
    assert client.release(res) == (0, res.leases)  # a second release is not an error


def test_piggybacked_release(rt, host):
    client, transport = host
    x = in_arena(client, np.ones(100000, np.float32))
    first = client.execute("identity", x, placement="shm")
    first_lease = first.leases[0]
    assert rt.leases.count == 1
    del first  # its output is collected: the lease id waits for the next call
    assert client.pending_releases == 1
    second = client.execute("identity", x, placement="shm")
    assert transport.last_call.release == [first_lease]
    assert rt.leases.count == 1 and first_lease not in rt.leases and second.leases[0] in rt.leases
    client.release(second)


def test_leases_of_a_vanished_client_expire(make_rt, connect):
    rt = make_rt(lease_ttl_s=0.2)
    client, _ = connect(rt)
    held = [client.execute("identity", np.ones(50000, np.float32), placement="shm") for _ in range(3)]
    assert rt.leases.count == 3 and rt.arena.stats().in_use_bytes > 0
    wait_until(lambda: rt.leases.count == 0)  # the janitor expires them with no further call
    assert rt.arena.stats().in_use_bytes == 0
    assert all((r.outputs[0] == 1).all() for r in held)  # reclaimed by unlinking: still valid here


def test_inline_and_auto_placements(rt, connect):
    client, transport = connect(rt, allow_alias=False)  # AUTO asks for no view of an input
    big = in_arena(client, np.ones(100000, np.float32))
    res = client.execute("identity", big, placement="inline")
    assert isinstance(transport.last.outputs[0].storage, InlineStorage) and res.leases == []
    res = client.execute("identity", big)  # AUTO: above the threshold -> shared memory
    assert isinstance(transport.last.outputs[0].storage, ShmStorage) and res.leases
    client.release(res)
    small = in_arena(client, np.ones(10, np.float32))
    client.execute("identity", small)
    assert isinstance(transport.last.outputs[0].storage, InlineStorage)
    res = client.execute("identity", small, placement="shm")
    assert isinstance(transport.last.outputs[0].storage, ShmStorage)
    client.release(res)


def test_out_refs_are_written_in_place(rt, host):
    client, transport = host
    a, b = np.random.rand(64, 32).astype(np.float32), np.random.rand(32, 16).astype(np.float32)
    out = client.empty((64, 16))
    res = client.execute("matmul", a, b, out=out)
    sent = list(transport.last_call.output.out)
    assert transport.last.outputs == sent and res.leases == [] and res.bytes_out == out.nbytes
    assert res.outputs == [out] and res.outputs[0] is out
    np.testing.assert_allclose(out, a @ b, rtol=1e-5)
    parts = [client.empty(2), client.empty(2)]
    client.call("fixture.split", np.arange(4, dtype=np.float32), out=parts)
    assert [p.tolist() for p in parts] == [[0, 1], [2, 3]]


def test_out_ref_errors(rt, host):
    client, _ = host
    a = in_arena(client, np.ones((4, 4), np.float32))
    with pytest.raises(ShapeMismatch) as info:
        client.call("identity", a, out=client.empty((4, 5)))
    assert info.value.input_index == -1 and "out ref 0" in info.value.message
    with pytest.raises(InvalidArgument) as info:
        client.call("identity", a, out=[])
    assert info.value.field == "out" and (info.value.expected, info.value.got) == ("1", "0")
    assert rt.arena.stats().in_use_bytes == 0


def test_device_placement_and_cuda_inputs_need_a_cuda_worker(host):
    client, _ = host
    with pytest.raises(DeviceUnavailable) as info:
        client.call("identity", np.ones(4, np.float32), placement="device")
    assert info.value.available == ["cpu"]
    ipc = TensorRef("float32", (4,), CudaIpcStorage(b"\0" * 64, 0, 16))  # a descriptor passes as it is
    with pytest.raises(DeviceUnavailable) as info:
        client.call("identity", ipc)
    assert info.value.input_index == 0


def test_invalid_refs_name_the_input(host):
    client, transport = host
    good = in_arena(client, np.ones(4, np.float32))
    client.call("identity", good)
    good_ref = transport.last_call.inputs[0]
    assert isinstance(good_ref.storage, ShmStorage)
    missing = TensorRef("float32", (4,), ShmStorage(f"/sc-{RUN}-1-deadbeef00", 0, 16))
    with pytest.raises(InvalidTensorRef) as info:
        client.call("add", good, missing)
    assert info.value.input_index == 1 and info.value.field == "name"
    lying = TensorRef("float32", (1 << 20,), good_ref.storage)
    with pytest.raises(InvalidTensorRef) as info:
        client.call("identity", lying)
    assert info.value.input_index == 0


def test_timing_and_bytes(host):
    client, _ = host
    x = np.ones(100000, np.float32)
    res = client.execute("identity", x)
    t = res.timing
    assert t.total_ns >= t.queue_ns + t.decode_ns + t.compute_ns + t.encode_ns > 0
    assert res.bytes_in == x.nbytes == res.bytes_out and res.device == "cpu" and res.request_id


def test_unencodable_result_is_op_failed(rt, host):
    client, _ = host
    rt.registry.add(make_spec(lambda: {1, 2}, "test.set_result"))
    with pytest.raises(OpFailed, match="type builtins.set"):
        client.call("test.set_result")


def test_system_exit_from_an_op_does_not_escape(rt, host):
    client, _ = host

    def quit_():
        raise SystemExit(3)

    rt.registry.add(make_spec(quit_, "test.exit"))
    with pytest.raises(OpFailed) as info:
        client.call("test.exit")
    assert info.value.exception_type == "SystemExit"


# ---------------------------------------------------------------------------------------------------
# admission control, cancellation, threads


def _blocking_op(rt):
    gate = threading.Event()
    entered = []

    def block(x):
        entered.append(1)
        gate.wait(30)
        return x

    rt.registry.add(make_spec(block, "test.block"))
    return gate, entered


def test_overloaded_when_queue_is_full(make_rt):
    rt = make_rt(max_concurrency=1, max_queue=1)
    gate, entered = _blocking_op(rt)
    results = []
    threads = [threading.Thread(target=lambda i=i: results.append(run(rt, "test.block", i).outputs[0]))
               for i in range(2)]
    threads[0].start()
    wait_until(lambda: rt.dispatcher.running == 1 and entered)
    threads[1].start()
    wait_until(lambda: rt.dispatcher.queue_depth == 1)
    with pytest.raises(Overloaded) as info:
        run(rt, "test.block", 99)
    assert (info.value.queue_depth, info.value.limit) == (1, 1)
    gate.set()
    for t in threads:
        t.join(10)
    assert sorted(results) == [0, 1] and rt.dispatcher.in_flight == 0
    assert rt.dispatcher.wait_idle(1)


def test_cancelled_while_queued(make_rt):
    rt = make_rt(max_concurrency=1, max_queue=4)
    gate, entered = _blocking_op(rt)
    t = threading.Thread(target=lambda: run(rt, "test.block", 0))
    t.start()
    wait_until(lambda: entered)
    gone = threading.Event()
    errors = []

    def queued():
        try:
            run(rt, "test.block", 1, is_cancelled=gone.is_set)
        except Cancelled as e:
            errors.append(e)

    q = threading.Thread(target=queued)
    q.start()
    wait_until(lambda: rt.dispatcher.queue_depth == 1)
    gone.set()
    q.join(10)
    assert len(errors) == 1 and rt.dispatcher.queue_depth == 0
    gate.set()
    t.join(10)
    assert len(entered) == 1  # the cancelled call never ran


def test_cancelled_after_compute_frees_outputs(rt, host):
    client, _ = host
    x = in_arena(client, np.ones(100000, np.float32))
    calls = []

    def cancelled_on_fourth_check():  # checks: admitted, decoded, computed, encoded: gone by the last
        calls.append(1)
        return len(calls) >= 4

    with pytest.raises(Cancelled):
        run(rt, "identity", tensors.to_ref(x, client.arena)[0], placement=Placement.SHM,
            is_cancelled=cancelled_on_fourth_check)
    assert len(calls) == 4  # the outputs had been written (and leased) when the caller left
    assert rt.leases.count == 0 and rt.arena.stats().in_use_bytes == 0


def test_many_threads_at_once(make_rt, connect):
    rt = make_rt(max_concurrency=4, max_queue=64)
    client, _ = connect(rt)
    xs = [np.full((50, 50), i, np.float32) for i in range(8)]
    shared = [in_arena(client, x) for x in xs]
    failures = []

    def worker(i):
        try:
            for _ in range(10):
                res = client.execute("add", shared[i], shared[i], placement="shm")
                got = res.outputs[0].copy()
                client.release(res)
                if not np.array_equal(got, xs[i] * 2):
                    failures.append(i)
        except Exception as e:  # pragma: no cover - reported below
            failures.append(repr(e))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert failures == [] and rt.leases.count == 0 and rt.dispatcher.calls_total == 80


# ---------------------------------------------------------------------------------------------------
# runtime


def test_close_unlinks_every_worker_segment(make_rt, connect):
    rt = make_rt(run_id=session_run("closeme"))
    client, _ = connect(rt)
    prefix = f"sc-{session_run('closeme')}-"
    held = [client.execute("identity", np.ones(100000, np.float32), placement="shm") for _ in range(3)]
    assert any(p.name.startswith(prefix) for p in Path("/dev/shm").iterdir())
    rt.close()
    assert not any(p.name.startswith(prefix) for p in Path("/dev/shm").iterdir())
    assert all((r.outputs[0] == 1).all() for r in held)  # unlinked, still mapped in the host


@pytest.mark.parametrize("spec", ["tpu", "cuda:7", "mps"] + (["cuda"] if not torch.cuda.is_available() else []))
def test_unavailable_device(spec):
    from sidecar.errors import DeviceUnavailable
    with pytest.raises(DeviceUnavailable) as info:
        build_runtime(WorkerOptions(device=spec, run_id=RUN))
    assert "cpu" in info.value.available and info.value.device


def test_runtime_reports_hardware_and_memory(rt):
    hw = rt.hardware()
    assert hw["device"] == "cpu" and hw["pid"] > 0
    sample = rt.memory_sample()
    assert sample["rss_bytes"] > 0 and sample["leases"] == 0 and sample["gpus"] == []


# ---------------------------------------------------------------------------------------------------
# exceptions -> structured errors


def test_cpu_out_of_memory_is_structured_and_survived(rt, host):
    client, _ = host
    rt.registry.add(make_spec(lambda: torch.empty(10 ** 13), "test.huge_torch"))  # 40 TB
    rt.registry.add(make_spec(lambda: np.empty(10 ** 14), "test.huge_numpy"))  # 800 TB
    from sidecar.errors import OutOfMemory

    with pytest.raises(OutOfMemory) as info:
        client.call("test.huge_torch")
    e = info.value
    assert e.device == "cpu" and e.requested_bytes == 4 * 10 ** 13
    assert 0 < e.free_bytes <= e.total_bytes and e.op == "test.huge_torch"
    with pytest.raises(OutOfMemory) as info:
        client.call("test.huge_numpy")
    assert info.value.requested_bytes > 7 * 10 ** 14 and info.value.total_bytes > 0
    assert client.call("identity", 1) == 1


def _raised(fn):
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001 - the point is to capture what torch raises
        return exc
    raise AssertionError("expected an exception")


@pytest.mark.parametrize("fn,expect", [
    (lambda: torch.ones(2, 3) + torch.ones(4), {"dim": 1, "expected": "3", "got": "4"}),
    (lambda: torch.ones(2, 3).expand(4, 3, 3), {"dim": 1, "expected": "2", "got": "3"}),
    (lambda: torch.bmm(torch.ones(2, 3, 4), torch.ones(2, 5, 6)), {"dim": 1, "expected": "4", "got": "5"}),
    (lambda: torch.mv(torch.ones(3, 4), torch.ones(5)), {"dim": 1, "expected": "4", "got": "5"}),
    (lambda: torch.ones(2, 3).reshape(2, 5), {"expected": "6 elements", "got": "[2, 5]"}),
    (lambda: torch.ones(2, 3).sum(3), {"dim": 3, "expected": "a dimension in [-2, 1]", "got": "3"}),
    (lambda: torch.nn.functional.layer_norm(torch.ones(2, 3), [4]), {"got": "[2, 3]"}),
    (lambda: torch.cat([torch.ones(2, 3), torch.ones(2, 4)]), {"expected": "3", "got": "4"}),
])
def test_torch_shape_messages_are_parsed(fn, expect):
    from sidecar.worker.torch_errors import to_sidecar_error

    err = to_sidecar_error(_raised(fn), op="user.op", inputs_meta=[((2, 3), "float32")], device="cpu")
    assert isinstance(err, ShapeMismatch) and err.op == "user.op" and err.suggestion
    assert err.input_shapes == [[2, 3]]
    for k, v in expect.items():
        assert getattr(err, k) == v, (k, err)


@pytest.mark.parametrize("fn,expected,got", [
    (lambda: torch.ones(2, 3) @ torch.ones(3, 2, dtype=torch.float64), "float32", "float64"),
    (lambda: torch.nn.Linear(3, 4)(torch.ones(2, 3, dtype=torch.float64)), "float64", "float32"),
    (lambda: torch.softmax(torch.ones(3, dtype=torch.long), 0), None, "int64"),
    (lambda: torch.ones(3, dtype=torch.long).mean(), None, "int64"),
])
def test_torch_dtype_messages_are_parsed(fn, expected, got):
    from sidecar.errors import DtypeMismatch
    from sidecar.worker.torch_errors import to_sidecar_error

    err = to_sidecar_error(_raised(fn), op="user.op", inputs_meta=None, device="cpu")
    assert isinstance(err, DtypeMismatch) and err.got == got and err.expected
    if expected:
        assert err.expected == expected


def test_cuda_oom_message_and_sticky_errors():
    from sidecar.errors import OutOfMemory
    from sidecar.worker.torch_errors import is_sticky_cuda_error, to_sidecar_error

    exc = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total "
                                      "capacity of 79.10 GiB of which 3.00 GiB is free.")
    err = to_sidecar_error(exc, op="big", device=torch.device("cuda", 0))
    assert isinstance(err, OutOfMemory) and err.device == "cuda:0" and err.requested_bytes == 20 << 30
    assert is_sticky_cuda_error(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not is_sticky_cuda_error(RuntimeError("CUDA out of memory. Tried to allocate 2.00 MiB"))
    other = to_sidecar_error(KeyError("w"), op="user.op")
    assert isinstance(other, OpFailed) and other.exception_type == "KeyError" and "KeyError" in other.traceback


# ---------------------------------------------------------------------------------------------------
# on a CUDA worker (skipped where CUDA is absent)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
def test_cuda_worker_runs_shm_inputs_on_the_gpu(make_rt, connect):
    rt = make_rt(device="cuda", ops_modules=[FIXTURE])
    client, _ = connect(rt)
    a, b = np.random.rand(256, 128).astype(np.float32), np.random.rand(128, 64).astype(np.float32)
    res = client.execute("matmul", a, b, placement="shm")
    assert res.device == "cuda:0"
    np.testing.assert_allclose(res.outputs[0], a @ b, rtol=1e-3, atol=1e-3)
    client.release(res)
    stats = client.call("fixture.stats", a)
    assert stats["device"] == "cuda:0"
    assert rt.memory_sample()["gpus"][0]["total"] > 0


@needs_cuda
def test_cuda_out_of_memory_is_structured_and_survived(make_rt):
    from sidecar.errors import OutOfMemory

    rt = make_rt(device="cuda")

    def huge(ctx):
        return torch.empty(1 << 40, dtype=torch.uint8, device=ctx.device)  # 1 TiB

    rt.registry.add(make_spec(huge, "test.huge_cuda"))
    with pytest.raises(OutOfMemory) as info:
        run(rt, "test.huge_cuda")
    e = info.value
    assert e.device == "cuda:0" and e.requested_bytes >= 1 << 40
    assert 0 < e.free_bytes <= e.total_bytes and e.reserved_bytes is not None and e.allocated_bytes is not None
    assert rt.tainted is None and run(rt, "identity", 1).outputs == [1]


def test_a_tainted_worker_refuses_further_calls(rt):
    reasons = []
    rt.dispatcher.on_taint.append(reasons.append)
    rt.dispatcher._taint("sticky CUDA error in op 'x': illegal memory access")  # what a sticky CUDA error does
    assert rt.tainted and reasons == [rt.tainted]
    with pytest.raises(DeviceUnavailable, match="unusable"):
        run(rt, "identity", 1)


# ---------------------------------------------------------------------------------------------------
# outputs that alias a host input (opt-in)


def test_outputs_are_copied_unless_aliasing_is_on(rt, host):
    client, transport = host
    res = client.execute("identity", np.arange(100000, dtype=np.float32), placement="shm")
    x = transport.last_call.inputs[0]
    assert transport.last.outputs[0].storage.name != x.storage.name and res.leases
    client.release(res)


def test_aliased_outputs_describe_the_host_segment(make_rt, connect):
    rt = make_rt(alias_inputs=True)
    client, transport = connect(rt)
    a = np.arange(24, dtype=np.float32).reshape(4, 6)
    shared = in_arena(client, a)
    res = client.execute("identity", shared)
    x = transport.last_call.inputs[0]
    assert isinstance(x.storage, ShmStorage)
    assert transport.last.outputs[0] == x and res.leases == [] and rt.arena.stats().in_use_bytes == 0
    assert np.shares_memory(res.outputs[0], shared)  # the caller gets a view of its own input
    got = client.call("transpose", shared)
    t = transport.last.outputs[0]  # a strided view of the same bytes
    assert t.storage.name == x.storage.name and t.strides == (4, 24) and t.shape == (6, 4)
    np.testing.assert_array_equal(got, a.T)
    got = client.call("reshape", shared, shape=[2, 12])
    r = transport.last.outputs[0]
    assert r.storage.name == x.storage.name and r.strides is None
    np.testing.assert_array_equal(got, a.reshape(2, 12))
    # a computed result is new memory: copied as usual; INLINE asks for bytes
    added = client.execute("add", shared, shared, placement="shm")
    assert transport.last.outputs[0].storage.name != x.storage.name and added.leases
    client.release(added)
    client.call("identity", shared, placement="inline")
    assert isinstance(transport.last.outputs[0].storage, InlineStorage)


def test_worker_segments_passed_back_are_never_aliased(make_rt, connect):
    rt = make_rt(alias_inputs=True)
    client, transport = connect(rt)
    first = client.execute("add", np.ones(50000, np.float32), 1.0, placement="shm")
    leased = transport.last.outputs[0]
    again = client.execute("identity", leased, placement="shm")  # a leased output's descriptor as input
    assert transport.last.outputs[0].storage.name != leased.storage.name and again.leases
    client.release(first)
    client.release(again)


def test_out_of_memory_under_an_address_space_limit_reports_the_limit(python_exe):
    """In a child process (the limit is process-wide): what `--memory-limit` does to a worker."""
    import subprocess
    import textwrap

    code = textwrap.dedent("""
        import resource, torch
        from sidecar.errors import OutOfMemory
        from sidecar.worker.torch_errors import to_sidecar_error
        import psutil
        limit = psutil.Process().memory_info().vms + (512 << 20)
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))
        try:
            torch.empty(1 << 31, dtype=torch.uint8)  # 2 GiB > what is left of the budget
        except Exception as exc:
            err = to_sidecar_error(exc, op="alloc", device="cpu")
        assert isinstance(err, OutOfMemory), err
        assert err.total_bytes == limit and err.requested_bytes == 1 << 31, err
        assert 0 < err.free_bytes < (512 << 20) and "address-space limit" in err.message, err
        print("ok")
    """)
    out = subprocess.run([python_exe, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
