"""Speculative decoding: a small draft model proposes, the target verifies, losslessly.

Per step and per sequence with lookahead k (its last token t already sampled, not yet cached):
  1. the draft catches up on the tokens it has not cached, then proposes d1..dk one token at a
     time (greedy requests: argmax; sampled ones: draws from the draft's processed distribution q);
  2. the target scores [t, d1..dk] in ONE forward (a k+1 verify window in the flat batch), giving
     p_0..p_k;
  3. `accept`: greedy — keep d_i while d_i == argmax p_{i-1}, then append argmax at the first
     mismatch (or the bonus argmax p_k); sampled — keep d_i with probability min(1, p(d_i)/q(d_i)),
     on rejection draw from norm(max(0, p - q)) (Leviathan et al. 2023; Chen et al. 2023), so
     the output is distributed exactly as the target's;
  4. both caches roll back the slots of rejected tokens.
"""
from __future__ import annotations

import statistics
import time
from array import array
from collections import deque

import torch

from .kv_cache import KVCache
from .model import GemmaModel
from .runner import ModelRunner, WorkItem
from .sampling import adjust, draw, greedy, probs
from .transfer import to_device


NGRAM = "[ngram]"  # draft_model value for prompt-lookup drafting (NgramDrafter)
PROBE_EVERY = 16   # a sequence that stopped drafting tries one draft token again after this many steps,
PROBE_MAX = 256    # doubling (up to this) after each probe that did not bring drafting back
CALIBRATE_EVERY = 64  # speculative steps in a row after which one step decodes plainly (a fresh baseline)


def best_lookahead(alpha: float, k_max: int, draft_cost: float, verify_slope: float = 0.0,
                   first_draft_cost: float | None = None, measured: tuple = ()) -> int:
    """The lookahead k in 0..k_max with the most expected tokens per unit of time, the unit being one
    plain decode step. At acceptance rate alpha a window of k drafts yields (1 - alpha^(k+1)) /
    (1 - alpha) tokens (the last one the target's own) for k draft steps, the first costing
    `first_draft_cost` (it also catches the draft up; default `draft_cost`) and each other
    `draft_cost`, plus the target's verify step, which costs 1 + k * `verify_slope` (each window token
    adds that much to the target's forward); `measured` ((k, cost), ...) replaces that model by what
    whole windows of k were timed at. k = 0 is plain decoding, one token per unit. Ties go to the
    smaller k."""
    first = draft_cost if first_draft_cost is None else first_draft_cost
    timed = dict(measured)

    def tokens_per_cost(k: int) -> float:
        if k == 0:
            return 1.0
        tokens = k + 1 if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)
        return tokens / timed.get(k, 1 + first + (k - 1) * draft_cost + k * verify_slope)
    return max(range(k_max + 1), key=tokens_per_cost)


def updated_rate(rate: float, accepted: int, proposed: int, decay: float) -> float:
    """The acceptance rate alpha (the chance that a draft token is accepted given the ones before it
    were) as a mean over draft positions that decays by `decay` per position: a window is `accepted`
    successes, then one failure if accepted < proposed. The positions after the first rejection were
    never tried; counting them as failures (accepted / proposed) reads a k-token window's
    (alpha - alpha^(k+1)) / ((1 - alpha) k), 0.33 for alpha 0.6 at k = 4, and drags the lookahead down."""
    for _ in range(accepted):
        rate = decay * rate + (1 - decay)
    return decay * rate if accepted < proposed else rate


