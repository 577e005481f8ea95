"""Descriptors: the small, transport-neutral records that say where a value's bytes are.

They mirror `sidecar.v1.Tensor` / `ArrowTable` / `ShmRef` / `CudaIpcRef` field for field (the codecs
in this package convert them by those names), but carry no protobuf. Nothing here touches memory;
`sidecar.dataplane.validate` checks them and `sidecar.dataplane.tensors` maps them.

`byte_span` is the one place that says how many bytes a strided layout reaches.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Union


@dataclass(frozen=True)
class ShmStorage:
    name: str
    offset: int
    nbytes: int
    inode: int = 0  # creator's st_ino; 0 = unknown (the consumer then checks it with one stat)


@dataclass(frozen=True)
class InlineStorage:
    data: bytes


@dataclass(frozen=True)
class CudaIpcStorage:
    handle: bytes  # 64-byte CUipcMemHandle naming the allocation base
    offset: int
    nbytes: int
    device_index: int = 0
    device_uuid: str = ""
    alloc_nbytes: int = 0


Storage = Union[ShmStorage, InlineStorage, CudaIpcStorage]


@dataclass(frozen=True)
class TensorRef:
    dtype: str
    shape: tuple[int, ...]
    storage: Storage
    strides: tuple[int, ...] | None = None  # bytes; None = C-contiguous

    @property
    def nbytes(self) -> int:
        return _storage_nbytes(self.storage)


@dataclass(frozen=True)
class ArrowRef:
    storage: Union[ShmStorage, InlineStorage]
    num_rows: int = -1

    @property
    def nbytes(self) -> int:
        return _storage_nbytes(self.storage)


def _storage_nbytes(s: Storage) -> int:
    return len(s.data) if isinstance(s, InlineStorage) else s.nbytes


def byte_span(shape: Sequence[int], strides: Sequence[int], itemsize: int) -> int:
    """Bytes a strided tensor reaches from its first element to one past its last byte; 0 when it
    has no elements. `strides` are in bytes and not negative (the wire's rule)."""
    if 0 in shape:
        return 0
    return sum((dim - 1) * stride for dim, stride in zip(shape, strides, strict=True)) + itemsize


def elements_overlap(shape: Sequence[int], strides: Sequence[int], itemsize: int) -> bool:
    """Whether elements share bytes (a stride-0 broadcast, an overlapping view): such a layout holds
    more element bytes than it spans, and is never described in place (it is copied)."""
    return math.prod(shape) * itemsize > byte_span(shape, strides, itemsize)
