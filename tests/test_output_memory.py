"""A worker's output memory: checked against its limits before anything is reserved, and never
showing an earlier call's bytes.

- `--memory-limit` covers shared-memory outputs: a segment that cannot be mapped under RLIMIT_AS (or
  does not fit in /dev/shm) is an OUT_OF_MEMORY naming the figures, with no segment ever created.
- An arena block handed out again is zero past its own `nbytes` up to where earlier users wrote.
Real workers, real arenas, inotify on /dev/shm.
"""
from __future__ import annotations

import ctypes
import os
import struct

import grpc
import numpy as np
import pytest

from sidecar.dataplane import segments
from sidecar.dataplane.arena import size_class
from sidecar.errors import OutOfMemory, SidecarError
from sidecar.protocol import grpc_codec
from sidecar.protocol.calls import Placement
from sidecar.v1 import sidecar_pb2 as pb
from sidecar.v1 import sidecar_pb2_grpc as pb_grpc
from tests.workers import long_lived_run, long_lived_worker, run_id, session_run, start_worker

OPS = ("--ops", "tests.dataplane_ops_module")
_IN_CREATE = 0x100


class ShmCreations:
    """Names of files created in /dev/shm while it lives (inotify: the kernel queues every event)."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0 or self._libc.inotify_add_watch(self.fd, b"/dev/shm", _IN_CREATE) < 0:
            raise OSError(ctypes.get_errno(), "inotify")

    def names(self) -> list[str]:
        out: list[str] = []
        while True:
            try:
                data = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return out
            pos = 0
            while pos < len(data):
                _, _, _, length = struct.unpack_from("iIII", data, pos)
                out.append(data[pos + 16:pos + 16 + length].rstrip(b"\0").decode())
                pos += 16 + length

    def close(self) -> None:
        os.close(self.fd)


def execute(address: str, op: str, **kw):
    with grpc.insecure_channel(address) as channel:
        try:
            return pb_grpc.SidecarStub(channel).Execute(grpc_codec.execute_request(op, [], kw.pop("attrs", {}), **kw),
                                                         timeout=60)
        except grpc.RpcError as err:
            return grpc_codec.error_from_rpc(err, op)


def test_memory_limit_refuses_a_shared_memory_output_before_reserving_it():
    run = run_id()
    watch = ShmCreations()
    try:
        with start_worker("--device", "cpu", "--threads", "1", "--run-id", run, "--memory-limit", "256M",
                          *OPS) as w:
            watch.names()  # start-up is not what we look at
            n = (512 << 20) // 4  # a 512 MiB output, from a 4-byte (stride-0) tensor
            err = execute(w.address, "dp.broadcast", attrs={"n": n}, placement=Placement.SHM)
            assert isinstance(err, OutOfMemory), err
            assert err.device == "cpu" and err.requested_bytes == size_class(4 * n), err.fields
            assert 0 <= err.free_bytes <= 256 << 20 and err.total_bytes > err.free_bytes
            assert "address-space limit" in err.message and "nothing was reserved" in err.message
            assert not [name for name in watch.names() if name.startswith(f"sc-{run}-")]  # never created
            small = execute(w.address, "dp.fill", attrs={"n": 1 << 20, "value": 3}, placement=Placement.SHM)
            assert not isinstance(small, SidecarError), small  # the worker still serves what fits
            with grpc.insecure_channel(w.address) as channel:
                pb_grpc.SidecarStub(channel).Release(pb.ReleaseRequest(leases=list(small.leases)), timeout=30)
            assert w.alive()
    finally:
        watch.close()


def test_a_segment_bigger_than_free_dev_shm_is_refused_before_it_is_created():
    free, total = segments.shm_usage()
    run = session_run("tshmfree")
    watch = ShmCreations()
    try:
        with pytest.raises(OutOfMemory) as ei:
            segments.create_segment(free + (1 << 30), run)
        err = ei.value
        assert err.device == "shm" and err.requested_bytes == free + (1 << 30) and err.total_bytes == total
        assert not [name for name in watch.names() if name.startswith(f"sc-{run}-")]
    finally:
        watch.close()


def test_reused_block_is_zero_past_its_nbytes(arena):
    cap = size_class(1 << 20 | 1)  # 1.25 MiB: requests of 1 MiB + 1 .. 1.25 MiB share it
    big = arena.alloc(cap)
    big.ndarray(np.uint8, cap)[:] = 0xAB
    name = big.name
    big.release()
    small = arena.alloc((1 << 20) + 8)
    assert small.name == name  # the same warm segment
    whole = np.frombuffer(small.segment, np.uint8)
    assert (whole[small.nbytes:] == 0).all() and (whole[:small.nbytes] == 0xAB).all()
    small.release()


@pytest.fixture(scope="module")
def worker():
    for run in long_lived_run():
        yield from long_lived_worker(run, *OPS)


def test_an_output_never_exposes_an_earlier_outputs_bytes(worker):
    """From a host: a big output, released, then a smaller one in the same size class reusing the
    segment: every byte of the segment past the small output's nbytes is zero."""
    cap = size_class(1 << 20 | 1)
    first = execute(worker.address, "dp.fill", attrs={"n": cap, "value": 0xAB}, placement=Placement.SHM)
    (ref,) = grpc_codec.result_from_response(first).outputs
    with grpc.insecure_channel(worker.address) as channel:
        stub = pb_grpc.SidecarStub(channel)
        stub.Release(pb.ReleaseRequest(leases=list(first.leases)), timeout=30)
        second = execute(worker.address, "dp.fill", attrs={"n": (1 << 20) + 8, "value": 0xCD},
                         placement=Placement.SHM)
        (ref2,) = grpc_codec.result_from_response(second).outputs
        assert ref2.storage.name == ref.storage.name  # the released block was reused
        with segments.open_segment(ref2.storage.name) as seg:  # what a host maps: the whole segment
            whole = np.frombuffer(seg, np.uint8)
            assert whole.size == cap
            assert (whole[:ref2.storage.nbytes] == 0xCD).all()
            assert (whole[ref2.storage.nbytes:] == 0).all(), "an earlier call's bytes are visible"
            del whole
        stub.Release(pb.ReleaseRequest(leases=list(second.leases)), timeout=30)
