"""Numerical judgement for kernel tests, the way FlashAttention's tests do it.

A low-precision result `out` is compared with an fp32 reference `ref32` and with the torch
reference run in the same low precision `ref_lp`:

    max|out - ref32| <= 2 * max|ref_lp - ref32| + floor(dtype)

NaN or inf anywhere in `out` fails. Outputs are poisoned with NaN before a kernel writes them, so
an element the kernel forgot to write fails the check.
"""
import torch

FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill a floating tensor with NaN (in place) and return it."""
    return t.fill_(float("nan"))


def assert_close(out: torch.Tensor, ref32: torch.Tensor, ref_lp: torch.Tensor | None = None,
                 floor: float | None = None, what: str = "output") -> None:
    assert out.shape == ref32.shape, f"{what}: shape {tuple(out.shape)} != reference {tuple(ref32.shape)}"
    o = out.float()
    assert torch.isfinite(o).all(), f"{what}: {int((~torch.isfinite(o)).sum())} non-finite values (unwritten?)"
    r = ref32.float()
    floor = FLOOR[out.dtype] if floor is None else floor
    err = (o - r).abs().max().item() if o.numel() else 0.0
    base = 0.0 if ref_lp is None or not ref_lp.numel() else (ref_lp.float() - r).abs().max().item()
    scale = max(1.0, r.abs().max().item()) if r.numel() else 1.0
    bound = 2 * base + floor * scale
    assert err <= bound, f"{what}: max error {err:.3g} > bound {bound:.3g} (lowp-ref error {base:.3g}, dtype {out.dtype})"
