"""Resources on a CUDA worker: FP16 model outputs within tolerance of FP32, device memory measured on
load and given back on unload (the cache emptied), out-of-memory while loading structured and survived.
Skipped (with the reason) where CUDA is absent (tests/gpu/conftest.py)."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import pytest
import torch

from sidecar.errors import OutOfMemory
from sidecar.host import Client
from tests.resident_ops_module import MLP, saved_mlp
from tests.workers import WorkerProcess, assert_run_clean, long_lived_run, start_worker

OPS = "tests.resident_ops_module"
MIB = 1 << 20


@pytest.fixture(scope="module")
def worker() -> Iterator[WorkerProcess]:
    for run in long_lived_run():
        w = start_worker("--device", "cuda", "--run-id", run, "--ops", OPS)
        yield w
        assert w.alive(), w.stderr_text()
        assert w.stop() == 0
        assert_run_clean(run)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[MLP, str]:
    return saved_mlp(tmp_path_factory.mktemp("ckpt"), seed=3)


def test_fp16_model_on_the_gpu_matches_fp32_in_process(worker: WorkerProcess, model: tuple[MLP, str]) -> None:
    m, path = model
    with Client(worker.address) as c:
        info = c.load("mlp16", "test_mlp", checkpoint=path, dtype="float16")
        assert info["device"].startswith("cuda") and info["device_bytes"] > 0
        x = np.random.rand(16, 4).astype(np.float32)
        with torch.inference_mode():
            want = m(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(c.call("mlp_forward", x, model="mlp16"), want, atol=2e-2, rtol=2e-2)
        c.unload("mlp16")


def test_unload_gives_device_memory_back(worker: WorkerProcess) -> None:
    with Client(worker.address) as c:
        info = c.load("dev", "device_ballast", mib=512)
        assert info["device_bytes"] >= 512 * MIB
        freed = c.unload("dev")
        assert freed["device_bytes_freed"] >= 512 * MIB
        assert freed["device_reserved_freed"] >= 512 * MIB  # the cache went back to the driver


def test_out_of_memory_while_loading_is_structured_and_survived(worker: WorkerProcess) -> None:
    with Client(worker.address) as c:
        total = c.hardware()["cuda"]["devices"][0]["memory_total"]
        with pytest.raises(OutOfMemory) as e:
            c.load("huge", "device_ballast", mib=2 * total // MIB)
        err = e.value
        assert err.device.startswith("cuda") and err.resource == "huge" and err.total_bytes > 0
        assert c.resources()["resources"] == []
        assert c.load("small", "device_ballast", mib=16)["device_bytes"] >= 16 * MIB
        c.unload("small")
