"""A request's sequence: its tokens, its place in the cache, its stop rules, and its outputs; a Request
groups the n sequences of one prompt."""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field

import torch

from .detokenizer import Detokenizer
from .sampling import SamplingParams
from .lookahead import PROBE_EVERY
from .tokenizer import Tokenizer

_ids = itertools.count()


@dataclass
class CompletionOutput:
    index: int
    text: str
    num_tokens: int                  # tokens generated when this output was made
    finish_reason: str | None        # "stop" | "length" | "abort" | None while running
    logprobs: list[dict] | None = None  # the first num_tokens entries belong to this output
    stop_reason: object = None       # the stop string or token id that ended it
    delta: str = ""                  # text new since the previous output of this request (streaming)
    spec: dict | None = None         # speculative decoding: proposed/accepted tokens, verify steps
    ids: list[int] = field(default_factory=list, repr=False)  # the sequence's token list (it grows)

    @property
    def token_ids(self) -> list[int]:
        """The generated ids as of this output (a copy taken on access: making an output each
        step of a streaming request costs O(1), not O(tokens so far))."""
        return self.ids[: self.num_tokens]


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0       # prompt tokens found in the prefix cache (not computed)
    # with prompt_logprobs: entry i is prompt token i's {"token", "logprob", "top"} given the tokens
    # before it (entry 0: logprob and top None); complete once the prompt has run
    prompt_logprobs: list[dict] | None = None
    first_token_time: float | None = None  # time.monotonic() when its first token was generated


