"""Host overhead of one engine step with a do-nothing model: scheduling, metadata, sampling,
detokenization and stop checks, at 1..256 running sequences (goal: <= 300 us at 1, <= 2 ms at 256).
`greedy_us` is the part of it that is the greedy pick over the [batch, vocab] logits, which runs on
the device when there is one; `python_us` is the rest. The garbage collector is frozen first, as
`gemforge serve` freezes it after loading. Each is the best of `--repeats` measurements
(a shared CPU's noise only ever adds time). For `--async-batches`, the same requests also run
through the AsyncEngine, the server's path, each consumed by its own coroutine: `async_stream_us`
when every request streams (an output delivered each step), `async_final_us` when none does (the
engine delivers final outputs only), both per step of the whole run. `async_step_us`: the same
steps with the engine's async scheduling (each step launched before the previous one's tokens are
read; on a GPU this host work then overlaps the device's step, here it only shows its own cost).
`--speculative`: a speculative step's host time (k draft steps, the verify forward, the verdicts),
do-nothing target and draft, greedy (`spec_greedy_step_us`) and sampled (`spec_sampled_step_us`).

    python benchmarks/engine/bench_host_overhead.py --model models/nano-codegemma
"""
from __future__ import annotations

import argparse
import gc
import time

import torch

from gemforge.engine import SamplingParams
from gemforge.engine.config import ModelConfig
from gemforge.engine.engine import Engine, EngineConfig
from gemforge.engine.sampling import greedy

from report import emit, save


class NullModel:
    """Stands in for GemmaModel: returns constant (contiguous, as a real model's) logits, so only host
    work is timed."""

    def __init__(self, vocab: int, max_rows: int):
        self.logits = torch.zeros(max_rows, vocab)
        self.logits[:, vocab - 1] = 1.0  # a merged piece, as most generated tokens are

    def forward(self, input_ids, meta, cache, logits_indices=None):
        n = input_ids.shape[0] if logits_indices is None else logits_indices.shape[0]
        return self.logits[:n]


def step_us(model_dir: str, batch: int, steps: int = 50, prompt_len: int = 4, async_scheduling: bool = False) -> float:
    """Mean wall time of a decode step with `batch` running sequences of `prompt_len`-token prompts."""
    eng = null_engine(model_dir, batch, prompt_len + steps + 32, prompt_len, async_scheduling)
    p = SamplingParams(max_tokens=steps + 20, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        eng.add_request(f"r{i}", [2] + [10 + (j % 50) for j in range(prompt_len - 1)], p)
    return timed_steps(eng, steps)


def timed_steps(eng: Engine, steps: int) -> float:
    """Microseconds per step of `steps` engine steps, after three (prefill and warm-up)."""
    for _ in range(3):
        eng.step()
    gc.collect()
    gc.freeze()  # as `gemforge serve` does after loading: full collections skip what is alive now
    try:
        t = time.perf_counter()
        for _ in range(steps):
            eng.step()
    finally:
        gc.unfreeze()
    return (time.perf_counter() - t) / steps * 1e6


def null_engine(model_dir: str, batch: int, ctx: int, prompt_len: int, async_scheduling: bool = False,
                draft: str | None = None, k: int = 4) -> Engine:
    """An engine whose model (and draft model, with `draft`: fixed lookahead k) do nothing."""
    spec = dict(draft_model=draft, num_speculative_tokens=k, adaptive_lookahead=False) if draft else {}
    eng = Engine(model_dir, EngineConfig(dtype="float32", device="cpu", max_num_seqs=max(batch, 1),
                                         async_scheduling=async_scheduling,
                                         max_num_batched_tokens=max(2048, batch * prompt_len),
                                         max_model_len=ctx, kv_cache_tokens=batch * ctx + 512, **spec), progress=False)
    eng.runner.model = NullModel(eng.cfg.vocab_size, max(batch, 1) * 8 * (k + 1))
    if draft:
        eng.drafter.runner.model = NullModel(eng.cfg.vocab_size, max(batch, 1) * 8)
    return eng


def spec_step_us(model_dir: str, draft: str, batch: int, k: int, sampled: bool, steps: int = 20) -> float:
    """Mean wall time of a speculative step (k draft steps, the verify forward, the verdicts, the
    bookkeeping) with `batch` running sequences, both models doing nothing: every draft is accepted
    (the draft's logits are the target's), so each step appends k + 1 tokens a sequence."""
    eng = null_engine(model_dir, batch, 4 + (steps + 4) * (k + 1) + 32, 4, draft=draft, k=k)
    p = SamplingParams(max_tokens=(steps + 4) * (k + 1), temperature=0.8 if sampled else 0.0, ignore_eos=True)
    for i in range(batch):
        eng.add_request(f"r{i}", [2, 10, 11, 12], p)
    return timed_steps(eng, steps)


def async_step_us(model_dir: str, batch: int, stream: bool, steps: int = 50, prompt_len: int = 4) -> float:
    """Wall time per step of `batch` requests of `steps` tokens through an AsyncEngine, prefill included."""
    import asyncio

    from gemforge.engine.async_engine import AsyncEngine

    engine = AsyncEngine(null_engine(model_dir, batch, prompt_len + steps + 32, prompt_len))
    p = SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True)
    prompt = [2] + [10 + (j % 50) for j in range(prompt_len - 1)]

    async def one(i):
        async for _ in engine.generate(prompt, p, f"r{i}", stream=stream):
            pass

    async def run():
        await asyncio.gather(*(one(i) for i in range(batch)))

    gc.collect()
    gc.freeze()
    try:
        t = time.perf_counter()
        asyncio.run(run())
    finally:
        gc.unfreeze()
    return (time.perf_counter() - t) / (steps + 1) * 1e6


