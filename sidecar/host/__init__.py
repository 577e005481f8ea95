"""Host side: `Client` talks to one worker, `Pool` runs and supervises many.

Importing this package does not import torch. `Pool` is loaded on first use, so that `Client`
works on its own.
"""
from __future__ import annotations

from typing import Any

from sidecar.host.client import Client, Result, TelemetryWatch, WorkerUnreachable

__all__ = ["Client", "Pool", "Result", "TelemetryWatch", "WorkerUnreachable"]


def __getattr__(name: str) -> Any:
    if name == "Pool":
        from sidecar.host.pool import Pool

        return Pool
    raise AttributeError(f"module 'sidecar.host' has no attribute {name!r}")
