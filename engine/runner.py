"""ModelRunner: packs the scheduled work of many sequences into ONE flat batch and runs the model.

Each `WorkItem` is a sequence's new tokens (a prefill chunk, one decode token, or a speculative
verify window) whose cache slots are already reserved in the BlockManager, with the number of its
tokens already cached before them. The runner builds AttnMetadata and returns logits for the last
token of each item (or for every token of items that ask for all, as verification does).
"""
from __future__ import annotations

from array import array
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


def padded_tables(tables: list[array], width: int, rows: int) -> torch.Tensor:
    """Host int32 [rows, width]: the block tables (int32 arrays), each padded with block 0, then
    all-zero rows. Packed with array concatenation (memcpy), not element by element."""
    flat = array("i")
    for t in tables:
        flat += t
        if len(t) < width:
            flat += array("i", bytes(4 * (width - len(t))))
    flat += array("i", bytes(4 * width * (rows - len(tables))))
    if not flat:
        return torch.zeros(rows, width, dtype=torch.int32)
    return torch.frombuffer(flat, dtype=torch.int32).view(rows, width)


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

    def dev(x, dtype):
        return torch.tensor(x, dtype=dtype).to(device, non_blocking=True)

    meta = AttnMetadata(
        positions=dev(positions, torch.int64), cu_seqlens_q=dev(cu, torch.int32),
        context_lens=dev(ctx, torch.int32),
        block_tables=padded_tables(tables, width, len(items)).to(device, non_blocking=True),
        slot_mapping=dev(slots, torch.int64),
        max_query_len=max((len(it.token_ids) for it in items), default=0),
        max_context_len=max(ctx, default=0), host_cu_seqlens=cu, host_context_lens=ctx)
    return meta, rows


class ModelRunner:
    """Runs WorkItems; decode-only batches replay a captured CUDA graph when graphs are enabled."""

    def __init__(self, model: GemmaModel, cache: KVCache, cuda_graphs: bool = False,
                 max_graph_batch: int = 64, max_context: int | None = None):
        self.model, self.cache, self.device = model, cache, model.device
        self.graphs = None
        if cuda_graphs:
            if self.device.type != "cuda":
                raise ValueError("cuda_graphs=True needs a CUDA device")
            self.graphs = DecodeGraphs(model, cache, max_graph_batch,
                                       max_context or model.cfg.max_position_embeddings)

    def run(self, items: list[WorkItem]) -> torch.Tensor:
        """fp32 logits [rows, V]: one row per item, or one per token for `all_logits` items."""
        if self.graphs is not None and self.graphs.accepts(items):
            return self.graphs.run(items)
        meta, rows = build_metadata(items, self.cache, self.device)
        ids = torch.tensor([t for it in items for t in it.token_ids], dtype=torch.int64).to(self.device)
        idx = torch.tensor(rows, dtype=torch.int64).to(self.device)
        return self.model.forward(ids, meta, self.cache, logits_indices=idx)


class DecodeGraphs:
    """CUDA graphs of decode steps (one new token per sequence), one per batch-size bucket.

    Inputs live in static buffers sized for the largest bucket; a batch is padded up to its
    bucket with dummy rows (slot -1: nothing written; context 1 over block 0: harmless reads)
    whose logits are dropped. Attention is captured with max_context_len = `max_context`, so
    kernels size their grids for the longest context and stop at each row's real length.
    """
    BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)

    def __init__(self, model: GemmaModel, cache: KVCache, max_batch: int, max_context: int):
        self.model, self.cache = model, cache
        self.buckets = [b for b in self.BUCKETS if b < max_batch] + [max_batch]
        self.max_context = max_context
        self.width = -(-max_context // cache.block_size)
        dev, B = model.device, max_batch
        self.ids = torch.zeros(B, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(B, dtype=torch.int64, device=dev)
        self.slots = torch.full((B,), -1, dtype=torch.int64, device=dev)
        self.context = torch.ones(B, dtype=torch.int32, device=dev)
        self.tables = torch.zeros(B, self.width, dtype=torch.int32, device=dev)
        self.cu = torch.arange(B + 1, dtype=torch.int32, device=dev)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None

    def accepts(self, items: list[WorkItem]) -> bool:
        return (0 < len(items) <= self.buckets[-1]
                and all(len(it.token_ids) == 1 and not it.all_logits and it.start + 1 <= self.max_context
                        for it in items))

    def _meta(self, b: int) -> AttnMetadata:
        return AttnMetadata(positions=self.positions[:b], cu_seqlens_q=self.cu[: b + 1],
                            context_lens=self.context[:b], block_tables=self.tables[:b],
                            slot_mapping=self.slots[:b], max_query_len=1, max_context_len=self.max_context)

    def _capture(self, b: int):
        meta = self._meta(b)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # compile kernels and settle the allocator outside the capture
                self.model.forward(self.ids[:b], meta, self.cache)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.model.forward(self.ids[:b], meta, self.cache)
        self.pool = graph.pool()
        self.graphs[b] = (graph, out)
        return self.graphs[b]

    def run(self, items: list[WorkItem]) -> torch.Tensor:
        n = len(items)
        b = next(x for x in self.buckets if x >= n)
        blocks = self.cache.blocks
        ids = [it.token_ids[0] for it in items] + [0] * (b - n)
        pos = [it.start for it in items] + [0] * (b - n)
        slots = [blocks.slots(it.seq_id, it.start, 1)[0] for it in items] + [-1] * (b - n)
        ctx = [it.start + 1 for it in items] + [1] * (b - n)
        table = padded_tables([blocks.tables[it.seq_id] for it in items], self.width, b)
        self.ids[:b].copy_(torch.tensor(ids), non_blocking=True)
        self.positions[:b].copy_(torch.tensor(pos), non_blocking=True)
        self.slots[:b].copy_(torch.tensor(slots), non_blocking=True)
        self.context[:b].copy_(torch.tensor(ctx, dtype=torch.int32), non_blocking=True)
        self.tables[:b].copy_(table, non_blocking=True)
        graph, out = self.graphs.get(b) or self._capture(b)
        graph.replay()
        return out[:n]
