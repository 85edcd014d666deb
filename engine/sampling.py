"""SamplingParams (validated against one table of ranges) and the batched sampler.

Sampling of one row of fp32 logits l over the vocabulary:
  0. adjustments (`Sequence.logit_adjustment`): + logit_bias[t] for each biased token t, and -inf
     on the stop token ids (eos included) while fewer than min_tokens tokens have been generated;
  1. penalties: repetition r (HF rule: l/r where l > 0 else l*r, over prompt and output tokens),
     presence p and frequency f (OpenAI rule: l - p*[count > 0] - f*count over output tokens);
  2. temperature 0 -> argmax; else l / T, then top-k, top-p (nucleus) and min-p filtering;
  3. a draw from softmax with the request's own torch.Generator (seeded when `seed` is set), so a
     seed gives the same tokens whatever else is in the batch.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, fields

import torch

from gemforge.kernels import argmax

from .errors import RequestError
from .transfer import to_device

INF = math.inf
# field: (minimum, maximum, min_inclusive, max_inclusive, description). One table drives the
# checks, the error messages, the server's validation and the docs.
RANGES: dict[str, tuple] = {
    "n": (1, 64, True, True, "number of completions"),
    "max_tokens": (0, 1 << 20, True, True, "tokens to generate at most (0: prompt_logprobs only)"),
    "min_tokens": (0, 1 << 20, True, True, "tokens before eos/stop may end the output"),
    "temperature": (0.0, 100.0, True, True, "0 = greedy"),
    "top_k": (-1, 1 << 20, True, True, "-1 or 0 = whole vocabulary"),
    "top_p": (0.0, 1.0, False, True, "nucleus mass"),
    "min_p": (0.0, 1.0, True, True, "drop tokens below min_p * max probability"),
    "repetition_penalty": (0.0, 10.0, False, True, "1 = off"),
    "presence_penalty": (-2.0, 2.0, True, True, "0 = off"),
    "frequency_penalty": (-2.0, 2.0, True, True, "0 = off"),
    "logprobs": (0, 20, True, True, "top log-probabilities per token"),
    "prompt_logprobs": (0, 20, True, True, "top log-probabilities per prompt token"),
    "seed": (-(1 << 63), (1 << 63) - 1, True, True, "random seed"),
}
_INTS = {"n", "max_tokens", "min_tokens", "top_k", "logprobs", "prompt_logprobs", "seed"}


def check_range(name: str, value) -> None:
    """Raise RequestError(field=name) unless `value` is of the right type and in RANGES[name]."""
    lo, hi, lo_in, hi_in, desc = RANGES[name]
    if name in _INTS:
        ok_type = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok_type = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok_type:
        kind = "an integer" if name in _INTS else "a finite number"
        raise RequestError(f"{name} must be {kind} ({desc}), got {value!r}", field=name)
    if not ((lo <= value if lo_in else lo < value) and (value <= hi if hi_in else value < hi)):
        interval = f"{'[' if lo_in else '('}{lo}, {hi}{']' if hi_in else ')'}"
        raise RequestError(f"{name} must be in {interval} ({desc}), got {value!r}", field=name)


@dataclass
class SamplingParams:
    """Per-request generation settings (OpenAI / vLLM names and defaults)."""
    n: int = 1
    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None  # each prompt token's logprob given those before it (+ top n)
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, in [-100, 100] (OpenAI)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in RANGES and v is not None:
                check_range(f.name, v)
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in self.stop):
            raise RequestError(f"stop must be a non-empty string or a list of them, got {self.stop!r}", field="stop")
        if not isinstance(self.stop_token_ids, (list, tuple)) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.stop_token_ids):
            raise RequestError(f"stop_token_ids must be a list of non-negative integers, got {self.stop_token_ids!r}",
                               field="stop_token_ids")
        if not isinstance(self.ignore_eos, bool):
            raise RequestError(f"ignore_eos must be a boolean, got {self.ignore_eos!r}", field="ignore_eos")
        if self.logit_bias is not None:
            self.logit_bias = _checked_bias(self.logit_bias)
        if self.max_tokens == 0 and self.prompt_logprobs is None:
            raise RequestError("max_tokens=0 generates nothing: it is only for prompt_logprobs (echo with logprobs)",
                               field="max_tokens")
        if self.min_tokens > self.max_tokens:
            raise RequestError(f"min_tokens {self.min_tokens} exceeds max_tokens {self.max_tokens}", field="min_tokens")
        self.stop, self.stop_token_ids = list(self.stop), list(self.stop_token_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def make_generator(self, device) -> torch.Generator | None:
        """The request's private random stream (None for greedy)."""
        if self.greedy:
            return None
        g = torch.Generator(device=device)
        if self.seed is None:
            g.seed()
        else:
            g.manual_seed(self.seed & ((1 << 64) - 1))
        return g


