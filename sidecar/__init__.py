"""The tensor sidecar: worker processes that run PyTorch/NumPy ops behind a process boundary.

Host code imports `sidecar.host` (Client, Pool); op modules loaded into a worker use `sidecar.op`.
Importing this package is cheap: torch is only imported by the worker side.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the type checker sees the real (typed) decorators; at run time they load lazily
    from sidecar.worker.registry import on_startup, op

__version__ = "0.1.0"

__all__ = ["__version__", "op", "on_startup", "resource"]


def __getattr__(name: str) -> Any:
    # Lazy so that `import sidecar` in a host does not import torch.
    if name in ("op", "on_startup"):
        from sidecar.worker import registry

        return getattr(registry, name)
    if name == "resource":
        from sidecar.worker import resources

        return resources.resource
    raise AttributeError(name)