class StepCosts:
    """Measured seconds of a plain decode step, of a window's first draft step (which also catches
    the draft up) and of each later one, and of a speculative decode step's target side (verify
    forward, acceptance, bookkeeping) with its window tokens per sequence: the adaptive lookahead's
    costs in plain steps, each from the last 32 samples, by median (a shared machine's stalls would
    drag a mean), recomputed every 8th sample. The target side is taken to cost 1 + slope * (window
    tokens per sequence) plain steps: on a GPU at small batch a window is nearly free (slope ~ 0), on
    a CPU or at large batch every token costs. Fixed per-step costs (host work, launches), which
    dominate small models and CPUs, are in the samples; a weight-bytes ratio leaves them out. Whole
    steps in which every sequence drafted k are timed too (`window_costs`): measured, they replace
    that model for k."""

    KINDS = ("plain", "verify", "first", "draft")
    REFRESH = 8  # after the first REFRESH samples of a kind, its median is recomputed every REFRESH-th
    WINDOW_SAMPLES = 4  # timed windows of one lookahead before their cost replaces the model's

    def __init__(self, draft_prior: float, window: int = 32):
        self.draft_prior = draft_prior  # draft cost until both sides are measured
        self.samples = {kind: deque(maxlen=window) for kind in self.KINDS}  # verify: (seconds, tokens)
        self.recorded = dict.fromkeys(self.KINDS, 0)
        self.median: dict[str, float | None] = dict.fromkeys(self.KINDS)  # seconds; kept current by record()
        self.verify_slope = 0.0  # kept current by record(); 0 until plain and verify steps are measured
        self.windows: dict[int, deque] = {}  # lookahead k -> seconds of whole steps that all drafted k
        self.windows_recorded: dict[int, int] = {}
        self.window_costs: tuple = ()  # ((k, plain steps), ...) kept current by record_window()

    def record_window(self, k: int, seconds: float) -> None:
        """A whole speculative step (drafts, verify, acceptance) in which every sequence drafted k."""
        samples = self.windows.setdefault(k, deque(maxlen=16))
        samples.append(seconds)
        self.windows_recorded[k] = count = self.windows_recorded.get(k, 0) + 1
        if count % self.WINDOW_SAMPLES or not self.median["plain"]:
            return  # refreshed every WINDOW_SAMPLES-th window of k
        self.window_costs = tuple(sorted((j, statistics.median(t) / self.median["plain"])
                                         for j, t in self.windows.items() if len(t) >= self.WINDOW_SAMPLES))

    def record(self, kind: str, seconds: float, window_tokens: float = 0.0) -> None:
        """One step's seconds; for "verify", also its draft tokens per scheduled sequence (> 0)."""
        self.samples[kind].append((seconds, window_tokens) if kind == "verify" else seconds)
        self.recorded[kind] += 1
        if self.recorded[kind] > self.REFRESH and self.recorded[kind] % self.REFRESH:
            return  # a median of the last 32 moves slowly: every step need not pay for it
        verify, plain = self.samples["verify"], self.median["plain"]
        if kind == "verify":
            self.median[kind] = statistics.median(t for t, _ in verify)
        else:
            self.median[kind] = plain = statistics.median(self.samples[kind])
        if kind in ("plain", "verify") and verify and plain:
            self.verify_slope = min(4.0, statistics.median(max(0.0, t / plain - 1) / x for t, x in verify))

    def _ratio(self, seconds: float | None) -> float:
        base = self.median["plain"] or self.median["verify"]
        return self.draft_prior if seconds is None or base is None else min(16.0, seconds / base)

    @property
    def first_draft_cost(self) -> float:
        return self._ratio(self.median["first"])

    @property
    def draft_cost(self) -> float:
        """A later draft step (the first's cost until windows of two drafts have run)."""
        return self._ratio(self.median["draft"] or self.median["first"])


