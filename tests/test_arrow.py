"""Arrow tables as IPC streams in shared memory, read back zero-copy."""
from __future__ import annotations

import datetime as dt
import decimal

import numpy as np
import pyarrow as pa
import pytest

from sidecar.dataplane.arrow import ref_to_table, stream_size, table_to_ref
from sidecar.dataplane.mapcache import MappingCache
from sidecar.errors import InvalidArgument, InvalidTensorRef
from sidecar.protocol.refs import ArrowRef, InlineStorage, ShmStorage


def mixed_table(n: int) -> pa.Table:
    """Many column types, with nulls sprinkled through each."""
    rng = np.random.default_rng(7)
    nulls = rng.random(n) < 0.1
    start = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
    return pa.table({
        "i64": pa.array(np.arange(n), mask=nulls),
        "f32": pa.array(rng.random(n, dtype=np.float32)),
        "f16": pa.array(rng.random(n).astype(np.float16)),
        "flag": pa.array([None if m else bool(i % 2) for i, m in enumerate(nulls)]),
        "text": pa.array([None if m else f"row-{i}-é" for i, m in enumerate(nulls)]),
        "big_text": pa.array(["x" * (i % 17) for i in range(n)], type=pa.large_string()),
        "raw": pa.array([bytes([i % 256]) * (i % 5) for i in range(n)], type=pa.binary()),
        "ints": pa.array([None if i % 11 == 0 else list(range(i % 4)) for i in range(n)],
                         type=pa.list_(pa.int32())),
        "when": pa.array([start + dt.timedelta(seconds=i) for i in range(n)],
                         type=pa.timestamp("us", tz="UTC")),
        "day": pa.array([dt.date(2020, 1, 1) + dt.timedelta(days=i % 1000) for i in range(n)]),
        "money": pa.array([decimal.Decimal(i) / 100 for i in range(n)], type=pa.decimal128(12, 2)),
        "kind": pa.array(["a", "b", None, "c"] * (n // 4) + ["a"] * (n % 4)).dictionary_encode(),
        "point": pa.array([{"x": i, "y": float(i) / 2} for i in range(n)]),
    })


def buffer_addresses(table: pa.Table) -> list[int]:
    out = []
    def walk(arr: pa.Array) -> None:
        out.extend(b.address for b in arr.buffers() if b is not None and b.size)
        if isinstance(arr, pa.DictionaryArray):
            walk(arr.dictionary)
    for column in table.columns:
        for chunk in column.chunks:
            walk(chunk)
    return out


def test_round_trip_through_shared_memory_is_zero_copy(arena, cache):
    table = mixed_table(20_000)
    ref, block = table_to_ref(table, arena)
    try:
        assert isinstance(ref.storage, ShmStorage) and block is not None
        assert ref.num_rows == 20_000 and ref.storage.nbytes == stream_size(table)
        back = ref_to_table(ref, cache)
        assert back.equals(table)
        assert back.schema == table.schema
        seg = cache.get(ref.storage.name, ref.storage.inode)
        lo, hi = seg.address + ref.storage.offset, seg.address + ref.storage.offset + ref.storage.nbytes
        addrs = buffer_addresses(back)
        assert len(addrs) > 20
        assert all(lo <= a < hi for a in addrs), "a column buffer was copied out of the mapping"
        del back
    finally:
        block.release()


def test_table_outlives_the_cache_mapping(arena):
    cache = MappingCache()
    table = mixed_table(5_000)
    ref, block = table_to_ref(table, arena)
    back = ref_to_table(ref, cache)
    cache.clear()  # closes the Segment; the table's buffers hold exports, so no munmap yet
    assert back.equals(table)
    assert back.column("text").to_pylist()[:3] == table.column("text").to_pylist()[:3]
    del back
    block.release()


def test_small_tables_travel_inline(arena, cache):
    table = mixed_table(40)
    ref, block = table_to_ref(table, arena)
    assert block is None and isinstance(ref.storage, InlineStorage)
    assert ref_to_table(ref, cache).equals(table)
    ref, block = table_to_ref(mixed_table(5_000))  # no arena: inline whatever the size
    assert block is None and isinstance(ref.storage, InlineStorage)


def test_record_batch_and_empty_tables(arena, cache):
    batch = pa.record_batch({"a": pa.array(np.arange(50_000, dtype=np.int64)), "s": pa.array(["q"] * 50_000)})
    ref, block = table_to_ref(batch, arena)
    assert ref.num_rows == 50_000
    assert ref_to_table(ref, cache).equals(pa.Table.from_batches([batch]))
    block.release()
    empty = mixed_table(0)
    ref, block = table_to_ref(empty, arena, inline_threshold=0)
    assert ref_to_table(ref, cache).equals(empty) and ref.num_rows == 0
    block.release()
    no_columns = pa.table({})
    ref, _ = table_to_ref(no_columns)
    assert ref_to_table(ref, cache).num_columns == 0


def test_multi_chunk_table(arena, cache):
    table = pa.concat_tables([mixed_table(3_000), mixed_table(4_000)])
    ref, block = table_to_ref(table, arena, inline_threshold=0)
    back = ref_to_table(ref, cache)
    assert back.equals(table) and back.column(0).num_chunks == 2
    del back
    block.release()


def test_not_a_table():
    with pytest.raises(InvalidArgument):
        table_to_ref(np.zeros(3))


# --- hostile descriptors and streams -------------------------------------------------------------

def test_garbage_stream_is_invalid_tensor_ref(arena, cache):
    block = arena.alloc(4096)
    np.frombuffer(block.buffer(), np.uint8)[:] = np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8)
    ref = ArrowRef(ShmStorage(block.name, 0, 4096, block.inode))
    with pytest.raises(InvalidTensorRef) as info:
        ref_to_table(ref, cache, input_index=4)
    assert info.value.field == "stream" and info.value.input_index == 4
    block.release()


def test_truncated_and_corrupted_streams(arena, cache):
    table = mixed_table(2_000)
    ref, block = table_to_ref(table, arena, inline_threshold=0)
    n = ref.storage.nbytes
    for cut in (8, n // 2, n - 9):
        short = ArrowRef(ShmStorage(block.name, 0, cut, block.inode))
        with pytest.raises(InvalidTensorRef) as info:
            ref_to_table(short, cache)
        assert info.value.field == "stream"
    del short
    # Corrupt the string column's offsets inside a serialised stream: full validation catches it
    # before any reader follows an offset out of bounds.
    sink = pa.BufferOutputStream()
    strings = pa.table({"s": pa.array(["abc", "de", "f"] * 100)})
    with pa.ipc.new_stream(sink, strings.schema) as w:
        w.write_table(strings)
    data = bytearray(sink.getvalue().to_pybytes())
    offsets = np.array([0, 3, 5, 6], dtype=np.int32).tobytes()
    at = data.find(offsets)
    assert at > 0
    data[at + 4:at + 8] = np.int32(1 << 30).tobytes()
    with pytest.raises(InvalidTensorRef) as info:
        ref_to_table(ArrowRef(InlineStorage(bytes(data))), cache)
    assert info.value.field == "stream"
    block.release()


def test_bad_descriptor_fields(arena, cache):
    ref, block = table_to_ref(mixed_table(3_000), arena, inline_threshold=0)
    s = ref.storage
    cases = [
        (ArrowRef(ShmStorage("/sc-../../etc/passwd", 0, 10)), "name"),
        (ArrowRef(ShmStorage(s.name, 0, block.capacity + 1, s.inode)), "nbytes"),
        (ArrowRef(ShmStorage(s.name, block.capacity + 1, 0, s.inode)), "offset"),
        (ArrowRef(ShmStorage(s.name, -1, 10, s.inode)), "offset"),
        (ArrowRef(ShmStorage(s.name, 0, 2**64, s.inode)), "nbytes"),
        (ArrowRef(s, num_rows=7), "num_rows"),
    ]
    for bad, field in cases:
        with pytest.raises(InvalidTensorRef) as info:
            ref_to_table(bad, cache, input_index=1)
        assert info.value.field == field, (bad, info.value)
        assert info.value.input_index == 1
    block.release()
