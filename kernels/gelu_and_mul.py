"""GeGLU: out = gelu_tanh(gate) * up, where gate_up = [gate | up] along the last dim.

gelu_tanh(g) = 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))), computed in fp32, one rounding
to the input dtype at the end.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import register, select

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch backend works without Triton
    triton = None


def _check(gate_up: torch.Tensor) -> int:
    if gate_up.shape[-1] % 2:
        raise ValueError(f"gelu_and_mul: last dim of gate_up must be even, got shape {tuple(gate_up.shape)}")
    return gate_up.shape[-1] // 2


@register("gelu_and_mul", "torch")
def gelu_and_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    n = _check(gate_up)
    g, u = gate_up[..., :n].float(), gate_up[..., n:].float()
    return (F.gelu(g, approximate="tanh") * u).to(gate_up.dtype)


if triton is not None:
    from ._triton_utils import round_to, rows

    _BLOCK = 1024

    @triton.jit
    def _gelu_and_mul_kernel(x_ptr, out_ptr, n, stride_x, stride_out, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n
        g = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(x_ptr + row * stride_x + n + cols, mask=mask, other=0.0).to(tl.float32)
        # 0.5 (1 + tanh(z)) == 1 / (1 + exp(-2z)): no tanh needed, and exp overflowing to inf
        # (g very negative) gives g / inf = -0 rather than NaN.
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        gelu = g / (1.0 + tl.exp(-2.0 * z))
        tl.store(out_ptr + row * stride_out + cols, round_to(gelu * u, out_ptr.dtype.element_ty), mask=mask)

    @register("gelu_and_mul", "triton")
    def gelu_and_mul_triton(gate_up: torch.Tensor) -> torch.Tensor:
        n = _check(gate_up)
        x2 = rows(gate_up)
        out = torch.empty((x2.shape[0], n), dtype=gate_up.dtype, device=gate_up.device)
        if out.numel():
            _gelu_and_mul_kernel[(x2.shape[0], triton.cdiv(n, _BLOCK))](
                x2, out, n, x2.stride(0), out.stride(0), BLOCK=_BLOCK, num_warps=4)
        return out.view(*gate_up.shape[:-1], n)


def gelu_and_mul(gate_up: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """GeGLU of the fused gate/up projection output; shape [..., 2I] -> [..., I]."""
    _check(gate_up)
    return select("gelu_and_mul", backend, gate_up.device)(gate_up)
