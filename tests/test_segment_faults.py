"""Hostile or changing segments never stall or kill a worker, and the cache never pins dead memory.

- A segment truncated after the worker mapped it is checked on every use (one stat): the next call
  gets INVALID_TENSOR_REF instead of a SIGBUS (both transports, inode given or not). A truncate
  *during* an op still raises SIGBUS; the worker then names the segment on stderr and the pool's
  WORKER_CRASHED says so.
- A FIFO (or anything but a regular file) under a valid segment name is refused at once.
- Mappings of segments their owner unlinked are dropped (on use, and by the janitor's sweep).
Real workers, real truncation, real FIFOs, real SIGBUS.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading

import grpc
import numpy as np
import pytest

from sidecar import _native
from sidecar.dataplane import segments, tensors
from sidecar.dataplane.mapcache import CallMappings, MappingCache
from sidecar.dataplane.names import make_name
from sidecar.errors import InvalidTensorRef, SidecarError, WorkerCrashed
from sidecar.etf import Atom as A
from sidecar.host import Client, Pool
from sidecar.protocol import grpc_codec
from sidecar.protocol.refs import ShmStorage, TensorRef
from sidecar.v1 import sidecar_pb2_grpc as pb_grpc
from tests.test_stdio_transport import PortClient, inline
from tests.workers import ROOT, long_lived_run, long_lived_worker, run_id, session_run, wait_until

MIB = 1 << 20
RUN = session_run("tsegfault")


def shm_path(name: str) -> str:
    return "/dev/shm/" + name.lstrip("/")


@pytest.fixture
def made():
    """made(nbytes) -> a host segment of float32 ones; every one is unlinked after the test."""
    segs: list[_native.Segment] = []

    def make(nbytes: int = MIB) -> _native.Segment:
        seg = segments.create_segment(nbytes, RUN)
        np.frombuffer(seg, np.float32)[:] = 1.0
        segs.append(seg)
        return seg

    yield make
    for seg in segs:
        seg.close()
        segments.unlink_segment(seg.name)


def ref_of(seg: _native.Segment, inode: bool = True, nbytes: int = MIB) -> TensorRef:
    return TensorRef("float32", (nbytes // 4,), ShmStorage(seg.name, 0, nbytes, seg.inode if inode else 0))


def truncate(seg: _native.Segment, size: int) -> None:
    """Truncate the host's segment; our own mapping goes first (touching it would be our SIGBUS)."""
    seg.close()
    os.truncate(shm_path(seg.name), size)


# ---------------------------------------------------------------------------------------------------
# in-process: the mapping cache


def test_truncated_segment_is_remapped_and_refused_not_a_sigbus(made):
    seg = made()
    for source in (MappingCache(), CallMappings(MappingCache())):
        view = tensors.to_numpy(ref_of(seg), source)
        assert view.sum() == MIB // 4
        del view
        if isinstance(source, CallMappings):
            source.close()
    cache, calls = MappingCache(), MappingCache()
    tensors.to_numpy(ref_of(seg), cache)
    held = CallMappings(calls)
    tensors.to_numpy(ref_of(seg), held)
    held.close()
    truncate(seg, 4096)
    for inode in (True, False):
        for source in (cache, CallMappings(calls)):
            with pytest.raises(InvalidTensorRef, match=r"past the end of segment .* \(4096 bytes\)") as ei:
                tensors.to_numpy(ref_of(seg, inode), source)
            assert ei.value.field == "nbytes"
    # What still fits in the file is served, from a mapping of the new size.
    small = tensors.to_numpy(ref_of(seg, nbytes=4096), cache)
    assert small.sum() == 1024 and cache.stats().dropped_stale >= 1
    del small
    cache.clear()
    calls.clear()


def test_unlinked_segments_are_dropped_on_use_and_by_the_sweep(made):
    cache = MappingCache()
    used, idle = made(65536), made(65536)
    for seg in (used, idle):
        tensors.to_numpy(ref_of(seg, nbytes=65536), cache)
        lent = CallMappings(cache)
        tensors.to_numpy(ref_of(seg, nbytes=65536), lent)
        lent.close()
    assert cache.stats().entries == 4  # a shared and a private mapping of each
    segments.unlink_segment(used.name)
    with pytest.raises(InvalidTensorRef, match="does not exist"):
        cache.get(used.name, used.inode)
    assert used.name not in cache and cache.stats().entries == 2
    segments.unlink_segment(idle.name)
    assert cache.sweep() == 2 and cache.stats().entries == 0  # nobody asked for it again
    with pytest.raises(InvalidTensorRef):
        CallMappings(cache).get(idle.name, idle.inode)


