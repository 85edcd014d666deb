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


@functools.lru_cache(maxsize=32)
def _inv_freq_cached(head_dim: int, theta: float, device: str) -> torch.Tensor:
    exps = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    return (1.0 / (theta ** exps)).to(device)


def rope_inv_freq(head_dim: int, theta: float, device) -> torch.Tensor:
    """fp32 [head_dim // 2] inverse frequencies, bit-identical to HF transformers'."""
    return _inv_freq_cached(head_dim, float(theta), str(torch.device(device)))


def _check(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> None:
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(f"rotary: q and k must be [tokens, heads, head_dim], got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[2] % 2:
        raise ValueError(f"rotary: q {tuple(q.shape)} and k {tuple(k.shape)} disagree on tokens or (even) head_dim")
    if positions.shape != (q.shape[0],):
        raise ValueError(f"rotary: positions must be [{q.shape[0]}], got {tuple(positions.shape)}")


def _rotate_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    h = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :h], xf[..., h:]
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    x.copy_(out.to(x.dtype))


@register("rotary", "torch")
def rotary_ref(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, theta: float) -> None:
    inv_freq = rope_inv_freq(q.shape[-1], theta, q.device)
    angle = (positions.float()[:, None] * inv_freq[None, :])[:, None, :]
    cos, sin = angle.cos(), angle.sin()
    _rotate_ref(q, cos, sin)
    _rotate_ref(k, cos, sin)


def rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, theta: float,
           backend: str = "auto") -> None:
    """Apply RoPE in place to q [T, Hq, D] and k [T, Hk, D] at `positions` [T]."""
    _check(q, k, positions)
    select("rotary", backend, q.device)(q, k, positions, theta)
