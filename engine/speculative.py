"""Speculative decoding: a small draft model proposes, the target verifies, losslessly.

Per step and per sequence with lookahead k (its last token t already sampled, not yet cached):
  1. the draft catches up on the tokens it has not cached, then proposes d1..dk one token at a
     time (greedy requests: argmax; sampled ones: draws from the draft's processed distribution q),
     each step taking the one before's tokens on the device;
  2. the target scores [t, d1..dk] in ONE forward (a k+1 verify window in the flat batch, the drafts
     taken from the device), giving p_0..p_k;
  3. `verdicts`, for all windows in one device read (the step's only one): greedy — keep d_i
     while d_i == argmax p_{i-1}, then append argmax at the first mismatch (or the bonus argmax
     p_k); sampled — keep d_i with probability min(1, p(d_i)/q(d_i)), on rejection draw from
     norm(max(0, p - q)) (Leviathan et al. 2023; Chen et al. 2023), so the output is distributed
     exactly as the target's;
  4. both caches roll back the slots of rejected tokens.
"""
from __future__ import annotations

import statistics
import time
from array import array
from collections import deque
from dataclasses import dataclass
from itertools import accumulate

import torch

from .kv_cache import KVCache
from .model import GemmaModel
from .runner import ModelRunner, WorkItem
from .sampling import adjust, draw, greedy, probs
from .transfer import read, to_device


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


