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

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .registry import register, select
from .rotary import check_rotary, rotary_ref

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch backend works without Triton
    triton = None


@dataclass
class AttnMetadata:
    """Describes one flat batch; every tensor lives on the model's device.

    positions      [T] int64   position of each new token (for RoPE)
    cu_seqlens_q   [B+1] int32 start of each sequence's new tokens in the flat batch
    context_lens   [B] int32   tokens in the cache per sequence, this step's included
    block_tables   [B, max_blocks] int32  cache block of each sequence's logical block
    slot_mapping   [T] int64   cache slot each new token's K/V is written to (-1: skip)
    max_query_len, max_context_len: host-side bounds, so launches never read the GPU
    host_cu_seqlens, host_context_lens: host copies of cu_seqlens_q / context_lens where the builder
        has them (the torch reference then needs no device read per layer); None where the tensors
        may change after construction (CUDA-graph input buffers)
    """
    positions: torch.Tensor
    cu_seqlens_q: torch.Tensor
    context_lens: torch.Tensor
    block_tables: torch.Tensor
    slot_mapping: torch.Tensor
    max_query_len: int
    max_context_len: int
    host_cu_seqlens: list[int] | None = None
    host_context_lens: list[int] | None = None

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


def _check_write(k, v, k_cache, v_cache, slot_mapping, what: str) -> None:
    _check_cache(k, k_cache, v_cache, what)
    if k.shape != v.shape or slot_mapping.shape != (k.shape[0],):
        raise ValueError(f"{what}: k {tuple(k.shape)}, v {tuple(v.shape)} and slot_mapping "
                         f"{tuple(slot_mapping.shape)} disagree")


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, backend: str = "auto") -> None:
    """Scatter k, v [T, Hk, D] into the paged cache at `slot_mapping` [T] (negative = skip)."""
    _check_write(k, v, k_cache, v_cache, slot_mapping, "write_kv")
    select("write_kv", backend, k.device)(k, v, k_cache, v_cache, slot_mapping)


@register("rotary_write_kv", "torch")
def rotary_write_kv_ref(q, k, v, positions, theta, k_cache, v_cache, slot_mapping) -> None:
    rotary_ref(q, k, positions, theta)
    write_kv_ref(k, v, k_cache, v_cache, slot_mapping)


def rotary_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, theta: float,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                    backend: str = "auto") -> None:
    """`rotary(q, k, positions, theta)` then `write_kv(k, v, k_cache, v_cache, slot_mapping)`, as one op:
    the attention layer's step between the QKV projection and attention (on a GPU one Triton kernel
    instead of two launches; each new K row is read once and written rotated to k and to the cache)."""
    check_rotary(q, k, positions)
    _check_write(k, v, k_cache, v_cache, slot_mapping, "rotary_write_kv")
    select("rotary_write_kv", backend, q.device)(q, k, v, positions, theta, k_cache, v_cache, slot_mapping)


class RotaryWrite(NamedTuple):
    """What the QKV projection's output qkv [T, (Hq + 2 Hk) * D] goes through before attention: RoPE at
    `positions` on its q and k heads, then its k and v heads into the paged cache at `slot_mapping`
    (rotary_write_kv). A linear that takes `rope=` does it in its own launch where its kernel can."""
    positions: torch.Tensor
    theta: float
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    slot_mapping: torch.Tensor

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [T, Hq, D], k and v [T, Hk, D]: views of qkv, Hk and D the cache's."""
        kv_heads, head_dim = self.k_cache.shape[-2:]
        q_size = qkv.shape[-1] - 2 * kv_heads * head_dim
        if qkv.dim() != 2 or q_size <= 0 or q_size % head_dim:
            raise ValueError(f"rotary_write_kv: qkv {tuple(qkv.shape)} is not [T, (Hq + 2 * {kv_heads}) * {head_dim}] "
                             f"for cache {tuple(self.k_cache.shape)}")
        t, kv = qkv.shape[0], kv_heads * head_dim
        return (qkv[:, :q_size].view(t, -1, head_dim), qkv[:, q_size:q_size + kv].view(t, kv_heads, head_dim),
                qkv[:, q_size + kv:].view(t, kv_heads, head_dim))

    def apply(self, qkv: torch.Tensor, impl=None) -> None:
        """rotary_write_kv (or `impl`, one of its backends) on qkv's q, k and v: q and k rotated in place."""
        (impl or rotary_write_kv)(*self.split(qkv), self.positions, self.theta, self.k_cache, self.v_cache,
                                  self.slot_mapping)


