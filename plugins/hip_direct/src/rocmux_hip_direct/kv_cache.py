"""A paged KV cache: fixed-size blocks of token slots, handed out to sequences.

The allocator is plain Python (no torch) so the scheduler can be tested on its own;
:class:`PagedKVCache` adds the tensors, one (n_layer, n_blocks * block_size, n_kv, d)
pair for keys and values, whose slot ``block * block_size + offset`` holds the token
at that offset of the block.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class OutOfBlocks(RuntimeError):
    """No free block is left."""


class BlockAllocator:
    """Free list of block ids; the most recently freed block is reused first."""

    def __init__(self, n_blocks: int, block_size: int) -> None:
        if n_blocks < 1 or block_size < 1:
            raise ValueError("n_blocks and block_size must be positive")
        self.n_blocks = n_blocks
        self.block_size = block_size
        self._free: list[int] = list(range(n_blocks - 1, -1, -1))
        self._used: set[int] = set()

    @property
    def n_free(self) -> int:
        return len(self._free)

    @property
    def n_used(self) -> int:
        return len(self._used)

    def blocks_for(self, n_tokens: int) -> int:
        """Blocks needed to hold ``n_tokens`` tokens."""
        return -(-n_tokens // self.block_size)

    def allocate(self) -> int:
        """One free block; ``OutOfBlocks`` when none is left."""
        if not self._free:
            raise OutOfBlocks(f"all {self.n_blocks} KV-cache blocks are in use")
        block = self._free.pop()
        self._used.add(block)
        return block

    def free(self, blocks: Iterable[int]) -> None:
        """Return blocks to the free list; freeing a block twice is an error."""
        for block in blocks:
            if block not in self._used:
                raise ValueError(f"block {block} is not allocated")
            self._used.remove(block)
            self._free.append(block)


class PageTable:
    """One sequence's blocks, in position order."""

    def __init__(self, allocator: BlockAllocator) -> None:
        self.allocator = allocator
        self.blocks: list[int] = []

    @property
    def capacity(self) -> int:
        """Tokens the table can hold without another block."""
        return len(self.blocks) * self.allocator.block_size

    def ensure(self, n_tokens: int) -> bool:
        """Grow to hold ``n_tokens``; False (and nothing taken) if blocks run out."""
        missing = self.allocator.blocks_for(n_tokens) - len(self.blocks)
        if missing <= 0:
            return True
        if missing > self.allocator.n_free:
            return False
        self.blocks.extend(self.allocator.allocate() for _ in range(missing))
        return True

    def slots(self, start: int, stop: int) -> list[int]:
        """Cache slots of positions ``start .. stop-1``."""
        bs = self.allocator.block_size
        return [self.blocks[p // bs] * bs + p % bs for p in range(start, stop)]

    def release(self) -> None:
        """Give every block back."""
        self.allocator.free(self.blocks)
        self.blocks = []


class PagedKVCache:
    """The key and value tensors behind an allocator."""

    def __init__(
        self,
        n_layer: int,
        n_blocks: int,
        block_size: int,
        n_head_kv: int,
        head_dim: int,
        head_dim_v: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        import torch

        self.allocator = BlockAllocator(n_blocks, block_size)
        n_slots = n_blocks * block_size
        # zeros, not empty: padded attention gathers slot 0 and must not meet NaNs.
        self.k = torch.zeros(n_layer, n_slots, n_head_kv, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros(n_layer, n_slots, n_head_kv, head_dim_v, dtype=dtype, device=device)

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()
