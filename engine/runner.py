"""ModelRunner: packs the scheduled work of many sequences into ONE flat batch and runs the model.

Each `WorkItem` is a sequence's new tokens (a prefill chunk, one decode token, or a speculative
verify window) whose cache slots are already reserved in the BlockManager, with the number of its
tokens already cached before them. The runner builds AttnMetadata and returns logits for the last
token of each item (or for every token of items that ask for all, as verification does).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from gemforge.kernels import AttnMetadata

from .kv_cache import KVCache
from .model import GemmaModel


@dataclass
class WorkItem:
    seq_id: object
    token_ids: list[int]
    start: int               # tokens of this sequence already in the cache
    all_logits: bool = False  # logits for every token (verify windows), not just the last


def build_metadata(items: list[WorkItem], cache: KVCache, device) -> tuple[AttnMetadata, list[int]]:
    """AttnMetadata for `items` and the flat-batch rows whose logits are wanted."""
    blocks = cache.blocks
    positions, slots, cu, ctx, tables, rows = [], [], [0], [], [], []
    for it in items:
        n = len(it.token_ids)
        positions.extend(range(it.start, it.start + n))
        slots.extend(blocks.slots(it.seq_id, it.start, n))
        rows.extend(range(cu[-1], cu[-1] + n) if it.all_logits else [cu[-1] + n - 1])
        cu.append(cu[-1] + n)
        ctx.append(it.start + n)
        tables.append(blocks.tables[it.seq_id])
    width = max((len(t) for t in tables), default=0)
    table_rows = [t + [0] * (width - len(t)) for t in tables]

    def dev(x, dtype):
        return torch.tensor(x, dtype=dtype).to(device, non_blocking=True)

    meta = AttnMetadata(
        positions=dev(positions, torch.int64), cu_seqlens_q=dev(cu, torch.int32),
        context_lens=dev(ctx, torch.int32),
        block_tables=dev(table_rows, torch.int32).reshape(len(items), width),
        slot_mapping=dev(slots, torch.int64),
        max_query_len=max((len(it.token_ids) for it in items), default=0),
        max_context_len=max(ctx, default=0))
    return meta, rows


class ModelRunner:
    def __init__(self, model: GemmaModel, cache: KVCache):
        self.model, self.cache, self.device = model, cache, model.device

    def run(self, items: list[WorkItem]) -> torch.Tensor:
        """fp32 logits [rows, V]: one row per item, or one per token for `all_logits` items."""
        meta, rows = build_metadata(items, self.cache, self.device)
        ids = torch.tensor([t for it in items for t in it.token_ids], dtype=torch.int64).to(self.device)
        idx = torch.tensor(rows, dtype=torch.int64).to(self.device)
        return self.model.forward(ids, meta, self.cache, logits_indices=idx)
