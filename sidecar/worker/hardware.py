"""What a worker sees: CPU, CUDA devices, MPS, and a stable identity hash.

The dict `detect()` returns matches the `sidecar.v1.Hardware` message field for field. GPUs are read
through NVML (nvidia-ml-py), which does not create a CUDA context; torch.cuda is only a fallback, and
only where this process uses CUDA anyway, because initialising CUDA in a pool's template process
would break every worker forked from it. Missing hardware is reported as absent with a reason.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import sys
from typing import Any

# Feature flags worth reporting (they decide which kernels are fast); the rest of /proc/cpuinfo is noise.
_X86_FLAGS = ("sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq",
              "avx512_bf16", "avx512_fp16", "avx512_vnni", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")
_ARM_FLAGS = {"asimd": "neon", "fphp": "fp16", "asimdhp": "fp16", "asimddp": "dotprod", "sve": "sve",
              "sve2": "sve2", "bf16": "bf16", "i8mm": "i8mm", "sme": "sme"}


def _cpuinfo() -> dict[str, str]:
    """First processor's block of /proc/cpuinfo (empty off Linux)."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    if info:
                        break
                    continue
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return info


def _sysctl(name: str) -> str:
    import subprocess

    try:
        return subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=2).stdout.strip()
    except Exception:
        return ""


def cpu_info() -> dict[str, Any]:
    import psutil

    info = _cpuinfo()
    arch = platform.machine()
    model = info.get("model name") or info.get("Model") or info.get("cpu model") or ""
    if not model and sys.platform == "darwin":
        model = _sysctl("machdep.cpu.brand_string")
    model = model or platform.processor() or arch
    raw = set((info.get("flags") or info.get("Features") or "").split())
    flags = [f for f in _X86_FLAGS if f in raw]
    flags += sorted({name for feat, name in _ARM_FLAGS.items() if feat in raw})
    if sys.platform == "darwin" and arch == "arm64" and "neon" not in flags:
        flags.append("neon")  # every Apple silicon core has it
    vm = psutil.virtual_memory()
    threads = psutil.cpu_count(logical=True) or os.cpu_count() or 0
    return {"model": model, "cores": psutil.cpu_count(logical=False) or threads, "threads": threads,
            "flags": flags, "memory_total": int(vm.total), "memory_available": int(vm.available), "arch": arch}


def _visible(devices: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """Apply CUDA_VISIBLE_DEVICES (indices or GPU-uuid prefixes) the way the CUDA runtime does, and
    renumber so `index` is the ordinal torch uses."""
    spec = os.environ.get("CUDA_VISIBLE_DEVICES")
    if spec is None:
        return devices, ""
    chosen: list[dict[str, Any]] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            break
        match = None
        if item.lstrip("-").isdigit():
            idx = int(item)
            if idx < 0:
                break  # the runtime stops at the first invalid entry
            match = next((d for d in devices if d["index"] == idx), None)
        else:
            match = next((d for d in devices if d["uuid"].startswith(item if item.startswith("GPU-")
                                                                      else "GPU-" + item)), None)
        if match is None or match in chosen:
            break
        chosen.append(match)
    for ordinal, d in enumerate(chosen):
        chosen[ordinal] = {**d, "index": ordinal}
    return chosen, ("" if chosen else f"CUDA_VISIBLE_DEVICES={spec!r} hides every GPU")


def _nvml() -> dict[str, Any]:
    import pynvml

    pynvml.nvmlInit()
    try:
        def text(v: Any) -> str:
            return v.decode() if isinstance(v, bytes) else str(v)

        driver = text(pynvml.nvmlSystemGetDriverVersion())
        try:
            cv = int(pynvml.nvmlSystemGetCudaDriverVersion_v2())
        except Exception:
            cv = int(pynvml.nvmlSystemGetCudaDriverVersion())
        devices = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            try:
                major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
            except Exception:
                major, minor = -1, -1
            try:
                util = int(pynvml.nvmlDeviceGetUtilizationRates(h).gpu)
            except Exception:
                util = -1
            try:
                temp = int(pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU))
            except Exception:
                temp = -1
            devices.append({"index": i, "name": text(pynvml.nvmlDeviceGetName(h)),
                            "uuid": text(pynvml.nvmlDeviceGetUUID(h)), "memory_total": int(mem.total),
                            "memory_free": int(mem.free), "compute_major": int(major),
                            "compute_minor": int(minor), "utilization_percent": util, "temperature_c": temp})
        return {"driver_version": driver, "cuda_version": f"{cv // 1000}.{cv % 1000 // 10}" if cv else "",
                "devices": devices}
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def _torch_cuda() -> list[dict[str, Any]]:
    import torch

    devices = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        free, total = torch.cuda.mem_get_info(i)
        uuid = str(getattr(p, "uuid", "") or "")
        devices.append({"index": i, "name": p.name, "uuid": uuid if not uuid or uuid.startswith("GPU-")
                        else "GPU-" + uuid, "memory_total": int(total), "memory_free": int(free),
                        "compute_major": int(p.major), "compute_minor": int(p.minor),
                        "utilization_percent": -1, "temperature_c": -1})
    return devices


