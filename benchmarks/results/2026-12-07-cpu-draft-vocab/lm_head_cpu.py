"""What a pruned draft LM head saves per draft step at CodeGemma-2B's shape (hidden 2048, vocab
256000) on this CPU: one row through the full head and through heads of 65536 / 32768 / 16384 rows
(packed bf16, and int4 g128 as a quantized draft has it), plus the pruned logits put back in the
vocabulary (-inf elsewhere) as Drafter.propose does; best of 7 after one warm-up, ms.
    python benchmarks/results/2026-12-07-cpu-draft-vocab/lm_head_cpu.py OUT.json
"""
import json
import sys
import time

import torch

from gemforge.kernels import _native
from gemforge.kernels.linear import PackedWeight
from gemforge.kernels.quant import quantize_int4

V, H = 256000, 2048


def best(fn, reps=7):
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return round(min(times) * 1e3, 3)


def main(out):
    torch.manual_seed(0)
    table = (torch.randn(V, H) * 0.02).bfloat16()
    x = torch.randn(1, H).bfloat16()
    rows = []
    for n in (V, 65536, 32768, 16384):
        ids = torch.randperm(V)[:n].sort().values
        w = table if n == V else table[ids].contiguous()
        packed, q4 = PackedWeight.pack(w), quantize_int4(w, 128)
        row = {"head_rows": n,
               "bf16_ms": best(lambda: _native.linear_packed_cpu(x, packed)),
               "int4_ms": best(lambda: _native.linear_int4_cpu(x, q4.qweight, q4.scales, q4.zeros, 128))}
        if n < V:
            logits = torch.randn(1, n)
            row["back_in_vocab_ms"] = best(lambda: logits.new_full((1, V), float("-inf")).index_copy_(1, ids, logits))
        rows.append(row)
        print(json.dumps(row), flush=True)
        del packed, q4
    json.dump(rows, open(out, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
