"""Torch models as resources: an architecture registry and a safe checkpoint loader.

    import sidecar
    from sidecar.models import load_module, register_architecture

    register_architecture("mlp", lambda hidden=16: MLP(hidden), example_shape=(1, 4))

    @sidecar.resource("mlp")
    def load_mlp(checkpoint: str, dtype: str = "float32", device=None):
        return load_module("mlp", checkpoint, dtype, device)

`load_module` builds the architecture, reads the checkpoint's state_dict with
`torch.load(weights_only=True)` (no pickled code runs), checks it against the model (every missing
and unexpected key and every shape mismatch is listed), casts floating tensors to `dtype`, moves the
model to `device`, sets eval mode and, when the architecture declares an example input shape, runs
one forward pass on zeros (kernels chosen and memory reserved before the first real call).

Errors are structured: RESOURCE_FAILED with `cause` = missing_checkpoint, unreadable_checkpoint,
incompatible_state_dict (missing_keys, unexpected_keys, shape_mismatches), unknown_architecture
(close_names); OUT_OF_MEMORY (device, requested, free and total bytes, allocated/reserved on CUDA)
when the model does not fit.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sidecar.errors import OutOfMemory, ResourceFailed, close_names

__all__ = ["Architecture", "architectures", "load_module", "register_architecture"]


@dataclass(frozen=True)
class Architecture:
    name: str
    factory: Callable[..., Any]  # (**config) -> torch.nn.Module
    example_shape: tuple[int, ...] | None = None  # input of the warm-up forward pass


_ARCHITECTURES: dict[str, Architecture] = {}
_LOCK = threading.Lock()


def register_architecture(name: str, factory: Callable[..., Any], *,
                          example_shape: Sequence[int] | None = None) -> Architecture:
    """Registers `factory` (returns an untrained `torch.nn.Module`) as `name`.

    Registering the same factory again is a no-op (a module imported twice); another factory under a
    taken name is refused with ValueError (two models would answer to one name)."""
    if not name or not isinstance(name, str):
        raise ValueError("an architecture needs a non-empty string name")
    if not callable(factory):
        raise TypeError(f"the factory of architecture {name!r} is not callable: {factory!r}")
    arch = Architecture(name, factory, None if example_shape is None else tuple(int(d) for d in example_shape))
    with _LOCK:
        old = _ARCHITECTURES.get(name)
        if old is not None:
            if _same_factory(old.factory, factory):
                return old
            raise ValueError(f"architecture {name!r} is already registered with another factory "
                             f"({_qualified(old.factory)}); pick another name")
        _ARCHITECTURES[name] = arch
    return arch


def _same_factory(a: Callable[..., Any], b: Callable[..., Any]) -> bool:
    # A module executed twice makes a new function object with the same qualified name and code.
    return a is b or (_qualified(a) == _qualified(b) and getattr(a, "__code__", None) is not None
                      and getattr(a, "__code__", None) == getattr(b, "__code__", None))


def _qualified(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def architectures() -> list[str]:
    with _LOCK:
        return sorted(_ARCHITECTURES)


def load_module(architecture: str, checkpoint: str | os.PathLike[str], dtype: Any = "float32", device: Any = None,
                *, config: Mapping[str, Any] | None = None, example_shape: Sequence[int] | None = None,
                warmup: bool = True) -> Any:
    """The architecture with the checkpoint's weights, in `dtype` on `device` (default: CPU), in eval
    mode, warmed up on `example_shape` (default: the architecture's) when `warmup`. See the module doc."""
    import torch

    with _LOCK:
        arch = _ARCHITECTURES.get(architecture)
        known = list(_ARCHITECTURES)
    if arch is None:
        raise ResourceFailed(f"unknown architecture {architecture!r} (registered: {', '.join(sorted(known)) or 'none'})",
                             architecture=str(architecture), cause="unknown_architecture",
                             close_names=close_names(str(architecture), known))
    path = os.fspath(checkpoint)
    if not os.path.isfile(path):
        raise ResourceFailed(f"checkpoint {path!r} of architecture {architecture!r} does not exist"
                             + (" (it is a directory)" if os.path.isdir(path) else ""),
                             architecture=architecture, cause="missing_checkpoint", field="checkpoint",
                             got=path)
    torch_dtype = _torch_dtype(dtype)
    target = torch.device(device) if device is not None else torch.device("cpu")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - not a torch file, truncated, or pickled code weights_only refuses
        raise ResourceFailed(f"checkpoint {path!r} cannot be read as a state_dict: {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''}", architecture=architecture,
                             cause="unreadable_checkpoint", exception_type=type(exc).__name__, got=path) from None
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]  # a training checkpoint: {"state_dict": ..., "epoch": ...}
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ResourceFailed(f"checkpoint {path!r} holds a {type(state).__name__}, not a state_dict of tensors",
                             architecture=architecture, cause="unreadable_checkpoint", got=path)
    nbytes = sum(int(v.numel() * v.element_size()) for v in state.values())
    try:
        model = arch.factory(**dict(config or {}))
    except (MemoryError, RuntimeError) as exc:
        if not _is_oom(exc):
            raise
        raise _oom(architecture, torch.device("cpu"), nbytes, exc) from None
    _check_compatible(architecture, path, model, state)
    model.load_state_dict(state)
    del state
    try:
        if torch_dtype.is_floating_point:
            model = model.to(dtype=torch_dtype)  # casts floating parameters and buffers only
        model = model.to(target)
        model.eval()
        shape = tuple(example_shape) if example_shape is not None else arch.example_shape
        if warmup and shape is not None:
            with torch.inference_mode():
                model(torch.zeros(shape, dtype=torch_dtype, device=target))
            if target.type == "cuda":
                torch.cuda.synchronize(target)
    except (MemoryError, RuntimeError) as exc:  # torch.cuda.OutOfMemoryError is a RuntimeError
        if not _is_oom(exc):
            raise
        del model
        raise _oom(architecture, target, nbytes, exc) from None
    return model


