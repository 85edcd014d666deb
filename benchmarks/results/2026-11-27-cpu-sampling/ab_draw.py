"""A/B of sampling.draw on this CPU, interleaved in one process: the exponential race it replaced
(V exponentials a row from the row's generator; argmax(p / E)) against the two-level inverse CDF
(one uniform a row), on softmax rows of the nano (8192) and CodeGemma (256000) vocabularies.
    python benchmarks/results/2026-11-27-cpu-sampling/ab_draw.py
"""
import json
import statistics
import time

import torch

from gemforge.engine.sampling import draw, greedy


def race(p, generators):
    noise = torch.stack([torch.empty(p.shape[-1], device=p.device).exponential_(generator=g) for g in generators])
    return greedy(p / noise)


rows = []
for vocab in (8192, 256000):
    for batch in (1, 8, 64):
        p = torch.softmax(torch.randn(batch, vocab), -1)
        gens = [torch.Generator().manual_seed(i) for i in range(batch)]
        times = {"exponential_race": [], "inverse_cdf": []}
        for _ in range(5 if vocab > 10000 else 15):
            for name, fn in (("exponential_race", race), ("inverse_cdf", draw)):
                t = time.perf_counter()
                fn(p, gens)
                times[name].append(time.perf_counter() - t)
        row = {"vocab": vocab, "rows": batch, **{f"{k}_ms": round(statistics.median(v) * 1e3, 3) for k, v in times.items()}}
        row["speedup"] = round(row["exponential_race_ms"] / row["inverse_cdf_ms"], 1)
        rows.append(row)
        print(json.dumps(row))
json.dump(rows, open("benchmarks/results/2026-11-27-cpu-sampling/ab-draw.json", "w"), indent=1)
