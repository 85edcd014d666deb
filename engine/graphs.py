"""CUDA graphs of engine steps: StepGraphs captures the forward of a step shape once, over static
input buffers, and replays it; the runner falls back to its eager forward for any other step.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from gemforge.kernels import AttnMetadata

from .kv_cache import KVCache, padded_tables
from .model import GemmaModel
from .transfer import to_device

if TYPE_CHECKING:
    from .runner import WorkItem

log = logging.getLogger("gemforge")


class CaptureFailed(RuntimeError):
    """A step's CUDA graph could not be captured: the runner runs that step shape eagerly."""


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
    are large enough that launches are not the bottleneck.

    Ragged steps (prompt chunks beside decode tokens, wanting each sequence's last row) up to the
    largest of RAGGED_TOKENS flat tokens have graphs of their own, one per (flat-token bucket T,
    batch bucket b): the real tokens first, as the eager batch lays them out, then the T - N padding
    tokens as sequences of their own (slots -1, positions 0.., context their count, over block 0;
    one unless a block-table row holds fewer slots), then sequences of no tokens up to b; attention
    is captured for a query length of T, so it tiles any layout of up to T tokens. Serving with
    arrivals makes many steps ragged; run eagerly, a step's ~10 launches a layer from Python can
    outlast a small model's device time."""
    BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
    MAX_WINDOW_TOKENS = 256
    # up to 256 tokens a 2B/7B step on an H100 is bound by its weight reads (by arithmetic: 14 GFLOP a
    # token for the 7B, 5 for the 2B), so padding to the bucket costs little; larger steps run eagerly,
    # where their device time hides most of the launches and padding would cost compute
    RAGGED_TOKENS = (16, 32, 48, 64, 96, 128, 192, 256)

    def __init__(self, model: GemmaModel, cache: KVCache, max_batch: int, max_context: int, max_width: int = 1):
        self.model, self.cache = model, cache
        self.buckets = [b for b in self.BUCKETS if b < max_batch] + [max_batch]
        self.max_context, self.max_width = max_context, max_width
        self.width = -(-(max_context + max_width - 1) // cache.block_size)  # block-table columns
        dev, B = model.device, max_batch
        rows = max(B, self.MAX_WINDOW_TOKENS) if max_width > 1 else B  # logits rows: windows want every row
        T = max(rows, self.RAGGED_TOKENS[-1])  # flat rows
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
        self.logits = torch.empty(rows, model.w.head.shape[0], dtype=torch.float32, device=dev)  # (a pruned head's)
        self.graphs: dict[tuple[int, int, bool], tuple[object, torch.Tensor]] = {}  # (b, w, every) -> graph
        self.ragged: dict[tuple[str, int, int], tuple[object, torch.Tensor]] = {}  # ("ragged", T, b) -> graph
        self.failed: dict[tuple, str] = {}  # keys of either kind whose capture failed -> the error
        self.pool = None

    def _bucket(self, n: int, w: int) -> int | None:
        b = next((x for x in self.buckets if x >= n), None)
        return b if b is not None and (w == 1 or b * w <= self.MAX_WINDOW_TOKENS) else None

    def _ragged_bucket(self, n: int, tokens: int) -> tuple[int, int] | None:
        """(T, b) of a ragged step of n sequences and `tokens` tokens (b counts the padding's sequences)."""
        T = next((t for t in self.RAGGED_TOKENS if t >= tokens), None)
        b = None if T is None else next((x for x in self.buckets if x >= n + self._pad_seqs(T - tokens)), None)
        return None if b is None else (T, b)

    def _pad_seqs(self, pad: int) -> int:
        """Sequences that hold `pad` padding tokens: each at most a block-table row's slots."""
        return -(-pad // (self.width * self.cache.block_size))

    def plan(self, items: list[WorkItem]) -> tuple | None:
        """The key of the graph that runs `items`: (b, w, every row's logits) when every sequence
        brings at most w <= max_width tokens, else
        ("ragged", T, b) when only last rows are wanted; None (run eagerly) past the buckets, the
        context or the table width, or for a shape whose capture failed."""
        if not items:
            return None
        tables = self.cache.blocks.tables
        if not all(it.token_ids and it.start + len(it.token_ids) <= self.max_context
                   and len(tables[it.seq_id]) <= self.width for it in items):
            return None
        n, w = len(items), max(len(it.token_ids) for it in items)
        every = any(it.all_logits for it in items)
        b = self._bucket(n, w) if w <= self.max_width else None
        if b is not None:
            key = (b, w, every and w > 1)  # (a decode step reads one row a sequence either way)
        elif every:
            return None
        else:
            bucket = self._ragged_bucket(n, sum(len(it.token_ids) for it in items))
            if bucket is None:
                return None
            key = ("ragged", *bucket)
        return None if key in self.failed else key

    def accepts(self, items: list[WorkItem]) -> bool:
        """Whether a graph runs `items`."""
        return self.plan(items) is not None

    def _step(self, b: int, w: int, every: bool):
        """The forward over the first b sequences of the buffers at width w, as a call to capture."""
        meta = AttnMetadata(positions=self.positions[: b * w], cu_seqlens_q=self.cu[: b + 1],
                            context_lens=self.context[:b], block_tables=self.tables[:b],
                            slot_mapping=self.slots[: b * w], max_query_len=w,
                            max_context_len=self.max_context + w - 1)
        rows = None if every or w == 1 else self.last_rows[:b]
        out = self.logits[: b * w if every else b]
        return lambda: self.model.forward(self.ids[: b * w], meta, self.cache, logits_indices=rows, out=out)

    def _ragged_step(self, T: int, b: int):
        """The forward over T flat tokens of b sequences (the buffers' ragged layout), as a call to capture."""
        meta = AttnMetadata(positions=self.positions[:T], cu_seqlens_q=self.cu[: b + 1], context_lens=self.context[:b],
                            block_tables=self.tables[:b], slot_mapping=self.slots[:T], max_query_len=T,
                            max_context_len=self.max_context)
        out, rows = self.logits[:b], self.last_rows[:b]
        return lambda: self.model.forward(self.ids[:T], meta, self.cache, logits_indices=rows, out=out)

    def _graph(self, key: tuple):
        """The graph of `key`, captured first if need be (from the buffers as they are); a capture that
        fails is logged once, remembered (plan then declines that shape) and raised as CaptureFailed."""
        ragged = key[0] == "ragged"
        table = self.ragged if ragged else self.graphs
        if key not in table:
            try:
                table[key] = self._record(self._ragged_step(*key[1:]) if ragged else self._step(*key))
            except Exception as e:  # e.g. an op that cannot be captured: eager still serves the shape
                self.failed[key] = f"{type(e).__name__}: {e}"
                log.warning("gemforge: the CUDA graph of step shape %s failed to capture (%s); that shape runs "
                            "eagerly", key, self.failed[key])
                raise CaptureFailed(self.failed[key]) from e
        return table[key]

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
        key = (b, w, every)
        if key in self.graphs or key in self.failed or w > self.max_width or self._bucket(b, w) != b:
            return False
        self._fill([], b, w, every)
        try:
            self._graph(key)
        except CaptureFailed:
            return False
        return True

    def capture_ragged(self, T: int, b: int) -> bool:
        """Capture the ragged graph of (T, b) now, over padding only, unless it exists or b sequences
        cannot hold T padding tokens; True if it captured."""
        key = ("ragged", T, b)
        if (key in self.ragged or key in self.failed or T not in self.RAGGED_TOKENS or b not in self.buckets
                or self._pad_seqs(T) > b):
            return False
        self._fill_ragged([], T, b)
        try:
            self._graph(key)
        except CaptureFailed:
            return False
        return True

    def warmup(self, shapes, ragged: bool = False) -> int:
        """Capture, for every batch bucket, the graphs of the given (width, every row's logits) step
        shapes, and with `ragged` those of ragged steps for every flat-token bucket, so that serving
        never stops to capture (or to compile the kernels a capture runs). Returns how many graphs it
        captured."""
        count = sum(self.capture(b, w, every) for w, every in shapes for b in self.buckets)
        if ragged:
            count += sum(self.capture_ragged(T, b) for T in self.RAGGED_TOKENS for b in self.buckets)
        return count

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
        cu = None
        if self.cu_width != w:  # the sequences' row offsets: i w
            cu, self.cu_width = range(0, (B + 1) * w, w), w
        self._upload(items, b, ids, pos, slots, ctx, cu, last if w > 1 and not every else None)
        return wanted

    def _fill_ragged(self, items: list[WorkItem], T: int, b: int) -> None:
        """Write the inputs of ragged `items` in T flat rows and b sequences (see the class) into the
        device buffers."""
        blocks, ids, pos, slots, cu, ctx, last = self.cache.blocks, [], [], [], [0], [], []
        for it in items:
            k, p = len(it.token_ids), it.start
            ids += it.token_ids
            pos += range(p, p + k)
            slots += blocks.slots(it.seq_id, p, k)
            cu.append(cu[-1] + k)
            ctx.append(p + k)
            last.append(cu[-1] - 1)
        pad, cap = T - cu[-1], self.width * self.cache.block_size
        while pad:
            k = min(pad, cap)
            ids += [0] * k
            pos += range(k)
            slots += [-1] * k
            cu.append(cu[-1] + k)
            ctx.append(k)
            last.append(cu[-1] - 1)
            pad -= k
        empty = b + 1 - len(cu)
        cu += [T] * (empty + self.B - b)  # sequences of no tokens, to the end of the buffer
        self.cu_width = None
        self._upload(items, b, ids, pos, slots, ctx + [0] * empty, cu, last + [T - 1] * empty)

    def _upload(self, items: list[WorkItem], b: int, ids, pos, slots, ctx, cu, last) -> None:
        """Host lists into the pinned twins (cu and last left as they are when None), the tables of
        `items` padded to b rows, and ONE copy of each twin to the device buffers."""
        T, B = self.T, self.B
        if self.copied is not None:
            self.copied.synchronize()  # the previous step's copies have read the host twins
        h64, h32, rows = self.h64.numpy(), self.h32.numpy(), len(ids)
        h64[:rows], h64[T: T + rows], h64[2 * T: 2 * T + rows] = ids, pos, slots
        if last is not None:
            h64[3 * T: 3 * T + b] = last
        h32[:b] = ctx
        if cu is not None:
            h32[B: 2 * B + 1] = cu
        tables = padded_tables([self.cache.blocks.tables[it.seq_id] for it in items], self.width, b)
        end = self.t0 + b * self.width
        h32[self.t0: end] = tables.view(-1).numpy()
        self.i64.copy_(self.h64, non_blocking=True)
        self.i32[:end].copy_(self.h32[:end], non_blocking=True)
        if self.copied is not None:
            self.copied.record()

    def run(self, items: list[WorkItem], key: tuple, ids: torch.Tensor | None = None,
            at: list[int] | None = None) -> torch.Tensor:
        """Replay the graph of `key` (from `plan`) over `items`; ids / at: tokens from the device at the
        eager flat batch's positions `at` (default: all), placed where the graph's layout holds them."""
        n = len(items)
        if key[0] == "ragged":
            self._fill_ragged(items, *key[1:])
            every, wanted = False, []
        else:
            b, w, every = key
            wanted = self._fill(items, b, w, every)
        if ids is not None:  # over the host's tokens, copied before them
            if key[0] != "ragged" and key[1] > 1:  # sequence i's tokens from row i w, not where the last ended
                w = key[1]
                layout = [i * w + j for i, it in enumerate(items) for j in range(len(it.token_ids))]
                at = layout if at is None else [layout[x] for x in at]
            if at is None:  # (decode and ragged layouts: the real tokens lead, in order)
                self.ids[: len(ids)].copy_(ids)
            else:
                self.ids.index_copy_(0, to_device(at, self.ids.device), ids)
        replay, out = self._graph(key)
        replay()
        if not every:
            return out[:n]
        if len(wanted) == n * w:  # every sequence a full window that wants all its rows
            return out[: n * w]
        return out[to_device(wanted, out.device)]
