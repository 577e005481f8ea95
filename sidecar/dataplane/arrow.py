"""Arrow tables <-> Arrow IPC *streams* in shared memory, read back without copying.

Writing sizes the stream first (a `MockOutputStream` pass counts bytes without copying any), then
serialises straight into an arena block through a `FixedSizeBufferWriter`: one copy of the column
data, the same as any IPC write. Reading wraps the mapped segment in a `pyarrow.Buffer` and opens the
stream over it, so every column buffer of the result points into the mapping; the table keeps the
segment mapped for as long as it lives.

A stream from another process may be malformed: it is validated (`Table.validate(full=True)`, which
checks offsets and UTF-8) before anyone reads a column, and any Arrow error becomes
InvalidTensorRef(field="stream").
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Union

import pyarrow as pa

from sidecar.dataplane.validate import check_segment_bounds, validate_arrow_ref
from sidecar.errors import InvalidArgument, InvalidTensorRef
from sidecar.protocol.limits import DEFAULT_INLINE_THRESHOLD
from sidecar.protocol.refs import ArrowRef, InlineStorage, ShmStorage

if TYPE_CHECKING:
    from sidecar.dataplane.arena import Arena, Block
    from sidecar.dataplane.mapcache import MappingCache


TableLike = Union[pa.Table, pa.RecordBatch]


def _write(sink: pa.NativeFile, table: TableLike) -> None:
    with pa.ipc.new_stream(sink, table.schema) as writer:
        if isinstance(table, pa.RecordBatch):
            writer.write_batch(table)
        else:
            writer.write_table(table)


def stream_size(table: TableLike) -> int:
    """Bytes of `table`'s IPC stream (schema, batches, end-of-stream marker)."""
    mock = pa.MockOutputStream()
    _write(mock, table)
    return int(mock.size())


def table_to_ref(table: TableLike, arena: Arena | None = None, *,
                 inline_threshold: int = DEFAULT_INLINE_THRESHOLD) -> tuple[ArrowRef, Block | None]:
    """Serialises `table` as an IPC stream: inline when small (or no arena), else into a new block.

    Returns (ref, block); the caller releases `block` (when not None) once the reader is done.
    """
    if not isinstance(table, (pa.Table, pa.RecordBatch)):
        raise InvalidArgument(f"expected a pyarrow Table or RecordBatch, got {type(table).__name__}")
    size = stream_size(table)
    if arena is None or size < inline_threshold:
        sink = pa.BufferOutputStream()
        _write(sink, table)
        return ArrowRef(InlineStorage(sink.getvalue().to_pybytes()), table.num_rows), None
    block = arena.alloc(size)
    try:
        _write(pa.FixedSizeBufferWriter(pa.py_buffer(block.buffer())), table)
    except BaseException:
        block.release()
        raise
    return ArrowRef(block.storage(), table.num_rows), block


def ref_to_table(ref: ArrowRef, cache: MappingCache, *, input_index: int | None = None) -> pa.Table:
    """The table a descriptor names; its column buffers lie inside the shared mapping (no copy)."""
    validate_arrow_ref(ref, input_index=input_index)
    storage = ref.storage
    if isinstance(storage, ShmStorage):
        try:
            seg = cache.get(storage.name, storage.inode)
        except InvalidTensorRef as err:
            raise InvalidTensorRef(err.message, **{"input_index": input_index, **err.fields}) from err
        check_segment_bounds(storage.offset, storage.nbytes, seg.size, storage.name, input_index)
        buf = pa.py_buffer(seg).slice(storage.offset, storage.nbytes)
    else:
        buf = pa.py_buffer(storage.data)
    try:
        table = pa.ipc.open_stream(buf).read_all()
        table.validate(full=True)
    except (pa.ArrowException, OSError, ValueError) as err:
        raise InvalidTensorRef(f"not a valid Arrow IPC stream: {err}", field="stream",
                               input_index=input_index) from err
    if ref.num_rows >= 0 and table.num_rows != ref.num_rows:
        raise InvalidTensorRef(f"stream holds {table.num_rows} rows, descriptor says {ref.num_rows}",
                               field="num_rows", input_index=input_index)
    return table