def gather_kv(cache: torch.Tensor, block_tables: torch.Tensor, lens: torch.Tensor | None, n: int) -> torch.Tensor:
    """The first n cache slots of each sequence of `block_tables` [B, W], as a [B, kv_heads, n,
    head_dim] view of whole blocks gathered by index_select (on CPU much faster than advanced
    indexing). With `lens` [B], table entries past a sequence's own blocks are never read (block 0
    stands in); None says every sequence owns all the blocks the n slots span."""
    bs = cache.shape[1]
    w = (n + bs - 1) // bs
    tables = block_tables[:, :w]
    if lens is not None:
        tables = torch.where(torch.arange(w, device=cache.device)[None, :] * bs < lens[:, None], tables, 0)
    blocks = cache.index_select(0, tables.reshape(-1).long())
    return blocks.view(block_tables.shape[0], w * bs, *cache.shape[2:])[:, :n].transpose(1, 2)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None,
            scale: float) -> torch.Tensor:
    """softmax(scale q.k over the allowed keys; None: all) @ v in fp32, each kv head serving its
    group of query heads: q [B, Q, Hq, D], k/v [B, Hk, L, D], allowed [B, Q, L] bool -> [B, Q, Hq, D]."""
    mask = None if allowed is None else allowed[:, None]
    out = F.scaled_dot_product_attention(q.float().transpose(1, 2), k.float(), v.float(), attn_mask=mask,
                                         scale=scale, enable_gqa=q.shape[2] != k.shape[1])
    return out.transpose(1, 2)


