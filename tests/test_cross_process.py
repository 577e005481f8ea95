"""Cross-process: a real child process decodes descriptors made by this (parent) process.

The child is a small JSON-lines server on stdin/stdout with its own MappingCache: the parent sends a
descriptor, the child maps it and answers with what it saw (or writes into it). Nothing but the
descriptor crosses the pipe.
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch

from sidecar._native import Segment
from sidecar.dataplane.arrow import table_to_ref
from sidecar.dataplane.segments import unlink_segment
from sidecar.dataplane.tensors import to_ref
from sidecar.protocol.refs import ArrowRef, ShmStorage, TensorRef

CHILD = r"""
import json, sys
import numpy as np
from sidecar.dataplane.mapcache import MappingCache
from sidecar.protocol.refs import ArrowRef, ShmStorage, TensorRef
from sidecar.dataplane.tensors import to_numpy, to_torch
from sidecar.dataplane.arrow import ref_to_table
from sidecar.errors import SidecarError

cache = MappingCache()

def tensor_ref(d):
    st = ShmStorage(**d["storage"])
    strides = tuple(d["strides"]) if d["strides"] is not None else None
    return TensorRef(d["dtype"], tuple(d["shape"]), st, strides)

for line in sys.stdin:
    msg = json.loads(line)
    try:
        if msg["op"] == "read":
            ref = tensor_ref(msg["ref"])
            arr = to_numpy(ref, cache, input_index=msg.get("input_index"))
            seg = cache.get(ref.storage.name, ref.storage.inode)
            out = {"values": arr.tolist(), "pid_ok": True,
                   "in_mapping": arr.size == 0 or seg.address <= arr.__array_interface__["data"][0] < seg.address + seg.size}
        elif msg["op"] == "read_torch":
            t = to_torch(tensor_ref(msg["ref"]), cache)
            out = {"values": t.float().tolist(), "dtype": str(t.dtype)}
        elif msg["op"] == "write":
            arr = to_numpy(tensor_ref(msg["ref"]), cache, writable=True)
            arr[...] = np.asarray(msg["values"], dtype=arr.dtype)
            out = {"written": int(arr.size)}
        elif msg["op"] == "arrow":
            d = msg["ref"]
            ref = ArrowRef(ShmStorage(**d["storage"]), d["num_rows"])
            table = ref_to_table(ref, cache)
            seg = cache.get(ref.storage.name, ref.storage.inode)
            addrs = [b.address for c in table.columns for ch in c.chunks for b in ch.buffers() if b is not None]
            out = {"rows": table.slice(0, 3).to_pylist(), "num_rows": table.num_rows,
                   "in_mapping": all(seg.address <= a < seg.address + seg.size for a in addrs)}
        else:
            out = {"unknown": msg["op"]}
    except SidecarError as err:
        out = {"error": err.to_dict()}
    print(json.dumps(out, default=str), flush=True)
"""


class Child:
    """The decoding child process; `ask` sends one message and returns its answer."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def ask(self, op: str, ref: TensorRef | ArrowRef, **extra: Any) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps({"op": op, "ref": asdict(ref), **extra}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"child died: {self.proc.stderr.read()}"
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.proc.stdout.close()
        self.proc.stderr.close()


@pytest.fixture(scope="module")
def child():
    c = Child()
    yield c
    c.close()
    assert c.proc.returncode == 0


def test_child_sees_parent_bytes(child, arena):
    block = arena.alloc(6 * 4)
    host = block.ndarray(np.int32, (2, 3))
    host[:] = [[1, 2, 3], [4, 5, 6]]
    ref, extra = to_ref(host, arena)
    assert extra is None
    got = child.ask("read", ref)
    assert got.get("values") == [[1, 2, 3], [4, 5, 6]] and got["in_mapping"], got
    host[1, 2] = 60  # same memory: a later read sees the change, no re-send of bytes
    assert child.ask("read", ref)["values"] == [[1, 2, 3], [4, 5, 60]]
    block.release()


def test_child_writes_parent_sees(child, arena):
    block = arena.alloc(4 * 8)
    host = block.ndarray(np.float64, (4,))
    host[:] = 0
    ref, _ = to_ref(host, arena)
    assert child.ask("write", ref, values=[1.5, 2.5, 3.5, 4.5]) == {"written": 4}
    assert host.tolist() == [1.5, 2.5, 3.5, 4.5]
    block.release()


