"""A tile sweep of the Triton paged attention on the CodeGemma attention shapes, for the tile table
of kernels/attention.py (`_attn_config`, `_num_partitions`): per case, each config of a small grid
(key tile BLOCK_N, query tile BLOCK_M for prefill, warps, pipeline stages; then, for decode, the
split-K partitions under the best tile) timed from a CUDA graph with the L2 cache flushed, its
output checked against the table's own; decode in GB/s of the K/V read (and the fraction of
--bandwidth-GBps), prefill in TFLOP/s beside torch's SDPA on the same dense causal prompt. Each
timing is a JSON line of OUT as it is measured (a run cut short keeps what it measured; a new run
replaces the file); per case, last, a line with the table's config, the best one and their ratio.

    python benchmarks/kernels/sweep_attention.py OUT.jsonl [--bandwidth-GBps BW] [--quick]

Without a GPU (the Triton interpreter, TRITON_INTERPRET=1) it runs the nano shapes and a few configs:
the outputs are checked, the times mean nothing.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_attention import paged_batch  # noqa: E402
from common import DEVICE, DTYPE, ON_GPU, device_time, graph_time  # noqa: E402

from gemforge.kernels import select  # noqa: E402

HEADS = {"2b": (8, 1, 256), "7b": (16, 16, 256)} if ON_GPU else {"nano": (4, 4, 64), "nano-draft": (4, 1, 32)}
# (model, sequences, new tokens per sequence, context per sequence)
DECODE = [("2b", 1, 1, 8192), ("2b", 16, 1, 4096), ("7b", 1, 1, 8192), ("7b", 16, 1, 4096)] \
    if ON_GPU else [("nano-draft", 3, 1, 200)]
PREFILL = [("2b", 1, 2048, 2048), ("7b", 1, 2048, 2048)] if ON_GPU else [("nano", 1, 40, 40)]
# Each fits an H100's shared memory at head_dim 256 in bf16, the table's own first (compiled for sm_90 without
# a GPU: decode 41-141 KiB, prefill 50-192 KiB; no spills, but for 128-key decode tiles on 4 warps with
# Triton 3.6, 20-28 bytes)
TILES = [dict(BLOCK_N=n, num_warps=w, num_stages=s) for n in (64, 32, 128) for w, s in ((8, 2), (4, 2), (8, 3))]
PREFILL_TILES = [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s) for m, n, w, s in (
    (64, 64, 8, 2), (64, 32, 4, 2), (64, 32, 8, 2), (64, 32, 8, 3), (64, 64, 8, 3), (128, 64, 8, 2),
    (128, 32, 8, 2), (128, 32, 8, 3), (32, 64, 4, 2), (32, 32, 4, 2))]
PARTS = (1, 2, 4, 8, 16, 32, 64) if ON_GPU else (1, 4)
QUICK = 4  # --quick: the first configs of each grid (the table's and its neighbours)
SMOKE = [dict(BLOCK_N=16, num_warps=4, num_stages=2), dict(BLOCK_N=32, num_warps=4, num_stages=2)]
SMOKE_PREFILL = [dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=2), dict(BLOCK_M=64, BLOCK_N=32, num_warps=4,
                                                                                  num_stages=2)]


def seconds(fn) -> float:
    """Device seconds per call: replayed from a CUDA graph where it captures (as the engine runs it);
    on a CPU one call's wall time (the interpreter: the sweep there only checks the configs)."""
    if not ON_GPU:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t
    return graph_time(fn) or device_time(fn)