def _attend_decode(q, k_cache, v_cache, tables, lens, lens_host: list[int], scale: float) -> torch.Tensor:
    """One query token per sequence, all sequences at once, over contexts padded to the longest
    (masks and per-sequence block masking only where the lengths differ): [B, Hq, D] fp32."""
    longest, bs = max(lens_host), k_cache.shape[1]
    ragged = any((n + bs - 1) // bs < (longest + bs - 1) // bs for n in lens_host)
    k = gather_kv(k_cache, tables, lens if ragged else None, longest)
    v = gather_kv(v_cache, tables, lens if ragged else None, longest)
    allowed = None
    if min(lens_host) < longest:
        allowed = (torch.arange(longest, device=q.device)[None, :] < lens[:, None])[:, None]
    return _attend(q[:, None], k, v, allowed, scale)[:, 0]


@register("attention", "torch")
def attention_ref(q, k_cache, v_cache, meta: AttnMetadata, scale: float) -> torch.Tensor:
    """Single-token (decode) sequences all at once; every other sequence (prefill chunk, verify
    window) on its own, causal within its new tokens."""
    cu = meta.host_cu_seqlens if meta.host_cu_seqlens is not None else meta.cu_seqlens_q.tolist()
    ctx = meta.host_context_lens if meta.host_context_lens is not None else meta.context_lens.tolist()
    new = [e - s for s, e in zip(cu, cu[1:])]
    single = [b for b, n in enumerate(new) if n == 1]
    if single and len(single) == len(new):  # a pure decode batch: no gathers or scatters of q
        return _attend_decode(q, k_cache, v_cache, meta.block_tables, meta.context_lens, ctx, scale).to(q.dtype)
    out = torch.empty_like(q)
    if single:
        rows = torch.tensor(single, device=q.device)
        tok = torch.tensor([cu[b] for b in single], device=q.device)
        out[tok] = _attend_decode(q[tok], k_cache, v_cache, meta.block_tables[rows], meta.context_lens[rows],
                                  [ctx[b] for b in single], scale).to(q.dtype)
    for b, n in enumerate(new):
        if n <= 1:
            continue
        s, c = cu[b], ctx[b]
        k = gather_kv(k_cache, meta.block_tables[b: b + 1], None, c)
        v = gather_kv(v_cache, meta.block_tables[b: b + 1], None, c)
        qpos = torch.arange(c - n, c, device=q.device)[:, None]
        allowed = torch.arange(c, device=q.device)[None, :] <= qpos
        out[s: s + n] = _attend(q[s: s + n][None], k, v, allowed[None], scale)[0].to(q.dtype)
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


if triton is not None:
    from ._triton_utils import dot, pdl_options, prior_grids_done, round_to

    @triton.jit
    def _write_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, n_heads, stride_kt, stride_kh, stride_vt, stride_vh,
                         stride_cb, stride_cs, stride_ch, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
                         BLOCK_D: tl.constexpr, PAGE: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        slot = tl.load(slot_ptr + t).to(tl.int64)
        if slot >= 0:
            h = tl.arange(0, BLOCK_H)[:, None]
            d = tl.arange(0, BLOCK_D)[None, :]
            mask = (h < n_heads) & (d < HEAD_DIM)
            dst = (slot // PAGE) * stride_cb + (slot % PAGE) * stride_cs + h * stride_ch + d
            tl.store(kc_ptr + dst, tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=mask), mask=mask)
            tl.store(vc_ptr + dst, tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask), mask=mask)

    @register("write_kv", "triton")
    def write_kv_triton(k, v, k_cache, v_cache, slot_mapping) -> None:
        if k.stride(-1) != 1 or v.stride(-1) != 1:
            k, v = k.contiguous(), v.contiguous()
        if k_cache.stride(-1) != 1 or k_cache.stride() != v_cache.stride():
            raise ValueError("write_kv: k_cache and v_cache must share a layout with a contiguous head_dim")
        if k.shape[0] == 0:
            return
        _write_kv_kernel[(k.shape[0],)](
            k, v, k_cache, v_cache, slot_mapping, k.shape[1], k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            *k_cache.stride()[:3], HEAD_DIM=k.shape[2], BLOCK_H=triton.next_power_of_2(k.shape[1]),
            BLOCK_D=triton.next_power_of_2(k.shape[2]), PAGE=k_cache.shape[1])

    from .rotary import rope_angles, rope_heads, rope_launch

    @triton.jit
    def _rotary_write_kv_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, inv_freq_ptr, kc_ptr, vc_ptr, slot_ptr, n_q_heads,
                                n_kv_heads, stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd,
                                stride_vt, stride_vh, stride_vd, stride_cb, stride_cs, stride_ch,
                                HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_HQ: tl.constexpr,
                                BLOCK_HK: tl.constexpr, PAGE: tl.constexpr):
        """Token t: q and k rotated in place; the rotated k and v into cache slot slot_mapping[t] (if >= 0)."""
        t = tl.program_id(0).to(tl.int64)
        cos, sin = rope_angles(pos_ptr, inv_freq_ptr, t, HALF, BLOCK_HALF)
        rope_heads(q_ptr, t, n_q_heads, stride_qt, stride_qh, stride_qd, cos, sin, HALF, BLOCK_HQ, BLOCK_HALF)
        k1, k2, h, i, mask = rope_heads(k_ptr, t, n_kv_heads, stride_kt, stride_kh, stride_kd, cos, sin, HALF,
                                        BLOCK_HK, BLOCK_HALF)
        slot = tl.load(slot_ptr + t).to(tl.int64)
        if slot >= 0:
            dst = (slot // PAGE) * stride_cb + (slot % PAGE) * stride_cs + h * stride_ch + i
            tl.store(kc_ptr + dst, k1, mask=mask)
            tl.store(kc_ptr + dst + HALF, k2, mask=mask)
            src = v_ptr + t * stride_vt + h * stride_vh + i * stride_vd
            tl.store(vc_ptr + dst, tl.load(src, mask=mask), mask=mask)
            tl.store(vc_ptr + dst + HALF, tl.load(src + HALF * stride_vd, mask=mask), mask=mask)

    @register("rotary_write_kv", "triton")
    def rotary_write_kv_triton(q, k, v, positions, theta, k_cache, v_cache, slot_mapping) -> None:
        if k_cache.stride(-1) != 1 or k_cache.stride() != v_cache.stride():
            raise ValueError("rotary_write_kv: k_cache and v_cache must share a layout with a contiguous head_dim")
        if q.shape[0] == 0:
            return
        inv_freq, opts = rope_launch(q, k, theta)
        _rotary_write_kv_kernel[(q.shape[0],)](
            q, k, v, positions, inv_freq, k_cache, v_cache, slot_mapping, q.shape[1], k.shape[1], *q.stride(),
            *k.stride(), *v.stride(), *k_cache.stride()[:3], PAGE=k_cache.shape[1], **opts)

    @triton.jit
    def _attn_kernel(q_ptr, kc_ptr, vc_ptr, out_ptr, part_acc_ptr, part_ml_ptr, bt_ptr, cu_ptr, ctx_ptr,
                     qk_scale, num_seqs, num_heads, num_parts,
                     stride_qt, stride_qh, stride_ot, stride_oh, stride_cb, stride_cs, stride_ch, stride_bt,
                     G: tl.constexpr, QT: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
                     SPLIT: tl.constexpr, ONE_TILE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr):
        """One program: up to QT query tokens x the G query heads of KV head `kvh` (row m = token m // G,
        head m % G), against the cached keys [lo, hi) of one partition (all of the causal range unless SPLIT).
        With SPLIT, partition `part` of `num_parts` is the part-th share of the tile's own causal range, in
        whole BLOCK_N tiles: a grid sized for a long context keeps every program busy on a short one."""
        prior_grids_done(PDL)
        tile = tl.program_id(0)
        kvh = tl.program_id(1)
        part = tl.program_id(2)
        if ONE_TILE:  # every sequence's tokens fit one tile: tile == sequence
            b = tile
            j = 0
        else:  # sequence b owns tiles [cu[b] // QT + b, cu[b + 1] // QT + b + 1); find b by binary search
            lo_b = 0
            hi_b = num_seqs
            while lo_b < hi_b:
                mid = (lo_b + hi_b) // 2
                if tl.load(cu_ptr + mid) // QT + mid <= tile:
                    lo_b = mid + 1
                else:
                    hi_b = mid
            b = lo_b - 1
            j = tile - (tl.load(cu_ptr + b) // QT + b)
        start = tl.load(cu_ptr + b)
        n = tl.load(cu_ptr + b + 1) - start
        if j * QT >= n:
            return
        ctx = tl.load(ctx_ptr + b)
        kv_end = ctx - n + tl.minimum((j + 1) * QT, n)  # causal limit of the tile's last token
        if SPLIT:
            share = tl.cdiv(tl.cdiv(kv_end, num_parts), BLOCK_N) * BLOCK_N
            kv_lo = part * share
            kv_hi = tl.minimum(kv_lo + share, kv_end)
        else:
            kv_lo = 0
            kv_hi = kv_end

        m = tl.arange(0, BLOCK_M)
        i = j * QT + m // G  # token index within the sequence
        row_ok = (m < QT * G) & (i < n)
        tok = (start + i).to(tl.int64)
        head = kvh * G + m % G
        qpos = ctx - n + i
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        if kv_lo < kv_hi:
            q = tl.load(q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            for kv_start in range(kv_lo, kv_hi, BLOCK_N):
                kpos = kv_start + tl.arange(0, BLOCK_N)
                k_ok = kpos < kv_hi
                page = tl.load(bt_ptr + b * stride_bt + kpos // PAGE, mask=k_ok, other=0).to(tl.int64)
                kv_off = page * stride_cb + (kpos % PAGE) * stride_cs + kvh * stride_ch
                kt = tl.load(kc_ptr + kv_off[None, :] + d[:, None], mask=k_ok[None, :] & d_ok[:, None], other=0.0)
                s = dot(q, kt)
                s = tl.where(k_ok[None, :] & (kpos[None, :] <= qpos[:, None]), s * qk_scale, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet stays all-zero
                alpha = tl.exp2(m_i - m_safe)
                p = tl.exp2(s - m_safe[:, None])
                l_i = l_i * alpha + tl.sum(p, axis=1)
                v = tl.load(vc_ptr + kv_off[:, None] + d[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
                acc = acc * alpha[:, None] + dot(p.to(v.dtype), v)
                m_i = m_new

        if SPLIT:  # unnormalised partial (acc, max, sum), combined by _attn_reduce_kernel
            slot = (tok * num_heads + head) * num_parts + part
            tl.store(part_ml_ptr + 2 * slot, m_i, mask=row_ok)
            tl.store(part_ml_ptr + 2 * slot + 1, l_i, mask=row_ok)
            if kv_lo < kv_hi:
                tl.store(part_acc_ptr + slot[:, None] * HEAD_DIM + d[None, :], acc,
                         mask=row_ok[:, None] & d_ok[None, :])
        else:
            out = acc / l_i[:, None]
            tl.store(out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                     round_to(out, out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])

    @triton.jit
    def _attn_reduce_kernel(part_acc_ptr, part_ml_ptr, out_ptr, num_heads, num_parts, stride_ot, stride_oh,
                            HEAD_DIM: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr):
        """out[t, h] = sum_p w_p acc_p / sum_p w_p l_p, w_p = exp2(m_p - max_p m_p), BLOCK_P partitions at a time
        (an online max, as in the attention loop). Partition 0 is never empty, so the max is finite from the
        first chunk on; empty partitions (m_p = -inf, acc never written) get w_p = 0 and are not read."""
        prior_grids_done(PDL)
        t = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        d = tl.arange(0, BLOCK_D)
        base = (t * num_heads + h) * num_parts
        m_run = tl.max(tl.full([BLOCK_P], float("-inf"), tl.float32), axis=0)
        l_run = tl.sum(tl.zeros([BLOCK_P], tl.float32), axis=0)
        acc = tl.zeros([BLOCK_D], tl.float32)
        for p0 in range(0, num_parts, BLOCK_P):
            slot = base + p0 + tl.arange(0, BLOCK_P)
            p_ok = p0 + tl.arange(0, BLOCK_P) < num_parts
            m_p = tl.load(part_ml_ptr + 2 * slot, mask=p_ok, other=float("-inf"))
            l_p = tl.load(part_ml_ptr + 2 * slot + 1, mask=p_ok, other=0.0)
            m_new = tl.maximum(m_run, tl.max(m_p, axis=0))
            w = tl.exp2(m_p - m_new)
            alpha = tl.exp2(m_run - m_new)
            a = tl.load(part_acc_ptr + slot[:, None] * HEAD_DIM + d[None, :],
                        mask=(w > 0)[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
            acc = acc * alpha + tl.sum(a * w[:, None], axis=0)
            l_run = l_run * alpha + tl.sum(w * l_p, axis=0)
            m_run = m_new
        tl.store(out_ptr + t * stride_ot + h * stride_oh + d, round_to(acc / l_run, out_ptr.dtype.element_ty),
                 mask=d < HEAD_DIM)

    @functools.lru_cache(maxsize=None)
    def _num_sms(device: torch.device) -> int:
        return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4

    def _attn_config(head_dim: int, group: int, max_query_len: int, itemsize: int = 2) -> dict:
        """Tile shapes: (BLOCK_M rows = QT tokens x G heads, BLOCK_N keys, BLOCK_D) and launch options.
        For 16-bit head_dim 256 these were the fastest of a small sweep on an H100 (Triton 3.6), decode and
        prefill. fp32 at head_dim > 128 takes 32-key tiles: 64 needs 208 KiB of shared memory for prefill,
        more than an A100 has (tests/kernels/triton_compile.py lists every launch's footprint)."""
        block_d = max(16, triton.next_power_of_2(head_dim))
        warps = 8 if block_d > 128 else 4
        block_n = 32 if itemsize > 2 and block_d > 128 else 64
        if max_query_len == 1:  # decode: one token, its G heads padded to the 16 rows tl.dot needs
            block_m = max(16, triton.next_power_of_2(group))
            return dict(QT=1, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps, num_stages=2)
        block_m = max(64 if block_d > 128 else 128, triton.next_power_of_2(group))
        return dict(QT=block_m // group, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps,
                    num_stages=2)

    MAX_PARTS = 64

    def _num_partitions(meta: AttnMetadata, kv_heads: int, block_n: int, device: torch.device) -> int:
        """Split-K partitions per sequence and KV head: as many as the resident programs (two per SM: the
        head_dim-256 decode kernel's 128 registers x 256 threads, tests/kernels/triton_compile.py) hold in
        one round, at most one per BLOCK_N keys of the longest context and at most MAX_PARTS. Rounded
        down: equal shares take equal times, so a grid a few programs over the slots runs two rounds, the
        second nearly empty (2B at batch 16: 17 partitions were 272 programs for 264 slots, 7B at batch
        1 the same). Each program takes an equal share of its own sequence's context, so the count
        depends on the batch's shape only: a CUDA graph captured for the longest context launches no
        programs that a shorter one leaves empty (beyond those of contexts under partitions x BLOCK_N)."""
        per_part = meta.num_seqs * kv_heads
        return max(1, min(MAX_PARTS, 2 * _num_sms(device) // per_part, triton.cdiv(meta.max_context_len, block_n)))

    TUNABLE = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "parts")

    def _tuned(cfg: dict, config: dict, group: int, prefill: bool) -> tuple[dict, int | None]:
        """The tile table's `cfg` with the caller's overrides (keys of TUNABLE; BLOCK_M, whose rows are
        QT tokens x G heads, only where queries have several tokens; `parts`, the split-K partitions,
        used where every sequence fits one tile), and the partitions asked for (None: _num_partitions)."""
        bad = sorted(set(config) - set(TUNABLE))
        if bad:
            raise ValueError(f"attention: unknown config keys {bad}; tunable: {list(TUNABLE)}")
        pow2 = lambda v: isinstance(v, int) and v >= 16 and v & (v - 1) == 0  # noqa: E731
        for key in ("BLOCK_M", "BLOCK_N"):
            if key in config and not pow2(config[key]):
                raise ValueError(f"attention: config {key} must be a power of two >= 16, got {config[key]}")
        if "BLOCK_M" in config and (not prefill or config["BLOCK_M"] < group):
            raise ValueError(f"attention: config BLOCK_M={config['BLOCK_M']} applies to prefill tiles of at least "
                             f"the {group} query heads of a KV head")
        parts = config.get("parts")
        if parts is not None and (not isinstance(parts, int) or not 1 <= parts <= MAX_PARTS):
            raise ValueError(f"attention: config parts={parts} must be an int in [1, {MAX_PARTS}]")
        cfg = {**cfg, **{k: v for k, v in config.items() if k != "parts"}}
        if "BLOCK_M" in config:
            cfg["QT"] = config["BLOCK_M"] // group
        return cfg, parts

    @register("attention", "triton")
    def attention_triton(q, k_cache, v_cache, meta: AttnMetadata, scale: float, *,
                         config: dict | None = None) -> torch.Tensor:
        """Flash attention over the paged cache, grid (query tiles, KV heads, context partitions).
        `config` overrides the tile table (TUNABLE keys; benchmarks/kernels/sweep_attention.py).

        Prefill/varlen: each sequence's tokens in tiles of QT tokens x G heads, a tile's sequence found
        in-kernel from cu_seqlens_q. When every sequence fits one tile (decode, verify windows) the tile is
        the sequence and the context is split into partitions (split-K) combined by _attn_reduce_kernel.
        Only host ints (shapes, max_query_len, max_context_len) size the launch: no device sync."""
        num_tokens, num_heads, head_dim = q.shape
        kv_heads, page = k_cache.shape[2], k_cache.shape[1]
        out = torch.empty((num_tokens, num_heads, head_dim), dtype=q.dtype, device=q.device)
        if num_tokens == 0 or meta.num_seqs == 0:
            return out
        if q.stride(-1) != 1:
            q = q.contiguous()
        if k_cache.stride(-1) != 1 or k_cache.stride() != v_cache.stride():
            raise ValueError("attention: k_cache and v_cache must share a layout with a contiguous head_dim")
        group = num_heads // kv_heads
        cfg = _attn_config(head_dim, group, meta.max_query_len, q.element_size())
        parts = None
        if config:
            cfg, parts = _tuned(cfg, config, group, meta.max_query_len > 1)
        qt = cfg.pop("QT")
        one_tile = meta.max_query_len <= qt
        num_tiles = meta.num_seqs if one_tile else num_tokens // qt + meta.num_seqs
        num_parts = (parts or _num_partitions(meta, kv_heads, cfg["BLOCK_N"], q.device)) if one_tile else 1
        split = num_parts > 1
        pdl = pdl_options(q)
        if split:
            part_acc = torch.empty((num_tokens, num_heads, num_parts, head_dim), dtype=torch.float32, device=q.device)
            part_ml = torch.empty((num_tokens, num_heads, num_parts, 2), dtype=torch.float32, device=q.device)
        else:
            part_acc = part_ml = out  # unused
        _attn_kernel[(num_tiles, kv_heads, num_parts)](
            q, k_cache, v_cache, out, part_acc, part_ml, meta.block_tables, meta.cu_seqlens_q, meta.context_lens,
            scale * 1.4426950408889634, meta.num_seqs, num_heads, num_parts,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1), *k_cache.stride()[:3], meta.block_tables.stride(0),
            G=group, QT=qt, HEAD_DIM=head_dim, PAGE=page, SPLIT=split, ONE_TILE=one_tile, **cfg, **pdl)
        if split:
            _attn_reduce_kernel[(num_tokens, num_heads)](
                part_acc, part_ml, out, num_heads, num_parts, out.stride(0), out.stride(1), HEAD_DIM=head_dim,
                BLOCK_P=min(16, triton.next_power_of_2(num_parts)), BLOCK_D=cfg["BLOCK_D"], num_warps=4, **pdl)
        return out


# H100 measurements (benchmarks/results/2026-11-27-h100-kernels): the Triton kernel beats the CUDA
# decode kernel for the 7B (one KV head per query head) and ties it for the 2B (MQA).
from .registry import prefer  # noqa: E402

prefer("attention", "triton", "cuda", "torch")
# One Triton launch for RoPE and the cache write, where the CUDA backend makes two (not measured yet:
# the GPU suite's decode_profile lists the kernels of a step).
prefer("rotary_write_kv", "triton", "cuda", "torch")