def test_default_cache_bound_is_a_share_of_dev_shm():
    total = segments.shm_usage()[1]
    assert MappingCache().max_bytes == total // 4
    assert MappingCache(shm_share=0.5).max_bytes == total // 2
    with pytest.raises(ValueError):
        MappingCache(shm_share=0)
    from sidecar.cli import build_parser
    from sidecar.worker.runtime import WorkerOptions, build_runtime

    args = build_parser().parse_args(["serve", "--map-cache-share", "10%"])
    rt = build_runtime(WorkerOptions(device="cpu", run_id=RUN, map_cache_share=args.map_cache_share))
    try:
        assert rt.cache.max_bytes == int(total * 0.1)
    finally:
        rt.close()


def fifo_name() -> str:
    """A valid segment name of this process with a FIFO behind it (the caller removes it)."""
    name = make_name(run_id())
    os.mkfifo(shm_path(name), 0o600)
    return name


def test_fifo_under_a_segment_name_is_refused_without_blocking():
    name = fifo_name()
    outcome: list[BaseException] = []

    def open_it() -> None:
        for attempt in (lambda: MappingCache().get(name), lambda: segments.open_segment(name),
                        lambda: CallMappings(MappingCache()).get(name)):
            try:
                attempt()
            except BaseException as exc:  # noqa: BLE001 - inspected below
                outcome.append(exc)

    t = threading.Thread(target=open_it, daemon=True)
    t.start()
    t.join(20)
    try:
        assert not t.is_alive(), "opening a FIFO blocked"
        assert len(outcome) == 3
        for exc in outcome:
            assert isinstance(exc, InvalidTensorRef) and exc.field == "name", exc
            assert "not a regular file" in exc.message
    finally:
        if t.is_alive():  # old behaviour: the open waits for a writer; give it one so the thread ends
            with open(shm_path(name), "wb"):
                pass
        os.unlink(shm_path(name))


# ---------------------------------------------------------------------------------------------------
# end to end


@pytest.fixture(scope="module")
def worker():
    for run in long_lived_run():
        yield from long_lived_worker(run)


@pytest.fixture
def stub(worker):
    with grpc.insecure_channel(f"{worker.address}") as channel:
        yield pb_grpc.SidecarStub(channel)


def execute(stub, op: str, *inputs, timeout: float = 30):
    """Run op over gRPC with raw descriptors; the structured error on failure."""
    try:
        return stub.Execute(grpc_codec.execute_request(op, list(inputs)), timeout=timeout)
    except grpc.RpcError as err:
        return grpc_codec.error_from_rpc(err, op)


def test_truncated_segment_over_grpc_is_an_invalid_ref_and_the_worker_lives(worker, stub, made):
    seg = made()
    ok = execute(stub, "sum", ref_of(seg))
    assert not isinstance(ok, SidecarError), ok
    (total,) = grpc_codec.result_from_response(ok).outputs  # a 0-d tensor, inline
    assert np.frombuffer(total.storage.data, np.float32)[0] == MIB // 4
    truncate(seg, 4096)
    for inode in (True, False):
        err = execute(stub, "sum", ref_of(seg, inode))
        assert isinstance(err, InvalidTensorRef) and err.field == "nbytes", err
        assert "4096 bytes" in err.message
    assert worker.alive()
    with Client(worker.address) as c:
        assert c.call("add", np.ones(4, np.float32), 1.0)[0] == 2.0


