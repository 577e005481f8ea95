"""Hardware detection on this machine, checked against the wire's Hardware message, and device choice."""
from __future__ import annotations

import os
import platform
import re

import pytest
import torch
from google.protobuf import json_format

from sidecar.errors import DeviceUnavailable
from sidecar.v1 import sidecar_pb2
from sidecar.worker import hardware
from sidecar.worker.devices import available_devices, select_device

HAS_CUDA = torch.cuda.is_available()


def _proc_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def test_detect_matches_the_wire_message_field_for_field():
    hw = hardware.detect("cpu")
    msg = json_format.ParseDict(hw, sidecar_pb2.Hardware())  # raises on any field the proto lacks
    assert msg.cpu.threads == hw["cpu"]["threads"] and msg.device == "cpu"
    names = {f.name for f in sidecar_pb2.Hardware.DESCRIPTOR.fields}
    assert set(hw) == names  # and nothing of the message is left out


def test_cpu_figures_are_sane():
    cpu = hardware.detect("cpu")["cpu"]
    assert cpu["model"] and cpu["arch"] == platform.machine()
    assert 1 <= cpu["cores"] <= cpu["threads"] == (os.cpu_count() or cpu["threads"])
    assert 0 < cpu["memory_available"] <= cpu["memory_total"]
    flags = _proc_flags()
    for f in ("avx", "avx2", "fma", "avx512f", "sse4_2"):
        assert (f in cpu["flags"]) == (f in flags)
    if "asimd" in flags:
        assert "neon" in cpu["flags"]


@pytest.mark.skipif(HAS_CUDA, reason="checks how absent CUDA is reported; this machine has CUDA")
def test_absent_cuda_is_reported_with_a_reason_without_initialising_it():
    hw = hardware.detect("cpu")
    assert hw["cuda"]["available"] is False and hw["cuda"]["devices"] == []
    assert hw["cuda"]["reason"]
    assert hw["mps_available"] is (platform.system() == "Darwin" and hw["mps_available"])
    assert not torch.cuda.is_initialized()
    text = hardware.format_text(hw)
    assert "cuda       absent: " + hw["cuda"]["reason"] in text and hw["cpu"]["model"] in text


def test_identity_is_stable_and_other_fields_filled():
    a, b = hardware.detect("cpu"), hardware.detect("cpu")
    assert a["identity"] == b["identity"] and re.fullmatch(r"[0-9a-f]{16}", a["identity"])
    assert a["pid"] == os.getpid() and a["hostname"] and a["platform"]
    assert a["python_version"] == platform.python_version() and a["torch_version"] == torch.__version__
    assert a["sidecar_version"]


def test_cuda_visible_devices_filters_and_renumbers(monkeypatch):
    devs = [{"index": i, "uuid": f"GPU-{c * 8}-0000", "name": f"gpu{i}"} for i, c in enumerate("abc")]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,0")
    got, reason = hardware._visible(devs)
    assert [(d["index"], d["name"]) for d in got] == [(0, "gpu2"), (1, "gpu0")] and reason == ""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-bbbb")
    assert [d["name"] for d in hardware._visible(devs)[0]] == ["gpu1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,7,2")  # the runtime stops at the first invalid entry
    assert [d["name"] for d in hardware._visible(devs)[0]] == ["gpu1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    got, reason = hardware._visible(devs)
    assert got == [] and "hides every GPU" in reason
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert hardware._visible(devs) == (devs, "")


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_gpus_are_listed_where_present():
    hw = hardware.detect("cuda:0")
    cuda = hw["cuda"]
    assert cuda["available"] and len(cuda["devices"]) == torch.cuda.device_count()
    d = cuda["devices"][0]
    assert d["uuid"].startswith("GPU-") and d["memory_total"] >= d["memory_free"] > 0
    assert (d["compute_major"], d["compute_minor"]) == torch.cuda.get_device_capability(0)
    json_format.ParseDict(hw, sidecar_pb2.Hardware())


def test_select_device():
    assert select_device("cpu") == torch.device("cpu")
    assert select_device("auto").type == ("cuda" if HAS_CUDA else "cpu")
    assert available_devices()[0] == "cpu"
    for bad in ("tpu", "cuda:99", "cpu:1", "") if HAS_CUDA else ("tpu", "cuda", "cuda:0", "cpu:1"):
        if bad == "":
            continue
        with pytest.raises(DeviceUnavailable) as info:
            select_device(bad)
        assert info.value.device and "cpu" in info.value.available
