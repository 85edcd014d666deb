"""Drafters: who proposes the draft tokens of speculative decoding, and the Proposal they return.

`Drafter` runs a small draft model over its own paged KV pool; `NgramDrafter` (draft_model "[ngram]")
looks the proposal up in the sequence's own prompt and output. Both keep the proposals on the device
for the verify forward (`speculative.verdicts` reads them, once, with the verdicts).
"""
from __future__ import annotations

import time
from array import array
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import RequestError
from .kv_cache import KVCache
from .model import GemmaModel
from .runner import ModelRunner, WorkItem
from .sampling import adjust, draw, greedy, probs
from .transfer import to_device


NGRAM = "[ngram]"  # draft_model value for prompt-lookup drafting (NgramDrafter)


@dataclass
class Proposal:
    """A step's draft tokens: counts[i] for sequence i (prompt lookup may find fewer than asked), all
    of them sequence by sequence in `tokens` (int64, on the device: the verify window takes them from
    there, and the host reads them once, with the verdicts); the distributions sampled drafts were
    drawn from, one row each, in `q` [rows, V] (as the draft steps made them: step by step), and
    q_rows[i] the rows of sequence i's drafts (None: greedy, or certain proposals)."""
    counts: list[int]
    tokens: torch.Tensor
    q: torch.Tensor | None = None
    q_rows: list | None = None

    def lists(self) -> list[list[int]]:
        """The drafts of each sequence, on the host (a device read)."""
        flat, out = self.tokens.tolist(), []
        for n in self.counts:
            out.append(flat[:n])
            flat = flat[n:]
        return out


CORPUS_CHARS = 64 << 20  # draft_vocabulary reads at most this many characters of a corpus


def corpus_counts(tokenizer, corpus: str | Path) -> Counter:
    """How often each token occurs in the text of `corpus` (a file, or every file below a directory, in
    name order, until CORPUS_CHARS are read; files that are not UTF-8 text are skipped)."""
    root = Path(corpus)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
    if not files:
        raise RequestError(f"draft_vocab_corpus {corpus}: no such file, or no files below it",
                           field="draft_vocab_corpus")
    counts, read = Counter(), 0
    for f in files:
        try:
            with open(f, encoding="utf-8") as fh:
                text = fh.read(CORPUS_CHARS - read)
        except (UnicodeDecodeError, OSError):
            continue
        counts.update(tokenizer.encode(text, add_bos=False))
        read += len(text)
        if read >= CORPUS_CHARS:
            break
    if not counts:
        raise RequestError(f"draft_vocab_corpus {corpus}: no UTF-8 text found", field="draft_vocab_corpus")
    return counts


def draft_vocabulary(tokenizer, size: int, corpus: str | Path | None = None) -> list[int]:
    """The `size` token ids a pruned draft head keeps, ascending: control, unknown, byte and
    user-defined pieces first; then, with a `corpus`, the tokens it holds most often (corpus_counts);
    without one, single characters (the units every other piece is made of; BPE lists them last,
    whatever their frequency), then the other pieces by score (sentencepiece scores BPE merges by
    their order, unigram pieces by log-probability: common pieces score higher)."""
    sp = tokenizer.sp
    if not 1 <= size <= tokenizer.vocab_size:
        raise RequestError(f"draft_vocab_size must be in [1, {tokenizer.vocab_size}] (the tokenizer's pieces), "
                           f"got {size}", field="draft_vocab_size")
    counts = corpus_counts(tokenizer, corpus) if corpus is not None else None

    def rank(i: int) -> tuple:
        piece = sp.IdToPiece(i)
        if sp.IsControl(i) or sp.IsUnknown(i) or sp.IsByte(i) or piece in tokenizer.special_ids:
            return (0, 0, 0, i)
        if counts is not None:
            return (1, -counts[i], -sp.GetScore(i), i)
        return (1 if len(piece.replace("\u2581", "", 1) or piece) == 1 else 2, 0, -sp.GetScore(i), i)
    return sorted(sorted(range(tokenizer.vocab_size), key=rank)[:size])