def _is_oom(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, MemoryError) or "out of memory" in text or "can't allocate memory" in text


def _torch_dtype(dtype: Any) -> Any:
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    from sidecar.dataplane import dtypes

    try:
        return dtypes.to_torch_dtype(dtypes.name_of(dtype))
    except Exception:  # noqa: BLE001 - any unknown spelling
        raise ResourceFailed(f"unknown dtype {dtype!r} for a model (float32, float16, bfloat16, ...)",
                             cause="loader_failed", field="dtype", got=str(dtype)) from None


def _check_compatible(architecture: str, path: str, model: Any, state: Mapping[str, Any]) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: checkpoint {list(state[k].shape)}, model {list(expected[k].shape)}"
              for k in sorted(set(state) & set(expected)) if tuple(state[k].shape) != tuple(expected[k].shape)]
    if not (missing or unexpected or shapes):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {', '.join(missing[:5])}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {', '.join(unexpected[:5])}")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatch(es): {'; '.join(shapes[:3])}")
    raise ResourceFailed(f"checkpoint {path!r} does not fit architecture {architecture!r}: {'; '.join(parts)}",
                         architecture=architecture, cause="incompatible_state_dict", missing_keys=missing,
                         unexpected_keys=unexpected, shape_mismatches=shapes)


def _oom(architecture: str, device: Any, nbytes: int, exc: BaseException) -> OutOfMemory:
    import torch

    fields: dict[str, Any] = {"device": str(device), "requested_bytes": nbytes}
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        fields.update(free_bytes=int(free), total_bytes=int(total),
                      allocated_bytes=int(torch.cuda.memory_allocated(device)),
                      reserved_bytes=int(torch.cuda.memory_reserved(device)))
        torch.cuda.empty_cache()  # what the failed load reserved goes back: the worker serves on
    else:
        import psutil

        vm = psutil.virtual_memory()
        fields.update(free_bytes=int(vm.available), total_bytes=int(vm.total))
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return OutOfMemory(f"architecture {architecture!r} ({nbytes} bytes of parameters) does not fit on {device}: "
                       f"{first}", **fields)
