"""CUDA IPC between two real processes without the sidecar around it: this process exports,
a peer process (tests/gpu/ipc_peer.py) opens, and the other way round. Isolates the C extension and
sidecar.dataplane.cuda_ipc from gRPC and the worker.
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from sidecar import _cudaipc
from sidecar.dataplane import cuda_ipc, segments
from sidecar.errors import InvalidTensorRef
from sidecar.protocol.refs import CudaIpcStorage, TensorRef
from tests.gpu.ipc_peer import ref_from_json, ref_to_json

ROOT = Path(__file__).resolve().parents[2]
PEER = ROOT / "tests" / "gpu" / "ipc_peer.py"


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra}


class Peer:
    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(PEER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=_env(), cwd=ROOT)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.strip() == "READY", f"peer did not start: {line!r}"

    def ask(self, cmd: str, ref: TensorRef | None = None, **kw: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        msg = {"cmd": cmd, **kw}
        if ref is not None:
            msg["ref"] = ref_to_json(ref)
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"peer died (exit {self.proc.poll()})"
        return json.loads(line)

    def close(self) -> None:
        try:
            self.ask("drop")
            assert self.proc.stdin is not None
            self.proc.stdin.write('{"cmd": "quit"}\n')
            self.proc.stdin.close()
            self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture(scope="module")
def peer() -> Iterator[Peer]:
    p = Peer()
    yield p
    p.close()


def _sum(t: torch.Tensor) -> float:
    return float(t.double().sum().item())


def test_device_uuid_matches_torch_and_nvml() -> None:
    uuid = cuda_ipc.device_uuid(0)
    assert uuid.startswith("GPU-") and len(uuid) == 40, uuid
    torch_uuid = str(torch.cuda.get_device_properties(0).uuid)
    print("driver:", uuid, "torch:", torch_uuid)
    if len(torch_uuid) == 36:  # torch prints it without the "GPU-" prefix
        assert uuid == "GPU-" + torch_uuid
    import pynvml

    pynvml.nvmlInit()
    try:
        nv = pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(0))
        nv = nv.decode() if isinstance(nv, bytes) else nv
    finally:
        pynvml.nvmlShutdown()
    if "CUDA_VISIBLE_DEVICES" not in os.environ:
        assert nv == uuid
    assert cuda_ipc.ordinal_of_uuid(uuid) == 0


def test_peer_reads_and_writes_the_same_memory(peer: Peer) -> None:
    t = torch.randn(1 << 20, device="cuda")  # 4 MiB
    ref = cuda_ipc.tensor_to_ref(t)
    s = ref.storage
    assert isinstance(s, CudaIpcStorage) and len(s.handle) == 64
    assert s.nbytes == t.numel() * 4 and s.offset + s.nbytes <= s.alloc_nbytes
    assert s.device_uuid == cuda_ipc.device_uuid(0)
    got = peer.ask("sum", ref)
    assert got["sum"] == pytest.approx(_sum(t), rel=1e-9) and got["device"] == "cuda:0"
    before = t.clone()
    torch.cuda.synchronize()  # the clone must be done before the peer writes
    assert peer.ask("mul2", ref) == {"ok": True}
    torch.cuda.synchronize()
    assert torch.equal(t, before * 2)  # the peer wrote into our memory


def test_exporting_one_allocation_twice_gives_the_same_handle() -> None:
    # The worker caches opened handles by their bytes: a stable handle is what makes hits possible.
    t = torch.ones(1000, device="cuda")
    a, b = cuda_ipc.tensor_to_ref(t), cuda_ipc.tensor_to_ref(t)
    assert a.storage.handle == b.storage.handle  # type: ignore[union-attr]


def test_two_tensors_in_one_allocation_share_one_mapping(peer: Peer) -> None:
    base = torch.arange(2 * 4096, dtype=torch.float32, device="cuda")
    lo, hi = base[:4096], base[4096:]
    rl, rh = cuda_ipc.tensor_to_ref(lo), cuda_ipc.tensor_to_ref(hi)
    assert rl.storage.handle == rh.storage.handle  # type: ignore[union-attr]
    assert rh.storage.offset - rl.storage.offset == 4096 * 4  # type: ignore[union-attr]
    # Separate small tensors of the caching allocator usually share one 2 MiB block, too.
    x, y = torch.ones(256, device="cuda"), torch.full((256,), 2.0, device="cuda")
    rx, ry = cuda_ipc.tensor_to_ref(x), cuda_ipc.tensor_to_ref(y)
    s0 = peer.ask("stats")
    assert peer.ask("hold", rl) == {"held": 1}
    assert peer.ask("sum", rh)["sum"] == _sum(hi)
    s1 = peer.ask("stats")
    assert s1["opens"] == s0["opens"] + 1 and s1["hits"] == s0["hits"] + 1  # opened once, then cached
    assert s1["open_handles"] == s0["open_handles"] + 1
    peer.ask("drop")
    s2 = peer.ask("stats")
    assert s2["open_handles"] == s0["open_handles"] and s2["closes"] == s0["closes"] + 1
    assert peer.ask("sum", rx)["sum"] == 256.0 and peer.ask("sum", ry)["sum"] == 512.0
    print("small tensors in one block:", rx.storage.handle == ry.storage.handle)  # type: ignore[union-attr]


def test_last_tensor_closes_the_handle(peer: Peer) -> None:
    t = torch.ones(4096, device="cuda")
    ref = cuda_ipc.tensor_to_ref(t)
    s0 = peer.ask("stats")
    peer.ask("sum", ref)  # opened, used, the tensor dies at once
    s1 = peer.ask("stats")
    assert s1["opens"] == s0["opens"] + 1 and s1["closes"] == s0["closes"] + 1
    assert s1["open_handles"] == s0["open_handles"] and s1["close_errors"] == 0


@pytest.mark.parametrize("case", ["offset_past_end", "nbytes_past_end"])
def test_region_beyond_the_opened_allocation_is_refused(peer: Peer, case: str) -> None:
    t = torch.ones(1024, device="cuda")
    ref = cuda_ipc.tensor_to_ref(t)
    s = ref.storage
    assert isinstance(s, CudaIpcStorage)
    # alloc_nbytes=0 ("unknown") so that only the receiver's own check of the opened allocation stops it
    if case == "offset_past_end":
        bad = replace(s, offset=s.alloc_nbytes + 4096, alloc_nbytes=0)
        field = "offset"
    else:
        bad = replace(s, offset=s.alloc_nbytes - 16, alloc_nbytes=0)
        field = "nbytes"
    before = peer.ask("stats")
    got = peer.ask("open", replace(ref, storage=bad))
    assert got["error"]["kind"] == "INVALID_TENSOR_REF" and got["error"]["field"] == field
    assert "CUDA allocation" in got["error"]["message"]
    after = peer.ask("stats")
    assert after["open_handles"] == before["open_handles"]  # the refused open was closed again
    assert after["opens"] == before["opens"] + 1 and after["closes"] == before["closes"] + 1


def test_a_handle_that_names_nothing_is_an_invalid_ref(peer: Peer) -> None:
    ref = cuda_ipc.tensor_to_ref(torch.ones(16, device="cuda"))
    junk = replace(ref.storage, handle=bytes(range(64)))  # type: ignore[type-var]
    got = peer.ask("open", replace(ref, storage=junk))
    assert got["error"]["kind"] == "INVALID_TENSOR_REF" and got["error"]["field"] == "handle"
    assert "cuIpcOpenMemHandle" in got["error"]["message"]


def test_strided_empty_and_dtypes(peer: Peer) -> None:
    m = torch.randn(64, 48, device="cuda")
    tr = m.t()  # non-contiguous
    ref = cuda_ipc.tensor_to_ref(tr)
    assert ref.strides == (4, 48 * 4)
    assert peer.ask("sum", ref)["sum"] == pytest.approx(_sum(m), rel=1e-9)
    empty = cuda_ipc.tensor_to_ref(torch.empty(0, 3, device="cuda"))
    assert empty.storage.nbytes == 0 and empty.storage.handle == cuda_ipc.EMPTY_HANDLE  # type: ignore[union-attr]
    assert peer.ask("sum", empty)["sum"] == 0.0
    for dtype in (torch.float16, torch.bfloat16, torch.int64, torch.bool, torch.complex64, torch.uint8):
        x = (torch.arange(100, device="cuda") % 7).to(dtype)
        assert peer.ask("sum", cuda_ipc.tensor_to_ref(x))["sum"] == pytest.approx(_sum(x.real if x.is_complex() else x)), dtype


def test_own_handle_comes_back_as_a_view_of_our_tensor() -> None:
    t = torch.randn(1000, device="cuda")
    ref = cuda_ipc.tensor_to_ref(t[10:20])
    before = cuda_ipc.cache_stats()
    back = cuda_ipc.ref_to_tensor(ref)
    assert back.data_ptr() == t[10:20].data_ptr() and torch.equal(back, t[10:20])
    after = cuda_ipc.cache_stats()
    assert after["own_handles"] == before["own_handles"] + 1 and after["opens"] == before["opens"]


def test_peer_memory_reexported_by_its_original_handle(peer: Peer) -> None:
    # The peer maps our tensor and describes it again: it must hand back our own handle (a mapping
    # cannot be re-exported), and we resolve that to our tensor without opening anything.
    t = torch.randn(5000, device="cuda")
    ref = cuda_ipc.tensor_to_ref(t)
    got = peer.ask("reexport", ref)
    back_ref = ref_from_json(got["ref"])
    assert back_ref.storage.handle == ref.storage.handle  # type: ignore[union-attr]
    assert back_ref.storage.offset == ref.storage.offset  # type: ignore[union-attr]
    back = cuda_ipc.ref_to_tensor(back_ref)
    assert back.data_ptr() == t.data_ptr()
    assert peer.ask("stats")["reexports"] >= 1
    peer.ask("drop")


def test_we_open_the_peers_memory(peer: Peer) -> None:
    got = peer.ask("export_new", n=12345)
    ref = ref_from_json(got["ref"])
    before = cuda_ipc.cache_stats()
    x = cuda_ipc.ref_to_tensor(ref)
    assert torch.equal(x, torch.arange(12345, dtype=torch.float32, device="cuda"))
    y = cuda_ipc.ref_to_tensor(ref)  # second tensor over the same handle: from the cache
    mid = cuda_ipc.cache_stats()
    assert mid["opens"] == before["opens"] + 1 and mid["hits"] == before["hits"] + 1
    del x, y
    gc.collect()
    after = cuda_ipc.cache_stats()
    assert after["closes"] == before["closes"] + 1 and after["open_handles"] == before["open_handles"]
    peer.ask("drop")


def test_expandable_segments_memory_is_refused_with_advice() -> None:
    code = textwrap.dedent("""
        import json, torch
        from sidecar.dataplane import cuda_ipc
        from sidecar.errors import InvalidTensorRef
        t = torch.ones(64 << 20, device='cuda')
        try:
            cuda_ipc.tensor_to_ref(t); print(json.dumps({'error': None}))
        except InvalidTensorRef as e:
            print(json.dumps({'error': e.to_dict()}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env=_env(PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True"))
    assert proc.returncode == 0, proc.stderr
    err = json.loads(proc.stdout.strip().splitlines()[-1])["error"]
    assert err is not None, "memory from expandable segments was exported (expected a refusal)"
    assert err["kind"] == "INVALID_TENSOR_REF" and "expandable_segments:False" in err["message"]


def test_pinned_arena_segment() -> None:
    seg = segments.create_segment(64 << 20, "gpupin")
    try:
        assert cuda_ipc.register_host_memory(seg) is True
        host = torch.frombuffer(memoryview(seg), dtype=torch.uint8)
        host.fill_(7)
        dev = host.to("cuda", non_blocking=True)
        torch.cuda.synchronize()
        assert int(dev[::4096].sum().item()) == 7 * (host.numel() // 4096)
        assert host.is_pinned()  # torch sees the registration
        del host
        assert cuda_ipc.unregister_host_memory(seg) is True
        assert cuda_ipc.unregister_host_memory(seg) is False
    finally:
        seg.close()
        segments.unlink_segment(seg.name)


def test_bad_inputs_fail_cleanly() -> None:
    with pytest.raises(InvalidTensorRef) as ei:
        cuda_ipc.ref_to_tensor(TensorRef("float32", (4,), CudaIpcStorage(b"x" * 60, 0, 16)))
    assert ei.value.field == "handle"
    with pytest.raises(_cudaipc.CudaError) as ce:
        _cudaipc.export(0x1234)  # not a device pointer
    assert ce.value.name.startswith("CUDA_ERROR") and "0x1234" in str(ce.value)
