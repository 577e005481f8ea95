"""The host's Transport cut: a Client over gRPC to a worker process and a Client over the in-process
transport to a runtime built the same way answer alike; a Client works over any Transport."""
from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import pytest

from sidecar.errors import Cancelled, InvalidArgument, SidecarError, UnknownOp
from sidecar.host import Client
from sidecar.host.client import WrongProcess
from sidecar.host.grpc_transport import GrpcTransport
from sidecar.worker.local_transport import InProcessTransport
from sidecar.host.transport import TelemetryWatch, Transport
from sidecar.protocol.calls import Call, CallResult
from sidecar.worker.registry import make_spec
from sidecar.worker.runtime import WorkerOptions, build_runtime
from tests.workers import FIXTURE_OPS, long_lived_run, long_lived_worker, session_run  # noqa: F401

OPS = ["tests.ops_fixture_module", "tests.slow_ops_module"]  # what FIXTURE_OPS loads into the worker


@pytest.fixture(scope="module")
def run() -> Any:
    yield from long_lived_run()


@pytest.fixture(scope="module")
def worker(run: str) -> Any:
    yield from long_lived_worker(run, "--device", "cpu", *FIXTURE_OPS)


@pytest.fixture
def runtime() -> Any:
    rt = build_runtime(WorkerOptions(device="cpu", ops_modules=OPS, run_id=session_run("trt")))
    yield rt
    rt.close()


@pytest.fixture
def clients(worker: Any, runtime: Any, run: str) -> Any:
    """The same worker configuration behind both transports."""
    over_grpc = Client(worker.address, run_id=run, timeout=30)
    in_process = Client(transport=InProcessTransport(runtime), run_id=session_run("trhost"), timeout=30)
    yield over_grpc, in_process
    over_grpc.close()
    in_process.close()


class Counting(Transport):
    """The module doc's example: a transport that counts the calls of another one."""

    def __init__(self, inner: Transport) -> None:
        self.inner, self.address, self.calls = inner, inner.address, 0

    def execute(self, call: Call, timeout: float | None = None) -> CallResult:
        self.calls += 1
        return self.inner.execute(call, timeout)

    def list_ops(self, timeout: float | None = None) -> list[dict[str, Any]]:
        return self.inner.list_ops(timeout)

    def hardware(self, timeout: float | None = None) -> dict[str, Any]:
        return self.inner.hardware(timeout)

    def release(self, lease_ids: list[str], timeout: float | None = None) -> tuple[int, list[str]]:
        return self.inner.release(lease_ids, timeout)

    def health(self, service: str = "", timeout: float | None = None) -> str:
        return self.inner.health(service, timeout)

    def watch_telemetry(self, memory_interval_s: float = 0.0, batch_window_ms: int = 20) -> TelemetryWatch:
        return self.inner.watch_telemetry(memory_interval_s, batch_window_ms)

    def reopen(self) -> Transport:
        return Counting(self.inner.reopen())

    def close(self) -> None:
        self.inner.close()


def test_both_transports_describe_the_worker_alike(clients: Any) -> None:
    over_grpc, in_process = clients
    assert sorted(over_grpc.list_ops(), key=lambda o: o["name"]) == \
        sorted(in_process.list_ops(), key=lambda o: o["name"])
    hw_grpc, hw_local = over_grpc.hardware(), in_process.hardware()
    assert hw_grpc.keys() == hw_local.keys() and hw_local["device"] == hw_grpc["device"] == "cpu"
    assert hw_local["pid"] == os.getpid() != hw_grpc["pid"]
    assert over_grpc.health() == in_process.health() == "SERVING"


def test_both_transports_return_the_same_values_and_errors(clients: Any) -> None:
    big = np.arange(100_000, dtype=np.float32)  # through shared memory, under a lease
    for client in clients:
        np.testing.assert_array_equal(client.call("add", big, 1.0), big + 1)
        res = client.execute("identity", big, placement="shm")
        assert len(res.leases) == 1 and np.array_equal(res.outputs[0], big)
        assert client.release(res) == (1, [])
        assert client.call("fixture.stats", big[:4]) == {"device": "cpu", "n": 4, "mean": 1.5}
    errors = []
    for client in clients:
        with pytest.raises(UnknownOp) as info:
            client.call("fixture.no_such_op", big[:4])
        errors.append((type(info.value), info.value.op, info.value.close_names))
    assert errors[0] == errors[1]


def test_both_transports_stream_telemetry_alike(clients: Any) -> None:
    shapes = []
    for client in clients:
        with client.watch_telemetry(memory_interval_s=60) as watch:
            events = iter(watch)
            memory = next(events)  # a watcher gets a memory sample at once
            client.call("add", np.ones(4, np.float32), 1.0)
            spans = [next(events), next(events)]
        assert memory["type"] == "memory" and memory["rss_bytes"] > 0
        assert [(s["type"], s["phase"], s["op"]) for s in spans] == [("span", "start", "add"), ("span", "stop", "add")]
        shapes.append((sorted(memory), sorted(spans[1]), sorted(spans[1]["timing"])))
    assert shapes[0] == shapes[1]


def test_a_client_works_over_any_transport(runtime: Any) -> None:
    counting = Counting(InProcessTransport(runtime))
    with Client(transport=counting, run_id=session_run("trcount")) as client:
        assert client.address == counting.address
        assert client.call("add", np.ones(3, np.float32), 2.0).tolist() == [3, 3, 3]
        assert client.call("identity", 7) == 7
        assert counting.calls == 2 and client.transport is counting
    with pytest.raises(InvalidArgument):
        Client()  # neither an address nor a transport
    with pytest.raises(InvalidArgument):
        Client("unix:/nowhere", transport=counting)


def test_in_process_timeout_cancels_and_leaves_no_lease(runtime: Any) -> None:
    def until_the_deadline_passed(x: Any, *, seconds: float) -> Any:
        end = time.monotonic() + seconds
        while time.monotonic() < end:  # runs on past the caller's timeout
            time.sleep(0.01)
        return x

    runtime.registry.add(make_spec(until_the_deadline_passed, "test.overrun"))
    with Client(transport=InProcessTransport(runtime), run_id=session_run("trtime")) as client:
        with pytest.raises(Cancelled) as info:
            client.call("test.overrun", np.ones(100_000, np.float32), seconds=0.3, placement="shm", timeout=0.1)
        assert info.value.op == "test.overrun"
        assert runtime.leases.count == 0 and runtime.arena.stats().in_use_bytes == 0
        assert client.call("identity", 1) == 1  # and it serves on


def test_in_process_transport_refuses_a_forked_child(runtime: Any) -> None:
    client = Client(transport=InProcessTransport(runtime), run_id=session_run("trfork"))
    assert client.call("identity", 1) == 1
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            client.call("identity", 2)
        except WrongProcess as exc:
            code = 0 if "belongs to process" in exc.message else 2
        except BaseException:
            code = 3
        os.write(write, bytes([code]))
        os._exit(0)
    os.close(write)
    got = os.read(read, 1)
    os.close(read)
    os.waitpid(pid, 0)
    assert got == b"\0"
    assert client.call("identity", 3) == 3  # the parent's client is untouched
    client.close()


def test_grpc_transport_errors_are_structured_and_say_when_nothing_was_sent(tmp_path: Any) -> None:
    transport = GrpcTransport(f"unix:{tmp_path}/nobody-listens.sock")
    try:
        with pytest.raises(SidecarError) as info:
            transport.list_ops(timeout=5)
        assert info.value.kind.value == "WORKER_CRASHED" and getattr(info.value, "call_started", None) is False
    finally:
        transport.close()
