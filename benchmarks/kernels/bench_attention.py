"""Paged attention (prefill and split-K decode) and write_kv on the CodeGemma attention shapes.

Peers: torch eager (the per-sequence reference), torch.compile of it (small batches only: it unrolls
its loop over sequences), and F.scaled_dot_product_attention on equivalent dense tensors.
"""
import pytest
import torch
import torch.nn.functional as F
from common import DEVICE, DTYPE, MODELS, ON_GPU, compare, nbytes, op_impls

from gemforge.kernels import AttnMetadata

BLOCK_SIZE = 16
KV_BYTES_LIMIT = 16 << 30  # paged cache + its dense copy stay well inside an 80 GB card
# (sequences, new tokens per sequence, context length per sequence)
CASES = ([(1, 512, 512), (4, 128, 128)] + [(b, 1, c) for b, c in
         [(1, 1024), (1, 8192), (16, 2048), (64, 1024), (256, 128), (256, 1024), (256, 8192)]]
         if ON_GPU else [(1, 8, 8), (2, 1, 40), (64, 1, 88), (4, 96, 96)])


def paged_batch(seqs, n, ctx, kv_heads, head_dim):
    """k/v caches with each sequence's blocks at random places, and the metadata of the batch."""
    per_seq = -(-ctx // BLOCK_SIZE)
    shape = (seqs * per_seq, BLOCK_SIZE, kv_heads, head_dim)
    k_cache = torch.randn(shape, device=DEVICE, dtype=DTYPE)
    v_cache = torch.randn(shape, device=DEVICE, dtype=DTYPE)
    tables = torch.randperm(seqs * per_seq, device=DEVICE).view(seqs, per_seq).int()
    pos = torch.arange(ctx - n, ctx, device=DEVICE).repeat(seqs)
    seq = torch.arange(seqs, device=DEVICE).repeat_interleave(n)
    meta = AttnMetadata(
        positions=pos, cu_seqlens_q=torch.arange(0, seqs * n + 1, n, device=DEVICE, dtype=torch.int32),
        context_lens=torch.full((seqs,), ctx, device=DEVICE, dtype=torch.int32), block_tables=tables,
        slot_mapping=tables[seq, pos // BLOCK_SIZE].long() * BLOCK_SIZE + pos % BLOCK_SIZE,
        max_query_len=n, max_context_len=ctx)
    return k_cache, v_cache, meta


@pytest.mark.parametrize("seqs,n,ctx", CASES, ids=lambda c: str(c))
@pytest.mark.parametrize("model", MODELS)
def test_attention(benchmark, model, seqs, n, ctx):
    benchmark.group = f"attention-{model}-{'decode' if n == 1 else 'prefill'}"
    hq, hk, d = (MODELS[model][k] for k in ("heads", "kv_heads", "head_dim"))
    kv_bytes = 2 * seqs * ctx * hk * d * DTYPE.itemsize
    if kv_bytes > KV_BYTES_LIMIT:
        pytest.skip(f"{kv_bytes / 2**30:.0f} GiB of KV cache")
    k_cache, v_cache, meta = paged_batch(seqs, n, ctx, hk, d)
    q = torch.randn(seqs * n, hq, d, device=DEVICE, dtype=DTYPE)
    impls = op_impls("attention", q, k_cache, v_cache, meta, d ** -0.5, compile_ref=seqs <= 4)
    if ON_GPU:
        dq = q.view(seqs, n, hq, d).transpose(1, 2)
        dk, dv = (torch.randn(seqs, hk, ctx, d, device=DEVICE, dtype=DTYPE) for _ in range(2))
        impls["sdpa"] = lambda: F.scaled_dot_product_attention(dq, dk, dv, is_causal=n > 1, enable_gqa=True)
    compare(benchmark, impls, 2 * nbytes(q) + kv_bytes)  # q read, out written, each sequence's K/V read once


@pytest.mark.parametrize("tokens", [1, 16, 512] if ON_GPU else [8])
@pytest.mark.parametrize("model", MODELS)
def test_write_kv(benchmark, model, tokens):
    benchmark.group = f"write_kv-{model}"
    hk, d = MODELS[model]["kv_heads"], MODELS[model]["head_dim"]
    k, v = (torch.randn(tokens, hk, d, device=DEVICE, dtype=DTYPE) for _ in range(2))
    blocks = 4 * -(-tokens // BLOCK_SIZE)
    k_cache, v_cache = (torch.empty(blocks, BLOCK_SIZE, hk, d, device=DEVICE, dtype=DTYPE) for _ in range(2))
    slots = torch.randperm(blocks * BLOCK_SIZE, device=DEVICE)[:tokens]
    compare(benchmark, op_impls("write_kv", k, v, k_cache, v_cache, slots), 2 * nbytes(k, v))  # read + scatter
