"""rotary, in place on q and k sliced from a fused qkv projection output (as the model calls it), and
rotary_write_kv (the same, then k and v into the paged cache: the op the model calls)."""
import pytest
import torch
from common import DEVICE, DTYPE, MODELS, ON_GPU, TOKENS, compare, nbytes, op_impls

from gemforge.kernels import select
from gemforge.kernels.registry import unavailable_reason


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


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("model", MODELS)
def test_rotary_write_kv(benchmark, model, tokens):
    """RoPE and the cache write as one op (Triton: one kernel) against the CUDA backend's two kernels
    (rotary, then write_kv: the path before the fused op) and the torch reference."""
    benchmark.group = f"rotary_write_kv-{model}"
    hq, hk, d = (MODELS[model][k] for k in ("heads", "kv_heads", "head_dim"))
    qkv = torch.randn(tokens, hq + 2 * hk, d, device=DEVICE, dtype=DTYPE)
    q, k, v = qkv[:, :hq], qkv[:, hq:hq + hk], qkv[:, hq + hk:]
    positions = torch.randint(0, 8192, (tokens,), device=DEVICE)
    blocks = 4 * -(-tokens // 16)
    k_cache, v_cache = (torch.empty(blocks, 16, hk, d, device=DEVICE, dtype=DTYPE) for _ in range(2))
    slots = torch.randperm(blocks * 16, device=DEVICE)[:tokens]
    args = (q, k, v, positions, 10000.0, k_cache, v_cache, slots)
    impls = op_impls("rotary_write_kv", *args, compile_ref=False)
    if ON_GPU and unavailable_reason("rotary_write_kv", "cuda", "cuda") is None:
        two = select("rotary_write_kv", "cuda", DEVICE)
        impls["cuda_two_kernels"] = lambda: two(*args)
    moved = 2 * nbytes(q, k) + nbytes(positions, slots) + 2 * nbytes(v)  # q, k in place; k, v to the cache
    compare(benchmark, impls, moved)
