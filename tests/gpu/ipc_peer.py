"""A second process for the direct CUDA IPC tests: no gRPC, no worker, only sidecar.dataplane.cuda_ipc.

Reads one JSON command per line on stdin, answers one JSON line on stdout:
  {"cmd": "sum", "ref": R}        -> {"sum": float64 sum, "ptr": data_ptr, "device": "cuda:N"}
  {"cmd": "mul2", "ref": R}       -> multiplies the shared tensor by 2 in place (then synchronises)
  {"cmd": "hold", "ref": R}       -> opens R and keeps the tensor;  {"cmd": "drop"} forgets them all
  {"cmd": "reexport", "ref": R}   -> opens R, keeps it, answers tensor_to_ref of it
  {"cmd": "export_new", "n": N}   -> a new float32 arange(N) of its own, kept, answered as a ref
  {"cmd": "open", "ref": R}       -> opens R, answers {"error": {...}} or {"ok": true}
  {"cmd": "stats"}                -> cuda_ipc.cache_stats()
Errors come back as {"error": SidecarError.to_dict() or {"kind": type, "message": ...}}.
"""
from __future__ import annotations

import gc
import json
import sys
from typing import Any

import torch

from sidecar.dataplane import cuda_ipc
from sidecar.errors import SidecarError
from sidecar.protocol.refs import CudaIpcStorage, TensorRef


def ref_to_json(ref: TensorRef) -> dict[str, Any]:
    s = ref.storage
    assert isinstance(s, CudaIpcStorage)
    return {"dtype": ref.dtype, "shape": list(ref.shape),
            "strides": None if ref.strides is None else list(ref.strides), "handle": s.handle.hex(),
            "offset": s.offset, "nbytes": s.nbytes, "device_index": s.device_index,
            "device_uuid": s.device_uuid, "alloc_nbytes": s.alloc_nbytes}


def ref_from_json(d: dict[str, Any]) -> TensorRef:
    storage = CudaIpcStorage(bytes.fromhex(d["handle"]), d["offset"], d["nbytes"], d["device_index"],
                             d["device_uuid"], d["alloc_nbytes"])
    strides = None if d["strides"] is None else tuple(d["strides"])
    return TensorRef(d["dtype"], tuple(d["shape"]), storage, strides)


def handle(cmd: dict[str, Any], held: list[torch.Tensor]) -> dict[str, Any]:
    op = cmd["cmd"]
    if op == "stats":
        gc.collect()
        return cuda_ipc.cache_stats()
    if op == "drop":
        n = len(held)
        held.clear()
        gc.collect()
        return {"dropped": n}
    if op == "export_new":
        t = torch.arange(int(cmd["n"]), dtype=torch.float32, device="cuda")
        held.append(t)
        return {"ref": ref_to_json(cuda_ipc.tensor_to_ref(t))}
    x = cuda_ipc.ref_to_tensor(ref_from_json(cmd["ref"]))
    if op == "sum":
        return {"sum": float(x.double().sum().item()), "ptr": x.data_ptr(), "device": str(x.device)}
    if op == "mul2":
        x.mul_(2)
        torch.cuda.synchronize()
        return {"ok": True}
    if op == "hold":
        held.append(x)
        return {"held": len(held)}
    if op == "reexport":
        held.append(x)
        return {"ref": ref_to_json(cuda_ipc.tensor_to_ref(x))}
    if op == "open":
        return {"ok": True}
    raise ValueError(f"unknown command {op!r}")


def main() -> None:
    held: list[torch.Tensor] = []
    torch.cuda.init()
    print("READY", flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        if cmd.get("cmd") == "quit":
            break
        try:
            out = handle(cmd, held)
        except SidecarError as err:
            out = {"error": err.to_dict()}
        except Exception as err:  # report, keep serving
            out = {"error": {"kind": type(err).__name__, "message": str(err)}}
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
