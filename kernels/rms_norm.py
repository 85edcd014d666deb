"""Gemma RMSNorm, optionally fused with the residual add.

    r = x + residual                      (rounded to x.dtype, when residual is given)
    y = r * rsqrt(mean(r^2) + eps) * (1 + w), computed in fp32, cast back to x.dtype

`rms_norm(x, w, eps)` returns y; `rms_norm(x, w, eps, residual)` returns (y, r).
"""
from __future__ import annotations

import torch

from .registry import register, select


@register("rms_norm", "torch")
def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None):
    r = x if residual is None else x + residual
    rf = r.float()
    y = rf * torch.rsqrt(rf.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + weight.float())
    y = y.to(x.dtype)
    return y if residual is None else (y, r)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None, backend: str = "auto"):
    """Gemma RMSNorm over the last dim (see module docstring)."""
    return select("rms_norm", backend, x.device)(x, weight, eps, residual)
