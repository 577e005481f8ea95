"""Descriptors: the small, transport-neutral records that say where a value's bytes are.

They mirror `sidecar.v1.Tensor` / `ArrowTable` / `ShmRef` / `CudaIpcRef` field for field, but carry no
protobuf: the gRPC transport (`sidecar.wire`) and the Erlang port transport convert them. Nothing here
touches memory; `sidecar.dataplane.validate` checks them and `sidecar.dataplane.tensors` maps them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union


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
        s = self.storage
        return len(s.data) if isinstance(s, InlineStorage) else s.nbytes


@dataclass(frozen=True)
class ArrowRef:
    storage: Union[ShmStorage, InlineStorage]
    num_rows: int = -1


@dataclass(frozen=True)
class Lease:
    """Ownership of worker-side output memory, handed to the host until it releases `lease_id`."""

    lease_id: str
    refs: tuple[TensorRef | ArrowRef, ...] = field(default_factory=tuple)