def _checked_bias(bias) -> dict[int, float]:
    if not isinstance(bias, dict):
        raise RequestError(f"logit_bias must map token ids to numbers, got {bias!r}", field="logit_bias")
    for t, b in bias.items():
        if not isinstance(t, int) or isinstance(t, bool) or t < 0:
            raise RequestError(f"logit_bias keys must be token ids (non-negative integers), got {t!r}",
                               field="logit_bias")
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not -100 <= b <= 100:
            raise RequestError(f"logit_bias[{t}] must be a number in [-100, 100], got {b!r}", field="logit_bias")
    return {t: float(b) for t, b in bias.items()}


def adjust(logits: torch.Tensor, adjustments: list) -> torch.Tensor:
    """In place on fp32 logits [B, V]: row i += adjustments[i] = (token ids, values), or nothing
    where it is None (ids distinct within a row)."""
    for row, adj in enumerate(adjustments):
        if adj is not None:
            ids, vals = adj
            logits[row, ids] += vals
    return logits


def apply_penalties(logits: torch.Tensor, params: list[SamplingParams],
                    prompt_ids: list[list[int]], output_ids: list[list[int]]) -> torch.Tensor:
    """In place on fp32 logits [B, V]; rows without penalties are untouched."""
    for row, (p, prompt, out) in enumerate(zip(params, prompt_ids, output_ids)):
        if p.repetition_penalty != 1.0 and (prompt or out):
            ids = torch.tensor(sorted(set(prompt) | set(out)), device=logits.device)
            vals = logits[row, ids]
            logits[row, ids] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and out:
            ids, counts = torch.tensor(out, device=logits.device).unique(return_counts=True)
            logits[row, ids] -= p.presence_penalty + p.frequency_penalty * counts.float()
    return logits


FILTER_CANDIDATES = 1024  # a CPU first looks for the top-k / top-p cut among this many best tokens


