"""A sample user ops module (loaded with `--ops tests.ops_fixture_module`).

It holds state loaded once per worker by a start-up hook (a small "model": a linear layer with fixed
weights), the way a real module would load weights before the worker reports ready.
"""
from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import torch

import sidecar

LOADS = 0  # how many times the start-up hook ran in this process
MODEL: torch.nn.Linear | None = None
IN_FEATURES, OUT_FEATURES = 4, 3


@sidecar.on_startup
def load_model(runtime) -> None:
    """Builds the model once, on the worker's device."""
    global LOADS, MODEL
    LOADS += 1
    gen = torch.Generator().manual_seed(1234)
    model = torch.nn.Linear(IN_FEATURES, OUT_FEATURES)
    with torch.no_grad():
        model.weight.copy_(torch.randn(OUT_FEATURES, IN_FEATURES, generator=gen))
        model.bias.copy_(torch.randn(OUT_FEATURES, generator=gen))
    MODEL = model.to(runtime.device).eval()


def reference_weights() -> tuple[torch.Tensor, torch.Tensor]:
    """The weights load_model builds, for tests to compute expected results."""
    gen = torch.Generator().manual_seed(1234)
    return torch.randn(OUT_FEATURES, IN_FEATURES, generator=gen), torch.randn(OUT_FEATURES, generator=gen)


@sidecar.op("fixture.predict")
def predict(x: torch.Tensor) -> torch.Tensor:
    """Applies the module's linear model (loaded at start-up) to x of shape (batch, 4)."""
    assert MODEL is not None, "start-up hook did not run"
    with torch.no_grad():
        return MODEL(x)


@sidecar.op("fixture.scale", idempotent=False)
def scale(x: torch.Tensor, factor: float = 2.0, *, offset: float = 0.0) -> torch.Tensor:
    """x * factor + offset."""
    return x * factor + offset


@sidecar.op("fixture.split")
def split(x: torch.Tensor, *, parts: int = 2) -> tuple[torch.Tensor, ...]:
    """Splits x into `parts` chunks along dimension 0 (several outputs)."""
    return tuple(torch.chunk(x, parts))


@sidecar.op("fixture.stats")
def stats(x: torch.Tensor, ctx) -> dict:
    """Plain values out; uses the op context."""
    return {"device": str(ctx.device), "n": int(x.numel()), "mean": float(x.float().mean())}


@sidecar.op("fixture.table_total")
def table_total(table: pa.Table, *, column: str = "v") -> pa.Table:
    """An Arrow table in, an Arrow table out: the column's sum and a doubled copy."""
    col = table.column(column)
    return pa.table({"doubled": pc.multiply(col, 2), "total": pa.array([pc.sum(col).as_py()] * len(col))})


@sidecar.op("fixture.fail")
def fail(x: torch.Tensor) -> torch.Tensor:
    """Raises a user exception."""
    raise ValueError(f"fixture op refuses a tensor of shape {tuple(x.shape)}")


@sidecar.op("fixture.torch_shape_error")
def torch_shape_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Lets torch itself raise the shape error (no checks first)."""
    return a @ b
