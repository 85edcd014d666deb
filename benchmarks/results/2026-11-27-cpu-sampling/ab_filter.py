"""A/B of the top-p filter on this CPU, interleaved in one process: the full sort of every row
(`_filter_sorted`) against the candidate search (`_filter`: the cut looked for among each row's best
1024 tokens, rows that need more sorted whole), top_p = 0.95, on rows whose mass sits on a few dozen
tokens as a language model's does (and, for the worst case, on flat rows that all fall back).
    python benchmarks/results/2026-11-27-cpu-sampling/ab_filter.py
"""
import json
import statistics
import time

import torch

from gemforge.engine.sampling import _filter, _filter_sorted

rows = []
for vocab in (8192, 256000):
    for batch in (1, 64):
        for shape in ("peaked", "flat"):
            g = torch.Generator().manual_seed(0)
            x = torch.randn(batch, vocab, generator=g) * 2
            if shape == "peaked":
                x[:, torch.randperm(vocab, generator=g)[:50]] += 12
            zero, top_p = torch.zeros(batch), torch.full((batch,), 0.95)
            times = {"full_sort": [], "candidates": []}
            for _ in range(3 if vocab > 10000 and batch > 1 else 9):
                for name, fn in (("full_sort", _filter_sorted), ("candidates", _filter)):
                    t = time.perf_counter()
                    fn(x, zero.long(), top_p, zero)
                    times[name].append(time.perf_counter() - t)
            row = {"vocab": vocab, "rows": batch, "logits": shape,
                   **{f"{k}_ms": round(statistics.median(v) * 1e3, 2) for k, v in times.items()}}
            row["speedup"] = round(row["full_sort_ms"] / row["candidates_ms"], 2)
            rows.append(row)
            print(json.dumps(row))
json.dump(rows, open("benchmarks/results/2026-11-27-cpu-sampling/ab-filter.json", "w"), indent=1)