def _filter(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) tokens outside each row's top-k / top-p / min-p set; [B, V] fp32 (the rule of
    `_filter_sorted`). On a CPU, where sorting a 256000-token row costs ~30 ms: min_p alone is a
    comparison with the best logit, and a top-k / top-p cut is looked for among the row's
    FILTER_CANDIDATES best tokens (topk), where it lies when the top-k set (ties at its k-th value
    included) ends inside them, or, without top_k, when their mass reaches top_p; only the other rows
    are sorted whole."""
    V = logits.shape[-1]
    if logits.device.type != "cpu" or V <= FILTER_CANDIDATES:
        return _filter_sorted(logits, top_k, top_p, min_p)
    # p < min_p * p_max  <=>  logit < max logit + log(min_p)   (min_p = 0: log = -inf, nothing dropped)
    out = logits.masked_fill(logits < logits.amax(-1, keepdim=True) + min_p.log()[:, None], -INF)
    ranked = ((top_k > 0) | (top_p < 1)).nonzero()[:, 0].tolist()
    if not ranked:
        return out
    x, tk, tp, mp = logits[ranked], top_k[ranked], top_p[ranked], min_p[ranked]
    k = torch.where(tk <= 0, V, tk.clamp(max=V))
    cand = min(V, max(FILTER_CANDIDATES, int(tk.max())))
    vals, order = x.topk(cand, dim=-1)
    limited = k < V
    kth = vals.gather(-1, (k.clamp(max=cand) - 1)[:, None])
    keep = (vals >= kth) | ~limited[:, None]
    # the top-k set's own distribution (top_p is a share of it); without top_k, the whole row's
    norm = torch.where(limited, vals.masked_fill(~keep, -INF).logsumexp(-1), x.logsumexp(-1))
    p = (vals - norm[:, None]).exp().masked_fill(~keep, 0.0)
    mass_before = p.cumsum(-1) - p
    drop = ~keep | ((mass_before >= tp[:, None]) & (tp[:, None] < 1)) | (p < mp[:, None] * p[:, :1])
    drop[:, 0] = False  # the most likely token always survives
    cut = torch.full_like(x, -INF).scatter_(-1, order, vals.masked_fill(drop, -INF))
    # rows whose set may reach past their candidates: a top-k set that does (k beyond them, or ties at
    # its k-th value down to the last candidate), or, without top_k, a top-p cut their mass does not reach
    beyond = torch.where(limited, (k > cand) | (vals[:, -1] >= kth[:, 0]), p.sum(-1) < tp) & (cand < V)
    if bool(beyond.any()):
        cut[beyond] = _filter_sorted(x[beyond], tk[beyond], tp[beyond], mp[beyond])
    out[ranked] = cut
    return out


def _filter_sorted(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) tokens outside each row's top-k / top-p / min-p set, by a full sort of each row, in
    HF transformers' order (vLLM's too for top-k and top-p): drop a logit below the k-th largest (ties
    with it stay), then, in the distribution of what is left, a token with at least top_p of the mass
    before it, then one whose probability is below min_p x the best's; the best always stays."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    V = logits.shape[-1]
    k = torch.where(top_k <= 0, V, top_k.clamp(max=V))
    drop = sorted_logits < sorted_logits.gather(-1, (k - 1)[:, None])
    probs = sorted_logits.masked_fill(drop, -INF).softmax(-1)
    mass_before = probs.cumsum(-1) - probs
    drop |= (mass_before >= top_p[:, None]) & (top_p[:, None] < 1)  # (fp32 sums reach 1 before the tail)
    drop |= probs < min_p[:, None] * probs[:, :1]
    drop[:, 0] = False  # the most likely token always survives
    sorted_logits = sorted_logits.masked_fill(drop, -INF)
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """The distribution each (non-greedy) row samples from: softmax of logits / T after the
    top-k / top-p / min-p filters; [B, V] fp32. Speculative decoding uses it for p and q alike."""
    dev = logits.device
    scaled = logits / to_device([p.temperature for p in params], dev)[:, None]
    if any(p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0 for p in params):
        scaled = _filter(scaled, to_device([p.top_k for p in params], dev), to_device([p.top_p for p in params], dev),
                         to_device([p.min_p for p in params], dev))
    return scaled.softmax(-1)


def draw(p: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """One token per row of probabilities p [B, V] (not necessarily normalised), each row from its own
    generator: the inverse CDF at one uniform u of the row, t = u * sum(p), is the first token whose
    cumulative mass exceeds t. Found in two levels: which block of the row (fp32 block sums, summed
    up in fp64), then where in that block (fp64); a token of zero probability is never drawn. One
    uniform a row, where an exponential race needs V of them (torch draws those at ~20 ns each on a
    CPU: 5 ms a row at V = 256000)."""
    rows, vocab = p.shape
    block = _draw_block(vocab)
    u = torch.stack([torch.rand((), generator=g, device=p.device, dtype=torch.float64) for g in generators])
    blocks = p.reshape(rows, vocab // block, block)
    cum = blocks.sum(-1).double().cumsum(-1)  # [B, nb]: mass up to the end of each block
    t = u * cum[:, -1]
    b = torch.searchsorted(cum, t[:, None], right=True).clamp_(max=cum.shape[1] - 1)  # block holding t
    before = torch.where(b > 0, cum.gather(1, (b - 1).clamp(min=0)), torch.zeros_like(t[:, None]))
    within = blocks[torch.arange(rows, device=p.device), b[:, 0]].double().cumsum(-1) + before  # [B, block]
    last = within[:, -1:]
    t = torch.maximum(torch.minimum(t[:, None], torch.nextafter(last, torch.zeros_like(last))), before)
    at = torch.searchsorted(within, t, right=True)[:, 0].clamp_(max=block - 1)  # p > 0 where within rises past t
    return b[:, 0] * block + at


@functools.lru_cache(maxsize=None)
def _draw_block(vocab: int) -> int:
    """The divisor of vocab nearest above sqrt(vocab): draw's block length (256000 -> 512)."""
    return next(b for b in range(max(1, math.isqrt(vocab)), vocab + 1) if vocab % b == 0)


def greedy(scores: torch.Tensor) -> torch.Tensor:
    """argmax over the last dim (the first index on ties): gemforge.kernels.argmax."""
    return argmax(scores)


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> torch.Tensor:
    """One token per row of fp32 logits [B, V] (penalties already applied) -> int64 [B]."""
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if len(rows) == len(params):
        return draw(probs(logits, params), generators)
    out = greedy(logits)
    if rows:
        idx = to_device(rows, logits.device)
        out.index_copy_(0, idx, draw(probs(logits[idx], [params[i] for i in rows]), [generators[i] for i in rows]))
    return out


def logprob_entries(logits: torch.Tensor, tokens: torch.Tensor, tops: list[int]) -> list[dict]:
    """Per row of logits [B, V]: {"token": tokens[i], "logprob": its log-softmax, "top": the tops[i]
    most likely {token: logprob}} (a request's logprobs entry)."""
    chosen, top_v, top_i = logprobs_of(logits, tokens, max(tops))
    return [{"token": t, "logprob": c, "top": dict(zip(ti[:k], tv[:k]))}
            for t, c, ti, tv, k in zip(tokens.tolist(), chosen.tolist(), top_i.tolist(), top_v.tolist(), tops)]


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor, top_n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logprob of the chosen token [B], top-n logprobs [B, n], their ids [B, n]) of raw logits."""
    lp = logits.log_softmax(-1)
    chosen = lp.gather(-1, tokens[:, None])[:, 0]
    top = lp.topk(max(top_n, 1), dim=-1)
    return chosen, top.values[:, :top_n], top.indices[:, :top_n]