@dataclass
class Proposal:
    """A step's draft tokens: counts[i] for sequence i (prompt lookup may find fewer than asked), all
    of them sequence by sequence in `tokens` (int64, on the device: the verify window takes them from
    there, and the host reads them once, with the verdicts), and for each sequence the draft's
    distributions [counts[i], V] it sampled from in `qs` (None: greedy, or certain proposals)."""
    counts: list[int]
    tokens: torch.Tensor
    qs: list

    def lists(self) -> list[list[int]]:
        """The drafts of each sequence, on the host (a device read)."""
        flat, out = self.tokens.tolist(), []
        for n in self.counts:
            out.append(flat[:n])
            flat = flat[n:]
        return out


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
        self._marks: list = []  # points in time between the last propose's draft steps

    def propose(self, seqs: list, ks: list[int]) -> Proposal:
        """Draft ks[i] tokens for each sequence (and each sampled sequence's q rows [ks[i], V]), without
        reading anything on the host: on a GPU the host queues step j + 1 while step j runs, and the
        verify forward after the last.

        The first step feeds each sequence what the draft has not cached (its last token, two after a
        window accepted whole, a whole prompt when new); each later step feeds the token the step
        before picked, on the device."""
        qs: list[list[torch.Tensor]] = [[] for _ in seqs]
        blocks = self.cache.blocks
        self.most_fed = 0
        steps = []  # (rows of seqs that drafted, their tokens on the device)
        self._marks = [self._mark()]
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
            self._marks.append(self._mark())
        # the last proposal is never fed to the draft: it holds tokens up to d_{k-1}
        qs = [torch.stack(q) if q else None for q in qs]
        if not steps:
            return Proposal(list(ks), torch.empty(0, dtype=torch.long, device=self.model.device), qs)
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
        return Proposal(list(ks), flat, qs)

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
    certain (the draft's distribution is a point mass), which `accept` takes as q = None; it may be
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
        return Proposal([len(d) for d in drafts], to_device([t for d in drafts for t in d], self.device, torch.long),
                        [None] * len(seqs))

    def keep(self, seq_id: int, n: int) -> None:
        pass

    def free(self, seq_id: int) -> None:
        self.chains.pop(seq_id, None)


@dataclass
class Window:
    """One sequence's verify window for `verdicts`: its request's params and generator, its k + 1 rows
    of the target's logits (row i scores the token after d_i; row 0 follows the last token), its k
    drafts' span in the step's flat draft tokens, and the draft's distributions [k, V] (None: certain
    proposals, q(d_i) = 1)."""
    params: object
    generator: torch.Generator | None
    rows: slice
    drafts: slice
    q: torch.Tensor | None = None

    @property
    def k(self) -> int:
        return self.drafts.stop - self.drafts.start


def verdicts(logits: torch.Tensor, drafts: torch.Tensor, windows: list[Window]) -> list[list[int]]:
    """Each window's tokens to append: the accepted prefix of its drafts plus one target token, in
    ONE device read for the lot (the drafts come with it: nothing was read before the verify forward).

    Greedy windows keep d_i while it equals the argmax of row i - 1, then append the argmax at the first
    mismatch (or row k's). Sampled ones are decided on the device by `_sampled_verdicts`."""
    if not windows:
        return []
    greedy_ws = [w for w in windows if w.params.greedy]
    sampled_ws = [w for w in windows if not w.params.greedy]
    parts = [drafts]
    if greedy_ws:
        rows = [r for w in greedy_ws for r in range(w.rows.start, w.rows.stop)]
        parts.append(greedy(_rows(logits, rows)))
    if sampled_ws:
        parts += _sampled_verdicts(logits, drafts, sampled_ws)
    host = read(*parts)
    flat, kept = host[0], {}
    if greedy_ws:
        best, at = host[1], 0
        for w in greedy_ws:
            d, b = flat[w.drafts], best[at: at + w.k + 1]
            at += w.k + 1
            i = next((i for i in range(w.k) if d[i] != b[i]), w.k)
            kept[id(w)] = d[:i] + [b[i]]
    if sampled_ws:
        for w, cut, tok in zip(sampled_ws, host[-2], host[-1]):
            kept[id(w)] = flat[w.drafts][:cut] + [tok]
    return [kept[id(w)] for w in windows]


def _sampled_verdicts(logits: torch.Tensor, drafts: torch.Tensor, windows: list[Window]) -> list[torch.Tensor]:
    """(accepted drafts [W], the token after them [W]) of sampled windows, on the device. Draft i of a
    window is accepted with probability min(1, p(d_i) / q(d_i)) (u_i ~ U(0, 1) from the sequence's
    generator, p and q after the request's temperature and filters); at the first rejection the token
    is drawn from norm(max(0, p - q)) (p when that is all zero), after k acceptances from p's row k.
    Each generator gives its k uniforms and then one draw, as the window alone would."""
    dev = logits.device
    ks = [w.k for w in windows]
    p = probs(_rows(logits, [r for w in windows for r in range(w.rows.start, w.rows.stop)]),
              [w.params for w in windows for _ in range(w.k + 1)])
    with_q = [w.q for w in windows if w.q is not None]
    q_all = with_q[0] if len(with_q) == 1 else torch.cat(with_q) if with_q else p[:1]  # (p: a stand-in never read)
    first = list(accumulate((k + 1 for k in ks), initial=0))  # each window's first row in p
    q_first = list(accumulate((w.k if w.q is not None else 0 for w in windows), initial=0))
    q0 = [q_first[i] if w.q is not None else -1 for i, w in enumerate(windows)]  # -1: certain drafts
    # the host's indices in one copy per window and one per draft token
    row0, k_of, q0_dev, d0 = to_device([first[:-1], ks, q0, [w.drafts.start for w in windows]], dev)
    cut = k_of.clone()  # drafts accepted per window
    if sum(ks):
        wid = [i for i, k in enumerate(ks) for _ in range(k)]
        local = [j for k in ks for j in range(k)]
        pos, p_row, q_row, wid, local = to_device([
            [windows[i].drafts.start + j for i, j in zip(wid, local)], [first[i] + j for i, j in zip(wid, local)],
            [max(q0[i], 0) + j * (q0[i] >= 0) for i, j in zip(wid, local)], wid, local], dev)
        toks = drafts[pos]
        u = torch.cat([torch.rand(w.k, generator=w.generator, device=dev) for w in windows]).double()
        pd = p[p_row, toks].double()
        qd = torch.where(q0_dev[wid] < 0, 1.0, q_all[q_row, toks].double())
        cut.scatter_reduce_(0, wid, torch.where(u * qd >= pd, local, k_of[wid]), "amin")  # first rejection
    bonus = cut == k_of
    has_q = q0_dev >= 0
    target = p[row0 + cut]
    # the draft's row at the first rejection: q's; onehot(d) for certain drafts; none after k acceptances
    draft = q_all[torch.where(has_q & ~bonus, q0_dev + cut, 0)].mul_((has_q & ~bonus)[:, None])
    if any(w.q is None and w.k for w in windows):
        at = (d0 + cut).clamp_(max=len(drafts) - 1)
        draft.scatter_add_(1, drafts[at][:, None], (~has_q & ~bonus).to(draft.dtype)[:, None])
    # max(0, p - q), unnormalised (draw normalises); p where that is all zero. In place: [W, V] is large on a CPU
    residual = torch.sub(target, draft, out=draft).clamp_(min=0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, target, out=residual)
    return [cut, draw(residual, [w.generator for w in windows])]


def _rows(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """x[rows] (a copy), or x itself when rows are all of its rows in order."""
    if len(rows) == x.shape[0] and rows == list(range(len(rows))):
        return x
    return x[to_device(rows, x.device)]


def accept(params, generator, drafts: list[int], target_logits: torch.Tensor,
           q: torch.Tensor | None) -> list[int]:
    """`verdicts` for one window: target_logits [k+1, V] fp32, q [k, V] or None (certain drafts)."""
    k = len(drafts)
    tokens = to_device(drafts, target_logits.device, torch.long)
    return verdicts(target_logits, tokens, [Window(params, generator, slice(0, k + 1), slice(0, k), q)])[0]
