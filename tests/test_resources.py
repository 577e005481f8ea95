"""Resources and sessions in one worker process, over gRPC (a Client) and over the Erlang port (real
frames): Load / Unload / ListResources / CloseSession, ctx.resource, ctx.session, their errors."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import psutil
import pytest
import torch

from sidecar.errors import InvalidArgument, OutOfMemory, ResourceFailed
from sidecar.etf import Atom as A
from sidecar.host import Client
from tests.resident_ops_module import MLP, saved_mlp
from tests.test_stdio_transport import PortClient, as_array, inline
from tests.workers import WorkerProcess, long_lived_run, long_lived_worker, wait_until

OPS = "tests.resident_ops_module"
MIB = 1 << 20


@pytest.fixture(scope="module")
def run() -> Iterator[str]:
    yield from long_lived_run()


@pytest.fixture(scope="module")
def worker(run: str) -> Iterator[WorkerProcess]:
    yield from long_lived_worker(run, "--ops", OPS)


@pytest.fixture()
def client(worker: WorkerProcess) -> Iterator[Client]:
    with Client(worker.address) as c:
        yield c
        for info in c.resources()["resources"]:  # each test starts from an empty worker
            c.unload(info["name"])


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[MLP, str]:
    return saved_mlp(tmp_path_factory.mktemp("ckpt"), seed=1)


def still_serves(client: Client) -> None:
    assert client.call("add", np.ones(3, np.float32), 1.0).tolist() == [2.0, 2.0, 2.0]


# ---------------------------------------------------------------------------------------------------
# gRPC


def test_load_keeps_the_model_resident_and_ops_use_it(client: Client, model: tuple[MLP, str],
                                                      worker: WorkerProcess) -> None:
    m, path = model
    info = client.load("mlp", "test_mlp", checkpoint=path)
    assert info["name"] == "mlp" and info["device"] == "cpu" and info["pid"] == worker.pid
    assert info["type"].endswith("MLP") and info["load_ns"] > 0 and not info["already_loaded"]
    x = np.random.rand(6, 4).astype(np.float32)
    np.testing.assert_allclose(client.call("mlp_forward", x), m(torch.from_numpy(x)).detach().numpy(), rtol=1e-6)
    again = client.load("mlp", "test_mlp", checkpoint=path)  # a replayed load: nothing runs
    assert again["already_loaded"] and again["load_ns"] == info["load_ns"]
    listed = client.resources()["resources"]
    assert [r["name"] for r in listed] == ["mlp"]


def test_loader_named_by_module_path(client: Client, model: tuple[MLP, str]) -> None:
    info = client.load("mlp", "tests.resident_ops_module.load_mlp", checkpoint=model[1], dtype="float16")
    assert info["loader"] == "tests.resident_ops_module.load_mlp"
    out = client.call("mlp_forward", np.ones((1, 4), np.float32))
    assert out.dtype == np.float32 and out.shape == (1, 3)


def test_unload_gives_the_memory_back(client: Client, worker: WorkerProcess) -> None:
    proc = psutil.Process(worker.pid)
    info = client.load("ballast", "ballast", mib=96)
    assert info["host_bytes"] >= 90 * MIB
    during = proc.memory_info().rss
    freed = client.unload("ballast")
    assert freed["unloaded"] and freed["host_bytes_freed"] >= 90 * MIB
    assert during - proc.memory_info().rss >= 90 * MIB  # measured from outside too
    assert client.unload("ballast")["unloaded"] is False  # gone: not an error
    assert client.resources()["resources"] == []


def test_same_name_with_another_recipe_is_refused(client: Client, model: tuple[MLP, str]) -> None:
    client.load("mlp", "test_mlp", checkpoint=model[1])
    with pytest.raises(ResourceFailed) as e:
        client.load("mlp", "test_mlp", checkpoint=model[1], dtype="bfloat16")
    assert e.value.cause == "already_loaded" and e.value.resource == "mlp"


@pytest.mark.parametrize("loader, cause, close", [
    ("test_mpl", "unknown_loader", "test_mlp"),
    ("tests.resident_ops_module.not_a_loader", "unknown_loader", None),
    ("no_such_package.load", "unknown_loader", None),
])
def test_unknown_loaders_are_refused_and_never_run(client: Client, loader: str, cause: str,
                                                   close: str | None) -> None:
    with pytest.raises(ResourceFailed) as e:
        client.load("x", loader)
    assert e.value.cause == cause and e.value.loader == loader
    if close:
        assert close in e.value.close_names
    still_serves(client)
    assert client.resources()["resources"] == []


def test_a_loader_that_raises(client: Client) -> None:
    with pytest.raises(ResourceFailed) as e:
        client.load("x", "failing", message="weights are elsewhere")
    err = e.value
    assert err.cause == "loader_failed" and err.exception_type == "FileNotFoundError"
    assert "weights are elsewhere" in err.message and "load_failing" in err.traceback
    still_serves(client)


def test_structured_loading_errors_end_to_end(client: Client, model: tuple[MLP, str], tmp_path: Path) -> None:
    with pytest.raises(ResourceFailed) as e:
        client.load("x", "test_mlp", checkpoint=str(tmp_path / "missing.pt"))
    assert e.value.cause == "missing_checkpoint" and e.value.resource == "x"
    wrong = tmp_path / "wrong.pt"
    torch.save(MLP(hidden=8).state_dict(), wrong)
    with pytest.raises(ResourceFailed) as e:
        client.load("x", "test_mlp", checkpoint=str(wrong))
    assert e.value.cause == "incompatible_state_dict"
    assert "fc1.weight: checkpoint [8, 4], model [16, 4]" in e.value.shape_mismatches
    with pytest.raises(ResourceFailed) as e:
        client.load("x", "by_architecture", architecture="test_mpl", checkpoint=model[1])
    assert e.value.cause == "unknown_architecture" and "test_mlp" in e.value.close_names
    still_serves(client)


def test_op_asking_for_a_resource_that_is_not_loaded(client: Client) -> None:
    with pytest.raises(ResourceFailed) as e:
        client.call("mlp_forward", np.ones((1, 4), np.float32), model="encoder")
    assert e.value.cause == "not_loaded" and e.value.resource == "encoder" and e.value.op == "mlp_forward"


def test_out_of_memory_while_loading_is_structured_and_survived(run: str, model: tuple[MLP, str]) -> None:
    for w in long_lived_worker(run, "--ops", OPS, "--memory-limit", "400M"):
        with Client(w.address) as c:
            with pytest.raises(OutOfMemory) as e:
                c.load("big", "test_big", checkpoint=model[1])  # 1 GiB of weights
            assert e.value.device == "cpu" and e.value.resource == "big"
            with pytest.raises(OutOfMemory) as e:
                c.load("ballast", "ballast", mib=1024)
            assert e.value.resource == "ballast" and e.value.loader == "ballast"
            assert c.resources()["resources"] == []
            assert c.load("small", "ballast", mib=1)["host_bytes"] >= 0  # still loads what fits
            still_serves(c)


def test_session_state_persists_across_calls_and_closes(client: Client) -> None:
    one = np.ones(2, np.float32)
    assert client.call("kv_append", one, session_id="s1").tolist() == [1, 1]
    assert client.call("kv_append", 2 * one, session_id="s1").tolist() == [1, 1, 2, 2]
    assert client.call("kv_append", 3 * one, session_id="s2").tolist() == [3, 3]  # another session
    sessions = {s["session_id"]: s for s in client.resources()["sessions"]}
    assert sessions["s1"]["calls"] == 2 and sessions["s1"]["keys"] == 1
    assert client.close_session("s1") is True and client.close_session("s1") is False
    assert client.call("session_calls", session_id="s1") == 0  # a fresh state
    client.close_session("s1")
    client.close_session("s2")


def test_session_idles_out_after_its_ttl(client: Client) -> None:
    client.call("kv_append", np.ones(1, np.float32), session_id="brief", session_ttl_s=0.2)
    wait_until(lambda: all(s["session_id"] != "brief" for s in client.resources()["sessions"]))
    assert client.call("session_calls", session_id="brief", session_ttl_s=0.2) == 0


def test_session_state_outside_a_session_is_a_clear_error(client: Client) -> None:
    with pytest.raises(InvalidArgument) as e:
        client.call("kv_append", np.ones(1, np.float32))
    assert e.value.field == "session_id" and "pool.session()" in e.value.suggestion


# ---------------------------------------------------------------------------------------------------
# the Erlang port


@pytest.fixture()
def port() -> Iterator[PortClient]:
    client = PortClient("--ops", OPS)
    yield client
    client.close()


def test_port_terms_load_call_list_unload(port: PortClient, model: tuple[MLP, str]) -> None:
    m, path = model
    tag, rid, info = port.request((A("load"), 1, "mlp", "test_mlp", {A("checkpoint"): path}))
    assert (tag, rid) == ("ok", 1), info
    assert info[A("name")] == b"mlp" and info[A("device")] == b"cpu" and info[A("already_loaded")] is False
    x = np.random.rand(3, 4).astype(np.float32)
    tag, _, result = port.request((A("call"), 2, "mlp_forward", [inline(x)], {}))
    assert tag == "ok", result
    np.testing.assert_allclose(as_array(result[A("outputs")][0]), m(torch.from_numpy(x)).detach().numpy(), rtol=1e-6)
    tag, _, listing = port.request((A("list_resources"), 3))
    assert [r[A("name")] for r in listing[A("resources")]] == [b"mlp"]
    tag, _, freed = port.request((A("unload"), 4, "mlp"))
    assert tag == "ok" and freed[A("unloaded")] is True


def test_port_sessions_and_errors(port: PortClient) -> None:
    one = inline(np.ones(2, np.float32))
    for i in (1, 2):
        tag, _, result = port.request((A("call"), i, "kv_append", [one], {}, {A("session_id"): "conv"}))
        assert tag == "ok", result
    assert as_array(result[A("outputs")][0]).tolist() == [1, 1, 1, 1]
    tag, _, closed = port.request((A("close_session"), 3, "conv"))
    assert tag == "ok" and closed == {A("closed"): True}
    tag, rid, err = port.request((A("load"), 4, "x", "nope", {}))
    assert (tag, rid) == ("error", 4)
    assert err[A("kind")] == "resource_failed" and err[A("cause")] == b"unknown_loader"
    tag, _, err = port.request((A("load"), 5, "x", "failing", [(A("message"), "gone")]))
    assert err[A("kind")] == "resource_failed" and err[A("exception_type")] == b"FileNotFoundError"
    tag, _, err = port.request((A("call"), 6, "mlp_forward", [inline(np.ones((1, 4), np.float32))], {}))
    assert err[A("kind")] == "resource_failed" and err[A("cause")] == b"not_loaded"
    tag, _, ok = port.request((A("list_resources"), 7))
    assert tag == "ok" and ok[A("resources")] == []
