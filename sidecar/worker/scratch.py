"""The arena blocks one call hands its op through `OpContext.empty` (CPU workers).

A fresh torch output costs one page fault per 4 KiB on every call, and the dispatcher then copies it
into an arena block to lease it out. An op that writes into a warm block from the worker's arena
skips both: the output already lies in shared memory and is leased as it is.

The dispatcher makes one `CallBlocks` per call and passes it to `tensors.to_ref` in place of the
arena: `find` sees only this call's blocks (a stale tensor from an earlier call must never be
described in place), `alloc` is the arena's. The blocks an output lies in move under the call's
lease (`take_found`); `close` gives every other one back when the call ends, whatever happened.
"""
from __future__ import annotations

import math
import threading

import torch

from sidecar.dataplane.arena import Arena, Block
from sidecar.errors import OutOfMemory


class CallBlocks:
    def __init__(self, arena: Arena, min_bytes: int) -> None:
        self._arena = arena
        self.min_bytes = min_bytes  # smaller tensors come from torch.empty: they travel inline anyway
        # Set by the dispatcher before encoding: an output under this size travels inline even if it
        # lies in one of our blocks (a small slice must not pin a big block under a lease).
        self.share_min = 0
        self._lock = threading.Lock()
        self._blocks: list[Block] = []
        self._found: list[Block] = []
        self._closed = False

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised CPU tensor, in an arena block when it is at least `min_bytes`."""
        numel = math.prod(shape)
        nbytes = numel * dtype.itemsize
        if nbytes < max(self.min_bytes, 1) or self._closed or any(d < 0 for d in shape):
            return torch.empty(shape, dtype=dtype)  # torch also gives the error for a negative size
        try:
            block = self._arena.alloc(nbytes)
        except OutOfMemory:
            # /dev/shm is full: compute in private memory as before. An OUT or INLINE output still
            # gets through; an AUTO one fails at the copy into a block, as it always did.
            return torch.empty(shape, dtype=dtype)
        with self._lock:
            if self._closed:  # a thread the op started outlived the call
                block.release()
                return torch.empty(shape, dtype=dtype)
            self._blocks.append(block)
        # frombuffer holds the block's memoryview (a buffer export), so the mapping outlives the tensor.
        return torch.frombuffer(block.buffer(), dtype=dtype, count=numel).view(shape)

    # -- the part of the Arena interface `tensors.to_ref` and `arrow.table_to_ref` use ---------------

    def find(self, address: int, nbytes: int) -> tuple[Block, int] | None:
        if nbytes < self.share_min:
            return None
        with self._lock:
            for block in self._blocks:
                offset = address - block.address
                if 0 <= offset and offset + nbytes <= block.nbytes:
                    if all(b is not block for b in self._found):
                        self._found.append(block)
                    return block, offset
        return None

    def alloc(self, nbytes: int) -> Block:
        return self._arena.alloc(nbytes)

    # -- end of the call ----------------------------------------------------------------------------

    def take_found(self) -> list[Block]:
        """The blocks outputs were described in; from now on the caller's lease releases them."""
        with self._lock:
            found, self._found = self._found, []
            self._blocks = [b for b in self._blocks if all(b is not f for f in found)]
        return found

    def close(self) -> None:
        """Gives back every block not taken for a lease (idempotent); later `empty` calls use torch."""
        with self._lock:
            self._closed = True
            blocks, self._blocks, self._found = self._blocks, [], []
        for block in blocks:
            block.release()


class NoCallBlocks:
    """What stands for a call's blocks when its op cannot have any (it takes no ctx, so it never
    called ctx.empty): outputs are never found in place, new ones come from the arena. Stateless:
    one per dispatcher serves every such call."""

    __slots__ = ("alloc", "share_min")

    def __init__(self, arena: Arena) -> None:
        self.alloc = arena.alloc
        self.share_min = 0

    @staticmethod
    def find(address: int, nbytes: int) -> None:
        return None

    @staticmethod
    def take_found() -> list[Block]:
        return []

    def close(self) -> None:
        pass
