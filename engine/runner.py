"""ModelRunner: packs the scheduled work of many sequences into ONE flat batch and runs the model.

Each `WorkItem` is a sequence's new tokens (a prefill chunk, one decode token, or a speculative
verify window) whose cache slots are already reserved in the BlockManager, with the number of its
tokens already cached before them. The runner builds AttnMetadata and returns logits for the last
token of each item (or for every token of items that ask for all, as verification does); steps
that a CUDA graph of `graphs.StepGraphs` covers replay it instead.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from gemforge.kernels import AttnMetadata

from .graphs import CaptureFailed, StepGraphs
from .kv_cache import KVCache, padded_tables
from .model import GemmaModel
from .transfer import to_device


@dataclass
class WorkItem:
    seq_id: object
    token_ids: list[int]
    start: int               # tokens of this sequence already in the cache
    all_logits: bool = False  # logits for every token (verify windows), not just the last


def build_metadata(items: list[WorkItem], cache: KVCache, device) -> tuple[AttnMetadata, list[int]]:
    """AttnMetadata for `items` and the flat-batch rows whose logits are wanted."""
    blocks, bs = cache.blocks, cache.block_size
    positions, slots, cu, ctx, tables, rows = [], [], [0], [], [], []
    for it in items:
        n, p, table = len(it.token_ids), it.start, blocks.tables[it.seq_id]
        if n == 1:  # a decode token: the common case, kept cheap
            positions.append(p)
            slots.append(table[p // bs] * bs + p % bs)
        else:
            positions.extend(range(p, p + n))
            slots.extend(blocks.slots(it.seq_id, p, n))
        rows.extend(range(cu[-1], cu[-1] + n) if it.all_logits else [cu[-1] + n - 1])
        cu.append(cu[-1] + n)
        ctx.append(p + n)
        tables.append(table)
    width = max((len(t) for t in tables), default=0)

    meta = AttnMetadata(
        positions=to_device(positions, device, torch.int64), cu_seqlens_q=to_device(cu, device, torch.int32),
        context_lens=to_device(ctx, device, torch.int32),
        block_tables=to_device(padded_tables(tables, width, len(items)), device),
        slot_mapping=to_device(slots, device, torch.int64),
        max_query_len=max((len(it.token_ids) for it in items), default=0),
        max_context_len=max(ctx, default=0), host_cu_seqlens=cu, host_context_lens=ctx)
    return meta, rows


class ModelRunner:
    """Runs WorkItems; steps whose sequences bring few new tokens each (decode steps, speculative
    verify windows, a draft catching up) replay a captured CUDA graph when graphs are enabled."""

    def __init__(self, model: GemmaModel, cache: KVCache, cuda_graphs: bool = False,
                 max_graph_batch: int = 64, max_context: int | None = None, max_graph_width: int = 1):
        self.model, self.cache, self.device = model, cache, model.device
        self.max_context = max_context or model.cfg.max_position_embeddings
        self.graphs = None
        if cuda_graphs:
            if self.device.type != "cuda":
                raise ValueError("cuda_graphs=True needs a CUDA device")
            self.graphs = StepGraphs(model, cache, max_graph_batch, self.max_context, max_graph_width)

    def run(self, items: list[WorkItem], ids: torch.Tensor | None = None, at: list[int] | None = None) -> torch.Tensor:
        """fp32 logits [rows, V]: one row per item, or one per token for `all_logits` items.
        ids: tokens already on the device (int64), read in place of the items' token_ids at the flat
        batch's token positions `at` (default: every position): a step takes the tokens a step
        before picked without the host reading them (which waits for the device)."""
        if ids is not None:
            positions = sum(len(it.token_ids) for it in items) if at is None else len(at)
            if len(ids) != positions:
                raise ValueError(f"run: {len(ids)} device ids for {positions} positions")
        key = self.graphs.plan(items) if self.graphs is not None else None
        if key is not None:
            try:
                return self.graphs.run(items, key, ids, at)
            except CaptureFailed:
                pass  # (logged once; the step's inputs are untouched)
        return self._eager(items, ids, at)

    def _eager(self, items: list[WorkItem], ids: torch.Tensor | None = None,
               at: list[int] | None = None) -> torch.Tensor:
        meta, rows = build_metadata(items, self.cache, self.device)
        flat = ids if ids is not None and at is None else to_device(
            [t for it in items for t in it.token_ids], self.device, torch.int64)
        if ids is not None and at is not None:
            flat.index_copy_(0, to_device(at, self.device), ids)
        idx = to_device(rows, self.device, torch.int64)
        return self.model.forward(flat, meta, self.cache, logits_indices=idx)

    def warmup(self, graph_shapes=(), prefill_steps=((17,), (16, 16), (2,) * 16), ragged: bool = False) -> int:
        """Before serving: run eager prefill steps of the given sequence lengths (on a GPU this compiles
        the Triton kernels of steps too large for graphs: Triton specialises integer arguments equal
        to 1 and divisible by 16, so one, two and sixteen sequences, token counts that are and are not
        multiples of 16) over scratch blocks it then frees, and capture the
        graphs of the given (width, every row's logits) step shapes for every batch bucket, with
        `ragged` those of ragged steps too. Returns how many graphs it captured."""
        blocks = self.cache.blocks
        for lengths in prefill_steps:
            lengths = [min(n, self.max_context) for n in lengths]
            sids = [("warmup", i) for i in range(len(lengths))]
            if sum(blocks.blocks_needed(None, n) for n in lengths) > blocks.num_free:
                continue  # a pool too small to spare them: the first real prefill compiles instead
            try:
                for sid, n in zip(sids, lengths):
                    blocks.append(sid, n)
                self._eager([WorkItem(sid, [0] * n, 0) for sid, n in zip(sids, lengths)])
            finally:
                for sid in sids:
                    blocks.free(sid)
        return self.graphs.warmup(graph_shapes, ragged) if self.graphs is not None else 0
