"""Where a decode step's time goes: each model op (rms_norm, linear, rotary, write_kv, attention,
gelu_and_mul) timed inside the engine, per decode step, beside the whole forward and the whole
engine step (the rest is host work: scheduling, sampling, detokenization). The workload is
bench_throughput's (prompts of 16-96 tokens, 64 new tokens each); prefill steps are left out.
Per-op times come from the op-by-op forward; where the model runs its layers in one C++ call
(NativeLayers, bf16 on a CPU) that forward and step are timed too (`native_forward_ms`,
`native_step_ms`), in a run of their own.

    python benchmarks/engine/bench_step_breakdown.py --concurrency 1 64
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from collections import defaultdict

import torch

from gemforge.engine import LLM, SamplingParams

from bench_throughput import prompts_for
from report import emit, save


def breakdown(llm: LLM, n: int, max_tokens: int, per_op: bool = True) -> dict:
    """Mean ms per decode step of each op (op by op, `per_op`), of the forward and of the engine step,
    over one run."""
    eng, model = llm.engine, llm.engine.runner.model
    acc, steps, decoding = defaultdict(float), [0], [False]

    def timed(name, fn):
        def run(*args, **kwargs):
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            if decoding[0]:
                acc[name] += time.perf_counter() - t
            return out
        return run

    ops, forward, step = model.ops, model.forward, eng.step

    def timed_forward(input_ids, *args, **kwargs):
        decoding[0] = input_ids.shape[0] <= n  # one token per running sequence
        steps[0] += decoding[0]
        return timed("forward", forward)(input_ids, *args, **kwargs)

    native = model.native_layers
    if per_op:
        model.native_layers = None
        model.ops = dataclasses.replace(ops, **{f.name: timed(f.name, getattr(ops, f.name))
                                                for f in dataclasses.fields(ops) if callable(getattr(ops, f.name))})
    model.forward, eng.step = timed_forward, timed("step", step)
    try:
        prompts = prompts_for(llm, n)
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        llm.generate(prompts, params, use_tqdm=False)  # warm-up
        acc.clear()
        steps[0] = 0
        llm.generate(prompts, params, use_tqdm=False)
    finally:
        model.ops, model.forward, eng.step, model.native_layers = ops, forward, step, native
    return {"concurrency": n, "decode_steps": steps[0], **{f"{k}_ms": round(v / steps[0] * 1e3, 3) for k, v in acc.items()}}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/nano-codegemma")
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 64])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--backend", default="auto", help="the model's ops (torch: the reference ops, for comparison)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    llm = LLM(args.model, device=args.device, dtype=args.dtype, backend=args.backend, progress=False,
              max_num_seqs=max(args.concurrency), enable_prefix_caching=False)  # each repeat computes its prompts
    rows = []
    native = llm.engine.runner.model.native_layers is not None
    for n in args.concurrency:
        row = breakdown(llm, n, args.max_tokens)
        if native:
            whole = breakdown(llm, n, args.max_tokens, per_op=False)
            row.update(native_forward_ms=whole["forward_ms"], native_step_ms=whole["step_ms"])
        emit(rows, {**row, "dtype": str(llm.engine.dtype), "backend": args.backend, "device": args.device})
    return save(rows, args.out)


if __name__ == "__main__":
    main()
