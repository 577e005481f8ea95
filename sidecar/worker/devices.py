"""`--device auto|cpu|cuda|cuda:N|mps` -> a torch.device, or DEVICE_UNAVAILABLE saying what exists."""
from __future__ import annotations

import re

import torch

from sidecar.errors import DeviceUnavailable

_SPEC = re.compile(r"^(auto|cpu|mps|cuda)(?::(\d+))?$")


def _cuda_count() -> int:
    if not torch.version.cuda:  # CPU build: never touch the CUDA runtime
        return 0
    try:
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        return 0


def _mps() -> bool:
    try:
        return bool(torch.backends.mps.is_available())
    except Exception:
        return False


def available_devices() -> list[str]:
    """Every device this process could use ("cpu" first). Queries CUDA: call it only when choosing one."""
    out = ["cpu"] + [f"cuda:{i}" for i in range(_cuda_count())]
    if _mps():
        out.append("mps")
    return out


def select_device(spec: str) -> torch.device:
    """The device for `spec`; `auto` prefers CUDA, then MPS, then the CPU."""
    text = (spec or "auto").strip().lower()
    m = _SPEC.match(text)
    if m is None:
        raise DeviceUnavailable(f"unknown device {spec!r}: use auto, cpu, cuda, cuda:N or mps",
                                device=str(spec), available=available_devices())
    kind, index = m.group(1), m.group(2)
    if kind == "cpu" and index is None:
        return torch.device("cpu")
    if kind == "auto" and index is None:
        if _cuda_count() > 0:
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("mps") if _mps() else torch.device("cpu")
    if kind == "cuda":
        n = _cuda_count()
        i = int(index) if index is not None else 0
        if i < n:
            return torch.device("cuda", i)
        why = ("this torch build has no CUDA" if not torch.version.cuda else
               "no CUDA device is visible" if n == 0 else f"only {n} CUDA device(s) are visible")
        raise DeviceUnavailable(f"device {text!r} is not available: {why}", device=text,
                                available=available_devices())
    if kind == "mps" and index is None and _mps():
        return torch.device("mps")
    raise DeviceUnavailable(f"device {text!r} is not available", device=text, available=available_devices())
