"""The C++ weight-only int8 / int4 linear on this CPU (csrc/cpu/quant_linear.cpp), against the path
it replaces (torch: dequantize the whole weight to fp32, then an fp32 GEMM) and the packed bf16 linear.
1. Kernels on CodeGemma-2B shapes (gate_up 32768 x 2048, down 2048 x 16384), 1 / 8 / 64 rows of bf16
   x, best of 5, the variants interleaved per shape; beside them torch's own CPU weight-only kernels
   (torch._weight_int8pack_mm, torch._weight_int4pack_mm_for_cpu) on the same weights.
2. The engine on the bundled nano model in bf16: decode tokens/s of 1 and 8 greedy requests (64 new
   tokens, 16-token prompts) with int8 and int4 (g128) weights, with the C++ kernel and without it
   (the registry's "cpu" entry removed before the model is built), best of 3 interleaved.
    python benchmarks/results/2026-11-27-cpu-quant-linear/ab_quant_cpu.py [--engine-only]
"""
import json
import os
import time

import torch

from gemforge.engine import LLM, SamplingParams
from gemforge.kernels import _native, registry
from gemforge.kernels.linear import PackedWeight, linear_quant_ref
from gemforge.kernels.quant import quantize_int4, quantize_int8, unpack_int4

HERE = os.path.dirname(os.path.abspath(__file__))


def best(f, n=5):
    f()
    b = float("inf")
    for _ in range(n):
        t = time.perf_counter()
        f()
        b = min(b, time.perf_counter() - t)
    return round(b * 1e3, 2)


def torch_native(x, q8, q4) -> dict:
    """torch's CPU weight-only kernels on the same weights: int8 per channel as is; int4 in its own
    layout (converted once here), W = (q - 8) * scale + zero with zero 0 for our symmetric codes."""
    q = unpack_int4(q4.qweight).to(torch.int32)
    packed = torch._convert_weight_to_int4pack_for_cpu(q, 8)
    sz = torch.stack([q4.scales.t(), torch.zeros_like(q4.scales.t())], dim=-1).contiguous()
    return {"int8": (lambda: torch._weight_int8pack_mm(x, q8.qweight, q8.scales), (q8.qweight, q8.scales, None, None)),
            "int4": (lambda: torch._weight_int4pack_mm_for_cpu(x, packed, 128, sz),
                     (q4.qweight, q4.scales, q4.zeros, 128))}


def kernels():
    torch.manual_seed(0)
    rows = []
    for name, n, k in [("2b_gate_up", 32768, 2048), ("2b_down", 2048, 16384)]:
        w = (torch.randn(n, k) * 0.02).bfloat16()
        pw, q8, q4 = PackedWeight.pack(w), quantize_int8(w), quantize_int4(w, 128)
        for m in (1, 8, 64):
            x = torch.randn(m, k).bfloat16()
            r = {"shape": name, "rows": m, "weight_MB": {"bf16": 2 * n * k / 1e6, "int8": n * k / 1e6,
                                                       "int4": n * k / 2e6}}
            r["bf16_packed_ms"] = best(lambda: _native.linear_packed_cpu(x, pw))
            r["int8_ms"] = best(lambda: _native.linear_int8_cpu(x, q8.qweight, q8.scales, None, None))
            r["int4_ms"] = best(lambda: _native.linear_int4_cpu(x, q4.qweight, q4.scales, q4.zeros, 128))
            for fmt, (fn, args) in torch_native(x, q8, q4).items():  # torch's own CPU weight-only kernels
                want = linear_quant_ref(x, *args).float()
                r[f"{fmt}_torch_native_max_rel_err"] = float((fn().float() - want).abs().max() / want.abs().max())
                r[f"{fmt}_torch_native_ms"] = best(fn)
            if m == 1:
                r["int8_torch_ms"] = best(lambda: linear_quant_ref(x, q8.qweight, q8.scales, None, None), 2)
                r["int4_torch_ms"] = best(lambda: linear_quant_ref(x, q4.qweight, q4.scales, q4.zeros, 128), 2)
            print(json.dumps(r), flush=True)
            rows.append(r)
    return rows


def engine():
    prompts = [[2] + [100 + (i * 7 + j) % 900 for j in range(15)] for i in range(8)]
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    rows = []
    for method in ("int8", "int4"):
        llms = {}
        for kernel in ("cpp", "torch"):
            saved = {op: registry._IMPLS[op].pop("cpu") for op in ("linear_int8", "linear_int4")} \
                if kernel == "torch" else {}
            try:
                llms[kernel] = LLM("models/nano-codegemma", dtype="bfloat16", quantization=method, progress=False)
            finally:
                for op, fn in saved.items():
                    registry._IMPLS[op]["cpu"] = fn
        for batch in (1, 8):
            speed, tokens = {}, {}
            for _ in range(3):
                for kernel, llm in llms.items():
                    t = time.perf_counter()
                    outs = llm.generate(prompts[:batch], params)
                    dt = time.perf_counter() - t
                    speed[kernel] = max(speed.get(kernel, 0), batch * 64 / dt)
                    tokens[kernel] = [o.outputs[0].token_ids for o in outs]
            same = sum(a == b for x, y in zip(tokens["cpp"], tokens["torch"]) for a, b in zip(x, y))
            r = {"weights": method, "requests": batch, "cpp_tok_s": round(speed["cpp"], 1),
                 "torch_tok_s": round(speed["torch"], 1), "speedup": round(speed["cpp"] / speed["torch"], 2),
                 "same_greedy_tokens": f"{same}/{batch * 64}"}
            print(json.dumps(r), flush=True)
            rows.append(r)
    bf16 = LLM("models/nano-codegemma", dtype="bfloat16", progress=False)
    for batch in (1, 8):
        s = 0
        for _ in range(3):
            t = time.perf_counter()
            bf16.generate(prompts[:batch], params)
            s = max(s, batch * 64 / (time.perf_counter() - t))
        rows.append({"weights": "bf16 (packed, one C++ call for all layers)", "requests": batch, "tok_s": round(s, 1)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


if __name__ == "__main__":
    import sys
    if sys.argv[1:] == ["--engine-only"]:  # (run again once quantized layers joined the one-call decoder)
        json.dump({"engine": engine()}, open(os.path.join(HERE, "quant_cpu_engine_native.json"), "w"), indent=1)
    else:
        out = {"kernels": kernels(), "engine": engine()}
        json.dump(out, open(os.path.join(HERE, "quant_cpu.json"), "w"), indent=1)