class Drafter:
    """The draft model and its own paged KV pool; `cached[seq_id]` tokens of each are cached. With
    prefix caching the pool shares prompt prefixes as the target's does: a sequence new to the draft
    starts from the blocks its tokens begin with, and after `keep` its cached tokens are all the
    sequence's own, so their full blocks are registered when it next drafts."""

    def __init__(self, model: GemmaModel, cache: KVCache, cuda_graphs: bool = False, max_batch: int = 64,
                 max_context: int | None = None):
        self.model, self.cache = model, cache
        # a propose's first step feeds one or two tokens a sequence (two after a window accepted whole)
        self.runner = ModelRunner(model, cache, cuda_graphs=cuda_graphs, max_graph_batch=max_batch,
                                  max_context=max_context, max_graph_width=2)
        self.cached: dict[int, int] = {}
        self.most_fed = 0  # the most tokens one sequence fed in the last propose's first forward
        self.seconds: list[float] = []  # wall time of each draft step of the last propose

    def propose(self, seqs: list, ks: list[int]) -> tuple[list[list[int]], list[torch.Tensor | None]]:
        """Draft ks[i] tokens for each sequence; also each sampled sequence's q rows [ks[i], V].

        The first step feeds each sequence what the draft has not cached (its last token, two after a
        window accepted whole, a whole prompt when new); each later step feeds the token the step
        before picked, taken from the device: the host reads the proposals once, after the last
        step, so on a GPU it queues step j + 1 while step j runs. `seconds` gets each step's time:
        on a GPU from events between the steps (read after the last), else wall time."""
        qs: list[list[torch.Tensor]] = [[] for _ in seqs]
        blocks = self.cache.blocks
        self.most_fed = 0
        steps = []  # (rows of seqs that drafted, their tokens on the device)
        marks = [self._mark()]
        for j in range(max(ks, default=0)):
            live = [i for i, k in enumerate(ks) if k > j]
            items, ids = [], None
            for i in live:
                s = seqs[i]
                start, n = self.cached.get(s.seq_id, 0), s.num_tokens   # feed token_ids from start
                if j == 0:
                    if blocks.prefix_caching:  # what it holds is the sequence's own (see keep)
                        if s.seq_id in blocks.tables:
                            blocks.register(s.seq_id, s.tokens, start)
                        else:
                            start = blocks.match(s.seq_id, s.tokens(0, n - 1))
                    feed = s.tokens(start, n - start)
                    self.most_fed = max(self.most_fed, len(feed))
                else:  # the previous draft, on the device
                    feed = [0]
                blocks.append(s.seq_id, len(feed))
                items.append(WorkItem(s.seq_id, feed, start))
                self.cached[s.seq_id] = n + j
            if j:
                prev_live, prev = steps[-1]
                ids = prev if len(live) == len(prev_live) else prev[
                    to_device([r for r, i in enumerate(prev_live) if ks[i] > j], prev.device)]
            logits = self.runner.run(items, ids)
            if any(seqs[i].adjusts for i in live):  # the target's logit_bias and min_tokens, j tokens ahead
                adjust(logits, [seqs[i].logit_adjustment(j) for i in live])
            nxt = greedy(logits)
            sampled = [r for r, i in enumerate(live) if not seqs[i].params.greedy]
            if sampled:
                rows = None if len(sampled) == len(live) else to_device(sampled, logits.device)
                q = probs(logits if rows is None else logits[rows], [seqs[live[r]].params for r in sampled])
                drawn = draw(q, [seqs[live[r]].generator for r in sampled])
                nxt = drawn if rows is None else nxt.index_copy_(0, rows, drawn)
                for row, r in enumerate(sampled):
                    qs[live[r]].append(q[row])
            steps.append((live, nxt))
            marks.append(self._mark())
        drafts: list[list[int]] = [[] for _ in seqs]
        if steps:  # one read for every step's proposals (it waits for the device)
            flat = iter(torch.cat([nxt for _, nxt in steps]).tolist())
            for live, _ in steps:
                for i in live:
                    drafts[i].append(next(flat))
        self.seconds = self._elapsed(marks)
        # the last proposal is never fed to the draft: it holds tokens up to d_{k-1}
        return drafts, [torch.stack(q) if q else None for q in qs]

    def _mark(self):
        """A point in time: an event on the current CUDA stream, or the wall clock."""
        if self.model.device.type != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    @staticmethod
    def _elapsed(marks: list) -> list[float]:
        """Seconds between consecutive marks (events: once the device has passed them)."""
        if marks and isinstance(marks[0], float):
            return [b - a for a, b in zip(marks, marks[1:])]
        return [a.elapsed_time(b) / 1e3 for a, b in zip(marks, marks[1:])]

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
    certain (the draft's distribution is a point mass), which `accept` takes as q = None; it may be
    shorter than asked, or empty.

    Per sequence a hash chain, as LZ77 compressors keep: the latest end of each token pair, and for
    every position the previous end of its pair (4 bytes a token). It grows by the tokens added since
    the last call; a lookup follows the chain of the last pair through at most `max_candidates`."""

    model = cache = None
    most_fed = 0  # nothing to catch up on

    def __init__(self, max_n: int = 4, min_n: int = 2, max_candidates: int = 16):
        if not 2 <= min_n <= max_n:
            raise ValueError(f"n-gram drafting needs 2 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
        self.max_n, self.min_n, self.max_candidates = max_n, min_n, max_candidates
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

    def propose(self, seqs: list, ks: list[int]) -> tuple[list[list[int]], list[None]]:
        t = time.perf_counter()
        drafts = [self._lookup(s, k) for s, k in zip(seqs, ks)]
        self.seconds = [time.perf_counter() - t]
        return drafts, [None] * len(seqs)

    def keep(self, seq_id: int, n: int) -> None:
        pass

    def free(self, seq_id: int) -> None:
        self.chains.pop(seq_id, None)


def greedy_picks(logits: torch.Tensor, windows: list[slice]) -> dict[int, list[int]]:
    """The argmax of every row of the given row ranges of `logits`, in one device read:
    {range start: [argmax of each of its rows]}."""
    if not windows:
        return {}
    if sum(w.stop - w.start for w in windows) == logits.shape[0]:  # the ranges cover every row
        flat = greedy(logits).tolist()
        return {w.start: flat[w.start: w.stop] for w in windows}
    idx = to_device([r for w in windows for r in range(w.start, w.stop)], logits.device)
    flat, picks, at = greedy(logits[idx]).tolist(), {}, 0
    for w in windows:
        picks[w.start], at = flat[at: at + w.stop - w.start], at + w.stop - w.start
    return picks


def accept(params, generator, drafts: list[int], target_logits: torch.Tensor,
           q: torch.Tensor | None, best: list[int] | None = None) -> list[int]:
    """Tokens to append for one sequence: the accepted prefix of `drafts` plus one target token.
    target_logits: [k+1, V] fp32 (row i scores the token after d_i; row 0 follows the last token).
    q: the draft's distributions [k, V], or None for certain proposals (q(d_i) = 1: d_i is accepted
    with probability p(d_i), and on rejection the token is drawn from p without d_i).
    best: for a greedy request, the rows' argmax if already read (`greedy_picks`)."""
    k = len(drafts)
    if params.greedy:
        best = greedy(target_logits).tolist() if best is None else best
        for i, d in enumerate(drafts):
            if d != best[i]:
                return drafts[:i] + [best[i]]
        return drafts + [best[k]]
    return accept_sampled([(params, generator, drafts, target_logits, q)])[0]


