"""One prefill forward of 512 tokens through 4 decoder layers of CodeGemma-2B's shape (vocab cut to
8192 so that the layers dominate; random weights) in bf16, int8 and int4 (g128), best of 3; the
same model in each format, quantized as the loader does. Run once per build of _C (alternating):
    python benchmarks/results/2026-12-07-cpu-quant-prefill/prefill_forward.py OUT.json
"""
import dataclasses
import json
import sys
import time

import torch

from gemforge.engine.config import preset
from gemforge.engine.kv_cache import KVCache
from gemforge.engine.loader import hf_state_dict, weights_from_state_dict
from gemforge.engine.model import GemmaModel
from gemforge.engine.quantization import QuantConfig
from gemforge.engine.runner import WorkItem, build_metadata
from gemforge.engine.weights import random_weights

TOKENS = 512


def main(out):
    cfg = dataclasses.replace(preset("codegemma-2b"), num_layers=4, vocab_size=8192)
    state = hf_state_dict(cfg, random_weights(cfg, torch.bfloat16))
    rows = []
    for fmt in ("none", "int8", "int4"):
        quant = None if fmt == "none" else QuantConfig(fmt)
        model = GemmaModel(cfg, weights_from_state_dict(state, cfg, torch.bfloat16, "cpu", quant), torch.bfloat16)
        cache = KVCache(cfg.num_layers, TOKENS // 16 + 1, 16, cfg.num_kv_heads, cfg.head_dim, torch.bfloat16)
        cache.blocks.append(0, TOKENS)
        meta, last = build_metadata([WorkItem(0, list(range(1, TOKENS + 1)), 0)], cache, "cpu")
        ids = torch.arange(1, TOKENS + 1)
        best = float("inf")
        for _ in range(4):
            t = time.perf_counter()
            model.forward(ids, meta, cache, torch.tensor(last))
            best = min(best, time.perf_counter() - t)
        rows.append({"weights": fmt, "tokens": TOKENS, "layers": cfg.num_layers, "forward_ms": round(best * 1e3, 1)})
        print(json.dumps(rows[-1]), flush=True)
    with open(out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
