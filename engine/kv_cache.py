"""The paged KV cache: a pool of fixed-size blocks, per-sequence block tables, and the tensors.

`BlockManager` is pure Python bookkeeping (the scheduler uses it without torch): a sequence owns
an ordered list of blocks; its token i lives in slot table[i // block_size] * block_size +
i % block_size. `KVCache` adds the per-layer K/V tensors, [num_blocks, block_size, kv_heads,
head_dim] each, the layout kernels/attention.py reads.
"""
from __future__ import annotations

from array import array


class BlockManager:
    """Allocates cache slots to sequences, block by block. Running out is not an error here:
    `can_append` says whether it would fit, and the scheduler preempts when it would not."""

    def __init__(self, num_blocks: int, block_size: int = 16):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be positive")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low block ids first
        self.tables: dict[object, array] = {}  # block ids per sequence (int32 arrays: cheap to pack)
        self.lengths: dict[object, int] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_needed(self, seq_id, n: int) -> int:
        """New blocks that appending n slots to `seq_id` would take."""
        have = len(self.tables.get(seq_id, ()))
        total = self.lengths.get(seq_id, 0) + n
        return max(0, -(-total // self.block_size) - have)

    def can_append(self, seq_id, n: int) -> bool:
        return self.blocks_needed(seq_id, n) <= len(self._free)

    def reserve(self, seq_id, n: int) -> bool:
        """Reserve n more slots for `seq_id` (created on first use) if the pool holds them;
        return False, changing nothing, if it does not."""
        need = self.blocks_needed(seq_id, n)
        if need > len(self._free):
            return False
        table = self.tables.get(seq_id)
        if table is None:
            table = self.tables[seq_id] = array("i")
        for _ in range(need):
            table.append(self._free.pop())
        self.lengths[seq_id] = self.lengths.get(seq_id, 0) + n
        return True

    def append(self, seq_id, n: int) -> list[int]:
        """Reserve n more slots for `seq_id` (created on first use); return their slot ids."""
        start = self.lengths.get(seq_id, 0)
        if not self.reserve(seq_id, n):
            raise MemoryError(f"KV cache: {self.blocks_needed(seq_id, n)} blocks needed for sequence {seq_id!r}, "
                              f"{len(self._free)} free")
        return self.slots(seq_id, start, n)

    def slots(self, seq_id, start: int, n: int) -> list[int]:
        table, bs = self.tables[seq_id], self.block_size
        return [table[i // bs] * bs + i % bs for i in range(start, start + n)]

    def rollback(self, seq_id, n: int) -> None:
        """Forget the last n slots of `seq_id` (rejected speculative tokens); frees emptied blocks."""
        length = self.lengths[seq_id]
        if not 0 <= n <= length:
            raise ValueError(f"cannot roll back {n} of {length} slots of sequence {seq_id!r}")
        self.lengths[seq_id] = length - n
        keep = -(-(length - n) // self.block_size)
        table = self.tables[seq_id]
        while len(table) > keep:
            self._free.append(table.pop())

    def free(self, seq_id) -> None:
        """Return every block of `seq_id` to the pool (no-op for an unknown sequence)."""
        self._free.extend(reversed(self.tables.pop(seq_id, [])))
        self.lengths.pop(seq_id, None)

    def check_invariants(self) -> None:
        """No block owned twice or both owned and free; free + used == total; tables fit lengths."""
        owned = [b for t in self.tables.values() for b in t]
        assert len(owned) == len(set(owned)), "a block is owned by two sequences"
        assert not set(owned) & set(self._free), "a block is both owned and free"
        assert len(set(self._free)) == len(self._free), "a block is free twice"
        assert len(owned) + len(self._free) == self.num_blocks, "free + used != total"
        for s, t in self.tables.items():
            assert len(t) == -(-self.lengths[s] // self.block_size), f"sequence {s!r}: table/length mismatch"


class KVCache:
    """Per-layer K and V tensors over one BlockManager."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype, device="cpu"):
        import torch

        self.blocks = BlockManager(num_blocks, block_size)
        self.data = torch.zeros(num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim,
                                dtype=dtype, device=device)
        self.k = [self.data[i, 0] for i in range(num_layers)]
        self.v = [self.data[i, 1] for i in range(num_layers)]

    @property
    def block_size(self) -> int:
        return self.blocks.block_size

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * dtype_bytes
