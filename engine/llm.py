"""LLM: the offline Python API.

    llm = LLM(model="models/nano-codegemma")
    outs = llm.generate(["def f(x):"], SamplingParams(max_tokens=64, temperature=0.0))
    outs[0].outputs[0].text

All requests of one `generate` call run together: every step packs each unfinished sequence's
uncached tokens (the prompt at first, then one token) into one flat batch.
"""
from __future__ import annotations

import logging
import uuid
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .config import ModelConfig
from .errors import RequestError
from .kv_cache import KVCache
from .loader import load_weights, to_dtype
from .model import GemmaModel
from .runner import ModelRunner, WorkItem
from .sampling import SamplingParams, apply_penalties, logprobs_of, sample
from .sequence import RequestOutput, Sequence
from .tokenizer import Tokenizer

log = logging.getLogger("gemforge")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str, cfg: ModelConfig, device: str) -> torch.dtype:
    """"auto": the checkpoint's dtype on a GPU, float32 on a CPU (bf16 matmuls are slow there)."""
    if dtype == "auto":
        return to_dtype(cfg.dtype) if device.startswith("cuda") else torch.float32
    return to_dtype(dtype)


class LLM:
    def __init__(self, model: str | Path, dtype: str = "auto", device: str | None = None,
                 backend: str = "auto", kv_cache_tokens: int | None = None, block_size: int = 16,
                 max_model_len: int | None = None, quantization: str | None = None, progress: bool = True):
        if quantization is not None:
            raise NotImplementedError("quantization is not implemented yet (see the quantization issue)")
        self.model_dir = Path(model)
        self.cfg = ModelConfig.from_pretrained(self.model_dir)
        self.tokenizer = Tokenizer(self.model_dir / "tokenizer.model")
        if self.tokenizer.vocab_size > self.cfg.vocab_size:
            raise RequestError(f"{self.tokenizer.path}: tokenizer has {self.tokenizer.vocab_size} pieces but "
                               f"config.json's vocab_size is {self.cfg.vocab_size}", field="tokenizer")
        self.device = device or default_device()
        self.dtype = resolve_dtype(dtype, self.cfg, self.device)
        weights = load_weights(self.model_dir, self.cfg, self.dtype, self.device, progress=progress)
        self.model = GemmaModel(self.cfg, weights, self.dtype, self.device, backend)
        self.max_model_len = min(max_model_len or self.cfg.max_position_embeddings,
                                 self.cfg.max_position_embeddings)
        tokens = kv_cache_tokens or self._default_cache_tokens()
        num_blocks = -(-tokens // block_size)
        self.cache = KVCache(self.cfg.num_layers, num_blocks, block_size, self.cfg.num_kv_heads,
                             self.cfg.head_dim, self.dtype, self.device)
        self.runner = ModelRunner(self.model, self.cache)
        log.info("gemforge: %s on %s in %s; KV cache %d tokens", self.model_dir.name, self.device,
                 self.dtype, num_blocks * block_size)

    def _default_cache_tokens(self) -> int:
        per_token = KVCache.bytes_per_token(self.cfg.num_layers, self.cfg.num_kv_heads, self.cfg.head_dim,
                                            torch.tensor([], dtype=self.dtype).element_size())
        if self.device.startswith("cuda"):
            free, _ = torch.cuda.mem_get_info()
            return max(self.max_model_len, int(0.8 * free) // per_token)
        return max(self.max_model_len, min(65536, (2 << 30) // per_token))

    # -- requests --------------------------------------------------------------------------
    def _prompt_ids(self, prompt, suffix: str | None, fim_mode: str) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            text = prompt if suffix is None else self.tokenizer.fim_prompt(prompt, suffix, fim_mode)
            return prompt, self.tokenizer.encode(text)
        if suffix is not None:
            raise RequestError("suffix (infill) needs a text prompt, not token ids", field="suffix")
        ids = list(prompt)
        if not ids or not all(isinstance(i, int) and 0 <= i < self.cfg.vocab_size for i in ids):
            raise RequestError(f"prompt token ids must be a non-empty list of integers in [0, {self.cfg.vocab_size})",
                               field="prompt")
        return None, ids

    def _check_fits(self, n_prompt: int, params: SamplingParams) -> None:
        total = n_prompt + params.max_tokens
        if total > self.max_model_len:
            raise RequestError(f"prompt ({n_prompt} tokens) + max_tokens ({params.max_tokens}) = {total} exceeds "
                               f"the model's context of {self.max_model_len} tokens", field="max_tokens")
        capacity = self.cache.blocks.num_blocks * self.cache.block_size
        if total > capacity:
            raise RequestError(f"prompt + max_tokens = {total} tokens exceeds the KV cache ({capacity} tokens)",
                               field="max_tokens")

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None,
                 suffixes: list[str | None] | None = None, fim_mode: str = "psm",
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Complete each prompt (text or token ids); with `suffixes`, infill between prompt and suffix."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        n = len(prompts)
        params = params if isinstance(params, list) else [params or SamplingParams()] * n
        suffixes = suffixes if suffixes is not None else [None] * n
        if len(params) != n or len(suffixes) != n:
            raise RequestError(f"{n} prompts but {len(params)} params and {len(suffixes)} suffixes",
                               field="params")
        requests, seqs = [], []
        for i, (prompt, p, suf) in enumerate(zip(prompts, params, suffixes)):
            text, ids = self._prompt_ids(prompt, suf, fim_mode)
            self._check_fits(len(ids), p)
            extra = self.tokenizer.fim_stop_ids() if suf is not None else ()
            rid = uuid.uuid4().hex[:12]
            group = [Sequence.create(rid, j, ids, p, self.tokenizer, self.cfg.eos_token_ids, extra, self.device)
                     for j in range(p.n)]
            requests.append((rid, text, ids, group))
            seqs.extend(group)
        bar = tqdm(total=sum(s.params.max_tokens for s in seqs), desc="generating", unit="tok",
                   disable=not use_tqdm, leave=False)
        try:
            while True:
                active = [s for s in seqs if not s.finished]
                if not active:
                    break
                self.step(active)
                bar.update(len(active))
        finally:
            bar.close()
            for s in seqs:
                self.cache.blocks.free(s.seq_id)
        return [RequestOutput(rid, text, ids, [s.output() for s in group], True)
                for rid, text, ids, group in requests]

    def step(self, seqs: list[Sequence]) -> None:
        """Run every sequence's uncached tokens in one forward and append one sampled token each."""
        items = []
        for s in seqs:
            new = s.token_ids[s.num_cached:]
            self.cache.blocks.append(s.seq_id, len(new))
            items.append(WorkItem(s.seq_id, new, s.num_cached))
        logits = self.runner.run(items)
        params = [s.params for s in seqs]
        if any(p.repetition_penalty != 1 or p.presence_penalty or p.frequency_penalty for p in params):
            apply_penalties(logits, params, [s.prompt_ids for s in seqs], [s.output_ids for s in seqs])
        tokens = sample(logits, params, [s.generator for s in seqs])
        want_lp = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        lps = logprobs_of(logits[want_lp], tokens[want_lp], max(seqs[i].params.logprobs for i in want_lp)) \
            if want_lp else None
        tokens = tokens.tolist()
        for i, s in enumerate(seqs):
            s.num_cached = len(s.token_ids)
            lp = None
            if lps is not None and i in want_lp:
                r, k = want_lp.index(i), s.params.logprobs
                lp = {"token": tokens[i], "logprob": lps[0][r].item(),
                      "top": dict(zip(lps[2][r, :k].tolist(), lps[1][r, :k].tolist()))}
            s.append(tokens[i], lp)