def sweep_case(model: str, seqs: int, n: int, ctx: int, configs: list[dict], bandwidth: float | None, out):
    """Time the table's config and each of `configs` on one case; returns the case's summary line."""
    hq, hk, d = HEADS[model]
    k_cache, v_cache, meta = paged_batch(seqs, n, ctx, hk, d)
    q = torch.randn(seqs * n, hq, d, device=DEVICE, dtype=DTYPE)
    attn, scale = select("attention", "triton", DEVICE), d ** -0.5
    expect = attn(q, k_cache, v_cache, meta, scale).float()
    case = dict(model=model, seqs=seqs, new_tokens=n, context=ctx)
    kv_bytes = 2 * seqs * ctx * hk * d * DTYPE.itemsize
    flops = 4 * seqs * hq * d * n * (ctx - n + (n + 1) / 2)  # QK^T and PV over each token's causal keys

    def measure(config: dict | None) -> dict:
        row = dict(case, config=config or "table")
        try:
            got = attn(q, k_cache, v_cache, meta, scale, config=config).float()
            row["max_rel_diff"] = float((got - expect).abs().max() / expect.abs().max())
            t = seconds(lambda: attn(q, k_cache, v_cache, meta, scale, config=config))
        except Exception as e:  # noqa: BLE001  (a tile that does not fit: recorded, the sweep goes on)
            row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:200]
        else:
            row["us"] = round(t * 1e6, 2)
            if n == 1:
                row["GBps"] = round((kv_bytes + 2 * q.numel() * q.element_size()) / t / 1e9, 1)
                if bandwidth:
                    row["fraction_of_bandwidth"] = round(row["GBps"] / bandwidth, 3)
            else:
                row["TFLOPs"] = round(flops / t / 1e12, 1)
        out.write(json.dumps(row) + "\n")
        out.flush()
        return row

    rows = [measure(None)] + [measure(c) for c in configs]
    ok = [r for r in rows if "us" in r and r["max_rel_diff"] < 2e-2]
    if n == 1 and ok:  # then the split-K partitions under the best tile
        tile = min(ok, key=lambda r: r["us"])["config"]
        base = {} if tile == "table" else tile
        rows += [measure(dict(base, parts=p)) for p in PARTS if p <= ctx // 16]
        ok = [r for r in rows if "us" in r and r["max_rel_diff"] < 2e-2]
    summary = dict(case, summary=True, table_us=rows[0].get("us"),
                   wrong=[r["config"] for r in rows if r.get("max_rel_diff", 0) >= 2e-2],
                   failed=[r["config"] for r in rows if "error" in r])
    if ok:
        best = min(ok, key=lambda r: r["us"])
        summary.update(best=best["config"], best_us=best["us"],
                       table_over_best=round(rows[0]["us"] / best["us"], 3) if "us" in rows[0] else None)
    if n > 1 and ON_GPU:  # the peer: SDPA's flash path on the same prompt, dense
        dq = q.view(seqs, n, hq, d).transpose(1, 2)
        dk, dv = (torch.randn(seqs, hk, ctx, d, device=DEVICE, dtype=DTYPE) for _ in range(2))
        t = seconds(lambda: F.scaled_dot_product_attention(dq, dk, dv, is_causal=True, enable_gqa=True))
        summary.update(sdpa_us=round(t * 1e6, 2), sdpa_TFLOPs=round(flops / t / 1e12, 1))
    out.write(json.dumps(summary) + "\n")
    out.flush()
    return summary


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--bandwidth-GBps", type=float, default=None, help="the measured copy bandwidth")
    ap.add_argument("--quick", action="store_true", help=f"the first {QUICK} configs of each grid")
    args = ap.parse_args(argv)
    tiles, prefill_tiles = (TILES, PREFILL_TILES) if ON_GPU else (SMOKE, SMOKE_PREFILL)
    if args.quick:
        tiles, prefill_tiles = tiles[:QUICK], prefill_tiles[:QUICK]
    summaries = []
    with open(args.out, "w") as out:
        for case in DECODE:
            summaries.append(sweep_case(*case, tiles, args.bandwidth_GBps, out))
        for case in PREFILL:
            summaries.append(sweep_case(*case, prefill_tiles, None, out))
    for s in summaries:
        print({k: v for k, v in s.items() if k != "summary"}, flush=True)
    return summaries


if __name__ == "__main__":
    main()
