"""Attention over a paged KV cache, for one flat variable-length batch.

Cache layout (per layer): k_cache, v_cache are [num_blocks, block_size, num_kv_heads, head_dim];
token slot s lives at block s // block_size, offset s % block_size.

The batch holds B sequences; sequence b owns the new query tokens
q[cu_seqlens_q[b] : cu_seqlens_q[b+1]] (n_b of them) and has context_lens[b] tokens in the cache
*after* this step's `write_kv`, the new ones last. New token i (0-based) of sequence b sits at
position p = context_lens[b] - n_b + i and attends to cached tokens 0..p (causal):

    out[t, h] = softmax(scale * q[t, h] . K[0..p, h // (Hq / Hk)]) @ V[0..p, h // (Hq / Hk)]

One entry point serves prefill (n_b = prompt chunk), decode (n_b = 1) and speculative verify
windows (n_b = k + 1), mixed freely in one batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .registry import register, select


@dataclass
class AttnMetadata:
    """Describes one flat batch; every tensor lives on the model's device.

    positions      [T] int64   position of each new token (for RoPE)
    cu_seqlens_q   [B+1] int32 start of each sequence's new tokens in the flat batch
    context_lens   [B] int32   tokens in the cache per sequence, this step's included
    block_tables   [B, max_blocks] int32  cache block of each sequence's logical block
    slot_mapping   [T] int64   cache slot each new token's K/V is written to (-1: skip)
    max_query_len, max_context_len: host-side bounds, so launches never read the GPU
    """
    positions: torch.Tensor
    cu_seqlens_q: torch.Tensor
    context_lens: torch.Tensor
    block_tables: torch.Tensor
    slot_mapping: torch.Tensor
    max_query_len: int
    max_context_len: int

    @property
    def num_seqs(self) -> int:
        return self.context_lens.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.slot_mapping.shape[0]


def _check_cache(k: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, what: str) -> None:
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"{what}: k_cache/v_cache must both be [blocks, block_size, kv_heads, head_dim], "
                         f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if k.shape[-2:] != k_cache.shape[-2:]:
        raise ValueError(f"{what}: heads/head_dim of {tuple(k.shape)} do not match cache {tuple(k_cache.shape)}")
    if k.dtype != k_cache.dtype:
        raise ValueError(f"{what}: dtype {k.dtype} does not match cache dtype {k_cache.dtype}")


@register("write_kv", "torch")
def write_kv_ref(k, v, k_cache, v_cache, slot_mapping) -> None:
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep]
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep]


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, backend: str = "auto") -> None:
    """Scatter k, v [T, Hk, D] into the paged cache at `slot_mapping` [T] (negative = skip)."""
    _check_cache(k, k_cache, v_cache, "write_kv")
    if k.shape != v.shape or slot_mapping.shape != (k.shape[0],):
        raise ValueError(f"write_kv: k {tuple(k.shape)}, v {tuple(v.shape)} and slot_mapping "
                         f"{tuple(slot_mapping.shape)} disagree")
    select("write_kv", backend, k.device)(k, v, k_cache, v_cache, slot_mapping)


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, n: int) -> torch.Tensor:
    """The first n cached tokens of one sequence: [n, kv_heads, head_dim]."""
    bs = cache.shape[1]
    blocks = block_table[: (n + bs - 1) // bs].long()
    return cache[blocks].reshape(-1, *cache.shape[2:])[:n]


@register("attention", "torch")
def attention_ref(q, k_cache, v_cache, meta: AttnMetadata, scale: float) -> torch.Tensor:
    out = torch.empty_like(q)
    hq, hk = q.shape[1], k_cache.shape[2]
    cu = meta.cu_seqlens_q.tolist()
    ctx = meta.context_lens.tolist()
    for b in range(len(ctx)):
        s, e = cu[b], cu[b + 1]
        n = e - s
        if n == 0:
            continue
        k = gather_kv(k_cache, meta.block_tables[b], ctx[b]).float().repeat_interleave(hq // hk, dim=1)
        v = gather_kv(v_cache, meta.block_tables[b], ctx[b]).float().repeat_interleave(hq // hk, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[s:e].float(), k) * scale
        qpos = torch.arange(ctx[b] - n, ctx[b], device=q.device)[:, None]
        kpos = torch.arange(ctx[b], device=q.device)[None, :]
        scores.masked_fill_(kpos > qpos, float("-inf"))
        out[s:e] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(q.dtype)
    return out


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttnMetadata,
              scale: float, backend: str = "auto") -> torch.Tensor:
    """Causal paged attention of q [T, Hq, D] over the cache; returns [T, Hq, D] in q's dtype."""
    _check_cache(q[:, :k_cache.shape[2]], k_cache, v_cache, "attention")
    if q.shape[1] % k_cache.shape[2]:
        raise ValueError(f"attention: {q.shape[1]} query heads is not a multiple of {k_cache.shape[2]} kv heads")
    if q.shape[0] != meta.num_tokens:
        raise ValueError(f"attention: q has {q.shape[0]} tokens but metadata describes {meta.num_tokens}")
    return select("attention", backend, q.device)(q, k_cache, v_cache, meta, scale)
