"""The exporter of one worker: `sidecar serve --metrics HOST:PORT` (either transport).

Call metrics come from the worker's telemetry hub (a span per call, the same events a
`WatchTelemetry` watcher gets), so the dispatcher knows nothing about Prometheus; gauges (memory,
arena, leases, GPU, taint) are read from the runtime when Prometheus scrapes. Durations here are the
worker's own (`total_ns`: decode, queue, compute, encode), without the host's round trip.
"""
from __future__ import annotations

import logging
import os
import threading
from typing import Any, Iterator

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from sidecar.observe.gpu import NvmlGpus
from sidecar.observe.metrics import CallMetrics, gauge, render
from sidecar.observe.server import ObservabilityServer, json_response

log = logging.getLogger(__name__)

__all__ = ["WorkerMetrics", "ALLOW_REMOTE_ENV"]

ALLOW_REMOTE_ENV = "SIDECAR_METRICS_ALLOW_REMOTE"  # =1: `--metrics` may bind a non-loopback address
# The subscription's own memory samples are not needed (gauges are read at scrape time): ask for
# them as rarely as the hub allows.
_MEMORY_SAMPLE_EVERY_S = 24 * 3600.0


class WorkerMetrics:
    """Subscribes to `runtime.telemetry`, serves /metrics (and /api/status) on `address`."""

    def __init__(self, runtime: Any, address: str, *, allow_remote: bool | None = None) -> None:
        if allow_remote is None:
            allow_remote = os.environ.get(ALLOW_REMOTE_ENV, "") == "1"
        self._rt = runtime
        self.registry = CollectorRegistry(auto_describe=False)
        self.calls = CallMetrics(self.registry, "Time a call spent inside the worker (decode, queue, compute, "
                                                "encode), without the host's round trip")
        ProcessCollector(registry=self.registry)  # process_cpu_seconds_total, process_resident_memory_bytes, ...
        self.gpus = NvmlGpus()
        self.registry.register(_WorkerCollector(runtime, self.gpus))
        self.server = ObservabilityServer(address, {
            "/metrics": lambda q: (200, "text/plain; version=0.0.4; charset=utf-8", render(self.registry)),
            "/api/status": lambda q: json_response(self.status_json()),
        }, allow_remote=allow_remote)
        self.address = self.server.address
        self._sub = runtime.telemetry.subscribe(_MEMORY_SAMPLE_EVERY_S)
        self._thread = threading.Thread(target=self._consume, name="sidecar-worker-metrics", daemon=True)
        self._thread.start()

    def _consume(self) -> None:
        for ev in self._sub:  # ends when the subscription is closed
            if ev.get("type") != "span" or ev.get("phase") == "start":
                continue
            timing = ev.get("timing") or {}
            known = ev.get("phase") == "stop"  # a failed call's split is partial: only its total counts
            self.calls.observe(str(ev.get("op", "")), str(ev.get("outcome") or "ok"),
                               int(ev.get("duration_ns") or 0) / 1e9,
                               timing.get("queue_ns", 0) / 1e9 if known else None,
                               timing.get("compute_ns", 0) / 1e9 if known else None,
                               int(ev.get("bytes_in") or 0) if known else 0, int(ev.get("bytes_out") or 0))

    def status_json(self) -> dict[str, Any]:
        rt = self._rt
        return {"pid": os.getpid(), "device": str(rt.device), "tainted": rt.tainted, "memory": rt.memory_sample()}

    def close(self) -> None:
        self.server.close()
        self._sub.close()
        self._thread.join(5)
        self.gpus.close()


class _WorkerCollector(Collector):
    def __init__(self, runtime: Any, gpus: NvmlGpus) -> None:
        self._rt = runtime
        self._gpus = gpus

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from sidecar import __version__

        rt = self._rt
        sample = rt.memory_sample()
        yield gauge("sidecar_worker_info", "The worker's pid, device and version (value 1)",
                    ["pid", "device", "version"], [((str(os.getpid()), str(rt.device), __version__), 1)])
        yield gauge("sidecar_worker_tainted", "1 once the device needs a fresh process (the worker exits 70)",
                    rows=[((), 1 if rt.tainted else 0)])
        for name, key, text in (
                ("sidecar_worker_rss_bytes", "rss_bytes", "Resident memory of the worker process"),
                ("sidecar_worker_arena_reserved_bytes", "arena_reserved_bytes", "Shared memory the worker's arena holds"),
                ("sidecar_worker_arena_in_use_bytes", "arena_in_use_bytes", "Arena memory holding outputs"),
                ("sidecar_worker_leases", "leases", "Output leases held for hosts (not yet released)")):
            yield gauge(name, text, rows=[((), sample.get(key, 0))])
        gpus = sample.get("gpus") or []
        if gpus:  # only a CUDA worker has these series
            labels = ["gpu"]
            yield gauge("sidecar_gpu_memory_allocated_bytes", "GPU memory torch has allocated", labels,
                        (((g["index"],), g["allocated"]) for g in gpus))
            yield gauge("sidecar_gpu_memory_reserved_bytes", "GPU memory torch's caching allocator holds", labels,
                        (((g["index"],), g["reserved"]) for g in gpus))
            yield gauge("sidecar_gpu_memory_free_bytes", "Free memory of the GPU", labels,
                        (((g["index"],), g["free"]) for g in gpus))
            yield gauge("sidecar_gpu_memory_total_bytes", "Memory of the GPU", labels,
                        (((g["index"],), g["total"]) for g in gpus))
        readings = self._gpus.read() if gpus else []
        if readings:
            yield gauge("sidecar_gpu_utilization_ratio", "Share of the last sample period a kernel ran on the GPU "
                        "(NVML; every GPU this process sees)", ["gpu", "name"],
                        (((str(g.index), g.name), g.utilization_ratio) for g in readings))
