"""The paged KV cache's bookkeeping: a free list of fixed-size blocks, ref counts, block tables.

Each sequence's `block_table` maps its logical blocks (token `i` is in logical block
`i // block_size`) to physical blocks of the device cache. Blocks are taken from the free list
as a sequence grows and return to it when their ref count drops to zero.
"""

from __future__ import annotations

from collections import deque

from jpaged.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_block_ids: deque[int] = deque(range(num_blocks))
        self.ref_counts = [0] * num_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_missing_blocks(self, seq: Sequence, num_tokens: int) -> int:
        return max(0, self.blocks_for(num_tokens) - len(seq.block_table))

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.num_missing_blocks(seq, num_tokens) <= self.num_free_blocks

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Extend `seq.block_table` so it holds `num_tokens` tokens."""
        missing = self.num_missing_blocks(seq, num_tokens)
        if missing > self.num_free_blocks:
            raise RuntimeError(f"{missing} blocks needed, {self.num_free_blocks} free")
        for _ in range(missing):
            block_id = self.free_block_ids.popleft()
            self.ref_counts[block_id] = 1
            seq.block_table.append(block_id)

    def free(self, seq: Sequence) -> None:
        for block_id in reversed(seq.block_table):
            if self.ref_counts[block_id] <= 0:
                raise RuntimeError(f"block {block_id} freed twice")
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                self.free_block_ids.append(block_id)
        seq.block_table = []