class Drafter:
    """The draft model and its own paged KV pool; `cached[seq_id]` tokens of each are cached. With
    prefix caching the pool shares prompt prefixes as the target's does: a sequence new to the draft
    starts from the blocks its tokens begin with, and after `keep` its cached tokens are all the
    sequence's own, so their full blocks are registered when it next drafts."""

    def __init__(self, model: GemmaModel, cache: KVCache, cuda_graphs: bool = False, max_batch: int = 64,
                 max_context: int | None = None, vocab: torch.Tensor | None = None):
        """vocab: the ids of a pruned LM head's rows (GemmaWeights.lm_head), on the model's device: the
        draft proposes only those (None: every token)."""
        self.model, self.cache, self.vocab = model, cache, vocab
        # a propose's first step feeds one or two tokens a sequence (two after a window accepted whole)
        self.runner = ModelRunner(model, cache, cuda_graphs=cuda_graphs, max_graph_batch=max_batch,
                                  max_context=max_context, max_graph_width=2)
        self.cached: dict[int, int] = {}
        self.most_fed = 0  # the most tokens one sequence fed in the last propose's first forward
        self._marks: list = []  # points in time between the last propose's draft steps

    def propose(self, seqs: list, ks: list[int]) -> Proposal:
        """Draft ks[i] tokens for each sequence (and each sampled sequence's q rows [ks[i], V]), without
        reading anything on the host: on a GPU the host queues step j + 1 while step j runs, and the
        verify forward after the last.

        The first step feeds each sequence what the draft has not cached (its last token, two after a
        window accepted whole, a whole prompt when new); each later step feeds the token the step
        before picked, on the device. A sequence whose slots the draft's pool cannot hold now drafts
        nothing this time (the pool has the target's block count, but shares less of it)."""
        q_steps: list[torch.Tensor] = []  # each step's distributions of its sampled sequences
        q_rows: list[list[int]] = [[] for _ in seqs]  # each sequence's rows in their concatenation
        q_count = 0
        ks, starts = self._reserve(seqs, ks)
        self.most_fed = max((seqs[i].num_tokens - start for i, start in starts.items()), default=0)
        steps = []  # (rows of seqs that drafted, their tokens on the device)
        self._marks = [self._mark()]
        for j in range(max(ks, default=0)):
            live = [i for i, k in enumerate(ks) if k > j]
            items, ids = [], None
            for i in live:
                s = seqs[i]
                n = s.num_tokens
                if j == 0:  # what it has not cached
                    start = starts[i]
                    feed = s.tokens(start, n - start)
                else:  # the previous draft, on the device
                    start, feed = n + j - 1, [0]
                items.append(WorkItem(s.seq_id, feed, start))
                self.cached[s.seq_id] = n + j
            if j:
                prev_live, prev = steps[-1]
                ids = prev if len(live) == len(prev_live) else prev[
                    to_device([r for r, i in enumerate(prev_live) if ks[i] > j], prev.device)]
            logits = self.runner.run(items, ids)
            sampled = [r for r, i in enumerate(live) if not seqs[i].params.greedy]
            adjusts = any(seqs[i].adjusts for i in live)
            if self.vocab is not None and not sampled and not adjusts:  # a pruned head's argmax, as a token id
                nxt = self.vocab[greedy(logits)]
            else:
                if self.vocab is not None:  # a pruned head's logits, back in the vocabulary: -inf off it
                    logits = logits.new_full((len(live), self.model.cfg.vocab_size), float("-inf")).index_copy_(
                        1, self.vocab, logits)
                if adjusts:  # the target's logit_bias and min_tokens, j tokens ahead
                    adjust(logits, [seqs[i].logit_adjustment(j) for i in live])
                nxt = None if len(sampled) == len(live) else greedy(logits)  # (no argmax when every row samples)
                if sampled:
                    rows = None if nxt is None else to_device(sampled, logits.device)
                    q = probs(logits if rows is None else logits[rows], [seqs[live[r]].params for r in sampled])
                    drawn = draw(q, [seqs[live[r]].generator for r in sampled])
                    nxt = drawn if rows is None else nxt.index_copy_(0, rows, drawn)
                    for row, r in enumerate(sampled):
                        q_rows[live[r]].append(q_count + row)
                    q_steps.append(q)
                    q_count += len(sampled)
            steps.append((live, nxt))
            self._marks.append(self._mark())
        # the last proposal is never fed to the draft: it holds tokens up to d_{k-1}
        q = None if not q_steps else q_steps[0] if len(q_steps) == 1 else torch.cat(q_steps)
        if not steps:
            return Proposal(list(ks), torch.empty(0, dtype=torch.long, device=self.model.device))
        flat = torch.cat([nxt for _, nxt in steps])  # step by step; the window wants sequence by sequence
        if len(seqs) > 1 and len(steps) > 1:
            offsets, order = [0], []
            for live, _ in steps:
                offsets.append(offsets[-1] + len(live))
            rank = [0] * len(steps)  # sequences before this one that drafted at step j
            for k in ks:
                order += [offsets[j] + rank[j] for j in range(k)]
                for j in range(k):
                    rank[j] += 1
            flat = flat[to_device(order, flat.device)]
        return Proposal(list(ks), flat, q, [rows or None for rows in q_rows])

    def _reserve(self, seqs: list, ks: list[int]) -> tuple[list[int], dict[int, int]]:
        """Take the pool slots each drafting sequence's propose fills (what it has not cached, then k - 1
        drafts), starting a new one from the prefix blocks it matches; a sequence they do not fit drafts
        0. Returns (the ks drafted, {index: first uncached token})."""
        blocks, ks, starts = self.cache.blocks, list(ks), {}
        for i, k in enumerate(ks):
            if not k:
                continue
            s = seqs[i]
            start, n, new = self.cached.get(s.seq_id, 0), s.num_tokens, s.seq_id not in blocks.tables
            if blocks.prefix_caching:  # what it holds is the sequence's own (see keep)
                if new:
                    start = blocks.match(s.seq_id, s.tokens(0, n - 1))
                else:
                    blocks.register(s.seq_id, s.tokens, start)
            if blocks.reserve(s.seq_id, n - start + k - 1):
                starts[i] = start
            else:
                ks[i] = 0
                if new:
                    blocks.free(s.seq_id)  # (the blocks its match took)
        return ks, starts

    @property
    def seconds(self) -> list[float]:
        """Each draft step's time in the last propose: on a GPU from events between the steps (ask
        once the device has run them: after the step's read), else wall time."""
        marks = self._marks
        if marks and isinstance(marks[0], float):
            return [b - a for a, b in zip(marks, marks[1:])]
        return [a.elapsed_time(b) / 1e3 for a, b in zip(marks, marks[1:])]

    def _mark(self):
        """A point in time: an event on the current CUDA stream, or the wall clock."""
        if self.model.device.type != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def keep(self, seq_id: int, n: int) -> None:
        """Roll the draft cache of `seq_id` back to its first n tokens."""
        have = self.cached.get(seq_id, 0)
        if n < have:
            self.cache.blocks.rollback(seq_id, have - n)
            self.cached[seq_id] = n

    def free(self, seq_id: int) -> None:
        self.cache.blocks.free(seq_id)
        self.cached.pop(seq_id, None)