def accept_sampled(windows: list[tuple]) -> list[list[int]]:
    """`accept` for sampled sequences' windows (params, generator, drafts, target_logits, q), all at
    once: two device reads for the lot. Draft i of a window is accepted with probability
    min(1, p(d_i) / q(d_i)) (u_i ~ U(0, 1) from the sequence's generator); at the first rejection
    the token is drawn from norm(max(0, p - q)) (p when that is all zero), after k acceptances from
    p's row k. Each generator gives its k uniforms and then one draw, as one window alone would."""
    if not windows:
        return []
    dev = windows[0][3].device
    p = probs(torch.cat([t for *_, t, _ in windows]), [w[0] for w in windows for _ in range(len(w[2]) + 1)])
    starts, n = [], 0
    for w in windows:
        starts.append(n)
        n += len(w[2]) + 1

    def ids(x):
        return torch.tensor(x, dtype=torch.long, device=dev)

    rows = ids([s + j for s, w in zip(starts, windows) for j in range(len(w[2]))])
    toks = ids([d for w in windows for d in w[2]])
    if len(toks):
        u = torch.cat([torch.rand(len(d), generator=g, device=dev) for _, g, d, _, _ in windows])
        qd = torch.cat([torch.ones(len(d), device=dev) if q is None else q[ids(range(len(d))), ids(d)]
                        for _, _, d, _, q in windows])
        u, pd, qd = torch.stack([u, p[rows, toks], qd]).tolist()  # read 1
    residuals, cut, at = [], [], 0
    for s, (_, _, d, _, q) in zip(starts, windows):
        i = next((j for j in range(len(d)) if u[at + j] * qd[at + j] >= pd[at + j]), len(d))  # first rejection
        at += len(d)
        cut.append(i)
        if i == len(d):  # all accepted: the bonus token from p's last row
            residuals.append(p[s + i])
            continue
        if q is None:  # max(0, p - onehot(d)) = p without d
            residual = p[s + i].clone()
            residual[d[i]] = 0
        else:
            residual = (p[s + i] - q[i]).clamp_(min=0)
        total = residual.sum()
        residuals.append(torch.where(total > 0, residual / total, p[s + i]))
    drawn = draw(torch.stack(residuals), [w[1] for w in windows]).tolist()  # read 2
    return [w[2][:i] + [tok] for w, i, tok in zip(windows, cut, drawn)]
