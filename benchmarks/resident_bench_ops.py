"""Ops for benchmarks/bench_resident.py (`--ops benchmarks/resident_bench_ops.py`): a 4-layer MLP of
~8.4 M parameters (34 MB in float32) as an architecture, its loader, and two ways to run it: on the
resident copy (`ctx.resource`) or loading the checkpoint inside the call, as one would without
resources."""
from __future__ import annotations

from typing import Any

import torch

import sidecar
from sidecar.models import load_module, register_architecture

WIDTH = 1024


def make_mlp(width: int = WIDTH, layers: int = 4) -> torch.nn.Module:
    mods: list[torch.nn.Module] = []
    for _ in range(layers):
        mods += [torch.nn.Linear(width, 2 * width), torch.nn.GELU(), torch.nn.Linear(2 * width, width)]
    return torch.nn.Sequential(*mods)


register_architecture("bench_mlp", make_mlp, example_shape=(1, WIDTH))


@sidecar.resource("bench_mlp")
def load_mlp(checkpoint: str, dtype: str = "float32", device: Any = None) -> Any:
    return load_module("bench_mlp", checkpoint, dtype, device)


@sidecar.op("bench.resident_forward")
def resident_forward(x: torch.Tensor, ctx: Any) -> torch.Tensor:
    with torch.inference_mode():
        return ctx.resource("model")(x)  # type: ignore[no-any-return]


@sidecar.op("bench.load_and_forward")
def load_and_forward(x: torch.Tensor, ctx: Any, *, checkpoint: str) -> torch.Tensor:
    model = load_module("bench_mlp", checkpoint, "float32", ctx.device, warmup=False)
    with torch.inference_mode():
        return model(x)  # type: ignore[no-any-return]
