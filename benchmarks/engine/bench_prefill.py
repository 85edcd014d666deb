"""Time to first token for one long prompt: gemforge's `LLM.generate(max_tokens=1)` (prefill, the LM
head on the last token, the pick) against HF transformers' forward of the same prompt with
`logits_to_keep=1` (its prefill, SDPA attention) on the same checkpoint in the same dtype and run.
The prompt is a real source file's tokens (torch's own functional.py), cut to each length; each
side runs 3 times, interleaved, and its best counts.

    python benchmarks/engine/bench_prefill.py --model models/nano-codegemma --lengths 128 512 2000
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from gemforge.engine import LLM, SamplingParams

from report import emit, save


def source_tokens(llm: LLM, n: int) -> list[int]:
    text = (Path(torch.__file__).parent / "nn" / "functional.py").read_text()
    ids = llm.tokenizer.encode(text)
    if len(ids) < n:
        raise SystemExit(f"bench_prefill: the source file has only {len(ids)} tokens, asked for {n}")
    return ids[:n]


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/nano-codegemma")
    ap.add_argument("--lengths", nargs="+", type=int, default=[128, 512, 2000])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="auto", help="both run in this dtype (auto: gemforge's choice)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    # each repeat computes the whole prompt; one sequence at a time, warmed up below (serving's warm-up would
    # capture the decode graphs of every batch size: seconds of the suite's part, for steps never run here)
    llm = LLM(args.model, device=args.device, dtype=args.dtype, progress=False, enable_prefix_caching=False,
              max_num_batched_tokens=max(2048, max(args.lengths)), max_num_seqs=1, warmup=False)
    from transformers import GemmaForCausalLM

    hf = GemmaForCausalLM.from_pretrained(args.model, dtype=llm.engine.dtype).to(args.device).eval()
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    rows = []
    params = SamplingParams(max_tokens=1, temperature=0.0)
    for n in args.lengths:
        ids = source_tokens(llm, n)
        x = torch.tensor([ids], device=args.device)
        runs = {"gemforge": lambda: llm.generate([ids], params, use_tqdm=False),
                "hf": lambda: hf(x, logits_to_keep=1)}
        best = dict.fromkeys(runs, float("inf"))
        with torch.inference_mode():
            for fn in runs.values():  # warm-up
                fn()
            for _ in range(args.repeats):
                for name, fn in runs.items():
                    sync()
                    t = time.perf_counter()
                    fn()
                    sync()
                    best[name] = min(best[name], time.perf_counter() - t)
        emit(rows, {"prompt_tokens": n, "gemforge_ms": round(best["gemforge"] * 1e3, 2),
                    "hf_forward_ms": round(best["hf"] * 1e3, 2), "ratio": round(best["hf"] / best["gemforge"], 2),
                    "gemforge_prefill_tok_s": round(n / best["gemforge"], 1), "device": args.device,
                    "dtype": str(llm.engine.dtype)})
    return save(rows, args.out)


if __name__ == "__main__":
    main()
