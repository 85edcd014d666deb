"""Engine: requests in, one scheduled flat batch per step, RequestOutputs out.

    engine.add_request(request_id, prompt, params, suffix=None)   # validates, tokenizes, queues
    outputs = engine.step()   # schedule -> run the model -> sample -> detokenize -> stop checks
    engine.abort(request_id)  # frees the request's KV blocks at once

The LLM (offline) and AsyncEngine (serving) APIs both drive this one class.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from gemforge.kernels.registry import BACKENDS, BackendUnavailable

from .config import ModelConfig
from .errors import RequestError
from .kv_cache import KVCache
from .loader import load_weights
from .model import GemmaModel, Ops
from .quantization import QuantConfig, step_bytes, weight_bytes
from .runner import ModelRunner
from .sampling import SamplingParams, adjust, apply_penalties, greedy, logprob_entries, sample
from .scheduler import Scheduler
from .drafters import NGRAM, Drafter, NgramDrafter, draft_vocabulary
from .lookahead import Lookahead
from .speculative import Window, verdicts
from .options import EngineConfig, check_device, check_sizes, default_device, host_memory_available, resolve_dtype
from .sequence import Request, RequestOutput, Sequence
from .step_input import FlatBatch, InFlight
from .tokenizer import Tokenizer
from .transfer import take_rows, to_device
from .weights import head_rows

log = logging.getLogger("gemforge")


class Engine:
    def __init__(self, model: str | Path, config: EngineConfig | None = None, progress: bool = True):
        ec = self.ec = config or EngineConfig()
        self.model_dir = Path(model)
        self.cfg = ModelConfig.from_pretrained(self.model_dir)
        check_sizes(ec, self.cfg)
        self.tokenizer = Tokenizer(self.model_dir / "tokenizer.model")
        if self.tokenizer.vocab_size > self.cfg.vocab_size:
            raise RequestError(f"{self.tokenizer.path}: tokenizer has {self.tokenizer.vocab_size} pieces but "
                               f"config.json's vocab_size is {self.cfg.vocab_size}", field="tokenizer")
        self.device = check_device(ec.device) if ec.device else default_device()
        self.dtype = resolve_dtype(ec.dtype, self.cfg, self.device)
        if ec.backend not in ("auto", *BACKENDS):
            raise RequestError(f"backend must be 'auto' or one of {BACKENDS}, got {ec.backend!r}", field="backend")
        try:  # (before the weights load: the model resolves its ops the same way)
            Ops.resolve(ec.backend, self.device)
        except BackendUnavailable as e:
            raise RequestError(f"backend {ec.backend!r}: {e}", field="backend") from None
        weights = load_weights(self.model_dir, self.cfg, self.dtype, self.device,
                               self._quant(ec.quantization, ec.quantize_lm_head), progress=progress)
        self.weight_bytes = weight_bytes(weights)
        self.model = GemmaModel(self.cfg, weights, self.dtype, self.device, ec.backend)
        self.max_model_len = ec.max_model_len or self.cfg.max_position_embeddings
        draft = self._load_draft() if ec.draft_model else None  # (its weights in memory before the pools are sized)
        tokens = ec.kv_cache_tokens or self._default_cache_tokens(draft[0].cfg if isinstance(draft, tuple) else None)
        self.cache = KVCache(self.cfg.num_layers, -(-tokens // ec.block_size), ec.block_size,
                             self.cfg.num_kv_heads, self.cfg.head_dim, self.dtype, self.device,
                             ec.enable_prefix_caching)
        graphs = ec.cuda_graphs and self.device.startswith("cuda") and ec.backend != "torch"
        self.runner = ModelRunner(self.model, self.cache, cuda_graphs=graphs, max_graph_batch=min(ec.max_num_seqs, 256),
                                  max_context=self.max_model_len,  # verify windows are k + 1 tokens
                                  max_graph_width=ec.num_speculative_tokens + 1 if ec.draft_model else 1)
        self.scheduler = Scheduler(self.cache.blocks, ec.max_num_seqs, ec.max_num_batched_tokens)
        self.drafter = self._with_pool(draft, graphs) if draft is not None else None
        # at small batch a decode step costs about its weight bytes (the 2B ~0.29 of the 7B in bf16): the
        # prior (prompt lookup: free); unless given, the costs are then measured on the running decode steps
        self.lookahead = Lookahead(min(ec.num_speculative_tokens, ec.max_num_batched_tokens - 1),  # (fits a step)
                                   ec.adaptive_lookahead, ec.draft_cost,
                                   step_bytes(self.drafter.model.w) / step_bytes(self.model.w)
                                   if self.drafter is not None and self.drafter.model is not None else 0.0)
        self.requests: dict[str, Request] = {}
        self._by_seq: dict[int, Request] = {}
        on_gpu = self.device.startswith("cuda")
        self.async_scheduling = on_gpu if ec.async_scheduling is None else ec.async_scheduling
        self._inflight: InFlight | None = None  # the step whose tokens are still on the device
        self._sync_seqs: set[int] = set()  # live sequences whose next step needs their tokens read first
        self.stats = {"prompt_tokens": 0, "generation_tokens": 0, "steps": 0}
        if ec.warmup and on_gpu:
            self.warmup()
        log.info("gemforge: %s on %s in %s; weights %.1f MB (%s); KV cache %d tokens (%.1f MB)",
                 self.model_dir.name, self.device, self.dtype, self.weight_bytes["total"] / 1e6,
                 ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in self.weight_bytes.items() if v and k != "total"),
                 self.capacity, self.cache.nbytes / 1e6)

    def _quant(self, method: str | None, lm_head: bool) -> QuantConfig | None:
        return QuantConfig(method, self.ec.group_size, True, lm_head) if method else None

    def memory_report(self) -> dict:
        """Bytes of the loaded weights (by format) and of the KV cache(s)."""
        rep = {"weights": dict(self.weight_bytes), "kv_cache": self.cache.nbytes, "kv_cache_tokens": self.capacity}
        if self.drafter is not None and self.drafter.model is not None:
            rep["draft_weights"] = weight_bytes(self.drafter.model.w)
            rep["draft_kv_cache"] = self.drafter.cache.nbytes
        return rep

    def _load_draft(self) -> NgramDrafter | tuple[GemmaModel, torch.Tensor | None]:
        """The draft model (same tokenizer and vocabulary) and the ids its pruned head keeps (None: all),
        or prompt lookup for draft_model "[ngram]"."""
        if not 1 <= self.ec.num_speculative_tokens <= 16:
            raise RequestError(f"num_speculative_tokens must be in [1, 16], got {self.ec.num_speculative_tokens}",
                               field="num_speculative_tokens")
        if self.ec.draft_cost is not None and not 0 <= self.ec.draft_cost <= 16:
            raise RequestError(f"draft_cost must be in [0, 16] (a draft step in target steps), got {self.ec.draft_cost}",
                               field="draft_cost")
        if self.ec.draft_model == NGRAM:
            for name in ("draft_quantization", "draft_vocab_size", "draft_vocab_corpus"):
                if getattr(self.ec, name) is not None:
                    raise RequestError(f"{name} needs a draft model, not {NGRAM}", field=name)
            return NgramDrafter(device=self.device)
        d = Path(self.ec.draft_model)
        dcfg = ModelConfig.from_pretrained(d)
        dtok = Tokenizer(d / "tokenizer.model")
        if dcfg.vocab_size != self.cfg.vocab_size or not self.tokenizer.same_vocab(dtok):
            i = self.tokenizer.first_difference(dtok)
            where = "" if i is None else (f"; id {i} is {dtok.sp.IdToPiece(i)!r} in the draft's, "
                                          f"{self.tokenizer.sp.IdToPiece(i)!r} in the target's")
            raise RequestError(f"draft model {d}: its vocabulary (config vocab_size {dcfg.vocab_size}, "
                               f"{dtok.vocab_size} pieces in {dtok.path}) differs from the target's (vocab_size "
                               f"{self.cfg.vocab_size}, {self.tokenizer.vocab_size} pieces in {self.tokenizer.path}"
                               f"{where}); speculative decoding needs the same tokenizer", field="draft_model")
        if self.ec.draft_vocab_corpus is not None and self.ec.draft_vocab_size is None:
            raise RequestError("draft_vocab_corpus ranks the tokens draft_vocab_size keeps: give a size too",
                               field="draft_vocab_corpus")
        vocab = None if self.ec.draft_vocab_size is None else draft_vocabulary(dtok, self.ec.draft_vocab_size,
                                                                               self.ec.draft_vocab_corpus)
        # a draft's logits only propose (the target decides), so its tied LM head is quantized with it: for
        # the 2B in int4 the bf16 head (1 GB) would be half of what a draft step reads
        weights = load_weights(d, dcfg, self.dtype, self.device, self._quant(self.ec.draft_quantization, True),
                               progress=False)
        if vocab is not None:  # the LM head cut to those rows (CodeGemma-2B's full head: a fifth of a step's reads)
            vocab = to_device(vocab, self.device, torch.long)
            weights.lm_head = head_rows(weights.embed, vocab)
        return GemmaModel(dcfg, weights, self.dtype, self.device, self.ec.backend), vocab

    def _with_pool(self, draft, graphs: bool) -> Drafter | NgramDrafter:
        """A loaded draft model with its own KV pool of the target's block count (prompt lookup needs none)."""
        if isinstance(draft, NgramDrafter):
            return draft
        (model, vocab), blocks, dcfg = draft, self.cache.blocks, draft[0].cfg
        cache = KVCache(dcfg.num_layers, blocks.num_blocks, blocks.block_size, dcfg.num_kv_heads, dcfg.head_dim,
                        self.dtype, self.device, blocks.prefix_caching)
        return Drafter(model, cache, cuda_graphs=graphs, max_batch=min(self.ec.max_num_seqs, 256),
                       max_context=self.max_model_len, vocab=vocab)

    @torch.inference_mode()
    def warmup(self) -> int:
        """Compile the kernels (eager prefill steps over scratch blocks, the greedy pick) and capture
        the CUDA graph of every step shape serving replays, for every batch bucket: decode steps,
        ragged steps (prompt chunks beside decodes) for every flat-token bucket, and with speculation
        the target's verify windows of 2..k+1 tokens and the draft's one- and two-token steps.
        Serving then never stops to compile or capture (each capture is a few eager forwards;
        Triton's first compile of a kernel takes seconds). Returns the graphs captured."""
        t = time.perf_counter()
        k = self.ec.num_speculative_tokens if self.drafter is not None else 0
        graphs = self.runner.warmup([(1, False)] + [(w, True) for w in range(2, k + 2)], ragged=True)
        if self.drafter is not None and self.drafter.model is not None:
            graphs += self.drafter.runner.warmup([(1, False), (2, False)], ragged=True)
        for rows in (1, 2):
            greedy(torch.zeros(rows, self.cfg.vocab_size, device=self.device))
        failed = sum(len(r.graphs.failed) for r in (self.runner, getattr(self.drafter, "runner", None))
                     if r is not None and r.graphs is not None)
        self.stats.update(warmup_s=round(time.perf_counter() - t, 3), warmup_graphs=graphs, graphs_failed=failed)
        log.info("gemforge: warm-up: kernels compiled, %d CUDA graphs captured%s in %.1f s", graphs,
                 f" ({failed} shapes failed to capture: they run eagerly)" if failed else "", self.stats["warmup_s"])
        return graphs

    @property
    def capacity(self) -> int:
        return self.cache.blocks.num_blocks * self.cache.block_size

    def _default_cache_tokens(self, draft_cfg: ModelConfig | None = None) -> int:
        """A GPU: what gpu_memory_utilization leaves of the card; a CPU: up to 2 GiB (65536 tokens); never
        more than max_num_seqs whole-context sequences use, never less than one (where it fits at all).
        A draft model's pool has as many blocks: a token costs both models' K and V."""
        size = torch.tensor([], dtype=self.dtype).element_size()
        per_token = sum(KVCache.bytes_per_token(c.num_layers, c.num_kv_heads, c.head_dim, size)
                        for c in (self.cfg, draft_cfg) if c is not None)
        if self.device.startswith("cuda"):
            free, total = torch.cuda.mem_get_info(self.device)
            tokens = int(free - (1 - self.ec.gpu_memory_utilization) * total) // per_token
        else:
            free = host_memory_available()
            tokens = min(65536, (2 << 30) // per_token)
        tokens = min(tokens, self.ec.max_num_seqs * self.max_model_len)
        if tokens >= self.max_model_len or self.max_model_len * per_token <= free:
            return max(tokens, self.max_model_len)
        raise RequestError(f"the KV cache of one {self.max_model_len}-token sequence "
                           f"({self.max_model_len * per_token / 1e9:.1f} GB) does not fit the memory available on "
                           f"{self.device} ({free / 1e9:.1f} GB): give a smaller max_model_len (--max-model-len)",
                           field="max_model_len")

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

    def check_request(self, n_prompt: int, params: SamplingParams) -> None:
        """The prompt and max_tokens fit the context and the KV cache, and every token id the
        parameters name (stop_token_ids, logit_bias) is in the vocabulary; else RequestError."""
        total = n_prompt + params.max_tokens
        if total > self.max_model_len:
            raise RequestError(f"prompt ({n_prompt} tokens) + max_tokens ({params.max_tokens}) = {total} exceeds "
                               f"the model's context of {self.max_model_len} tokens", field="max_tokens")
        if total > self.capacity:
            raise RequestError(f"prompt ({n_prompt} tokens) + max_tokens ({params.max_tokens}) = {total} exceeds "
                               f"the KV cache ({self.capacity} tokens)", field="max_tokens")
        V = self.cfg.vocab_size
        for name, ids in (("stop_token_ids", params.stop_token_ids), ("logit_bias", params.logit_bias or ())):
            bad = [i for i in ids if i >= V]
            if bad:
                raise RequestError(f"{name}: token id {bad[0]} is outside the vocabulary [0, {V})", field=name)

    def add_request(self, request_id: str, prompt, params: SamplingParams, suffix: str | None = None,
                    fim_mode: str = "psm", extra_stop_ids=(), stream: bool = True, encoded=None) -> Request:
        """Queue a request. stream=False: `step` returns its output only once it has finished (a
        caller that wants no deltas saves building and delivering one every step). encoded: what
        encode_prompt returned for this prompt, where the caller has it (a long prompt is tokenized once)."""
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already running", field="request_id")
        text, ids = encoded or self.encode_prompt(prompt, suffix, fim_mode)
        self.check_request(len(ids), params)
        extra = tuple(extra_stop_ids) + (tuple(self.tokenizer.fim_stop_ids()) if suffix is not None else ())
        seqs = [Sequence.create(request_id, j, ids, params, self.tokenizer, self.cfg.eos_token_ids, extra, self.device)
                for j in range(params.n)]
        req = Request(request_id, text, ids, seqs, stream=stream)
        self.requests[request_id] = req
        needs_tokens = (params.logprobs is not None or params.prompt_logprobs is not None or params.max_tokens == 0
                        or params.repetition_penalty != 1 or params.presence_penalty or params.frequency_penalty)
        for s in seqs:
            if not s.seeded:  # (a seeded one starts from the same estimate whatever ran before it)
                s.spec_rate = self.lookahead.rate
            self._by_seq[s.seq_id] = req
            self.scheduler.add(s)
            if needs_tokens:
                self._sync_seqs.add(s.seq_id)
        return req

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now; its blocks are freed. Returns its final output (None if unknown)."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        for s in req.seqs:
            s.abort()
            self._retire(s)
            self._by_seq.pop(s.seq_id, None)
        return req.output(True)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # -- one iteration ----------------------------------------------------------------------
    @torch.inference_mode()  # logits are inference tensors: penalties and biases edit them in place
    def step(self, finished_only: bool = False) -> list[RequestOutput]:
        """Run one scheduled batch; return the outputs of requests that produced tokens (of those
        that finished, with `finished_only`: a caller that does not stream skips building the rest).

        With async scheduling, a step's sampled tokens stay on the device (`Sequence.pending`): the
        next call schedules and launches its batch first, feeding them from the device, and only
        then reads them (appends, stop checks, outputs), so the device computes one step while the
        host finishes the one before; outputs come one call after their step. A sequence whose
        unread token is certain to end it (max_tokens) sits out; one that an unread token ends
        otherwise (a stop) has one step computed in vain, dropped. Steps with speculation, or with a
        sequence that needs its tokens on the host before the next step (penalties, logprobs,
        prompt logprobs), read the previous step's tokens first, as without it."""
        touched: dict[str, Request] = {}
        inflight, self._inflight = self._inflight, None
        overlap = self.async_scheduling and self.drafter is None and not self._sync_seqs
        if inflight is not None and not overlap:
            self._resolve(inflight, touched)
            inflight = None
        if self.drafter is not None:
            self.lookahead.assign(self.scheduler.running, self.max_model_len)
        skip = {s.seq_id for s in inflight.seqs if len(s.output_ids) + s.pending >= s.params.max_tokens} \
            if inflight is not None else ()
        plan = self.scheduler.schedule(skip)
        for s in plan.preempted:
            self._forget_draft(s)
        if not plan.scheduled:
            if inflight is not None:
                self._resolve(inflight, touched)
            return self._collect(touched, finished_only)
        spec = [sc for sc in plan.scheduled if sc.lookahead > 0]
        t_start = time.perf_counter()
        proposal, window = self._propose(spec) if spec else (None, {})
        spec = [sc for sc in spec if sc.lookahead]
        batch = FlatBatch.pack(plan.scheduled, window)
        logits = self._forward(batch, inflight, proposal)
        for sc in plan.scheduled:
            sc.seq.num_cached = sc.start + sc.num_tokens
        self.stats["steps"] += 1
        self.stats["prompt_tokens"] += batch.prompt_tokens
        rows, plain = batch.rows, batch.plain
        for i in batch.scored:
            self._prompt_logprobs(plan.scheduled[i], logits[rows[i]])
        if plain:
            for i in [i for i in plain if plan.scheduled[i].seq.params.max_tokens == 0]:
                self._finish_prompt_only(plan.scheduled[i].seq, touched)
            plain = [i for i in plain if plan.scheduled[i].seq.params.max_tokens]
        if plain:
            seqs = [plan.scheduled[i].seq for i in plain]
            picked = take_rows(logits, [rows[i].stop - 1 for i in plain])
            if overlap:  # read next call, after the next step is launched
                self._inflight = InFlight.launch(seqs, self._pick(seqs, picked))
                self.stats["async_steps"] = self.stats.get("async_steps", 0) + 1
                for s in seqs:
                    s.pending += 1
            else:
                for s, tok, lp in zip(seqs, *self._sample(seqs, picked)):
                    self._append(s, (tok,), (lp,), touched)
        if inflight is not None:
            self._resolve(inflight, touched)
        if window:
            self._verify(plan.scheduled, window, proposal, logits, rows, touched)
        if self.cache.blocks.prefix_caching:  # offer newly filled blocks to later prompts
            bs, blocks = self.cache.block_size, self.cache.blocks
            for sc in plan.scheduled:
                s = sc.seq
                if s.num_cached // bs > sc.start // bs and not s.finished:
                    blocks.register(s.seq_id, s.tokens, s.num_cached)
        measure = self.drafter is not None and all(sc.num_tokens == 1 for sc in plan.scheduled) and not any(
            req.finished for req in touched.values())
        out = self._collect(touched, finished_only)
        if measure:
            self.lookahead.measure(self.drafter, spec, len(plan.scheduled), time.perf_counter() - t_start)
        return out

    def _propose(self, spec: list) -> tuple:
        """(the drafter's proposal for the scheduled sequences `spec`, window): window maps id(sc) to its
        drafts' span in proposal.tokens and their rows in proposal.q. A sequence given fewer drafts than
        its lookahead (prompt lookup may find fewer, or none) gives the other KV slots back."""
        proposal = self.drafter.propose([sc.seq for sc in spec], [sc.lookahead for sc in spec])
        window, drafted = {}, 0
        for i, (sc, n) in enumerate(zip(spec, proposal.counts)):
            if n < sc.lookahead:
                self.cache.blocks.rollback(sc.seq.seq_id, sc.lookahead - n)
                sc.lookahead = n
            if n:
                window[id(sc)] = (slice(drafted, drafted + n), proposal.q_rows[i] if proposal.q_rows else None)
                drafted += n
        return proposal, window

    def _forward(self, batch: "FlatBatch", inflight: "InFlight | None", proposal) -> torch.Tensor:
        """The model over the flat batch; the tokens not on the host (the step in flight's, a window's
        drafts) gathered into it on the device."""
        if batch.at:  # (only ever the last token of a sequence, fed alone)
            src = [inflight.row(s) for s in batch.fed]
            ids = inflight.tokens if src == list(range(len(inflight.seqs))) else \
                inflight.tokens[to_device(src, inflight.tokens.device)]
            return self.runner.run(batch.items, ids, None if len(batch.at) == batch.size else batch.at)
        if batch.draft_at:  # (no token is in flight in a speculative step)
            at = batch.draft_at
            return self.runner.run(batch.items, proposal.tokens, None if len(at) == batch.size else at)
        return self.runner.run(batch.items)

    def _verify(self, scheduled, window: dict, proposal, logits: torch.Tensor, rows: list[slice],
                touched: dict) -> None:
        """Judge each verify window's drafts against the target's rows (speculative.verdicts, one read),
        append what is kept, and give the rejected drafts' KV slots back to both models' caches."""
        verified = [i for i, sc in enumerate(scheduled) if id(sc) in window]
        raw = logits.clone() if any(scheduled[i].seq.adjusts and scheduled[i].seq.params.logprobs is not None
                                    for i in verified) else logits  # what logprobs report (see _sample)
        for i in verified:
            s = scheduled[i].seq
            if s.adjusts:  # row j scores the token j places after the next one
                adjust(logits[rows[i]], [s.logit_adjustment(j) for j in range(rows[i].stop - rows[i].start)])
        windows = [Window(scheduled[i].seq.params, scheduled[i].seq.generator, rows[i], *window[id(scheduled[i])])
                   for i in verified]
        kept = dict(zip(verified, verdicts(logits, proposal.tokens, windows, proposal.q)))
        tops = {i: w.params.logprobs for i, w in zip(verified, windows) if w.params.logprobs is not None}
        lps = self._window_logprobs(raw, rows, kept, tops) if tops else {}
        for i in verified:
            sc = scheduled[i]
            s, k = sc.seq, sc.lookahead
            toks = kept[i]
            accepted = len(toks) - 1
            self.lookahead.update(s, accepted, k)
            self.stats["spec_proposed"] = self.stats.get("spec_proposed", 0) + k
            self.stats["spec_accepted"] = self.stats.get("spec_accepted", 0) + accepted
            self.stats["spec_windows"] = self.stats.get("spec_windows", 0) + 1
            self._append(s, toks, lps.get(i, [None] * len(toks)), touched)
            if not s.finished:  # keep the KV of the last token and the accepted drafts
                s.num_cached = sc.start + 1 + accepted
                self.cache.blocks.rollback(s.seq_id, sc.lookahead - accepted)
                self.drafter.keep(s.seq_id, s.num_cached)

    @staticmethod
    def _window_logprobs(logits: torch.Tensor, rows: list[slice], kept: dict, tops: dict) -> dict:
        """{window: logprob entries of its kept tokens (each scored by its window row, with tops[window]
        alternatives)} for the given windows, in one device read."""
        sel = [r for i in tops for r in range(rows[i].start, rows[i].start + len(kept[i]))]
        dev = logits.device
        entries = logprob_entries(logits[to_device(sel, dev)], to_device([t for i in tops for t in kept[i]], dev),
                                  [tops[i] for i in tops for _ in kept[i]])
        out, at = {}, 0
        for i in tops:
            out[i], at = entries[at: at + len(kept[i])], at + len(kept[i])
        return out

    def _prompt_logprobs(self, sc, logits: torch.Tensor) -> None:
        """Extend the sequence's prompt logprobs with what this prompt chunk's rows say: row j (position
        start + j) scores prompt token start + j + 1 (the prompt's last row scores the first output)."""
        s, start = sc.seq, sc.start
        first = len(s.prompt_logprobs) - 1 - start  # rows before this one were collected already
        last = min(sc.num_tokens, len(s.prompt_ids) - 1 - start)  # the prompt's last row scores output
        if first >= last:
            return
        nxt = torch.tensor(s.prompt_ids[start + first + 1: start + last + 1], device=logits.device)
        s.prompt_logprobs += logprob_entries(logits[first:last], nxt, [s.params.prompt_logprobs] * len(nxt))

    def _finish_prompt_only(self, s: Sequence, touched: dict) -> None:
        """max_tokens=0: the prompt has run (its logprobs are collected); nothing is generated."""
        s.finish_reason = "length"
        self._retire(s)
        req = self._by_seq[s.seq_id]
        touched[req.request_id] = req

    def _pick(self, seqs, logits) -> torch.Tensor:
        """The next token of each sequence (a row of `logits` each), on the device: adjustments
        (for the token after any not read yet), penalties and filters applied."""
        params = [s.params for s in seqs]
        if any(s.adjusts for s in seqs):
            adjust(logits, [s.logit_adjustment(s.pending) for s in seqs])
        if any(p.repetition_penalty != 1 or p.presence_penalty or p.frequency_penalty for p in params):
            apply_penalties(logits, params, [s.prompt_ids for s in seqs], [s.output_ids for s in seqs])
        return sample(logits, params, [s.generator for s in seqs])

    def _resolve(self, inflight: "InFlight", touched: dict) -> None:
        """Read the tokens of a step launched earlier and append them (a sequence that finished or
        was aborted since drops its own)."""
        for s, tok in zip(inflight.seqs, inflight.read()):
            s.pending -= 1
            if not s.finished:
                self._append(s, (tok,), (None,), touched)

    def _sample(self, seqs, logits):
        """(tokens, logprob dicts) for the rows of `logits`: the tokens picked with adjustments, penalties
        and filters applied, their logprobs those of the model's own logits (as the prompt's are)."""
        want = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        raw = logits[want] if want else None  # (a copy: _pick edits logits in place)
        tokens = self._pick(seqs, logits)
        lp_dicts: list[dict | None] = [None] * len(seqs)
        if want:
            entries = logprob_entries(raw, tokens[want], [seqs[i].params.logprobs for i in want])
            for i, entry in zip(want, entries):
                lp_dicts[i] = entry
        return tokens.tolist(), lp_dicts

    def _append(self, s: Sequence, tokens: list[int], lps: list, touched: dict) -> None:
        """Append tokens one by one until the sequence finishes (nothing past a stop is kept)."""
        for i, (tok, lp) in enumerate(zip(tokens, lps)):
            s.delta += s.append(tok, lp)
            if s.finish_reason is not None:
                self._retire(s)
                break
        self.stats["generation_tokens"] += i + 1
        req = self._by_seq[s.seq_id]
        if req.first_token_time is None:
            req.first_token_time = time.monotonic()
        touched[req.request_id] = req

    def _retire(self, s: Sequence) -> None:
        """A finished or aborted sequence leaves the scheduler and both KV pools."""
        self.scheduler.finish(s)
        self._forget_draft(s)
        self._sync_seqs.discard(s.seq_id)

    def _forget_draft(self, s: Sequence) -> None:
        if self.drafter is not None:
            self.drafter.free(s.seq_id)

    def _collect(self, touched: dict, finished_only: bool = False) -> list[RequestOutput]:
        outs = []
        for req in touched.values():
            done = req.finished
            if done or (req.stream and not finished_only):
                outs.append(req.output(done))
                for s in req.seqs:  # a delta is the text since the request's previous output
                    s.delta = ""
            if done:
                self.requests.pop(req.request_id, None)
                for s in req.seqs:
                    self._by_seq.pop(s.seq_id, None)
        return outs
