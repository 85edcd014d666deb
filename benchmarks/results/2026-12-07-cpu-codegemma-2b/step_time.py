"""Where a bf16 decode step of CodeGemma-2B's shape goes on this CPU (random weights): the 18 decoder
layers (one C++ call) and the final norm + tied LM head, timed apart, 3 x 5 steps; then the same model
through bench_decode's own decode loop (`bench_gemforge`, 16 steps), 3 times. The session's figures
came from ad-hoc copies of these two parts; run it several times (and with THP_MEM_ALLOC_ENABLE=1
for huge pages) to see this machine's minute-to-minute spread:
    python benchmarks/results/2026-12-07-cpu-codegemma-2b/step_time.py
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "engine"))
from bench_decode import bench_gemforge  # noqa: E402

from gemforge.engine.config import preset  # noqa: E402
from gemforge.engine.kv_cache import KVCache  # noqa: E402
from gemforge.engine.model import GemmaModel  # noqa: E402
from gemforge.engine.runner import WorkItem, build_metadata  # noqa: E402
from gemforge.engine.weights import random_weights  # noqa: E402


def main():
    cfg = preset("codegemma-2b")
    model = GemmaModel(cfg, random_weights(cfg, torch.bfloat16), torch.bfloat16)
    cache = KVCache(cfg.num_layers, 20, 16, cfg.num_kv_heads, cfg.head_dim, torch.bfloat16)
    cache.blocks.append(0, 130)
    meta, rows = build_metadata([WorkItem(0, list(range(1, 129)), 0)], cache, "cpu")
    model.forward(torch.arange(1, 129), meta, cache, torch.tensor(rows))  # the prompt
    layers = model.native_layers
    meta, rows = build_metadata([WorkItem(0, [5], 128)], cache, "cpu")
    for _ in range(3):
        times = []
        for _ in range(5):
            h = model.embed(torch.tensor([5]))
            t0 = time.perf_counter()
            h, r = layers(h, meta, cache)
            t1 = time.perf_counter()
            layers.logits(h, r, torch.tensor(rows))
            times.append((t1 - t0, time.perf_counter() - t1))
        print("layers ms", [round(a * 1e3, 1) for a, _ in times], "norm + LM head ms", [round(b * 1e3, 1) for _, b in times],
              flush=True)
    print("THP_MEM_ALLOC_ENABLE", os.environ.get("THP_MEM_ALLOC_ENABLE"))
    for _ in range(3):
        print("decode loop step ms", round(bench_gemforge(model, 1, 128, 16, cuda_graphs=False)["step_ms"], 1), flush=True)


if __name__ == "__main__":
    main()
