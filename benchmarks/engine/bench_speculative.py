"""Speculative decoding on the bundled nano pair: tokens/s and tokens per target forward against
the target alone (timed in the same rounds as each variant), for k = 1..8, on held-out code
prompts and on FIM prompts (greedy); then the
adaptive lookahead (draft cost measured, or given as the draft's measured speed ratio), an int4
draft, and prompt lookup ("[ngram]": no draft model) at k = 4, fixed and adaptive; with
--draft-vocab-sizes, the draft with its LM head cut to each size (k = 4, fixed).

    python benchmarks/engine/bench_speculative.py [--target models/nano-codegemma] [--ks 1 2 ... 8]
"""
from __future__ import annotations

import argparse
import json
import random
import sysconfig
import time
from pathlib import Path

from gemforge.engine import LLM, SamplingParams
from gemforge.engine.drafters import NGRAM

from report import emit, save


def heldout_prompts(target: Path, n: int, seed: int = 0) -> tuple[list[str], list[tuple[str, str]]]:
    """Code prompts (a held-out file's first lines) and FIM (prefix, suffix) pairs around a line."""
    files = json.loads((target / "training.json").read_text())["heldout_files"]
    root = Path(sysconfig.get_paths()["stdlib"])
    rng = random.Random(seed)
    texts = [(root / f).read_text(errors="ignore").splitlines(keepends=True) for f in files if (root / f).exists()]
    texts = [t for t in texts if len(t) > 30]
    code, fim = [], []
    while len(code) < n:
        lines = rng.choice(texts)
        i = rng.randrange(10, len(lines) - 10)
        code.append("".join(lines[max(0, i - 12): i]))        # fits the models' 256-token training rows
        fim.append(("".join(lines[max(0, i - 12): i]), "".join(lines[i + 1: i + 7])))
    return code, fim


def run(llms: list[LLM], prompts, suffixes, max_tokens: int, repeats: int = 3) -> list[dict]:
    """Greedy generation of all prompts by each engine in turn, `repeats` rounds (interleaved, so that
    a slow minute of the machine hits all alike; the fastest round counts; the outputs are the same
    each time): per engine tokens/s and, with a draft, acceptance and tokens per target forward."""
    # code runs to max_tokens; an infill stops at its <|file_separator|> (what follows would be noise)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=suffixes is None)
    best, outs = [float("inf")] * len(llms), [None] * len(llms)
    for _ in range(repeats):
        for i, llm in enumerate(llms):
            t = time.perf_counter()
            outs[i] = llm.generate(prompts, params, suffixes=suffixes, use_tqdm=False)
            best[i] = min(best[i], time.perf_counter() - t)
    results = []
    for dt, out in zip(best, outs):
        toks = sum(len(o.outputs[0].token_ids) for o in out)
        spec = [o.outputs[0].spec for o in out if o.outputs[0].spec]
        res = {"tokens_per_s": round(toks / dt, 1), "tokens": toks}
        if spec:
            proposed = max(1, sum(s["proposed"] for s in spec))
            res["acceptance_rate"] = round(sum(s["accepted"] for s in spec) / proposed, 3)
            res["tokens_per_target_forward"] = round(
                sum(s["accepted"] + s["verify_steps"] for s in spec) / sum(s["verify_steps"] for s in spec), 2)
        results.append(res)
    return results


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="models/nano-codegemma")
    ap.add_argument("--draft", default="models/nano-codegemma-draft")
    ap.add_argument("--ks", nargs="+", type=int, default=list(range(1, 9)))
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1, help="requests in flight together")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (the best counts)")
    ap.add_argument("--draft-vocab-sizes", nargs="*", type=int, default=[],
                    help="also the draft with its LM head cut to each size (k = 4, fixed)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    target = Path(args.target)
    code, fim = heldout_prompts(target, args.prompts)
    workloads = {"code": (code, None), "fim": ([p for p, _ in fim], [s for _, s in fim])}
    rows = []
    common = dict(device=args.device, dtype=args.dtype, progress=False, max_num_seqs=args.batch,
                  enable_prefix_caching=False)  # each repeat computes its prompts
    base = LLM(target, **common)
    # the draft's cost on this machine, in target steps: its decode speed alone against the target's
    alone, draft_alone = run([base, LLM(args.draft, **common)], code, None, args.max_tokens, args.repeats)
    measured = round(alone["tokens_per_s"] / draft_alone["tokens_per_s"], 3)
    # (k, lookahead, drafter, draft weights, draft cost given to the adaptive lookahead: None = measured,
    # the draft's vocabulary: None = all)
    variants = [(k, "fixed", args.draft, None, None, None) for k in args.ks] + [
        (4, "adaptive", args.draft, None, None, None), (4, "adaptive", args.draft, None, measured, None),
        (4, "adaptive", args.draft, "int4", None, None), (4, "fixed", NGRAM, None, None, None),
        (4, "adaptive", NGRAM, None, None, None)] + [
        (4, "fixed", args.draft, None, None, n) for n in args.draft_vocab_sizes]
    for k, lookahead, drafter, draft_quant, cost, vocab in variants:
        spec = LLM(target, **common, draft_model=drafter, num_speculative_tokens=k, draft_vocab_size=vocab,
                   adaptive_lookahead=lookahead == "adaptive", draft_quantization=draft_quant, draft_cost=cost)
        for name, (prompts, suffixes) in workloads.items():
            plain, res = run([base, spec], prompts, suffixes, args.max_tokens, args.repeats)
            draft = "ngram" if drafter == NGRAM else draft_quant or "dense"
            emit(rows, {"workload": name, "k": k, "lookahead": lookahead, "draft": draft, "draft_vocab_size": vocab,
                         "first_draft_cost": round(spec.engine.lookahead.first_draft_cost, 3),
                         "draft_cost": round(spec.engine.lookahead.draft_cost, 3),
                         "verify_slope": round(spec.engine.lookahead.verify_slope, 3), **res,
                         "target_alone_tokens_per_s": plain["tokens_per_s"],
                         "speedup": round(res["tokens_per_s"] / plain["tokens_per_s"], 2)})
    return save(rows, args.out)


if __name__ == "__main__":
    main()
