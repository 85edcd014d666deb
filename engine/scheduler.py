"""Iteration-level scheduler (pure Python, no torch): which tokens of which sequences run next.

Each `schedule()` fills one flat batch under two budgets, `max_num_batched_tokens` and
`max_num_seqs`:
  1. running sequences first, oldest first: one decode token each, or the next chunk of a prompt
     still being prefilled (chunked prefill); when the KV pool cannot hold a running sequence's
     next tokens, the newest running sequence is preempted (its blocks freed, it is requeued at
     the front of the waiting queue and later recomputed from its prompt + output so far);
  2. then waiting sequences, first come first served, while the budgets and free blocks allow;
     with prefix caching a sequence starts from the cached blocks its tokens begin with, and one
     whose next block a running sequence is computing waits for it (later ones may go first).
A sequence is anything with `seq_id`, `num_cached` (tokens in the cache), `num_tokens` (prompt +
output so far), `lookahead` (speculative tokens to verify after its next decode token),
`cached_prompt_tokens` (None until first scheduled, then what the prefix cache held) and, for
prefix caching, `tokens(start, n)` and `reuses_prefix`. The scheduler reserves the cache slots of
what it schedules, lookahead slots included; the engine rolls back those of rejected tokens. A
sequence leaving the cache (finished or preempted) first registers its full blocks, so they can be
matched later.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .kv_cache import BlockManager


@dataclass(eq=False)
class ScheduledSeq:
    seq: object
    num_tokens: int          # tokens of this sequence in the batch
    start: int               # its tokens already cached
    lookahead: int = 0       # speculative slots reserved after them
    @property
    def completes(self) -> bool:
        """True when the batch brings the sequence fully up to date (a token will be sampled)."""
        return self.start + self.num_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[object] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int = 64, max_num_batched_tokens: int = 2048):
        if max_num_seqs <= 0 or max_num_batched_tokens <= 0:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be positive")
        self.blocks = blocks
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque = deque()
        self.running: list = []
        self.num_preemptions = 0
        self.prefix_queries = self.prefix_hits = 0  # tokens of admitted sequences / of those found cached

    def add(self, seq) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _release(self, seq) -> None:
        """Free the blocks of `seq`, registering its full ones first (no-op without prefix caching)."""
        if self.blocks.prefix_caching:
            self.blocks.register(seq.seq_id, seq.tokens, seq.num_cached)
        self.blocks.free(seq.seq_id)

    def _preempt(self, seq, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.num_cached = 0
        self.waiting.appendleft(seq)
        out.preempted.append(seq)
        self.num_preemptions += 1

    def schedule(self, skip=frozenset()) -> SchedulerOutput:
        """The next batch; running sequences whose seq_id is in `skip` sit this step out (the engine's
        async scheduling: their last token, not read yet, is certain to end them)."""
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        gone: set[int] = set()  # ids of sequences preempted during this schedule()
        for seq in list(self.running):
            if id(seq) in gone or seq.seq_id in skip:  # (gone: preempted to make room for an older one)
                continue
            if budget == 0:
                break
            n = min(seq.num_tokens - seq.num_cached, budget)
            # a window follows the one token left, but a seeded sequence's first token comes from a plain
            # step whether or not chunking or the prefix cache left its prompt's last token alone
            decoding = seq.num_tokens - seq.num_cached == 1 and not (
                seq.seeded and seq.num_cached < len(seq.prompt_ids))
            la = min(seq.lookahead, budget - n) if decoding else 0
            if decoding and la < seq.lookahead and seq.seeded:
                continue  # its window whole next step, not cut by the batch (Sequence.seeded)
            while not self.blocks.reserve(seq.seq_id, n + la):
                victim = self.running[-1]
                self._preempt(victim, out)
                gone.add(id(victim))
                if victim is seq:
                    break
            else:
                out.scheduled.append(ScheduledSeq(seq, n, seq.num_cached, la))
                budget -= n + la
        i = 0  # waiting[:i] wait for a prefix that a running sequence is computing
        while i < len(self.waiting) and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[i]
            if id(seq) in gone:
                break
            if self.blocks.prefix_caching and seq.reuses_prefix:
                seq.num_cached = self.blocks.match(seq.seq_id, seq.tokens(0, seq.num_tokens - 1))
                if self._being_computed(seq):
                    self.blocks.free(seq.seq_id)
                    seq.num_cached = 0
                    i += 1
                    continue
            n = min(seq.num_tokens - seq.num_cached, budget)
            if not self.blocks.reserve(seq.seq_id, n):
                self.blocks.free(seq.seq_id)  # gives back what the match took
                seq.num_cached = 0
                break
            self.prefix_queries += seq.num_tokens
            self.prefix_hits += seq.num_cached
            if seq.cached_prompt_tokens is None:
                seq.cached_prompt_tokens = seq.num_cached
            del self.waiting[i]
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, n, seq.num_cached))
            budget -= n
        return out

    def _being_computed(self, seq) -> bool:
        """Whether a running sequence is computing the block of tokens that `seq` would match next
        (it holds the same blocks before it, has the same tokens in it, and has not computed it yet):
        then `seq` waits and matches it once registered, instead of computing it too (the n samples
        of one request, or requests with one new long prefix, arriving together)."""
        bs, m = self.blocks.block_size, seq.num_cached
        if seq.num_tokens - 1 < m + bs:  # no full block left to match (the last token is computed)
            return False
        # a registered block's key names the block before it, so holding `seq`'s last matched block at
        # the same place means holding all the blocks before it too
        tables, last = self.blocks.tables, m // bs - 1
        mine = tables[seq.seq_id][last] if m else None
        block = None
        for r in self.running:
            if r.num_cached < m + bs <= r.num_tokens and (not m or tables[r.seq_id][last] == mine):
                block = block or seq.tokens(m, bs)
                if r.tokens(m, bs) == block:
                    return True
        return False

    def finish(self, seq) -> None:
        """Drop a finished or aborted sequence wherever it is and free its blocks at once (registered
        first, with prefix caching)."""
        if seq in self.running:
            self.running.remove(seq)
        else:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        self._release(seq)

    def check_invariants(self) -> None:
        self.blocks.check_invariants()
        owners = set(self.blocks.tables)
        assert owners <= {s.seq_id for s in self.running}, "a block table belongs to no running sequence"
        assert len(self.running) <= self.max_num_seqs
        assert not set(map(id, self.running)) & set(map(id, self.waiting)), "a sequence is running and waiting"
        for seq in self.running:  # between steps: what is reserved is what is cached
            assert self.blocks.lengths.get(seq.seq_id, 0) == seq.num_cached, f"sequence {seq.seq_id}: slots reserved " \
                f"{self.blocks.lengths.get(seq.seq_id, 0)} != cached {seq.num_cached}"
