"""The host side of an in-process dispatcher test: puts inputs in its own arena segments (never inline),
hands out output blocks, and reads results back as NumPy (torch for bfloat16)."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from sidecar.dataplane import tensors
from sidecar.dataplane.arena import Arena, Block
from sidecar.dataplane.mapcache import MappingCache
from sidecar.protocol.refs import TensorRef


class SegmentHost:
    def __init__(self, run: str) -> None:
        self.arena = Arena(run)
        self.cache = MappingCache()
        self.blocks: list[Block] = []

    def ref(self, x: Any) -> Any:
        """A tensor becomes a ref into this host's shared memory; anything else (an attr) passes through."""
        if not isinstance(x, (np.ndarray, torch.Tensor)):
            return x
        ref, block = tensors.to_ref(x, self.arena, inline_threshold=0)
        if block is not None:
            self.blocks.append(block)
        return ref

    def out_ref(self, shape: tuple[int, ...], dtype: str = "float32") -> TensorRef:
        """A caller-provided output: a fresh block of the right size, kept until close()."""
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        block = self.arena.alloc(nbytes)
        self.blocks.append(block)
        return TensorRef(dtype, tuple(shape), block.storage())

    def read(self, v: Any) -> Any:
        """A result ref as a private copy (so the worker may reuse its memory); plain values as they are."""
        if not isinstance(v, TensorRef):
            return v
        if v.dtype == "bfloat16":
            return tensors.to_torch(v, self.cache).clone()
        return tensors.to_numpy(v, self.cache).copy()

    def close(self) -> None:
        for b in self.blocks:
            b.release()
        self.cache.clear()
        self.arena.close()
