"""GPU utilisation and device memory from NVML (nvidia-ml-py), for the exporters.

On a machine without an NVIDIA driver `NvmlGpus.read()` returns no rows and the metrics built from it
are simply absent: a figure that cannot be measured is never reported as zero.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["GpuReading", "NvmlGpus"]


@dataclass(frozen=True)
class GpuReading:
    index: int
    name: str
    utilization_ratio: float  # 0..1, the share of the last sample period a kernel ran
    used_bytes: int
    free_bytes: int
    total_bytes: int


class NvmlGpus:
    """Reads every GPU NVML sees. NVML is initialised once, on first use; if that fails (no driver,
    no library) it is not tried again and `read()` is always empty."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._nvml: Any = None
        self._handles: list[Any] | None = None  # None: not tried yet; []: no GPU / no NVML

    def _init(self) -> list[Any]:
        if self._handles is not None:
            return self._handles
        self._handles = []
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception as exc:  # no driver (this is every CPU machine): nothing to report
            log.debug("NVML unavailable: %s", exc)
        return self._handles

    def read(self) -> list[GpuReading]:
        with self._lock:
            handles = self._init()
            nvml = self._nvml
            out: list[GpuReading] = []
            for i, h in enumerate(handles):
                try:
                    util = nvml.nvmlDeviceGetUtilizationRates(h)
                    mem = nvml.nvmlDeviceGetMemoryInfo(h)
                    name = nvml.nvmlDeviceGetName(h)
                except Exception as exc:  # a GPU that fell off the bus: skip it, keep the others
                    log.debug("NVML read of GPU %d failed: %s", i, exc)
                    continue
                out.append(GpuReading(i, name.decode() if isinstance(name, bytes) else str(name),
                                      util.gpu / 100.0, int(mem.used), int(mem.free), int(mem.total)))
            return out

    def close(self) -> None:
        with self._lock:
            if self._nvml is not None:
                try:
                    self._nvml.nvmlShutdown()
                except Exception:  # noqa: BLE001 - shutting down
                    pass
            self._nvml, self._handles = None, []
