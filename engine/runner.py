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
        batch's token positions `at` (default: every position, one token per item): a step takes
        the tokens a step before picked without the host reading them (which waits for the device)."""
        n = sum(len(it.token_ids) for it in items)
        if ids is not None and len(ids) != (n if at is None else len(at)):
            raise ValueError(f"run: {len(ids)} device ids for {n if at is None else len(at)} positions")
        if self.graphs is not None and self.graphs.accepts(items) and (ids is None or n == len(items)):
            return self.graphs.run(items, ids, at)
        meta, rows = build_metadata(items, self.cache, self.device)
        flat = ids if ids is not None and at is None else torch.tensor(
            [t for it in items for t in it.token_ids], dtype=torch.int64).to(self.device, non_blocking=True)
        if ids is not None and at is not None:
            flat.index_copy_(0, torch.tensor(at).to(self.device, non_blocking=True), ids)
        idx = torch.tensor(rows, dtype=torch.int64).to(self.device, non_blocking=True)
        return self.model.forward(flat, meta, self.cache, logits_indices=idx)

    def warmup(self, graph_shapes=(), prefill_steps=((17,), (16, 16))) -> int:
        """Before serving: run eager prefill steps of the given sequence lengths (on a GPU this compiles
        the Triton kernels for one and several sequences, token counts that are and are not multiples
        of 16) over scratch blocks it then frees, and capture the graphs of the given (width, every
        row's logits) step shapes for every batch bucket. Returns how many graphs it captured."""
        blocks = self.cache.blocks
        for lengths in prefill_steps:
            lengths = [min(n, self.max_context) for n in lengths]
            sids = [("warmup", i) for i in range(len(lengths))]
            if sum(blocks.blocks_needed(None, n) for n in lengths) > blocks.num_free:
                continue  # a pool too small to spare them: the first real prefill compiles instead
            try:
                for sid, n in zip(sids, lengths):
                    blocks.append(sid, n)
                self.run([WorkItem(sid, [0] * n, 0) for sid, n in zip(sids, lengths)])
            finally:
                for sid in sids:
                    blocks.free(sid)
        return self.graphs.warmup(graph_shapes) if self.graphs is not None else 0


class StepGraphs:
    """CUDA graphs of steps in which every sequence brings at most `w` new tokens (w <= max_width):
    decode steps (w = 1), speculative verify windows (w = k + 1), a draft catching up (w = 2).
    One graph per (batch bucket b, width w, every row's logits or the last of each sequence).

    Inputs live in static buffers. Sequence i owns flat rows [i w, i w + w): its n_i real tokens
    first, then w - n_i padding tokens (slot -1: nothing written) at the positions after them; its
    context counts the padding (start + w), so each real token keeps its position and causal range
    and no real token attends to a padding one. Batches are padded up to their bucket with dummy
    sequences (context w over block 0: harmless reads). Padding rows' logits are dropped. Attention
    is captured with the longest context, so kernels size their grids for it and stop at each row's
    real length. Windows are captured up to MAX_WINDOW_TOKENS flat rows (b w): beyond that, batches
    are large enough that launches are not the bottleneck."""
    BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
    MAX_WINDOW_TOKENS = 256

    def __init__(self, model: GemmaModel, cache: KVCache, max_batch: int, max_context: int, max_width: int = 1):
        self.model, self.cache = model, cache
        self.buckets = [b for b in self.BUCKETS if b < max_batch] + [max_batch]
        self.max_context, self.max_width = max_context, max_width
        self.width = -(-(max_context + max_width - 1) // cache.block_size)  # block-table columns
        dev, B = model.device, max_batch
        T = max(B, self.MAX_WINDOW_TOKENS) if max_width > 1 else B  # flat rows
        self.T, self.B = T, B
        # Inputs in two device buffers, each filled by ONE copy from a pinned host twin a step: int64
        # [ids T | positions T | slots T | last_rows B], int32 [context B | cu B+1 | pad | tables B x width]
        # (the tables 16-byte aligned; the int32 copy stops after the batch's table rows).
        pin = dev.type == "cuda"
        self.t0 = -(-(2 * B + 1) // 4) * 4
        self.h64 = torch.zeros(3 * T + B, dtype=torch.int64, pin_memory=pin)
        self.h32 = torch.zeros(self.t0 + B * self.width, dtype=torch.int32, pin_memory=pin)
        self.h32[B: 2 * B + 1] = torch.arange(B + 1, dtype=torch.int32)
        self.cu_width = 1  # cu holds i * cu_width
        self.i64, self.i32 = self.h64.to(dev), self.h32.to(dev)
        self.ids, self.positions, self.slots = self.i64[:T], self.i64[T: 2 * T], self.i64[2 * T: 3 * T]
        self.last_rows = self.i64[3 * T:]
        self.context, self.cu = self.i32[:B], self.i32[B: 2 * B + 1]
        self.tables = self.i32[self.t0:].view(B, self.width)
        self.copied = torch.cuda.Event() if pin else None  # the host twins may be rewritten once it is done
        # every graph writes its logits here (each graph keeping its own would hold up to GBs at V = 256k)
        self.logits = torch.empty(T, model.cfg.vocab_size, dtype=torch.float32, device=dev)
        self.graphs: dict[tuple[int, int, bool], tuple[object, torch.Tensor]] = {}
        self.pool = None

    def _bucket(self, n: int, w: int) -> int | None:
        b = next((x for x in self.buckets if x >= n), None)
        return b if b is not None and (w == 1 or b * w <= self.MAX_WINDOW_TOKENS) else None

    def accepts(self, items: list[WorkItem]) -> bool:
        if not items:
            return False
        w, tables = max(len(it.token_ids) for it in items), self.cache.blocks.tables
        return (w <= self.max_width and self._bucket(len(items), w) is not None
                and all(it.token_ids and it.start + len(it.token_ids) <= self.max_context
                        and len(tables[it.seq_id]) <= self.width for it in items))

    def _step(self, b: int, w: int, every: bool):
        """The forward over the first b sequences of the buffers at width w, as a call to capture."""
        meta = AttnMetadata(positions=self.positions[: b * w], cu_seqlens_q=self.cu[: b + 1],
                            context_lens=self.context[:b], block_tables=self.tables[:b],
                            slot_mapping=self.slots[: b * w], max_query_len=w,
                            max_context_len=self.max_context + w - 1)
        rows = None if every or w == 1 else self.last_rows[:b]
        out = self.logits[: b * w if every else b]
        return lambda: self.model.forward(self.ids[: b * w], meta, self.cache, logits_indices=rows, out=out)

    def _record(self, step):
        """(replay, output) of `step` captured in a CUDA graph (all graphs share one memory pool and
        one logits buffer: a step's logits are read before the next replay)."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # compile kernels and settle the allocator outside the capture
                step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = step()
        self.pool = graph.pool()
        return graph.replay, out

    def capture(self, b: int, w: int, every: bool) -> bool:
        """Capture the graph of key (b, w, every) now, over a batch of padding only, unless it exists
        or the key is beyond what this runner graphs; True if it captured."""
        every = every and w > 1  # a decode step reads one row a sequence either way
        if (b, w, every) in self.graphs or w > self.max_width or b not in self.buckets or self._bucket(b, w) != b:
            return False
        self._fill([], b, w, every)
        self.graphs[(b, w, every)] = self._record(self._step(b, w, every))
        return True

    def warmup(self, shapes) -> int:
        """Capture, for every batch bucket, the graphs of the given (width, every row's logits) step
        shapes, so that serving never stops to capture (or to compile the kernels a capture runs).
        Returns how many graphs it captured."""
        return sum(self.capture(b, w, every) for w, every in shapes for b in self.buckets)

    def _fill(self, items: list[WorkItem], b: int, w: int, every: bool) -> list[int]:
        """Write the inputs of `items` padded to b sequences of width w into the device buffers (one
        copy each from the pinned twins); returns the output rows wanted when `every`."""
        n, T, B = len(items), self.T, self.B
        pad = b - n
        blocks = self.cache.blocks
        wanted: list[int] = []
        if w == 1:  # decode: the common case, kept cheap
            ids = [it.token_ids[0] for it in items] + [0] * pad
            pos = [it.start for it in items] + [0] * pad
            slots = [blocks.slots(it.seq_id, it.start, 1)[0] for it in items] + [-1] * pad
            ctx = [it.start + 1 for it in items] + [1] * pad
        else:
            ids, pos, slots, ctx, last = [], [], [], [], []
            for i, it in enumerate(items):
                k, p = len(it.token_ids), it.start
                ids += it.token_ids + [0] * (w - k)
                pos += range(p, p + w)
                slots += blocks.slots(it.seq_id, p, k) + [-1] * (w - k)
                ctx.append(p + w)
                last.append(i * w + k - 1)
                if every:
                    wanted += range(i * w, i * w + k) if it.all_logits else [i * w + k - 1]
            ids += [0] * (pad * w)
            pos += list(range(w)) * pad
            slots += [-1] * (pad * w)
            ctx += [w] * pad
            last += [(n + j) * w + w - 1 for j in range(pad)]
        if self.copied is not None:
            self.copied.synchronize()  # the previous step's copies have read the host twins
        h64, h32, rows = self.h64.numpy(), self.h32.numpy(), b * w
        h64[:rows], h64[T: T + rows], h64[2 * T: 2 * T + rows] = ids, pos, slots
        if w > 1 and not every:
            h64[3 * T: 3 * T + b] = last
        h32[:b] = ctx
        if self.cu_width != w:  # the sequences' row offsets: i w
            h32[B: 2 * B + 1] = range(0, (B + 1) * w, w)
            self.cu_width = w
        tables = padded_tables([blocks.tables[it.seq_id] for it in items], self.width, b)
        end = self.t0 + b * self.width
        h32[self.t0: end] = tables.view(-1).numpy()
        self.i64.copy_(self.h64, non_blocking=True)
        self.i32[:end].copy_(self.h32[:end], non_blocking=True)
        if self.copied is not None:
            self.copied.record()
        return wanted

    def run(self, items: list[WorkItem], ids: torch.Tensor | None = None, at: list[int] | None = None) -> torch.Tensor:
        n, w = len(items), max(len(it.token_ids) for it in items)
        b = self._bucket(n, w)
        every = w > 1 and any(it.all_logits for it in items)
        wanted = self._fill(items, b, w, every)
        if ids is not None:  # tokens from the device, over the host's (copied before them)
            if w != 1:
                raise ValueError("StepGraphs.run: device ids are for decode-shaped steps (one token a sequence)")
            if at is None:
                self.ids[:n].copy_(ids)
            else:  # (w = 1: flat position i is row i)
                self.ids.index_copy_(0, torch.tensor(at).to(self.ids.device, non_blocking=True), ids)
        key = (b, w, every)
        if key not in self.graphs:
            self.graphs[key] = self._record(self._step(b, w, every))
        replay, out = self.graphs[key]
        replay()
        if not every:
            return out[:n]
        if len(wanted) == n * w:  # every sequence a full window that wants all its rows
            return out[: n * w]
        return out[torch.tensor(wanted, device=out.device)]
