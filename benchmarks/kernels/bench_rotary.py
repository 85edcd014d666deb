"""rotary, in place on q and k sliced from a fused qkv projection output (as the model calls it)."""
import pytest
import torch
from common import DEVICE, DTYPE, MODELS, TOKENS, compare, nbytes, op_impls


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("model", MODELS)
def test_rotary(benchmark, model, tokens):
    benchmark.group = f"rotary-{model}"
    hq, hk, d = (MODELS[model][k] for k in ("heads", "kv_heads", "head_dim"))
    qkv = torch.randn(tokens, hq + 2 * hk, d, device=DEVICE, dtype=DTYPE)
    q, k = qkv[:, :hq], qkv[:, hq:hq + hk]
    positions = torch.randint(0, 8192, (tokens,), device=DEVICE)
    moved = 2 * nbytes(q, k) + nbytes(positions)  # q, k read and written in place
    compare(benchmark, op_impls("rotary", q, k, positions, 10000.0), moved)
