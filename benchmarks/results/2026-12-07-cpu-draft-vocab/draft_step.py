"""A whole batch-1 decode step of CodeGemma-2B's shape (random bf16 weights) on this CPU with its tied
LM head and with the head cut to 32768 rows (a pruned draft vocabulary, as Engine._load_draft builds
it: GemmaWeights.lm_head, packed, the one-call native decoder), alternating, 5 x 4 steps each, ms per
step including the pruned logits put back in the vocabulary; --int4: every linear and the head int4
(g128), as a quantized draft loads:
    python benchmarks/results/2026-12-07-cpu-draft-vocab/draft_step.py OUT.json [--int4]
"""
import json
import sys
import time

import torch

from gemforge.engine.config import preset
from gemforge.engine.kv_cache import KVCache
from gemforge.engine.model import GemmaModel, NativeLayers
from gemforge.engine.quantization import QuantConfig
from gemforge.engine.runner import WorkItem, build_metadata
from gemforge.engine.weights import head_rows, random_weights
from gemforge.kernels.linear import PackedWeight

ROWS = 32768


def main(out, int4=False):
    cfg = preset("codegemma-2b")
    weights = random_weights(cfg, torch.bfloat16)
    if int4:  # as load_weights quantizes a draft: the linears and the tied head
        quant = QuantConfig("int4", 128, True, True)
        weights.embed = quant.quantize("embed", weights.embed)
        for layer in weights.layers:
            for name in ("qkv", "o", "gate_up", "down"):
                setattr(layer, name, quant.quantize(name, getattr(layer, name)))
    ids = torch.randperm(cfg.vocab_size, generator=torch.Generator().manual_seed(0))[:ROWS].sort().values
    pruned_head = head_rows(weights.embed, ids)
    if not int4:
        pruned_head = PackedWeight.pack(pruned_head)
    model = GemmaModel(cfg, weights, torch.bfloat16)
    heads = {"tied": (None, model.native_layers)}
    model.w.lm_head = pruned_head
    heads[f"{ROWS} rows"] = (ids, NativeLayers.build(model))
    model.w.lm_head = None
    cache = KVCache(cfg.num_layers, 20, 16, cfg.num_kv_heads, cfg.head_dim, torch.bfloat16)
    cache.blocks.append(0, 130)
    meta, rows = build_metadata([WorkItem(0, list(range(1, 129)), 0)], cache, "cpu")
    model.forward(torch.arange(1, 129), meta, cache, torch.tensor(rows))  # the prompt
    meta, rows = build_metadata([WorkItem(0, [5], 128)], cache, "cpu")
    rows = torch.tensor(rows)

    def step(vocab, layers):
        h, r = layers(model.embed(torch.tensor([5])), meta, cache)
        logits = layers.logits(h, r, rows)
        if vocab is not None:
            logits = logits.new_full((1, cfg.vocab_size), float("-inf")).index_copy_(1, vocab, logits)
        return logits.argmax(-1)

    results = {name: [] for name in heads}
    for _ in range(5):
        for name, (vocab, layers) in heads.items():
            step(vocab, layers)
            t = time.perf_counter()
            for _ in range(4):
                step(vocab, layers)
            results[name].append(round((time.perf_counter() - t) / 4 * 1e3, 1))
        print(results, flush=True)
    json.dump(results, open(out, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1], "--int4" in sys.argv[2:])
