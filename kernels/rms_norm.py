"""Gemma RMSNorm, optionally fused with the residual add.

    r = x + residual                      (rounded to x.dtype, when residual is given)
    y = r * rsqrt(mean(r^2) + eps) * (1 + w), computed in fp32, cast back to x.dtype

`rms_norm(x, w, eps)` returns y; `rms_norm(x, w, eps, residual)` returns (y, r).
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


@register("rms_norm", "torch")
def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None):
    r = x if residual is None else x + residual
    y = F.rms_norm(r.float(), r.shape[-1:], weight.float() + 1.0, eps).to(x.dtype)
    return y if residual is None else (y, r)


if triton is not None:
    from ._triton_utils import round_to, row_config, rows

    @triton.jit
    def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, y_ptr, r_ptr, n, stride_x, stride_res, stride_y, stride_r, eps,
                         HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            res = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0)
            x = round_to(x.to(tl.float32) + res.to(tl.float32), r_ptr.dtype.element_ty)  # r, rounded once
            tl.store(r_ptr + row * stride_r + cols, x, mask=mask)
        xf = x.to(tl.float32)
        inv_rms = tl.rsqrt(tl.sum(xf * xf, axis=0) / n + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * stride_y + cols, round_to(xf * inv_rms * (1.0 + w), y_ptr.dtype.element_ty), mask=mask)

    @register("rms_norm", "triton")
    def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float,
                        residual: torch.Tensor | None = None):
        n = x.shape[-1]
        if weight.shape != (n,):
            raise ValueError(f"rms_norm: weight {tuple(weight.shape)} does not match hidden size {n}")
        x2 = rows(x)
        y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
        if residual is None:
            res2, r = x2, y  # unused by the kernel when HAS_RESIDUAL is False
        else:
            if residual.shape != x.shape or residual.dtype != x.dtype:
                raise ValueError(f"rms_norm: residual {tuple(residual.shape)} {residual.dtype} does not match "
                                 f"x {tuple(x.shape)} {x.dtype}")
            res2, r = rows(residual), torch.empty(x2.shape, dtype=x.dtype, device=x.device)
        if x2.shape[0]:
            block, warps = row_config(n)
            _rms_norm_kernel[(x2.shape[0],)](
                x2, res2, weight.contiguous(), y, r, n, x2.stride(0), res2.stride(0), y.stride(0), r.stride(0),
                eps, HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=warps)
        y = y.view(x.shape)
        return y if residual is None else (y, r.view(x.shape))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None, backend: str = "auto"):
    """Gemma RMSNorm over the last dim (see module docstring)."""
    return select("rms_norm", backend, x.device)(x, weight, eps, residual)
