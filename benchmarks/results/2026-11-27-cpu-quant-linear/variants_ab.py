"""The timings behind this folder's README for kernel variants (each variant's build swapped into
kernels/_C*.so between runs, the builds alternating): the kernel table's shapes at 1 / 8 / 64 rows,
ours beside torch's CPU weight-only kernels; with --one-row-shapes, one row of x against int4 / int8
weights of three shapes with the same (or half the) weight count, the per-row cost that exposed the
missing prefetch. Run from the repository root.

The --one-row-shapes runs (ms, int4 / int8), builds without and with the prefetch, three rounds
each: 32768 x 2048: 2.03-2.09 / 1.84-1.97 without, 0.84-0.86 / 1.40-1.71 with; 8192 x 8192:
1.19-1.34 / 1.85-1.88 without, 0.87-0.88 / 1.29-1.40 with; 2048 x 16384: 0.37-0.43 / 0.64-0.69
without, 0.41-0.45 / 0.39-0.50 with.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ab_quant_cpu import best, torch_native  # noqa: E402

from gemforge.kernels import _native  # noqa: E402
from gemforge.kernels.quant import quantize_int4, quantize_int8  # noqa: E402


def ours(x, q8, q4):
    return {"int8": lambda: _native.linear_int8_cpu(x, q8.qweight, q8.scales, None, None),
            "int4": lambda: _native.linear_int4_cpu(x, q4.qweight, q4.scales, q4.zeros, 128)}


def main(one_row_shapes: bool):
    torch.manual_seed(0)
    shapes = [(32768, 2048), (8192, 8192), (2048, 16384)] if one_row_shapes else [(32768, 2048), (2048, 16384)]
    for n, k in shapes:
        w = (torch.randn(n, k) * 0.02).bfloat16()
        q8, q4 = quantize_int8(w), quantize_int4(w, 128)
        for m in (1,) if one_row_shapes else (1, 8, 64):
            x = torch.randn(m, k).bfloat16()
            r = {"shape": f"{n}x{k}", "rows": m, **{f"ours_{f}_ms": best(fn) for f, fn in ours(x, q8, q4).items()}}
            if one_row_shapes:
                r.update({f"ours_{f}_GBps": round(n * k / (2 if f == "int4" else 1) / r[f"ours_{f}_ms"] / 1e6, 1)
                          for f in ("int8", "int4")})
            else:
                r.update({f"torch_native_{f}_ms": best(fn) for f, (fn, _) in torch_native(x, q8, q4).items()})
            print(r, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] == ["--one-row-shapes"])
