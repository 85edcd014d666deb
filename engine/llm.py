"""LLM: the offline Python API over the Engine.

    llm = LLM(model="models/nano-codegemma")
    outs = llm.generate(["def f(x):"], SamplingParams(max_tokens=64, temperature=0.0))
    outs[0].outputs[0].text
    llm.chat([{"role": "user", "content": "Write a binary search."}])   # the IT model's chat template
"""
from __future__ import annotations

import itertools
from pathlib import Path

from tqdm.auto import tqdm

from .engine import Engine, EngineConfig
from .errors import RequestError
from .sampling import SamplingParams
from .sequence import RequestOutput


class LLM:
    """Loads a model once; `generate` runs a list of requests to completion with continuous batching."""

    def __init__(self, model: str | Path, dtype: str = "auto", device: str | None = None,
                 backend: str = "auto", kv_cache_tokens: int | None = None, block_size: int = 16,
                 max_model_len: int | None = None, max_num_seqs: int = 64, max_num_batched_tokens: int = 2048,
                 enable_prefix_caching: bool = True, cuda_graphs: bool = True, warmup: bool = True,
                 async_scheduling: bool | None = None, quantization: str | None = None,
                 quantize_lm_head: bool = False, group_size: int = 128,
                 draft_model: str | Path | None = None, draft_quantization: str | None = None,
                 draft_vocab_size: int | None = None, draft_vocab_corpus: str | None = None,
                 num_speculative_tokens: int = 4, adaptive_lookahead: bool = True, draft_cost: float | None = None,
                 progress: bool = True):
        self.engine = Engine(model, EngineConfig(dtype=dtype, device=device, backend=backend,
                                                 kv_cache_tokens=kv_cache_tokens, block_size=block_size,
                                                 max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                                                 max_num_batched_tokens=max_num_batched_tokens,
                                                 enable_prefix_caching=enable_prefix_caching,
                                                 cuda_graphs=cuda_graphs, warmup=warmup,
                                                 async_scheduling=async_scheduling,
                                                 quantization=quantization,
                                                 quantize_lm_head=quantize_lm_head, group_size=group_size,
                                                 draft_model=draft_model, draft_quantization=draft_quantization,
                                                 draft_vocab_size=draft_vocab_size,
                                                 draft_vocab_corpus=draft_vocab_corpus,
                                                 num_speculative_tokens=num_speculative_tokens,
                                                 adaptive_lookahead=adaptive_lookahead, draft_cost=draft_cost),
                             progress=progress)
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def cfg(self):
        return self.engine.cfg

    @property
    def model(self):
        return self.engine.model

    @property
    def cache(self):
        return self.engine.cache

    def memory_report(self) -> dict:
        """Bytes of the loaded weights by format ('dense', 'int8', 'int4', 'total') and of the KV cache."""
        return self.engine.memory_report()

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None,
                 suffixes: list[str | None] | None = None, fim_mode: str = "psm",
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Complete each prompt (text or token ids); with `suffixes`, infill between prompt and suffix.
        Outputs come back in input order. Every request is validated before any is queued."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        n = len(prompts)
        params = params if isinstance(params, list) else [params or SamplingParams()] * n
        suffixes = suffixes if suffixes is not None else [None] * n
        if len(params) != n or len(suffixes) != n:
            raise RequestError(f"{n} prompts but {len(params)} params and {len(suffixes)} suffixes", field="params")
        return self._run(prompts, params, suffixes, fim_mode, (), use_tqdm)

    def chat(self, messages, params: SamplingParams | list[SamplingParams] | None = None,
             use_tqdm: bool = True) -> list[RequestOutput]:
        """Answer a conversation ([{"role": "system" | "user" | "assistant", "content": str}, ...], ending
        with the user's turn), or each of a list of them, through the Gemma chat template (the IT
        model's); an answer ends at <end_of_turn>, which it does not include."""
        if not isinstance(messages, list) or not messages:
            raise RequestError("messages must be a non-empty list of {'role', 'content'} turns, or a list of "
                               "such conversations", field="messages")
        conversations = [messages] if isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.chat_prompt(c) for c in conversations]
        n = len(prompts)
        params = params if isinstance(params, list) else [params or SamplingParams()] * n
        if len(params) != n:
            raise RequestError(f"{n} conversations but {len(params)} params", field="params")
        return self._run(prompts, params, [None] * n, "psm", tuple(self.tokenizer.chat_stop_ids()), use_tqdm)

    def _run(self, prompts, params, suffixes, fim_mode, extra_stop_ids, use_tqdm) -> list[RequestOutput]:
        """Validate every request, queue them all, step until each has finished; outputs in input order."""
        n = len(prompts)
        eng = self.engine
        for prompt, p, suf in zip(prompts, params, suffixes):
            eng.check_request(len(eng.encode_prompt(prompt, suf, fim_mode)[1]), p)
        ids = [f"llm-{next(self._ids)}" for _ in range(n)]
        try:
            for rid, prompt, p, suf in zip(ids, prompts, params, suffixes):
                eng.add_request(rid, prompt, p, suf, fim_mode, extra_stop_ids)
            final: dict[str, RequestOutput] = {}
            with tqdm(total=n, desc="generating", unit="req", disable=not use_tqdm, leave=False) as bar:
                while len(final) < n:
                    if not eng.scheduler.has_work():
                        raise RuntimeError("engine has unfinished requests but nothing to schedule")
                    for out in eng.step(finished_only=True):
                        if out.finished:
                            final[out.request_id] = out
                            bar.update(1)
        finally:
            for rid in ids:
                eng.abort(rid)  # no-op for finished ones; frees everything on an exception
        return [final[rid] for rid in ids]
