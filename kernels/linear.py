"""y = x @ W^T (+ b): the one linear op of the model, dense or weight-only quantized."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import register, select


@register("linear", "torch")
def linear_ref(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, weight, bias)


def linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """x [..., K] times weight [N, K]^T -> [..., N]."""
    return select("linear", backend, x.device)(x, weight, bias)