def cuda_info(device: str = "cpu") -> dict[str, Any]:
    out: dict[str, Any] = {"available": False, "driver_version": "", "cuda_version": "", "runtime_version": "",
                           "devices": [], "reason": ""}
    try:
        import torch

        out["runtime_version"] = torch.version.cuda or ""
        torch_cuda_used = bool(torch.cuda.is_initialized())  # type: ignore[no-untyped-call]  # (unannotated in torch)
    except Exception:
        torch = None  # type: ignore[assignment]
        torch_cuda_used = False
    nvml_error = ""
    try:
        nv = _nvml()
        out.update(driver_version=nv["driver_version"], cuda_version=nv["cuda_version"])
        out["devices"], hidden = _visible(nv["devices"])
        if hidden:
            out["reason"] = hidden
    except Exception as exc:  # no driver, no libnvidia-ml, no GPU: all mean "absent"
        nvml_error = _nvml_reason(exc)
    if nvml_error:
        # Only ask torch where CUDA is (or is about to be) in use: it would initialise CUDA otherwise.
        wants_cuda = device.startswith("cuda") or device == "auto" or torch_cuda_used
        if torch is not None and torch.version.cuda and wants_cuda:
            try:
                if torch.cuda.is_available():
                    out["devices"] = _torch_cuda()
                    out["driver_version"] = out["driver_version"] or _driver_from_torch()
            except Exception as exc:
                nvml_error += f"; torch.cuda failed: {exc}"
        if not out["devices"]:
            out["reason"] = nvml_error
    if out["devices"] and not out["reason"]:
        if torch is None or not torch.version.cuda:
            out["reason"] = (f"GPUs present but this torch build has no CUDA "
                             f"(torch {getattr(torch, '__version__', 'missing')})")
        else:
            out["available"] = True
    return out


def _driver_from_torch() -> str:
    try:
        import torch

        v = int(torch._C._cuda_getDriverVersion())  # type: ignore[attr-defined]  # e.g. 12040; private, stable for years
        return f"{v // 1000}.{v % 1000 // 10}"
    except Exception:
        return ""


def _nvml_reason(exc: Exception) -> str:
    name = type(exc).__name__
    if "LibraryNotFound" in name:
        return "no NVIDIA driver (libnvidia-ml.so.1 not found)"
    if "DriverNotLoaded" in name:
        return "NVIDIA driver not loaded"
    if "NoPermission" in name:
        return "no permission to query the NVIDIA driver"
    if isinstance(exc, ImportError):
        return "nvidia-ml-py (pynvml) not installed"
    return f"NVML failed: {name}: {exc}"


def mps_available() -> bool:
    if sys.platform != "darwin":
        return False
    try:
        import torch

        return bool(torch.backends.mps.is_available())
    except Exception:
        return False


def identity(cpu: dict[str, Any], cuda: dict[str, Any]) -> str:
    """Same machine, same answer: a hash of what does not change between runs (no free memory, no pid)."""
    key = {"model": cpu.get("model"), "cores": cpu.get("cores"), "threads": cpu.get("threads"),
           "arch": cpu.get("arch"), "memory_total": cpu.get("memory_total"),
           "gpus": sorted(d.get("uuid", "") for d in cuda.get("devices", []))}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def detect(device: str = "cpu") -> dict[str, Any]:
    """The `Hardware` message as a dict; `device` is the device this worker runs ops on (or "auto")."""
    import sidecar

    try:
        import torch

        torch_version = str(torch.__version__)
    except Exception:
        torch_version = ""
    cpu = cpu_info()
    cuda = cuda_info(str(device))
    return {
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "cpu": cpu,
        "cuda": cuda,
        "mps_available": mps_available(),
        "device": str(device),
        "identity": identity(cpu, cuda),
        "python_version": platform.python_version(),
        "torch_version": torch_version,
        "sidecar_version": sidecar.__version__,
        "pid": os.getpid(),
    }


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB"


def format_text(hw: dict[str, Any]) -> str:
    """Human-readable report for `sidecar hardware`."""
    cpu, cuda = hw.get("cpu", {}), hw.get("cuda", {})
    lines = [
        f"platform   {hw.get('platform', '')} ({hw.get('hostname', '')})",
        f"cpu        {cpu.get('model', '')} [{cpu.get('arch', '')}], {cpu.get('cores', 0)} cores / "
        f"{cpu.get('threads', 0)} threads",
        f"cpu flags  {' '.join(cpu.get('flags', [])) or '-'}",
        f"memory     {_gib(cpu.get('memory_available', 0))} available of {_gib(cpu.get('memory_total', 0))}",
    ]
    if cuda.get("available") or cuda.get("devices"):
        lines.append(f"cuda       {'available' if cuda.get('available') else 'not usable'}: driver "
                     f"{cuda.get('driver_version') or '?'}, CUDA {cuda.get('cuda_version') or '?'}, torch CUDA "
                     f"{cuda.get('runtime_version') or '-'}" + (f" ({cuda['reason']})" if cuda.get("reason") else ""))
        for d in cuda.get("devices", []):
            extra = []
            if d.get("utilization_percent", -1) >= 0:
                extra.append(f"{d['utilization_percent']}% busy")
            if d.get("temperature_c", -1) >= 0:
                extra.append(f"{d['temperature_c']} C")
            lines.append(f"  gpu {d.get('index')}    {d.get('name')} (sm_{d.get('compute_major')}{d.get('compute_minor')})"
                         f", {_gib(d.get('memory_free', 0))} free of {_gib(d.get('memory_total', 0))}"
                         + (", " + ", ".join(extra) if extra else "") + f", {d.get('uuid')}")
    else:
        lines.append(f"cuda       absent: {cuda.get('reason') or 'no CUDA device'}")
    lines += [
        f"mps        {'available' if hw.get('mps_available') else 'absent'}",
        f"device     {hw.get('device', '')}",
        f"identity   {hw.get('identity', '')}",
        f"versions   python {hw.get('python_version', '')}, torch {hw.get('torch_version', '')}, "
        f"sidecar {hw.get('sidecar_version', '')}",
        f"pid        {hw.get('pid', 0)}",
    ]
    return "\n".join(lines)
