"""Offline throughput: gemforge's continuous batching against HF transformers `generate` (batched,
left-padded) on the same checkpoint in the same run, with 1, 8 and 64 concurrent requests.

    python benchmarks/engine/bench_throughput.py --model models/nano-codegemma
"""
from __future__ import annotations

import argparse
import random
import time

import torch

from gemforge.engine import LLM, SamplingParams

from report import emit, save


def prompts_for(llm: LLM, n: int, seed: int = 0) -> list[list[int]]:
    """n prompts of 16..96 tokens cut from the tokenizer's own encoding of Python-ish text."""
    rng = random.Random(seed)
    text = "def handler(request):\n    if request.method == 'GET':\n        return render(request)\n" * 8
    ids = llm.tokenizer.encode(text, add_bos=False)
    return [[llm.tokenizer.bos_id] + ids[: rng.randrange(16, min(96, len(ids)))] for _ in range(n)]


def gemforge_run(llm: LLM, prompts, max_tokens: int):
    """A timed callable: all prompts through LLM.generate; returns the tokens generated."""
    p = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(max_tokens=2, temperature=0.0), use_tqdm=False)  # warm-up
    return lambda: sum(len(o.outputs[0].token_ids) for o in llm.generate(prompts, p, use_tqdm=False))


def hf_run(model, prompts, max_tokens: int, device: str):
    """A timed callable: HF `generate`, batched and left-padded; returns the tokens generated."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    with torch.no_grad():
        model.generate(ids[:1], attention_mask=mask[:1], max_new_tokens=2, do_sample=False, pad_token_id=0)

    def run():
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                           do_sample=False, pad_token_id=0)
        return len(prompts) * max_tokens
    return run


def best_tok_s(runs: dict, repeats: int) -> dict:
    """Each callable `repeats` times, interleaved (so drift in the machine hits all alike); the best
    tokens/s of each."""
    best = dict.fromkeys(runs, 0.0)
    for _ in range(repeats):
        for name, run in runs.items():
            t = time.perf_counter()
            tokens = run()
            best[name] = max(best[name], tokens / (time.perf_counter() - t))
    return best


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/nano-codegemma")
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 64])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="auto", help="both engines run in this dtype (auto: gemforge's choice)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per side (the best counts)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    llm = LLM(args.model, device=args.device, dtype=args.dtype, progress=False, max_num_seqs=max(args.concurrency),
              enable_prefix_caching=False)  # repeats would find their prompts cached; HF has no such cache
    from transformers import GemmaForCausalLM

    hf = GemmaForCausalLM.from_pretrained(args.model, dtype=llm.engine.dtype).to(args.device).eval()
    rows = []
    for n in args.concurrency:
        prompts = prompts_for(llm, n)
        best = best_tok_s({"gemforge": gemforge_run(llm, prompts, args.max_tokens),
                           "hf": hf_run(hf, prompts, args.max_tokens, args.device)}, args.repeats)
        emit(rows, {"concurrency": n, "gemforge_tok_s": round(best["gemforge"], 1), "hf_generate_tok_s":
                     round(best["hf"], 1), "ratio": round(best["gemforge"] / best["hf"], 2), "repeats": args.repeats,
                     "device": args.device, "dtype": str(llm.engine.dtype)})
    return save(rows, args.out)


if __name__ == "__main__":
    main()
