"""GeGLU: out = gelu_tanh(gate) * up, where gate_up = [gate | up] along the last dim.

gelu_tanh(g) = 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))), computed in fp32, one rounding
to the input dtype at the end.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import register, select


def _check(gate_up: torch.Tensor) -> int:
    if gate_up.shape[-1] % 2:
        raise ValueError(f"gelu_and_mul: last dim of gate_up must be even, got shape {tuple(gate_up.shape)}")
    return gate_up.shape[-1] // 2


@register("gelu_and_mul", "torch")
def gelu_and_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    n = _check(gate_up)
    g, u = gate_up[..., :n].float(), gate_up[..., n:].float()
    return (F.gelu(g, approximate="tanh") * u).to(gate_up.dtype)


def gelu_and_mul(gate_up: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """GeGLU of the fused gate/up projection output; shape [..., 2I] -> [..., I]."""
    _check(gate_up)
    return select("gelu_and_mul", backend, gate_up.device)(gate_up)
