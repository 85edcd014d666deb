"""The paged KV cache: a pool of fixed-size blocks, per-sequence block tables, and the tensors.

`BlockManager` is pure Python bookkeeping (the scheduler uses it without torch): a sequence owns
an ordered list of blocks; its token i lives in slot table[i // block_size] * block_size +
i % block_size. `KVCache` adds the per-layer K/V tensors, [num_blocks, block_size, kv_heads,
head_dim] each, the layout kernels/attention.py reads.
"""
from __future__ import annotations

import itertools
from array import array
from collections import OrderedDict


class BlockManager:
    """Allocates cache slots to sequences, block by block. Running out is not an error here:
    `can_append` says whether it would fit, and the scheduler preempts when it would not.

    With `prefix_caching`, a full block whose tokens have their K/V in it is registered under the key
    (key of the block before it, its tokens) by `register`; `match` gives a new sequence the longest
    chain of registered blocks its tokens start with, shared (blocks are reference-counted) instead of
    recomputed. Keys compare tokens exactly (a dict key, not a hash alone) and name the block before by
    a number never reused, so a match is exact however blocks are recycled. A registered block no
    sequence holds stays cached until a free block is needed: plain free blocks go first, then cached
    ones, least recently released first (a sequence releases its last block first, so a prefix
    outlives its continuations)."""

    def __init__(self, num_blocks: int, block_size: int = 16, prefix_caching: bool = False):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be positive")
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low block ids first
        self._cached_free: OrderedDict[int, None] = OrderedDict()  # registered, held by no sequence
        self._refs = [0] * num_blocks
        self._block_of: dict[tuple, int] = {}            # (key number of the block before, tokens) -> block
        self._key_of: dict[int, tuple[tuple, int]] = {}  # registered block -> (its key, its key number)
        self._key_numbers = itertools.count(1)           # 0 stands for "no block before"
        self._chains: dict[object, list[int]] = {}       # key numbers of each sequence's registered blocks
        self.tables: dict[object, array] = {}  # block ids per sequence (int32 arrays: cheap to pack)
        self.lengths: dict[object, int] = {}

    @property
    def num_free(self) -> int:
        """Blocks a sequence can be given: empty ones and cached ones no sequence holds."""
        return len(self._free) + len(self._cached_free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Registered blocks, held or not."""
        return len(self._key_of)

    def blocks_needed(self, seq_id, n: int) -> int:
        """New blocks that appending n slots to `seq_id` would take."""
        have = len(self.tables.get(seq_id, ()))
        total = self.lengths.get(seq_id, 0) + n
        return max(0, -(-total // self.block_size) - have)

    def can_append(self, seq_id, n: int) -> bool:
        return self.blocks_needed(seq_id, n) <= self.num_free

    def _take(self) -> int:
        if self._free:
            block = self._free.pop()
        else:  # evict the least recently released cached block
            block, _ = self._cached_free.popitem(last=False)
            key, _ = self._key_of.pop(block)
            del self._block_of[key]
        self._refs[block] = 1
        return block

    def _release(self, block: int) -> None:
        self._refs[block] -= 1
        if self._refs[block] == 0:
            if block in self._key_of:
                self._cached_free[block] = None
            else:
                self._free.append(block)

    def reserve(self, seq_id, n: int) -> bool:
        """Reserve n more slots for `seq_id` (created on first use) if the pool holds them;
        return False, changing nothing, if it does not."""
        table, length = self.tables.get(seq_id), self.lengths.get(seq_id, 0)
        if table is not None and length + n <= len(table) * self.block_size:  # its blocks hold them
            self.lengths[seq_id] = length + n
            return True
        need = self.blocks_needed(seq_id, n)
        if need > self.num_free:
            return False
        if table is None:
            table = self.tables[seq_id] = array("i")
        for _ in range(need):
            table.append(self._take())
        self.lengths[seq_id] = length + n
        return True

    def append(self, seq_id, n: int) -> list[int]:
        """Reserve n more slots for `seq_id` (created on first use); return their slot ids."""
        start = self.lengths.get(seq_id, 0)
        if not self.reserve(seq_id, n):
            raise MemoryError(f"KV cache: {self.blocks_needed(seq_id, n)} blocks needed for sequence {seq_id!r}, "
                              f"{self.num_free} free")
        return self.slots(seq_id, start, n)

    def slots(self, seq_id, start: int, n: int) -> list[int]:
        table, bs = self.tables[seq_id], self.block_size
        return [table[i // bs] * bs + i % bs for i in range(start, start + n)]

    def match(self, seq_id, tokens: list[int]) -> int:
        """Start the new sequence `seq_id` with the registered blocks that `tokens` begins with; return
        how many tokens they hold (a multiple of the block size; 0 without prefix caching). Pass all
        but the last token of a prompt: a step must compute at least one to sample from."""
        if seq_id in self.tables:
            raise ValueError(f"match: sequence {seq_id!r} already has blocks")
        if not self.prefix_caching:
            return 0
        bs, table, chain = self.block_size, array("i"), []
        for i in range(len(tokens) // bs):
            block = self._block_of.get((chain[-1] if chain else 0, tuple(tokens[i * bs: (i + 1) * bs])))
            if block is None:
                break
            if self._refs[block] == 0:
                del self._cached_free[block]
            self._refs[block] += 1
            table.append(block)
            chain.append(self._key_of[block][1])
        if table:
            self.tables[seq_id], self.lengths[seq_id], self._chains[seq_id] = table, len(table) * bs, chain
        return len(table) * bs

    def register(self, seq_id, tokens, n: int) -> None:
        """Register the full blocks among the first n tokens of `seq_id`, whose K/V are in the cache;
        `tokens(start, count)` returns the sequence's tokens. A block whose key another block already
        has stays unregistered (freed as usual) and the chain goes on through the other's key."""
        if not self.prefix_caching or seq_id not in self.tables:
            return
        bs, table = self.block_size, self.tables[seq_id]
        chain = self._chains.setdefault(seq_id, [])
        for i in range(len(chain), min(n, self.lengths[seq_id]) // bs):
            key = (chain[-1] if chain else 0, tuple(tokens(i * bs, bs)))
            other = self._block_of.get(key)
            if other is not None:
                chain.append(self._key_of[other][1])
                continue
            number = next(self._key_numbers)
            self._block_of[key], self._key_of[table[i]] = table[i], (key, number)
            chain.append(number)

    def rollback(self, seq_id, n: int) -> None:
        """Forget the last n slots of `seq_id` (rejected speculative tokens); frees emptied blocks."""
        length = self.lengths[seq_id]
        if not 0 <= n <= length:
            raise ValueError(f"cannot roll back {n} of {length} slots of sequence {seq_id!r}")
        if len(self._chains.get(seq_id, ())) * self.block_size > length - n:
            raise ValueError(f"cannot roll back sequence {seq_id!r} to {length - n} slots: its first "
                             f"{len(self._chains[seq_id]) * self.block_size} are registered for prefix caching")
        self.lengths[seq_id] = length - n
        keep = -(-(length - n) // self.block_size)
        table = self.tables[seq_id]
        while len(table) > keep:
            self._release(table.pop())

    def free(self, seq_id) -> None:
        """Release every block of `seq_id`, its last first (no-op for an unknown sequence)."""
        for block in reversed(self.tables.pop(seq_id, ())):
            self._release(block)
        self.lengths.pop(seq_id, None)
        self._chains.pop(seq_id, None)

    def check_invariants(self) -> None:
        """Reference counts match the tables; every block is held, free or cached-free, exactly once;
        the registry's two maps agree; tables fit lengths."""
        refs = [0] * self.num_blocks
        for t in self.tables.values():
            for b in t:
                refs[b] += 1
        assert refs == self._refs, "reference counts differ from the tables"
        assert len(set(self._free)) == len(self._free), "a block is free twice"
        free, cached_free = set(self._free), set(self._cached_free)
        held = {b for b, r in enumerate(refs) if r}
        assert not free & cached_free and not held & (free | cached_free), "a block is held, free or cached twice"
        assert len(held) + len(free) + len(cached_free) == self.num_blocks, "held + free + cached-free != total"
        assert cached_free <= set(self._key_of) and not free & set(self._key_of), "cached-free != registered, unheld"
        assert {b: k for k, b in self._block_of.items()} == {b: k for b, (k, _) in self._key_of.items()}, \
            "the registry's two maps disagree"
        for s, t in self.tables.items():
            assert len(t) == -(-self.lengths[s] // self.block_size), f"sequence {s!r}: table/length mismatch"
            assert len(self._chains.get(s, ())) <= self.lengths[s] // self.block_size, f"sequence {s!r}: chain too long"


def padded_tables(tables: list[array], width: int, rows: int) -> "torch.Tensor":
    """Host int32 [rows, width]: the block tables (int32 arrays), each padded with block 0, then
    all-zero rows. Packed with array concatenation (memcpy), not element by element."""
    import torch  # (this module's bookkeeping runs without torch)
    flat = array("i")
    for t in tables:
        flat += t
        if len(t) < width:
            flat += array("i", bytes(4 * (width - len(t))))
    flat += array("i", bytes(4 * width * (rows - len(tables))))
    if not flat:
        return torch.zeros(rows, width, dtype=torch.int32)
    return torch.frombuffer(flat, dtype=torch.int32).view(rows, width)


class KVCache:
    """Per-layer K and V tensors over one BlockManager."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype, device="cpu", prefix_caching: bool = False):
        import torch

        self.blocks = BlockManager(num_blocks, block_size, prefix_caching)
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
