"""The whole model on Triton kernels (interpreter on CPU), and on the C++ CPU kernels, gives the torch
backend's greedy tokens."""
import pytest
import torch

from gemforge.engine.config import ModelConfig
from gemforge.engine.kv_cache import KVCache
from gemforge.engine.model import GemmaModel
from gemforge.engine.runner import ModelRunner, WorkItem
from gemforge.engine.weights import random_weights
from gemforge.kernels._native import cpu_packs_linear
from gemforge.kernels.linear import PackedWeight
from gemforge.kernels.quant import quantize_int4
from gemforge.kernels.registry import unavailable_reason

CFG = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16, max_position_embeddings=128)


def greedy(backend: str, prompts, steps: int, quantize: bool = False, device=None, dtype=torch.float32,
           model_out: list | None = None):
    w = random_weights(CFG, dtype, "cpu", seed=3, std=0.3)
    if quantize:
        for layer in w.layers:
            layer.gate_up = quantize_int4(layer.gate_up, group_size=32)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    w = type(w)(w.embed.to(device), [type(l)(*(t.to(device) for t in vars(l).values())) for l in w.layers],
                w.final_norm.to(device))
    model = GemmaModel(CFG, w, dtype, device, backend)
    if model_out is not None:
        model_out.append(model)
    cache = KVCache(CFG.num_layers, 8, 16, CFG.num_kv_heads, CFG.head_dim, dtype, device)
    runner = ModelRunner(model, cache)
    for i, p in enumerate(prompts):
        cache.blocks.append(i, len(p))
    logits = [runner.run([WorkItem(i, p, 0) for i, p in enumerate(prompts)])]
    toks = [logits[-1].argmax(-1).tolist()]
    for s in range(steps):
        items = []
        for i, p in enumerate(prompts):
            cache.blocks.append(i, 1)
            items.append(WorkItem(i, [toks[-1][i]], len(p) + s))
        logits.append(runner.run(items))
        toks.append(logits[-1].argmax(-1).tolist())
    return toks, torch.cat(logits)


@pytest.mark.parametrize("quantize", [False, True])
@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_model_matches_torch_model(backend, quantize):
    if backend == "cpu" and unavailable_reason("attention", "cpu", "cpu"):
        pytest.skip(unavailable_reason("attention", "cpu", "cpu"))
    device = "cpu" if backend == "cpu" else None
    prompts = [[2, 5, 9, 11, 40, 3, 7], [2, 60], [2] + list(range(10, 29))]  # 19 tokens: crosses a block
    ref_toks, ref = greedy("torch", prompts, 4, quantize, device)
    toks, ours = greedy(backend, prompts, 4, quantize, device)
    assert toks == ref_toks
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@pytest.mark.skipif(unavailable_reason("attention", "cpu", "cpu") is not None, reason="gemforge._C not built")
def test_bf16_model_on_cpu_kernels_matches_torch_model():
    """In bf16 the "cpu" backend packs every dense matrix (where _C has the AVX512-BF16 linear) and its
    logits stay within bf16 rounding of the torch backend's; the greedy tokens agree."""
    prompts = [[2, 5, 9, 11, 40, 3, 7], [2, 60], [2] + list(range(10, 29))]
    models = []
    ref_toks, ref = greedy("torch", prompts, 4, device="cpu", dtype=torch.bfloat16)
    toks, ours = greedy("cpu", prompts, 4, device="cpu", dtype=torch.bfloat16, model_out=models)
    w = models[0].w
    assert isinstance(w.layers[0].qkv, PackedWeight) == isinstance(w.embed, PackedWeight) == cpu_packs_linear()
    assert toks == ref_toks
    torch.testing.assert_close(ours, ref, rtol=0.02, atol=0.02 * ref.abs().max().item())
