"""Observability: Prometheus metrics, the live dashboard page and the memory history.

Everything here attaches to public surfaces of the host and the worker (pool events, `Pool.status()`,
`Pool.watch_telemetry`, each call's `Result`, the worker's telemetry hub), so the supervision code
knows nothing about it and pays nothing for it until it is switched on:

- `metrics`         metric names and the per-op call metrics both exporters share
- `history`         memory history rings per worker and device, threshold and steady-growth events
- `journal`         bounded rings of recent calls and pool events (what the dashboard lists)
- `gpu`             GPU utilisation and memory from NVML, where a driver exists (absent otherwise)
- `server`          the HTTP endpoint (/metrics, the dashboard, /api/*), loopback unless allowed
- `pool_observer`   `PoolObserver`: all of the above for one `Pool` (`pool.serve_metrics()`)
- `worker_metrics`  the exporter of one worker (`sidecar serve --metrics HOST:PORT`)
- `static/`         the dashboard page (plain HTML/JS/CSS, no build step)

See guides/observability.md.
"""
from __future__ import annotations

from typing import Any

__all__ = ["PoolObserver", "MemoryProfile", "MemorySeries", "MemorySample"]


def __getattr__(name: str) -> Any:  # keeps `import sidecar.observe` free of prometheus-client imports
    if name == "PoolObserver":
        from sidecar.observe.pool_observer import PoolObserver

        return PoolObserver
    if name in ("MemoryProfile", "MemorySeries", "MemorySample"):
        from sidecar.observe import history

        return getattr(history, name)
    raise AttributeError(f"module 'sidecar.observe' has no attribute {name!r}")
