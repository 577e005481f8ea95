"""Ops and loaders for the resources/sessions tests (`--ops tests.resident_ops_module`): a small MLP
registered as an architecture, loaders (a good one, one that raises, one that allocates a known
amount of host memory), ops that use a resource, ops that keep session state, and `whoami`."""
from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import torch

import sidecar
from sidecar.models import load_module, register_architecture


class MLP(torch.nn.Module):
    def __init__(self, inputs: int = 4, hidden: int = 16, outputs: int = 3) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(inputs, hidden)
        self.fc2 = torch.nn.Linear(hidden, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def make_mlp(hidden: int = 16) -> MLP:
    return MLP(hidden=hidden)


register_architecture("test_mlp", make_mlp, example_shape=(1, 4))


def saved_mlp(directory: Any, seed: int) -> tuple[MLP, str]:
    """A seeded MLP and the path of its state_dict saved in `directory` (the tests' checkpoint)."""
    torch.manual_seed(seed)
    m = MLP()
    path = os.path.join(str(directory), "mlp.pt")
    torch.save(m.state_dict(), path)
    return m, path


@sidecar.resource("test_mlp")
def load_mlp(checkpoint: str, dtype: str = "float32", hidden: int = 16, device: Any = None) -> Any:
    return load_module("test_mlp", checkpoint, dtype, device, config={"hidden": hidden})


@sidecar.resource("ballast")
def load_ballast(mib: int = 64) -> Any:
    """`mib` MiB of host memory, touched (so it is resident)."""
    return np.ones(int(mib) << 20, dtype=np.uint8)


@sidecar.resource("failing")
def load_failing(message: str = "no weights here") -> Any:
    raise FileNotFoundError(message)


@sidecar.resource("slow_ballast")
def load_slow(seconds: float = 0.5, mib: int = 1) -> Any:
    time.sleep(float(seconds))
    return np.ones(int(mib) << 20, dtype=np.uint8)


def not_a_loader() -> Any:
    """Importable but not declared: must never be run as a loader."""
    raise AssertionError("ran an undeclared loader")


@sidecar.op("mlp_forward")
def mlp_forward(x: torch.Tensor, ctx: Any, *, model: str = "mlp") -> torch.Tensor:
    """The resident model `model` on `x` (cast to the model's dtype; the output is float32)."""
    m = ctx.resource(model)
    p = next(m.parameters())
    with torch.inference_mode():
        return m(x.to(device=p.device, dtype=p.dtype)).float()


@sidecar.op("kv_append", idempotent=False)
def kv_append(x: torch.Tensor, ctx: Any) -> torch.Tensor:
    """Appends `x` to the session's cache and returns the whole cache (a KV cache in miniature)."""
    cache = ctx.session.setdefault("cache", [])
    cache.append(x.clone())
    return torch.cat(cache)


@sidecar.op("session_calls")
def session_calls(ctx: Any) -> int:
    return len(ctx.session.get("cache", []))


@sidecar.op("whoami")
def whoami() -> int:
    return os.getpid()


@sidecar.op("set_config", idempotent=False)
def set_config(ctx: Any, *, key: str, value: Any) -> int:
    """A 'config change' broadcast to every worker: returns the worker's pid."""
    ctx.runtime.config = {**getattr(ctx.runtime, "config", {}), key: value}
    return os.getpid()


def make_big(features: int = 16384) -> torch.nn.Module:
    """A model too big for a worker started with a small --memory-limit (1 GiB of float32 weights)."""
    return torch.nn.Linear(features, features)


register_architecture("test_big", make_big)


@sidecar.resource("test_big")
def load_big(checkpoint: str, device: Any = None) -> Any:
    return load_module("test_big", checkpoint, "float32", device)


@sidecar.resource("by_architecture")
def load_by_architecture(architecture: str, checkpoint: str, dtype: str = "float32", device: Any = None) -> Any:
    """Any registered architecture (the structured errors of sidecar.models, end to end)."""
    return load_module(architecture, checkpoint, dtype, device)


@sidecar.op("crash_if_pid", idempotent=False)
def crash_if_pid(*, pid: int) -> int:
    """Segfaults the worker whose pid is `pid`; the others answer their pid."""
    if os.getpid() == int(pid):
        import ctypes

        ctypes.memset(0, 1, 1)
    return os.getpid()


@sidecar.op("busy_while", idempotent=False)
def busy_while(*, path: str) -> int:
    """Keeps its worker busy for as long as `path` exists (the test removes it); returns the pid."""
    while os.path.exists(path):
        time.sleep(0.01)
    return os.getpid()


@sidecar.resource("device_ballast")
def load_device_ballast(mib: int = 256, device: Any = None) -> Any:
    """`mib` MiB on the worker's device (CUDA: straight from the caching allocator)."""
    return torch.ones(int(mib) << 20, dtype=torch.uint8, device=device)
