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

from dataclasses import dataclass
from itertools import accumulate

import torch

from .sampling import draw, greedy, probs
from .transfer import read, take_rows, to_device


@dataclass
class Window:
    """One sequence's verify window for `verdicts`: its request's params and generator, its k + 1 rows
    of the target's logits (row i scores the token after d_i; row 0 follows the last token), its k
    drafts' span in the step's flat draft tokens, and the rows of the step's draft distributions that
    d_1..d_k were drawn from (None: certain proposals, q(d_i) = 1)."""
    params: object
    generator: torch.Generator | None
    rows: slice
    drafts: slice
    q_rows: list[int] | None = None

    @property
    def k(self) -> int:
        return self.drafts.stop - self.drafts.start


def verdicts(logits: torch.Tensor, drafts: torch.Tensor, windows: list[Window],
             q: torch.Tensor | None = None) -> list[list[int]]:
    """Each window's tokens to append: the accepted prefix of its drafts plus one target token, in
    ONE device read for the lot (the drafts come with it: nothing was read before the verify forward).
    q: the draft distributions [rows, V] that windows' `q_rows` index (read in place, not gathered).

    Greedy windows keep d_i while it equals the argmax of row i - 1, then append the argmax at the first
    mismatch (or row k's). Sampled ones are decided on the device by `_sampled_verdicts`."""
    if not windows:
        return []
    greedy_ws = [w for w in windows if w.params.greedy]
    sampled_ws = [w for w in windows if not w.params.greedy]
    parts = [drafts]
    if greedy_ws:
        rows = [r for w in greedy_ws for r in range(w.rows.start, w.rows.stop)]
        parts.append(greedy(take_rows(logits, rows)))
    if sampled_ws:
        parts += _sampled_verdicts(logits, drafts, sampled_ws, q)
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


def _sampled_verdicts(logits: torch.Tensor, drafts: torch.Tensor, windows: list[Window],
                      q: torch.Tensor | None) -> list[torch.Tensor]:
    """(accepted drafts [W], the token after them [W]) of sampled windows, on the device. Draft i of a
    window is accepted with probability min(1, p(d_i) / q(d_i)) (u_i ~ U(0, 1) from the sequence's
    generator, p and q after the request's temperature and filters); at the first rejection the token
    is drawn from norm(max(0, p - q)) (p when that is all zero), after k acceptances from p's row k.
    Each generator gives its k uniforms and then one draw, as the window alone would."""
    dev = logits.device
    ks = [w.k for w in windows]
    p = probs(take_rows(logits, [r for w in windows for r in range(w.rows.start, w.rows.stop)]),
              [w.params for w in windows for _ in range(w.k + 1)])
    q = p[:1] if q is None else q  # (with certain drafts only: a stand-in, never read)
    first = list(accumulate((k + 1 for k in ks), initial=0))  # each window's first row in p
    own = list(accumulate(ks, initial=0))  # each window's first draft among these windows' drafts
    has_q = [w.q_rows is not None for w in windows]
    # the host's indices in one copy per window and one per draft token
    row0, k_of, own0, d0, has_q_dev = to_device([first[:-1], ks, own[:-1], [w.drafts.start for w in windows],
                                                 has_q], dev)
    has_q_dev = has_q_dev.bool()
    cut = k_of.clone()  # drafts accepted per window
    q_at_cut = torch.zeros_like(cut)  # the q row of each window's first rejected draft
    if own[-1]:
        wid = [i for i, k in enumerate(ks) for _ in range(k)]
        local = [j for k in ks for j in range(k)]
        pos, p_row, q_row, wid, local = to_device([
            [windows[i].drafts.start + j for i, j in zip(wid, local)], [first[i] + j for i, j in zip(wid, local)],
            [windows[i].q_rows[j] if has_q[i] else 0 for i, j in zip(wid, local)], wid, local], dev)
        toks = drafts[pos]
        u = torch.cat([torch.rand(w.k, generator=w.generator, device=dev) for w in windows]).double()
        pd = p[p_row, toks].double()
        qd = torch.where(has_q_dev[wid], q[q_row, toks].double(), 1.0)
        cut.scatter_reduce_(0, wid, torch.where(u * qd >= pd, local, k_of[wid]), "amin")  # first rejection
        q_at_cut = q_row[(own0 + cut).clamp_(max=own[-1] - 1)]
    bonus = cut == k_of
    target = p[row0 + cut]
    # the draft's row at the first rejection: q's; onehot(d) for certain drafts; none after k acceptances
    take = has_q_dev & ~bonus
    draft = q[torch.where(take, q_at_cut, 0)].mul_(take[:, None])
    if not all(has_q) and own[-1]:
        at = (d0 + cut).clamp_(max=len(drafts) - 1)
        draft.scatter_add_(1, drafts[at][:, None], (~has_q_dev & ~bonus).to(draft.dtype)[:, None])
    # max(0, p - q), unnormalised (draw normalises); p where that is all zero. In place: [W, V] is large on a CPU
    residual = torch.sub(target, draft, out=draft).clamp_(min=0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, target, out=residual)
    return [cut, draw(residual, [w.generator for w in windows])]


def accept(params, generator, drafts: list[int], target_logits: torch.Tensor,
           q: torch.Tensor | None) -> list[int]:
    """`verdicts` for one window: target_logits [k+1, V] fp32, q [k, V] or None (certain drafts)."""
    k = len(drafts)
    tokens = to_device(drafts, target_logits.device, torch.long)
    window = Window(params, generator, slice(0, k + 1), slice(0, k), None if q is None else list(range(k)))
    return verdicts(target_logits, tokens, [window], q)[0]