def test_truncated_segment_over_the_port_is_an_invalid_ref_and_the_worker_lives(made):
    port = PortClient()
    try:
        seg = made()

        def term(inode: bool) -> tuple:
            return (A("tensor"), {A("dtype"): "float32", A("shape"): [MIB // 4],
                                  A("shm"): {A("name"): seg.name, A("offset"): 0, A("nbytes"): MIB,
                                             A("inode"): seg.inode if inode else 0}})

        tag, _, result = port.request((A("call"), 1, "sum", [term(True)], {}))
        assert tag == "ok", result
        truncate(seg, 4096)
        for i, inode in enumerate((True, False)):
            tag, _, err = port.request((A("call"), 2 + i, "sum", [term(inode)], {}))
            assert tag == "error" and err[A("kind")] == A("invalid_tensor_ref") and err[A("field")] == b"nbytes"
        tag, _, result = port.request((A("call"), 9, "add", [inline(np.ones(4, np.float32)), 1.0], {}))
        assert tag == "ok" and port.proc.poll() is None, result
    finally:
        assert port.close() == 0


def test_fifo_refs_in_concurrent_calls_fail_at_once_and_health_stays_serving(worker, stub, run_threads):
    name = fifo_name()
    try:
        ref = TensorRef("float32", (4,), ShmStorage(name, 0, 16, 0))
        errors: list[SidecarError] = []

        def call(_: int) -> None:
            errors.append(execute(stub, "sum", ref, timeout=20))  # the old worker blocked here forever

        assert not run_threads(call, range(6))
        assert len(errors) == 6
        for err in errors:
            assert isinstance(err, InvalidTensorRef) and err.field == "name", err
            assert "not a regular file" in err.message
        with Client(worker.address) as c:
            assert c.health() == "SERVING"
            assert c.call("add", np.ones(4, np.float32), 1.0)[0] == 2.0
    finally:
        os.unlink(shm_path(name))


def deleted_mappings(pid: int, run: str) -> int:
    """Mappings in process `pid` of `run`'s segments whose file was unlinked."""
    with open(f"/proc/{pid}/maps") as f:
        return sum(f"/dev/shm/sc-{run}-" in line and line.rstrip().endswith("(deleted)") for line in f)


def test_segments_unlinked_by_their_host_do_not_stay_mapped_in_the_worker(worker, stub):
    run = run_id()  # the host side of the churn: 600 segments, each used once and then unlinked
    for _ in range(600):
        seg = segments.create_segment(65536, run)
        try:
            reply = execute(stub, "sum", ref_of(seg, nbytes=65536))
            assert not isinstance(reply, SidecarError), reply
        finally:
            seg.close()
            segments.unlink_segment(seg.name)
    wait_until(lambda: deleted_mappings(worker.pid, run) == 0)  # the janitor's sweep


# ---------------------------------------------------------------------------------------------------
# a truncate during an op: the SIGBUS names the segment


SIGBUS_SCRIPT = textwrap.dedent("""
    import os, sys
    from sidecar import _native
    from sidecar.dataplane import segments
    _native.install_sigbus_handler()
    seg = segments.create_segment(1 << 20, sys.argv[1])
    print(seg.name, flush=True)
    os.truncate("/dev/shm" + seg.name, 4096)
    memoryview(seg)[1 << 19]  # past the new end of the file
""")


@pytest.mark.parametrize("faulthandler", [False, True])
def test_sigbus_inside_a_segment_is_named_on_stderr(faulthandler):
    run = run_id()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PYTHONFAULTHANDLER", None)
    if faulthandler:
        env["PYTHONFAULTHANDLER"] = "1"
    proc = subprocess.run([sys.executable, "-c", SIGBUS_SCRIPT, run], capture_output=True, text=True, env=env,
                          timeout=60)
    name = proc.stdout.strip()
    try:
        assert proc.returncode == -signal.SIGBUS, proc.stderr
        line = f"inside segment {name} (mapped 1048576 bytes, file now 4096 bytes)"
        assert "sidecar: SIGBUS at 0x" in proc.stderr and line in proc.stderr, proc.stderr
        assert ("Fatal Python error: Bus error" in proc.stderr) == faulthandler  # chained to faulthandler
    finally:
        segments.unlink_segment(name)


def test_pool_reports_a_sigbus_naming_the_segment_truncated_during_an_op():
    # The op truncates the host segment its input lies in (the pool's copy of x), then reads it all.
    with Pool(1, device="cpu", run_id=run_id(), ops=["tests.dataplane_ops_module"], threads=1,
              env={**os.environ, "PYTHONPATH": str(ROOT)}) as pool:
        with pytest.raises(WorkerCrashed) as ei:
            pool.call("dp.truncate_then_sum", np.ones(MIB // 4, np.float32), size=4096)
        err = ei.value
        assert err.classification == "bus_error" and err.signal == signal.SIGBUS, err.fields
        named = f"inside segment /sc-{pool.run_id}-{os.getpid()}-"
        assert "sidecar: SIGBUS at 0x" in err.message and named in err.message, err.message
        assert "file now 4096 bytes" in err.message
        assert any(named in line for line in err.stderr_tail), err.stderr_tail
