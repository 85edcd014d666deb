"""Host overhead of one engine step with a do-nothing model: scheduling, metadata, sampling,
detokenization and stop checks, at 1..256 running sequences (goal: <= 300 us at 1, <= 2 ms at 256).

    python benchmarks/engine/bench_host_overhead.py --model models/nano-codegemma
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from gemforge.engine import SamplingParams
from gemforge.engine.engine import Engine, EngineConfig


class NullModel:
    """Stands in for GemmaModel: returns constant logits, so only host work is timed."""

    def __init__(self, vocab: int):
        self.logits = torch.zeros(1, vocab)
        self.logits[0, vocab - 1] = 1.0  # a merged piece, as most generated tokens are

    def forward(self, input_ids, meta, cache, logits_indices=None):
        n = input_ids.shape[0] if logits_indices is None else logits_indices.shape[0]
        return self.logits.expand(n, -1)


def step_us(model_dir: str, batch: int, steps: int = 50) -> float:
    eng = Engine(model_dir, EngineConfig(dtype="float32", device="cpu", max_num_seqs=max(batch, 1),
                                         kv_cache_tokens=batch * 512 + 512), progress=False)
    eng.runner.model = NullModel(eng.cfg.vocab_size)
    p = SamplingParams(max_tokens=steps + 20, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        eng.add_request(f"r{i}", [2, 10, 11, 12], p)
    for _ in range(3):  # prefill and warm-up
        eng.step()
    t = time.perf_counter()
    for _ in range(steps):
        eng.step()
    return (time.perf_counter() - t) / steps * 1e6


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/nano-codegemma")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64, 256])
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    rows = []
    for b in args.batches:
        rows.append({"running_seqs": b, "step_us": round(step_us(args.model, b), 1)})
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
