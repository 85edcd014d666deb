"""Offline throughput: gemforge's continuous batching against HF transformers `generate` (batched,
left-padded) on the same checkpoint in the same run, with 1, 8 and 64 concurrent requests. On a GPU
gemforge also runs with async scheduling off (`gemforge_sync_tok_s`: each step's tokens read before
the next step is launched), interleaved with the rest: what the overlap buys. `--staggered`: the
requests also join one every few engine steps instead of all at once, so that steps mix prompt
chunks with decode tokens as serving with arrivals does; timed with those mixed steps replayed from
CUDA graphs (`ragged`) and run eagerly (`eager_mixed_tok_s`).

    python benchmarks/engine/bench_throughput.py --model models/nano-codegemma
"""
from __future__ import annotations

import argparse
import itertools
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


def gemforge_run(llm: LLM, prompts, max_tokens: int, async_scheduling: bool | None = None):
    """A timed callable: all prompts through LLM.generate (async scheduling as given, else the
    engine's default); returns the tokens generated."""
    p = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    default = llm.engine.async_scheduling
    llm.generate(prompts[:1], SamplingParams(max_tokens=2, temperature=0.0), use_tqdm=False)  # warm-up

    def run():
        llm.engine.async_scheduling = default if async_scheduling is None else async_scheduling
        try:
            return sum(len(o.outputs[0].token_ids) for o in llm.generate(prompts, p, use_tqdm=False))
        finally:
            llm.engine.async_scheduling = default
    return run


_ids = itertools.count()


def staggered_run(llm: LLM, prompts, max_tokens: int, every: int, ragged_graphs: bool = True):
    """A timed callable: the prompts join the engine one every `every` steps, each running to
    max_tokens (steps mix prompt chunks with decode tokens); with ragged_graphs=False those mixed
    steps run eagerly. Returns the tokens generated."""
    eng = llm.engine
    p = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    graphs = eng.runner.graphs

    def run():
        if graphs is not None and not ragged_graphs:
            graphs.RAGGED_TOKENS = ()  # (the instance's: no step is ragged-graphed)
        try:
            waiting, tokens, step = list(prompts), 0, 0
            while waiting or eng.has_unfinished():
                if waiting and step % every == 0:
                    eng.add_request(f"staggered-{next(_ids)}", waiting.pop(), p)
                tokens += sum(len(c.token_ids) for out in eng.step(finished_only=True) for c in out.outputs)
                step += 1
            return tokens
        finally:
            if graphs is not None:
                graphs.__dict__.pop("RAGGED_TOKENS", None)
    return run


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
    ap.add_argument("--staggered", type=int, default=0, metavar="N",
                    help="also N requests joining one every 2 steps (with mixed steps graphed and eager)")
    ap.add_argument("--async-ab", action=argparse.BooleanOptionalAction, default=None,
                    help="also time gemforge with async scheduling off (default: on a GPU)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    ab = args.async_ab if args.async_ab is not None else args.device.startswith("cuda")
    llm = LLM(args.model, device=args.device, dtype=args.dtype, progress=False, max_num_seqs=max(args.concurrency),
              enable_prefix_caching=False)  # repeats would find their prompts cached; HF has no such cache
    from transformers import GemmaForCausalLM

    hf = GemmaForCausalLM.from_pretrained(args.model, dtype=llm.engine.dtype).to(args.device).eval()
    rows = []
    for n in args.concurrency:
        prompts = prompts_for(llm, n)
        runs = {"gemforge": gemforge_run(llm, prompts, args.max_tokens),
                "hf": hf_run(hf, prompts, args.max_tokens, args.device)}
        if ab:
            runs["sync"] = gemforge_run(llm, prompts, args.max_tokens, async_scheduling=False)
        best = best_tok_s(runs, args.repeats)
        row = {"concurrency": n, "gemforge_tok_s": round(best["gemforge"], 1), "hf_generate_tok_s":
               round(best["hf"], 1), "ratio": round(best["gemforge"] / best["hf"], 2), "repeats": args.repeats,
               "device": args.device, "dtype": str(llm.engine.dtype),
               "async_scheduling": llm.engine.async_scheduling}
        stats = llm.engine.stats  # (the warm-up's, on a GPU: its seconds and graphs are the start-up cost)
        row.update({k: stats[k] for k in ("warmup_s", "warmup_graphs", "graphs_failed") if k in stats})
        if ab:
            row.update(gemforge_sync_tok_s=round(best["sync"], 1),
                       async_speedup=round(best["gemforge"] / best["sync"], 3))
        emit(rows, row)
    if args.staggered:
        prompts = prompts_for(llm, args.staggered, seed=1)
        best = best_tok_s({"ragged": staggered_run(llm, prompts, args.max_tokens, every=2),
                           "eager": staggered_run(llm, prompts, args.max_tokens, every=2, ragged_graphs=False)},
                          args.repeats)
        emit(rows, {"workload": f"{args.staggered} requests, one joining every 2 steps",
                    "gemforge_tok_s": round(best["ragged"], 1), "eager_mixed_tok_s": round(best["eager"], 1),
                    "ragged_graph_speedup": round(best["ragged"] / best["eager"], 3),
                    "cuda_graphs": llm.engine.runner.graphs is not None, "device": args.device})
    return save(rows, args.out)


if __name__ == "__main__":
    main()
