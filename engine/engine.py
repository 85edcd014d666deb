"""Engine: requests in, one scheduled flat batch per step, RequestOutputs out.

    engine.add_request(request_id, prompt, params, suffix=None)   # validates, tokenizes, queues
    outputs = engine.step()   # schedule -> run the model -> sample -> detokenize -> stop checks
    engine.abort(request_id)  # frees the request's KV blocks at once

The LLM (offline) and AsyncEngine (serving) APIs both drive this one class.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import ModelConfig
from .errors import RequestError
from .kv_cache import KVCache
from .loader import load_weights, to_dtype
from .model import GemmaModel
from .runner import ModelRunner, WorkItem
from .sampling import SamplingParams, apply_penalties, logprobs_of, sample
from .scheduler import Scheduler
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


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    seqs: list[Sequence]
    arrival: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)

    def output(self) -> RequestOutput:
        return RequestOutput(self.request_id, self.prompt, self.prompt_ids, [s.output() for s in self.seqs],
                             self.finished)


@dataclass
class EngineConfig:
    dtype: str = "auto"
    device: str | None = None
    backend: str = "auto"
    kv_cache_tokens: int | None = None
    block_size: int = 16
    max_model_len: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    cuda_graphs: bool = True
    gpu_memory_utilization: float = 0.85


class Engine:
    def __init__(self, model: str | Path, config: EngineConfig | None = None, progress: bool = True):
        ec = self.ec = config or EngineConfig()
        self.model_dir = Path(model)
        self.cfg = ModelConfig.from_pretrained(self.model_dir)
        self.tokenizer = Tokenizer(self.model_dir / "tokenizer.model")
        if self.tokenizer.vocab_size > self.cfg.vocab_size:
            raise RequestError(f"{self.tokenizer.path}: tokenizer has {self.tokenizer.vocab_size} pieces but "
                               f"config.json's vocab_size is {self.cfg.vocab_size}", field="tokenizer")
        self.device = ec.device or default_device()
        self.dtype = resolve_dtype(ec.dtype, self.cfg, self.device)
        weights = load_weights(self.model_dir, self.cfg, self.dtype, self.device, progress=progress)
        self.model = GemmaModel(self.cfg, weights, self.dtype, self.device, ec.backend)
        self.max_model_len = min(ec.max_model_len or self.cfg.max_position_embeddings,
                                 self.cfg.max_position_embeddings)
        tokens = ec.kv_cache_tokens or self._default_cache_tokens()
        self.cache = KVCache(self.cfg.num_layers, -(-tokens // ec.block_size), ec.block_size,
                             self.cfg.num_kv_heads, self.cfg.head_dim, self.dtype, self.device)
        graphs = ec.cuda_graphs and self.device.startswith("cuda") and ec.backend != "torch"
        self.runner = ModelRunner(self.model, self.cache, cuda_graphs=graphs,
                                  max_graph_batch=min(ec.max_num_seqs, 256), max_context=self.max_model_len)
        self.scheduler = Scheduler(self.cache.blocks, ec.max_num_seqs, ec.max_num_batched_tokens)
        self.requests: dict[str, Request] = {}
        self._by_seq: dict[int, Request] = {}
        self.stats = {"prompt_tokens": 0, "generation_tokens": 0, "steps": 0}
        log.info("gemforge: %s on %s in %s; KV cache %d tokens", self.model_dir.name, self.device, self.dtype,
                 self.capacity)

    @property
    def capacity(self) -> int:
        return self.cache.blocks.num_blocks * self.cache.block_size

    def _default_cache_tokens(self) -> int:
        per_token = KVCache.bytes_per_token(self.cfg.num_layers, self.cfg.num_kv_heads, self.cfg.head_dim,
                                            torch.tensor([], dtype=self.dtype).element_size())
        if self.device.startswith("cuda"):
            free, total = torch.cuda.mem_get_info()
            budget = free - (1 - self.ec.gpu_memory_utilization) * total
            return max(self.max_model_len, int(budget) // per_token)
        return max(self.max_model_len, min(65536, (2 << 30) // per_token))

    # -- requests ---------------------------------------------------------------------------
    def encode_prompt(self, prompt, suffix: str | None = None, fim_mode: str = "psm") -> tuple[str | None, list[int]]:
        """(text or None, token ids) of a text or token-id prompt; with `suffix`, a FIM prompt."""
        if isinstance(prompt, str):
            if not prompt and suffix is None:
                raise RequestError("prompt must not be empty", field="prompt")
            text = prompt if suffix is None else self.tokenizer.fim_prompt(prompt, suffix, fim_mode)
            return prompt, self.tokenizer.encode(text)
        if suffix is not None:
            raise RequestError("suffix (infill) needs a text prompt, not token ids", field="suffix")
        ids = list(prompt) if isinstance(prompt, (list, tuple)) else None
        if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.cfg.vocab_size
                              for i in ids):
            raise RequestError(f"prompt token ids must be a non-empty list of integers in [0, {self.cfg.vocab_size})",
                               field="prompt")
        return None, ids

    def check_fits(self, n_prompt: int, params: SamplingParams) -> None:
        total = n_prompt + params.max_tokens
        if total > self.max_model_len:
            raise RequestError(f"prompt ({n_prompt} tokens) + max_tokens ({params.max_tokens}) = {total} exceeds "
                               f"the model's context of {self.max_model_len} tokens", field="max_tokens")
        if total > self.capacity:
            raise RequestError(f"prompt ({n_prompt} tokens) + max_tokens ({params.max_tokens}) = {total} exceeds "
                               f"the KV cache ({self.capacity} tokens)", field="max_tokens")

    def add_request(self, request_id: str, prompt, params: SamplingParams, suffix: str | None = None,
                    fim_mode: str = "psm", extra_stop_ids=()) -> Request:
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already running", field="request_id")
        text, ids = self.encode_prompt(prompt, suffix, fim_mode)
        self.check_fits(len(ids), params)
        extra = tuple(extra_stop_ids) + (tuple(self.tokenizer.fim_stop_ids()) if suffix is not None else ())
        seqs = [Sequence.create(request_id, j, ids, params, self.tokenizer, self.cfg.eos_token_ids, extra, self.device)
                for j in range(params.n)]
        req = Request(request_id, text, ids, seqs)
        self.requests[request_id] = req
        for s in seqs:
            self._by_seq[s.seq_id] = req
            self.scheduler.add(s)
        return req

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now; its blocks are freed. Returns its final output (None if unknown)."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        for s in req.seqs:
            s.abort()
            self.scheduler.finish(s)
            self._by_seq.pop(s.seq_id, None)
        return req.output()

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # -- one iteration ----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduled batch; return the outputs of requests that produced tokens."""
        plan = self.scheduler.schedule()
        if not plan.scheduled:
            return []
        items = [WorkItem(sc.seq.seq_id, sc.seq.token_ids[sc.start: sc.start + sc.num_tokens], sc.start)
                 for sc in plan.scheduled]
        logits = self.runner.run(items)
        for sc in plan.scheduled:
            sc.seq.num_cached = sc.start + sc.num_tokens
        self.stats["steps"] += 1
        self.stats["prompt_tokens"] += sum(sc.num_tokens for sc in plan.scheduled if not sc.seq.output_ids)
        done = [i for i, sc in enumerate(plan.scheduled) if sc.completes]
        if not done:
            return []
        seqs = [plan.scheduled[i].seq for i in done]
        logits = logits[done]
        params = [s.params for s in seqs]
        if any(p.repetition_penalty != 1 or p.presence_penalty or p.frequency_penalty for p in params):
            apply_penalties(logits, params, [s.prompt_ids for s in seqs], [s.output_ids for s in seqs])
        tokens = sample(logits, params, [s.generator for s in seqs])
        want_lp = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        lps = (logprobs_of(logits[want_lp], tokens[want_lp], max(seqs[i].params.logprobs for i in want_lp))
               if want_lp else None)
        tokens = tokens.tolist()
        touched: dict[str, Request] = {}
        now = time.monotonic()
        for i, s in enumerate(seqs):
            lp = None
            if lps is not None and i in want_lp:
                r, k = want_lp.index(i), s.params.logprobs
                lp = {"token": tokens[i], "logprob": lps[0][r].item(),
                      "top": dict(zip(lps[2][r, :k].tolist(), lps[1][r, :k].tolist()))}
            s.delta += s.append(tokens[i], lp)
            self.stats["generation_tokens"] += 1
            req = self._by_seq[s.seq_id]
            req.first_token_time = req.first_token_time or now
            touched[req.request_id] = req
            if s.finished:
                self.scheduler.finish(s)
        outs = []
        for req in touched.values():
            out = req.output()
            for s in req.seqs:
                s.delta = ""
            outs.append(out)
            if req.finished:
                self.requests.pop(req.request_id, None)
                for s in req.seqs:
                    self._by_seq.pop(s.seq_id, None)
        return outs