@dataclass(eq=False)  # identity: the scheduler tests membership in its queues
class Sequence:
    """One completion being generated. `num_cached` tokens of `token_ids` are in the KV cache."""
    request_id: str
    index: int
    prompt_ids: list[int]
    params: SamplingParams
    detok: Detokenizer
    stop_ids: frozenset[int]
    generator: torch.Generator | None = None
    output_ids: list[int] = field(default_factory=list)
    num_cached: int = 0
    cached_prompt_tokens: int | None = None  # found in the prefix cache when first scheduled
    finish_reason: str | None = None
    stop_reason: object = None
    logprobs: list[dict] | None = None
    prompt_logprobs: list[dict] | None = None  # see RequestOutput; filled as prompt chunks run (index 0 only)
    delta: str = ""
    lookahead: int = 0               # speculative tokens to verify next step (set by the engine)
    pending: int = 0                 # sampled tokens the host has not read yet (async scheduling): they
    #                                  count in num_tokens; tokens() never reaches them (the engine feeds
    #                                  them to the next step from the device)
    spec_proposed: int = 0
    spec_accepted: int = 0
    spec_steps: int = 0
    spec_rate: float = 1.0           # recent acceptance rate (drives the adaptive lookahead)
    spec_idle: int = 0               # steps since the adaptive lookahead last chose to draft
    spec_probe_every: int = PROBE_EVERY  # idle steps before the next one-token probe (backs off)
    seq_id: int = field(default_factory=lambda: next(_ids))
    adjusts: bool = False            # has a logit_bias, or stop ids to ban until min_tokens
    device: str | torch.device = "cpu"
    _adjustments: dict = field(default_factory=dict, repr=False)  # banning stop ids? -> (ids, values) or None

    @classmethod
    def create(cls, request_id: str, index: int, prompt_ids: list[int], params: SamplingParams,
               tokenizer: Tokenizer, eos_ids, extra_stop_ids=(), device="cpu") -> "Sequence":
        stop_ids = set(params.stop_token_ids) | set(extra_stop_ids)
        if not params.ignore_eos:
            stop_ids |= set(eos_ids)
        gen = params.make_generator(device)
        if gen is not None and params.seed is not None and index:
            gen.manual_seed((params.seed + 7919 * index) & ((1 << 64) - 1))
        # the prompt's logprobs are the request's: its first sequence collects them
        first = ([{"token": prompt_ids[0], "logprob": None, "top": None}]
                 if params.prompt_logprobs is not None and index == 0 else None)
        return cls(request_id, index, list(prompt_ids), params, Detokenizer(tokenizer, params.stop),
                   frozenset(stop_ids), gen, logprobs=[] if params.logprobs is not None else None,
                   prompt_logprobs=first, adjusts=bool(params.logit_bias or (params.min_tokens and stop_ids)),
                   device=device)

    def logit_adjustment(self, ahead: int = 0) -> tuple[torch.Tensor, torch.Tensor] | None:
        """What to add to the logits of the token `ahead` places after its next one (token ids,
        values), or None: the request's logit_bias, and -inf on its stop ids (eos unless ignore_eos,
        stop_token_ids, FIM's) while that token would be among the first min_tokens."""
        if not self.adjusts:
            return None
        ban = len(self.output_ids) + ahead < self.params.min_tokens
        if ban not in self._adjustments:
            add = dict(self.params.logit_bias or {})
            if ban:
                add.update(dict.fromkeys(self.stop_ids, -math.inf))
            self._adjustments[ban] = (torch.tensor(list(add), dtype=torch.long, device=self.device),
                                      torch.tensor(list(add.values()), dtype=torch.float32, device=self.device)
                                      ) if add else None
        return self._adjustments[ban]

    @property
    def seeded(self) -> bool:
        """Sampled with a seed: how many draws its steps take must depend on the request alone (not on
        other requests, step timings or the batch's token budget), or the seed would not replay."""
        return self.generator is not None and self.params.seed is not None

    @property
    def reuses_prefix(self) -> bool:
        """Whether the prefix cache may stand in for its prompt (not when it collects every prompt
        token's logprob: those need the prompt computed)."""
        return self.prompt_logprobs is None

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def tokens(self, start: int, n: int) -> list[int]:
        """token_ids[start: start + n] without building token_ids (O(n), not O(length))."""
        p = len(self.prompt_ids)
        if start + n <= p:
            return self.prompt_ids[start: start + n]
        if start >= p:
            return self.output_ids[start - p: start - p + n]
        return self.prompt_ids[start:] + self.output_ids[: start + n - p]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids) + self.pending

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def append(self, token: int, logprob: dict | None = None) -> str:
        """Add a sampled token, apply the stop rules, and return the newly certain text."""
        self.output_ids.append(token)
        if self.logprobs is not None and logprob is not None:
            self.logprobs.append(logprob)
        n = len(self.output_ids)
        if token in self.stop_ids and n > self.params.min_tokens:
            self.finish_reason, self.stop_reason = "stop", token
            return self.detok.flush()
        delta = self.detok.push(token, stops=n > self.params.min_tokens)
        if self.detok.stopped:
            self.finish_reason, self.stop_reason = "stop", self.detok.stop_reason
            return delta
        if n >= self.params.max_tokens:
            self.finish_reason = "length"
            return delta + self.detok.flush()
        return delta

    def abort(self) -> None:
        if not self.finished:
            self.finish_reason = "abort"

    def output(self) -> CompletionOutput:
        return CompletionOutput(self.index, self.detok.text, len(self.output_ids), self.finish_reason,
                                self.logprobs, self.stop_reason, self.delta, self._spec_stats(), self.output_ids)

    def _spec_stats(self) -> dict | None:
        if not self.spec_steps:
            return None
        return {"proposed": self.spec_proposed, "accepted": self.spec_accepted, "verify_steps": self.spec_steps,
                "acceptance_rate": self.spec_accepted / max(1, self.spec_proposed),
                "tokens_per_step": (self.spec_accepted + self.spec_steps) / self.spec_steps}


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    seqs: list[Sequence]
    arrival: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    stream: bool = True  # an output every step it makes progress; False: only the final one

    @property
    def finished(self) -> bool:
        for s in self.seqs:
            if s.finish_reason is None:
                return False
        return True

    def output(self, finished: bool) -> RequestOutput:
        return RequestOutput(self.request_id, self.prompt, self.prompt_ids, [s.output() for s in self.seqs],
                             finished, max(s.cached_prompt_tokens or 0 for s in self.seqs),
                             self.seqs[0].prompt_logprobs, self.first_token_time)