def test_child_writes_through_strided_view(child, arena):
    block = arena.alloc(8 * 8 * 4)
    host = block.ndarray(np.float32, (8, 8))
    host[:] = 0
    ref, _ = to_ref(host[1::3, ::2].T, arena)  # shape (4, 3), transposed and stepped
    assert ref.strides is not None
    child.ask("write", ref, values=np.arange(12, dtype=np.float32).reshape(4, 3).tolist())
    assert host[1::3, ::2].T.tolist() == np.arange(12, dtype=np.float32).reshape(4, 3).tolist()
    assert float(host.sum()) == float(np.arange(12).sum())  # nothing outside the view was touched
    assert child.ask("read", ref)["values"] == host[1::3, ::2].T.tolist()
    block.release()


def test_child_reads_bfloat16_via_torch(child, arena):
    block = arena.alloc(5 * 2)
    host = torch.from_numpy(block.ndarray(np.int16, (5,))).view(torch.bfloat16)
    host.copy_(torch.tensor([1.0, -2.5, 0.15625, 3e38, float("inf")], dtype=torch.bfloat16))
    ref, _ = to_ref(host, arena)
    got = child.ask("read_torch", ref)
    assert got["dtype"] == "torch.bfloat16"
    assert got["values"] == host.float().tolist()
    block.release()


def test_child_reads_arrow_table_zero_copy(child, arena):
    table = pa.table({"n": pa.array(np.arange(10_000)), "s": pa.array([None, "b", "c"] * 3333 + ["z"]),
                      "l": pa.array([[1, 2], None, []] * 3333 + [[9]])})
    ref, block = table_to_ref(table, arena, inline_threshold=0)
    got = child.ask("arrow", ref)
    assert got["num_rows"] == 10_000 and got["in_mapping"]
    assert got["rows"] == table.slice(0, 3).to_pylist()
    block.release()


def test_bad_descriptors_are_structured_errors_and_child_stays_up(child, arena):
    block = arena.alloc(64)
    block.ndarray(np.uint8, (64,))[:] = 7
    good, _ = to_ref(block.ndarray(np.uint8, (64,)), arena)
    bad = TensorRef("uint8", (2**20,), ShmStorage(good.storage.name, 0, 2**20, good.storage.inode))
    err = child.ask("read", bad, input_index=2)["error"]
    assert err["kind"] == "INVALID_TENSOR_REF" and err["field"] == "nbytes" and err["input_index"] == 2
    trick = TensorRef("uint8", (1,), ShmStorage("/sc-../../etc/passwd", 0, 1))
    assert child.ask("read", trick)["error"]["field"] == "name"
    assert child.ask("read", good)["values"] == [7] * 64  # still serving
    assert child.proc.poll() is None
    block.release()


def test_recreated_name_is_not_served_stale(child):
    """Unlink a segment the child has mapped, re-create the same name with other bytes: descriptors
    of the new segment (its inode, or inode unknown) never get the child's old mapping."""
    name = "/sc-testxproc-1-00000000deadbeef"
    old = Segment.create(name, 4096, True)
    np.frombuffer(old, np.uint8)[:4] = [1, 1, 1, 1]
    old_ref = TensorRef("uint8", (4,), ShmStorage(name, 0, 4, old.inode))
    assert child.ask("read", old_ref)["values"] == [1, 1, 1, 1]
    old.close()
    unlink_segment(name)
    new = Segment.create(name, 4096, True)
    try:
        np.frombuffer(new, np.uint8)[:4] = [2, 2, 2, 2]
        assert new.inode != old.inode
        new_ref = TensorRef("uint8", (4,), ShmStorage(name, 0, 4, new.inode))
        assert child.ask("read", new_ref)["values"] == [2, 2, 2, 2]
        unknown = TensorRef("uint8", (4,), ShmStorage(name, 0, 4, 0))
        assert child.ask("read", unknown)["values"] == [2, 2, 2, 2]
    finally:
        new.close()
        unlink_segment(name)
    # The segment is gone now: the child answers with a structured error, not a crash.
    gone = TensorRef("uint8", (4,), ShmStorage(name, 0, 4, 0))
    assert child.ask("read", gone)["error"]["field"] == "name"
