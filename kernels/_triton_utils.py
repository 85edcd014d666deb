"""Small helpers shared by the Triton kernels (imported lazily: Triton is optional)."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


def rows(x: torch.Tensor) -> torch.Tensor:
    """View x [..., N] as a 2-D [rows, N] tensor whose last dim is contiguous (copies only if needed)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def row_config(n: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for a kernel that handles one row of n elements per program."""
    block = triton.next_power_of_2(max(n, 1))
    return block, max(1, min(16, block // 256))


@triton.jit
def prior_grids_done(PDL: tl.constexpr):
    """A kernel's first statement, as csrc/common/launch.cuh's: launched programmatically (PDL, launch_pdl), it lets
    the next kernel of the stream be scheduled, then waits until the previous one has finished."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()


def pdl_options(t: torch.Tensor) -> dict:
    """A launch's PDL constexpr and launch option: programmatic (kernels._native.PROGRAMMATIC_LAUNCH) on an
    sm_90+ device of t, else not."""
    from . import _native
    on = _native.PROGRAMMATIC_LAUNCH and t.is_cuda and torch.cuda.get_device_capability(t.device)[0] >= 9
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}


# Interpreter shims: Triton 3.9's interpreter truncates fp32 -> bf16 (the GPU rounds to nearest even)
# and multiplies bf16 tl.dot operands as raw integers, so there both are emulated exactly.
if os.environ.get("TRITON_INTERPRET") == "1":
    @triton.jit
    def round_to(x, dtype: tl.constexpr):
        """fp32 x rounded to nearest even in dtype (x free of NaN)."""
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            x = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        return x.to(dtype)

    @triton.jit
    def dot(a, b):
        """a @ b accumulated in fp32."""
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
else:
    @triton.jit
    def round_to(x, dtype: tl.constexpr):
        """fp32 x rounded to nearest even in dtype."""
        return x.to(dtype)

    @triton.jit
    def dot(a, b):
        """a @ b accumulated in fp32; fp32 operands in full precision (no TF32)."""
        if a.dtype == tl.float32:
            c = tl.dot(a, b, input_precision="ieee")
        else:
            c = tl.dot(a, b)
        return c
