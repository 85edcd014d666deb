"""The C++ weight-only linear (csrc/cpu/quant_linear.cpp) against the packed bf16 linear on
CodeGemma-2B's gate_up (32768 x 2048) and down (2048 x 16384), 1 to 512 rows of bf16 x, best of 5.
Run once per build of gemforge.kernels._C to compare builds (processes alternating):
    python benchmarks/results/2026-12-07-cpu-quant-prefill/quant_rows.py OUT.json [ROWS ...]
"""
import json
import os
import sys

import torch

from gemforge.kernels import _native
from gemforge.kernels.linear import PackedWeight
from gemforge.kernels.quant import quantize_int4, quantize_int8

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "2026-11-27-cpu-quant-linear"))
from ab_quant_cpu import best  # noqa: E402  (ms, best of 5 after one warm-up call)


def main(out, rows):
    torch.manual_seed(0)
    results = []
    for name, n, k in [("2b_gate_up", 32768, 2048), ("2b_down", 2048, 16384)]:
        w = (torch.randn(n, k) * 0.02).bfloat16()
        pw, q8, q4 = PackedWeight.pack(w), quantize_int8(w), quantize_int4(w, 128)
        for m in rows:
            x = torch.randn(m, k).bfloat16()
            r = {"shape": name, "rows": m, "bf16_packed_ms": best(lambda: _native.linear_packed_cpu(x, pw)),
                 "int8_ms": best(lambda: _native.linear_int8_cpu(x, q8.qweight, q8.scales, None, None)),
                 "int4_ms": best(lambda: _native.linear_int4_cpu(x, q4.qweight, q4.scales, q4.zeros, 128))}
            r["int8_over_bf16"] = round(r["int8_ms"] / r["bf16_packed_ms"], 2)
            r["int4_over_bf16"] = round(r["int4_ms"] / r["bf16_packed_ms"], 2)
            print(json.dumps(r), flush=True)
            results.append(r)
    with open(out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], [int(a) for a in sys.argv[2:]] or [1, 8, 16, 32, 64, 128, 512])
