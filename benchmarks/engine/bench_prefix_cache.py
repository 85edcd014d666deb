"""What prefix caching buys: the same workloads on one model with it and without, in one run.

  completion: an editor's requests over one file, one at a time: the file's first `--prefix` tokens
              (torch's functional.py), then a different tail of 8..40 tokens each time (the code
              around the cursor); time to first token (`max_tokens=1`), median of `--requests`.
  shared:     `--batch` concurrent requests with one `--prefix`-token prompt prefix (a long
              instruction or a repository context) and distinct tails of 8..40 tokens (new ones each
              repeat), 16 tokens each; wall time of the batch, the best of `--repeats`.
Each engine first serves one request with the bare prefix (the cache's cold start, not timed).
Then two workloads on prefixes nothing has computed yet (a new one each repeat), where what counts
is that requests arriving together compute a shared prompt once:
  samples:    one request for `--samples` completions of a new `--prefix`-token prompt (pass@k
              sampling, temperature 0.8), 16 tokens each;
  burst:      `--batch` requests that share a new `--prefix`-token prefix, with distinct tails,
              arriving together, 16 tokens each.

    python benchmarks/engine/bench_prefix_cache.py --model models/nano-codegemma --prefix 1500
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from gemforge.engine import LLM, SamplingParams

from report import emit, save


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/nano-codegemma")
    ap.add_argument("--prefix", type=int, default=1500, help="shared prompt tokens")
    ap.add_argument("--requests", type=int, default=12, help="completion: sequential requests")
    ap.add_argument("--batch", type=int, default=16, help="shared, burst: concurrent requests")
    ap.add_argument("--samples", type=int, default=8, help="samples: completions of one request")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    engines = {on: LLM(args.model, device=args.device, dtype=args.dtype, progress=False, enable_prefix_caching=on,
                       max_num_seqs=args.batch, max_num_batched_tokens=max(2048, args.prefix + 64))
               for on in (False, True)}
    text = (Path(torch.__file__).parent / "nn" / "functional.py").read_text()
    ids = engines[True].tokenizer.encode(text)
    prefix, rest = ids[: args.prefix], ids[args.prefix:]
    tails = [rest[i * 97: i * 97 + 8 + (i * 13) % 33] for i in range(args.requests + args.batch * args.repeats)]
    if len(rest) < 97 * len(tails) + 40:
        raise SystemExit(f"bench_prefix_cache: the source file is too short for {len(tails)} distinct tails")
    start = args.prefix + 97 * len(tails) + 40  # new prefixes from here on: two per repeat
    fresh = [ids[start + j * args.prefix: start + (j + 1) * args.prefix] for j in range(2 * args.repeats)]
    if len(fresh[-1]) < args.prefix:
        raise SystemExit("bench_prefix_cache: the source file is too short for the cold-prefix workloads")
    one = SamplingParams(max_tokens=1, temperature=0.0)
    samples = SamplingParams(n=args.samples, max_tokens=16, temperature=0.8, seed=0, ignore_eos=True)
    sixteen = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)

    def timed(llm, prompts, params) -> float:
        sync()
        t = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        sync()
        return time.perf_counter() - t

    rows, results = [], {}
    for on, llm in engines.items():
        llm.generate([prefix], one, use_tqdm=False)  # cold start: fills the cache (with caching on)
        ttft = [timed(llm, [prefix + tails[i]], one) for i in range(args.requests)]
        batch = min(timed(llm, [prefix + t for t in tails[args.requests + r * args.batch:][: args.batch]], sixteen)
                    for r in range(args.repeats))  # new tails each time: only the prefix can be cached
        sched = llm.engine.scheduler
        hit_rate = sched.prefix_hits / max(1, sched.prefix_queries)
        n_samples = min(timed(llm, [fresh[2 * r]], samples) for r in range(args.repeats))
        burst = min(timed(llm, [fresh[2 * r + 1] + t for t in tails[:args.batch]], sixteen)
                    for r in range(args.repeats))
        results[on] = {"completion_ttft_ms": statistics.median(ttft) * 1e3, "shared_batch_s": batch,
                       "samples_s": n_samples, "burst_s": burst, "hit_rate": hit_rate}
    off, on = results[False], results[True]
    for name, key, unit, count in (("completion", "completion_ttft_ms", "ms", args.requests),
                                   ("shared", "shared_batch_s", "s", args.batch),
                                   ("samples", "samples_s", "s", args.samples), ("burst", "burst_s", "s", args.batch)):
        emit(rows, {"workload": name, "prefix_tokens": args.prefix, "requests": count,
                    f"off_{unit}": round(off[key], 4), f"on_{unit}": round(on[key], 4),
                    "speedup": round(off[key] / on[key], 2), "hit_rate": round(on["hit_rate"], 3),
                    "device": args.device, "dtype": str(engines[True].engine.dtype).replace("torch.", "")})
    save(rows, args.out)
    return rows


if __name__ == "__main__":
    main()
