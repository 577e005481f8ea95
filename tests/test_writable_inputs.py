"""Inputs are the caller's (DESIGN memory rule 8): an op that writes into an input in place never
crashes the worker and never changes the caller's memory.

A CPU worker decodes inputs from private copy-on-write mappings (checked out for one call at a time);
a mapping an op wrote into is dropped after the call, so later calls see the host's current bytes.
Real segments, /proc/self/pagemap, real workers and concurrent calls.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sidecar import _native
from sidecar._native import Segment
from sidecar.dataplane import tensors
from sidecar.dataplane.mapcache import CallMappings, MappingCache
from sidecar.dataplane.names import make_name
from sidecar.host import Client
from sidecar.protocol.refs import ShmStorage, TensorRef
from tests.workers import long_lived_run, long_lived_worker, session_run

MIB = 1 << 20
OPS = ("--ops", "tests.dataplane_ops_module")


@pytest.fixture
def host_segment():
    """A 1 MiB host segment of float32 0, 1, 2, ... (unlinked after the test)."""
    name = make_name(session_run("tcow"))
    seg = Segment.create(name, MIB)
    np.frombuffer(seg, np.float32)[:] = np.arange(MIB // 4, dtype=np.float32)
    yield seg
    seg.close()
    try:
        _native.unlink(name)
    except FileNotFoundError:
        pass


def test_private_mapping_is_copy_on_write_and_counts_written_pages(host_segment):
    seg = host_segment
    cow = Segment.open(seg.name, private=True)
    assert cow.private and cow.writable and cow.private_pages() == 0
    view = np.frombuffer(cow, np.float32)
    assert view.sum() == np.arange(MIB // 4, dtype=np.float64).sum() and cow.private_pages() == 0  # reads copy nothing
    view[1024:2048] *= 2  # 4 KiB: exactly one page
    assert cow.private_pages() == 1 and cow.private_pages(offset=8192) == 0
    assert np.frombuffer(seg, np.float32)[1024] == 1024  # the host's memory is untouched
    np.frombuffer(seg, np.float32)[0] = -5  # an unwritten page shows the host's current bytes
    assert view[0] == -5 and view[1024] == 2048
    assert Segment.open(seg.name).private_pages() == 0  # shared mappings never hold private pages
    with pytest.raises(ValueError, match="copy-on-write"):
        Segment.open(seg.name, writable=True, private=True)
    del view
    cow.close()


def test_call_mappings_lend_one_mapping_per_call_and_drop_written_ones(host_segment):
    seg = host_segment
    cache = MappingCache()
    ref = TensorRef("float32", (MIB // 4,), ShmStorage(seg.name, 0, MIB, seg.inode))

    first, second = CallMappings(cache), CallMappings(cache)
    a = tensors.to_torch(ref, first)
    b = tensors.to_torch(ref, first)  # the same segment twice in one call: one mapping
    concurrent = tensors.to_torch(ref, second)  # another call at the same time: its own mapping
    assert a.data_ptr() == b.data_ptr() != concurrent.data_ptr()
    a.mul_(2)  # no SIGSEGV: a private page
    assert concurrent[1].item() == 1 and b[1].item() == 2 and np.frombuffer(seg, np.float32)[1] == 1
    assert first.scan() == {seg.name} and second.scan() == set()
    first.close()
    second.close()
    assert cache.stats().dropped_dirty == 1 and cache.stats().entries == 1  # only the clean one is kept

    third = CallMappings(cache)
    again = tensors.to_torch(ref, third)
    assert again.data_ptr() == concurrent.data_ptr()  # the clean mapping is reused ...
    assert again[1].item() == 1  # ... and never shows another call's writes
    third.close()
    del a, b, concurrent, again
    cache.clear()


@pytest.fixture(scope="module")
def worker():
    for run in long_lived_run():
        yield from long_lived_worker(run, *OPS)


@pytest.fixture
def client(worker):
    with Client(worker.address) as c:
        yield c


def test_an_op_writing_into_its_input_gets_a_private_copy(worker, client):
    x = client.empty(MIB // 4, "float32")  # 1 MiB in the host's arena: sent as a descriptor, no copy
    x[:] = np.arange(MIB // 4, dtype=np.float32)
    y = client.call("dp.mul2_inplace", x)
    np.testing.assert_array_equal(y, 2 * np.arange(MIB // 4, dtype=np.float32))
    np.testing.assert_array_equal(x, np.arange(MIB // 4, dtype=np.float32))  # the caller's memory
    assert worker.alive() and client.health() == "SERVING"
    x[:] = 7.0  # the host rewrites the same segment: the next call sees the new bytes
    np.testing.assert_array_equal(client.call("dp.mul2_inplace", x), np.full(MIB // 4, 14.0, np.float32))
    assert client.call("sum", x) == 7.0 * (MIB // 4)
    np.testing.assert_array_equal(x, np.full(MIB // 4, 7.0, np.float32))
    assert worker.alive()


def test_torch_inputs_and_aliasing_clients_get_the_op_result_not_their_input(client):
    x = client.empty(MIB // 4, "float32", torch=True)
    x.copy_(torch.arange(MIB // 4, dtype=torch.float32))
    # allow_alias (the client's default) lets an output that views an input come back as that input:
    # an op that wrote into its input must not be answered with the (unchanged) host memory.
    y = client.call("dp.mul2_inplace", x)
    assert torch.equal(y, 2 * torch.arange(MIB // 4, dtype=torch.float32))
    assert torch.equal(x, torch.arange(MIB // 4, dtype=torch.float32))
    assert torch.equal(client.call("identity", x), x)  # an op that writes nothing still aliases fine


def test_concurrent_calls_on_one_segment_do_not_see_each_others_writes(client, tmp_path, run_threads):
    x = client.empty(MIB // 4, "float32")
    x[:] = 1.0
    results: dict[str, float] = {}

    def call(op: str) -> None:
        results[op] = client.call(op, x, sync_dir=str(tmp_path), timeout=60)

    # The writer fills its input with -1 and waits until the reader has summed the same segment.
    errors = run_threads(call, ["dp.write_then_wait", "dp.sum_after_write"])
    assert not errors, errors
    assert results == {"dp.write_then_wait": -float(MIB // 4), "dp.sum_after_write": float(MIB // 4)}
    np.testing.assert_array_equal(x, np.ones(MIB // 4, np.float32))
