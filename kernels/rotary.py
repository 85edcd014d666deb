"""Rotary position embedding (rotate-half layout), applied in place to q and k.

For head_dim D, i < D/2 and inv_freq_i = 1 / theta^(2i/D) (computed as HF transformers does),
angle = pos * inv_freq_i in fp32 and
    x'[i]       = x[i] cos(angle) - x[i + D/2] sin(angle)
    x'[i + D/2] = x[i + D/2] cos(angle) + x[i] sin(angle)
computed in fp32, rounded once to the tensor's dtype.
"""
from __future__ import annotations

import functools

import torch

from .registry import register, select

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch backend works without Triton
    triton = None


@functools.lru_cache(maxsize=32)
def _inv_freq_cached(head_dim: int, theta: float, device: str) -> torch.Tensor:
    exps = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    return (1.0 / (theta ** exps)).to(device)


def rope_inv_freq(head_dim: int, theta: float, device) -> torch.Tensor:
    """fp32 [head_dim // 2] inverse frequencies, bit-identical to HF transformers'."""
    return _inv_freq_cached(head_dim, float(theta), str(torch.device(device)))


def check_rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> None:
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(f"rotary: q and k must be [tokens, heads, head_dim], got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[2] % 2:
        raise ValueError(f"rotary: q {tuple(q.shape)} and k {tuple(k.shape)} disagree on tokens or (even) head_dim")
    if positions.shape != (q.shape[0],):
        raise ValueError(f"rotary: positions must be [{q.shape[0]}], got {tuple(positions.shape)}")


def _rotate_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """x <- x * cos + rotate_half(x) * sin in fp32 (cos, sin over the full head_dim), rounded once."""
    h = x.shape[-1] // 2
    xf = x.float()
    x.copy_(xf * cos + torch.cat([-xf[..., h:], xf[..., :h]], dim=-1) * sin)


@register("rotary", "torch")
def rotary_ref(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, theta: float) -> None:
    inv_freq = rope_inv_freq(q.shape[-1], theta, q.device)
    angle = (positions.float()[:, None] * inv_freq[None, :])[:, None, :]
    angle = torch.cat([angle, angle], dim=-1)
    cos, sin = angle.cos(), angle.sin()
    _rotate_ref(q, cos, sin)
    _rotate_ref(k, cos, sin)


if triton is not None:
    from ._triton_utils import round_to, row_config

    @triton.jit
    def rope_angles(pos_ptr, inv_freq_ptr, t, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
        """(cos, sin) [1, BLOCK_HALF] fp32 of token t's angles pos * inv_freq_i."""
        i = tl.arange(0, BLOCK_HALF)
        angle = tl.load(pos_ptr + t).to(tl.float32) * tl.load(inv_freq_ptr + i, mask=i < HALF, other=0.0)
        return tl.cos(angle)[None, :], tl.sin(angle)[None, :]  # fp32 libdevice cosf/sinf on NVIDIA, as torch uses

    @triton.jit
    def rope_heads(ptr, t, n_heads, stride_t, stride_h, stride_d, cos, sin,
                   HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
        """Rotates token t's heads in place; returns the rotated halves (rounded to ptr's dtype), their
        head and column indices [BLOCK_H, 1], [1, BLOCK_HALF] and the mask of real elements."""
        heads = tl.arange(0, BLOCK_H)[:, None]
        i = tl.arange(0, BLOCK_HALF)[None, :]
        mask = (heads < n_heads) & (i < HALF)
        p1 = ptr + t * stride_t + heads * stride_h + i * stride_d
        p2 = p1 + HALF * stride_d
        x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(p2, mask=mask, other=0.0).to(tl.float32)
        y1 = round_to(x1 * cos - x2 * sin, ptr.dtype.element_ty)
        y2 = round_to(x2 * cos + x1 * sin, ptr.dtype.element_ty)
        tl.store(p1, y1, mask=mask)
        tl.store(p2, y2, mask=mask)
        return y1, y2, heads, i, mask

    @triton.jit
    def _rotary_kernel(q_ptr, k_ptr, pos_ptr, inv_freq_ptr, n_q_heads, n_k_heads,
                       stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd,
                       HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        cos, sin = rope_angles(pos_ptr, inv_freq_ptr, t, HALF, BLOCK_HALF)
        rope_heads(q_ptr, t, n_q_heads, stride_qt, stride_qh, stride_qd, cos, sin, HALF, BLOCK_HQ, BLOCK_HALF)
        rope_heads(k_ptr, t, n_k_heads, stride_kt, stride_kh, stride_kd, cos, sin, HALF, BLOCK_HK, BLOCK_HALF)

    def rope_launch(q: torch.Tensor, k: torch.Tensor, theta: float) -> tuple[torch.Tensor, dict]:
        """(inv_freq, launch options) of a kernel that rotates one token's q and k heads per program."""
        half = q.shape[-1] // 2
        block_half = triton.next_power_of_2(half)
        hq, hk = triton.next_power_of_2(q.shape[1]), triton.next_power_of_2(k.shape[1])
        return rope_inv_freq(q.shape[-1], theta, q.device), dict(
            HALF=half, BLOCK_HALF=block_half, BLOCK_HQ=hq, BLOCK_HK=hk,
            num_warps=row_config(2 * max(hq, hk) * block_half)[1])

    @register("rotary", "triton")
    def rotary_triton(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, theta: float) -> None:
        if q.shape[0] == 0:
            return
        inv_freq, opts = rope_launch(q, k, theta)
        _rotary_kernel[(q.shape[0],)](q, k, positions, inv_freq, q.shape[1], k.shape[1], *q.stride(), *k.stride(),
                                      **opts)


def rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, theta: float,
           backend: str = "auto") -> None:
    """Apply RoPE in place to q [T, Hq, D] and k [T, Hk, D] at `positions` [T]."""
    check_rotary(q, k, positions)
    select("rotary", backend, q.device)(q, k, positions, theta)
