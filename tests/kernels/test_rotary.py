"""rotary: the in-place Triton kernel (interpreter on CPU) and C++ CPU kernel against the torch reference."""
import pytest
import torch
from numerics import DTYPES, assert_close, poison

from gemforge.kernels import rotary, rotary_write_kv, select
from gemforge.kernels.rotary import rotary_ref, rotary_triton

THETA = 10000.0


def test_select_picks_triton(device):
    assert select("rotary", "triton", device) is rotary_triton


def _qk_views(tokens, hq, hk, d, dtype, device, seed):
    """(qkv, q, k): q and k are non-contiguous head slices of one fused [T, Hq + 2 Hk, D] projection output."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(tokens, hq + 2 * hk, d, generator=g).to(device, dtype)
    return qkv, qkv[:, :hq], qkv[:, hq:hq + hk]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens,hq,hk,d", [(1, 8, 1, 256), (7, 4, 4, 64), (83, 3, 1, 6), (5, 16, 16, 128)])
def test_rotary(tokens, hq, hk, d, dtype, kernel):
    _, q, k = _qk_views(tokens, hq, hk, d, dtype, kernel.device, seed=tokens + d)
    assert q.stride(0) == (hq + 2 * hk) * d  # rows of the fused output, not a dense [T, Hq, D]
    g = torch.Generator().manual_seed(d)
    positions = torch.randint(0, 8192, (tokens,), generator=g).to(kernel.device)
    q32, k32 = q.float(), k.float()
    q_lp, k_lp = q.clone(), k.clone()
    rotary_ref(q32, k32, positions, THETA)
    rotary_ref(q_lp, k_lp, positions, THETA)
    before = q.data_ptr(), k.data_ptr()
    rotary(q, k, positions, THETA, backend=kernel.backend)
    assert (q.data_ptr(), k.data_ptr()) == before
    assert_close(q, q32, q_lp, what="q")
    assert_close(k, k32, k_lp, what="k")


def test_rotary_leaves_v_alone(kernel):
    """Only q and k are rotated: the v slice that shares their rows stays bit-identical."""
    qkv, q, k = _qk_views(9, 2, 1, 16, torch.float32, kernel.device, seed=5)
    v_before = qkv[:, 3:].clone()
    rotary(q, k, torch.arange(9, device=kernel.device), THETA, backend=kernel.backend)
    assert torch.equal(qkv[:, 3:], v_before)


def test_rotary_empty(kernel):
    q, k = torch.empty(0, 2, 8, device=kernel.device), torch.empty(0, 1, 8, device=kernel.device)
    rotary(q, k, torch.empty(0, dtype=torch.long, device=kernel.device), THETA, backend=kernel.backend)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens,hq,hk,d,page", [(1, 8, 1, 256, 16), (7, 4, 4, 64, 32), (83, 3, 1, 6, 16),
                                                 (5, 16, 16, 128, 16)])
def test_rotary_write_kv(tokens, hq, hk, d, page, dtype, kernel):
    """The fused op: q and k rotated in place as `rotary` does, the rotated k and v (untouched) in the
    cache at their slots, in any order, slot -1 skipped; every other cache slot left as it was."""
    qkv, q, k = _qk_views(tokens, hq, hk, d, dtype, kernel.device, seed=3 * tokens + d)
    v = qkv[:, hq + hk:]
    g = torch.Generator().manual_seed(tokens)
    positions = torch.randint(0, 8192, (tokens,), generator=g).to(kernel.device)
    blocks = tokens // page + 3
    slots = torch.randperm(blocks * page, generator=g)[:tokens]
    slots[1::4] = -1  # padding tokens of a CUDA-graph batch (token 0 is written: the one-token case too)
    slots = slots.to(kernel.device)
    k_cache, v_cache = (poison(torch.empty(blocks, page, hk, d, dtype=dtype, device=kernel.device)) for _ in range(2))
    q32, k32 = q.float(), k.float()
    q_lp, k_lp, v_before = q.clone(), k.clone(), v.clone()
    rotary_ref(q32, k32, positions, THETA)
    rotary_ref(q_lp, k_lp, positions, THETA)
    rotary_write_kv(q, k, v, positions, THETA, k_cache, v_cache, slots, backend=kernel.backend)
    assert_close(q, q32, q_lp, what="q")
    assert_close(k, k32, k_lp, what="k")
    assert torch.equal(v, v_before)
    keep = slots >= 0
    flat_k, flat_v = k_cache.view(-1, hk, d), v_cache.view(-1, hk, d)
    assert torch.equal(flat_k[slots[keep]], k[keep]) and torch.equal(flat_v[slots[keep]], v[keep])
    untouched = torch.ones(blocks * page, dtype=torch.bool, device=kernel.device)
    untouched[slots[keep]] = False
    assert flat_k[untouched].isnan().all() and flat_v[untouched].isnan().all()


def test_rotary_write_kv_bad_input(kernel):
    q, k = torch.randn(3, 2, 8, device=kernel.device), torch.randn(3, 1, 8, device=kernel.device)
    cache = torch.zeros(2, 16, 1, 8, device=kernel.device)
    with pytest.raises(ValueError, match="rotary_write_kv: k .* slot_mapping"):
        rotary_write_kv(q, k, k.clone(), torch.arange(3, device=kernel.device), THETA, cache, cache.clone(),
                        torch.arange(2, device=kernel.device), backend=kernel.backend)
    with pytest.raises(ValueError, match="rotary: positions"):
        rotary_write_kv(q, k, k.clone(), torch.arange(2, device=kernel.device), THETA, cache, cache.clone(),
                        torch.arange(3, device=kernel.device), backend=kernel.backend)