class NgramDrafter:
    """Prompt lookup (no draft model): the proposal for a sequence is what followed the earlier
    occurrence of its last tokens that matches the most of them (`min_n` to `max_n`; the latest of
    equals) in its prompt and output: code repeats names, lines and whole blocks. A proposal is
    certain (the draft's distribution is a point mass), which `verdicts` takes as q = None; it may be
    shorter than asked, or empty.

    Per sequence a hash chain, as LZ77 compressors keep: the latest end of each token pair, and for
    every position the previous end of its pair (4 bytes a token). It grows by the tokens added since
    the last call; a lookup follows the chain of the last pair through at most `max_candidates`."""

    model = cache = None
    most_fed = 0  # nothing to catch up on

    def __init__(self, max_n: int = 4, min_n: int = 2, max_candidates: int = 16, device="cpu"):
        if not 2 <= min_n <= max_n:
            raise ValueError(f"n-gram drafting needs 2 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
        self.max_n, self.min_n, self.max_candidates = max_n, min_n, max_candidates
        self.device = torch.device(device)  # where the proposals go: the target's device
        self.seconds: list[float] = []  # the last propose's lookups, counted as one draft step
        self.chains: dict[int, tuple[dict[int, int], array]] = {}  # seq_id -> (pair -> latest end, previous ends)

    def _lookup(self, seq, k: int) -> list[int]:
        length = seq.num_tokens
        latest, previous = self.chains.setdefault(seq.seq_id, ({}, array("i", [-1])))  # position 0 ends no pair
        done = len(previous)  # pairs ending at 1 .. done - 1 are chained; the last token's pair is not
        if length - 1 > done:  # (a pair that ends at the last token is the one looked up)
            new = seq.tokens(done - 1, length - done)
            for i in range(1, len(new)):
                pair = new[i - 1] << 32 | new[i]
                previous.append(latest.get(pair, -1))
                latest[pair] = done + i - 1
        if length < self.min_n + 1:
            return []
        tail = seq.tokens(length - min(self.max_n, length - 1), min(self.max_n, length - 1))
        best, best_n = -1, 0
        end = latest.get(tail[-2] << 32 | tail[-1], -1)
        for _ in range(self.max_candidates):
            if end < 0:
                break
            before = seq.tokens(max(0, end + 1 - len(tail)), min(len(tail), end + 1))
            n = 2
            while n < len(before) and before[-1 - n] == tail[-1 - n]:
                n += 1
            if n > best_n:
                best, best_n = end, n
                if n == len(tail):
                    break
            end = previous[end]
        return seq.tokens(best + 1, min(k, length - best - 1)) if best_n >= self.min_n else []

    def propose(self, seqs: list, ks: list[int]) -> Proposal:
        t = time.perf_counter()
        drafts = [self._lookup(s, k) for s, k in zip(seqs, ks)]
        self.seconds = [time.perf_counter() - t]
        return Proposal([len(d) for d in drafts], to_device([t for d in drafts for t in d], self.device, torch.long))

    def keep(self, seq_id: int, n: int) -> None:
        pass

    def free(self, seq_id: int) -> None:
        self.chains.pop(seq_id, None)