def greedy_us(vocab: int, batch: int, iters: int = 50) -> float:
    logits = torch.randn(batch, vocab)
    greedy(logits)
    t = time.perf_counter()
    for _ in range(iters):
        greedy(logits)
    return (time.perf_counter() - t) / iters * 1e6


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/nano-codegemma")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64, 256])
    ap.add_argument("--prompt-lens", nargs="+", type=int, default=[4, 1024],
                    help="context per sequence (long ones expose per-step work that grows with length)")
    ap.add_argument("--repeats", type=int, default=3, help="measurements per point (the best counts)")
    ap.add_argument("--async-batches", nargs="*", type=int, default=[64, 256],
                    help="running requests at which to time the AsyncEngine too (4-token prompts)")
    ap.add_argument("--speculative", nargs="*", type=int, default=[],
                    help="running requests at which to time a speculative step too (do-nothing draft, k = --k)")
    ap.add_argument("--draft", default="models/nano-codegemma-draft")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    rows = []
    vocab = ModelConfig.from_pretrained(args.model).vocab_size
    for plen in args.prompt_lens:
        for b in args.batches:
            step = overlapped = float("inf")
            for _ in range(args.repeats):  # sync and async interleaved
                step = min(step, step_us(args.model, b, prompt_len=plen))
                overlapped = min(overlapped, step_us(args.model, b, prompt_len=plen, async_scheduling=True))
            pick = min(greedy_us(vocab, b) for _ in range(args.repeats))
            emit(rows, {"running_seqs": b, "prompt_len": plen, "step_us": round(step, 1), "greedy_us": round(pick, 1),
                         "python_us": round(step - pick, 1), "async_step_us": round(overlapped, 1)})
    for b in args.async_batches:
        best = {True: float("inf"), False: float("inf")}
        for _ in range(args.repeats):  # streamed and final-only interleaved
            for stream in best:
                best[stream] = min(best[stream], async_step_us(args.model, b, stream))
        emit(rows, {"running_seqs": b, "prompt_len": 4, "async_stream_us": round(best[True], 1),
                    "async_final_us": round(best[False], 1)})
    for b in args.speculative:
        best = {False: float("inf"), True: float("inf")}
        for _ in range(args.repeats):  # greedy and sampled interleaved
            for sampled in best:
                best[sampled] = min(best[sampled], spec_step_us(args.model, args.draft, b, args.k, sampled))
        emit(rows, {"running_seqs": b, "k": args.k, "spec_greedy_step_us": round(best[False], 1),
                    "spec_sampled_step_us": round(best[True], 1)})
    return save(rows, args.out)


if __name__ == "__main__":
    main()
