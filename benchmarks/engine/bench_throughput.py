"""Offline throughput: gemforge's continuous batching against HF transformers `generate` (batched,
left-padded) on the same checkpoint in the same run, with 1, 8 and 64 concurrent requests.

    python benchmarks/engine/bench_throughput.py --model models/nano-codegemma
"""
from __future__ import annotations

import argparse
import json
import random
import time

import torch

from gemforge.engine import LLM, SamplingParams


def prompts_for(llm: LLM, n: int, seed: int = 0) -> list[list[int]]:
    """n prompts of 16..96 tokens cut from the tokenizer's own encoding of Python-ish text."""
    rng = random.Random(seed)
    text = "def handler(request):\n    if request.method == 'GET':\n        return render(request)\n" * 8
    ids = llm.tokenizer.encode(text, add_bos=False)
    return [[llm.tokenizer.bos_id] + ids[: rng.randrange(16, min(96, len(ids)))] for _ in range(n)]


def bench_gemforge(llm: LLM, prompts, max_tokens: int) -> float:
    p = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(max_tokens=2, temperature=0.0), use_tqdm=False)  # warm-up
    t = time.perf_counter()
    outs = llm.generate(prompts, p, use_tqdm=False)
    return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t)


def bench_hf(model_dir: str, prompts, max_tokens: int, device: str, dtype) -> float:
    from transformers import GemmaForCausalLM

    model = GemmaForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    with torch.no_grad():
        model.generate(ids[:1], attention_mask=mask[:1], max_new_tokens=2, do_sample=False, pad_token_id=0)
        t = time.perf_counter()
        model.generate(ids, attention_mask=mask, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                       do_sample=False, pad_token_id=0)
    return len(prompts) * max_tokens / (time.perf_counter() - t)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/nano-codegemma")
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 64])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    llm = LLM(args.model, device=args.device, progress=False, max_num_seqs=max(args.concurrency))
    rows = []
    for n in args.concurrency:
        prompts = prompts_for(llm, n)
        ours = bench_gemforge(llm, prompts, args.max_tokens)
        peer = bench_hf(args.model, prompts, args.max_tokens, args.device, llm.engine.dtype)
        rows.append({"concurrency": n, "gemforge_tok_s": round(ours, 1), "hf_generate_tok_s": round(peer, 1),
                     "ratio": round(ours / peer, 2), "device": args.device, "dtype": str(llm.engine.dtype)})
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
