"""Weight-only quantized formats: int8 per output channel, int4 group-wise along K.

The packed layouts are specified in docs/QUANT_FORMAT.md and shared with the CUDA kernels and the
loader. In short, for a weight W [N, K] (y = x @ W^T):

    int8:  qweight int8 [N, K],       scales [N]:          W[n, k] = q[n, k] * s[n]
    int4:  qweight uint8 [N, K // 2], scales [N, K // g],  zeros [N, K // g] or None (= 8):
           W[n, k] = (q[n, k] - z[n, k // g]) * s[n, k // g], q in 0..15,
           byte (n, j) = q[n, 2j] | q[n, 2j + 1] << 4

Scales (and zeros) are stored in the activation dtype. Quantization computes in fp32 and rounds the
codes against the stored (already rounded) scales, so dequantize() reconstructs each element to
within half a step: |W - dequantize(quantize(W))| <= s / 2, plus the rounding of s itself at the
clamped ends of the range (asymmetric int4 in bf16: up to 15 * 2^-9 * s) and of the output dtype.
"""
from __future__ import annotations

import dataclasses

import torch

INT4_GROUP_SIZES = (32, 64, 128)
INT4_SYMMETRIC_ZERO = 8


@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A quantized [N, K] linear weight; `shape` is the logical (N, K)."""

    fmt: str  # "int8" | "int4"
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    group_size: int | None  # None for int8
    shape: tuple[int, int]

    def __post_init__(self):
        n, k = self.shape
        if self.fmt == "int8":
            want = {"qweight": ((n, k), torch.int8), "scales": ((n,), None)}
            if self.group_size is not None or self.zeros is not None:
                raise ValueError("int8 QuantizedWeight takes no group_size and no zeros")
        elif self.fmt == "int4":
            if self.group_size not in INT4_GROUP_SIZES or k % self.group_size:
                raise ValueError(f"int4 QuantizedWeight: group_size {self.group_size} must be one of "
                                 f"{INT4_GROUP_SIZES} and divide in_features {k}")
            ng = k // self.group_size
            want = {"qweight": ((n, k // 2), torch.uint8), "scales": ((n, ng), None)}
            if self.zeros is not None:
                want["zeros"] = ((n, ng), self.scales.dtype)
        else:
            raise ValueError(f"unknown quantized format {self.fmt!r}; expected 'int8' or 'int4'")
        for field, (shape, dtype) in want.items():
            t = getattr(self, field)
            if tuple(t.shape) != shape or (dtype is not None and t.dtype != dtype):
                raise ValueError(f"{self.fmt} QuantizedWeight of shape {self.shape}: {field} is "
                                 f"{t.dtype} {tuple(t.shape)}, expected {dtype or 'float'} {shape}")

    @property
    def dtype(self) -> torch.dtype:
        """The dtype dequantize() returns: the scales' (activation) dtype."""
        return self.scales.dtype

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def nbytes(self) -> int:
        """Bytes held in memory: qweight + scales + zeros."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros) if t is not None)

    def select_rows(self, ids: torch.Tensor) -> QuantizedWeight:
        """The weight of output rows `ids`, in that order (each tensor's rows; int4 packs along K)."""
        pick = lambda t: None if t is None else t[ids].contiguous()  # noqa: E731
        return dataclasses.replace(self, qweight=pick(self.qweight), scales=pick(self.scales), zeros=pick(self.zeros),
                                   shape=(len(ids), self.shape[1]))

    def to(self, device) -> QuantizedWeight:
        """The same weight with every tensor on `device`."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return dataclasses.replace(self, qweight=move(self.qweight), scales=move(self.scales), zeros=move(self.zeros))


def _check_weight(w: torch.Tensor, fmt: str, name: str | None) -> str:
    what = f"{fmt} quantization of {name or 'weight'}"
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"{what}: expected a 2-D floating [out_features, in_features] tensor, "
                         f"got {w.dtype} {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError(f"{what}: the weight holds {int((~torch.isfinite(w)).sum())} non-finite values")
    return what


def quantize_int8(w: torch.Tensor, name: str | None = None, dtype: torch.dtype | None = None) -> QuantizedWeight:
    """Symmetric per-output-channel int8: s[n] = max_k |W[n, k]| / 127 (1 for a zero row),
    q = clamp(round(W / s), -127, 127). Scales are stored in `dtype` (default: w's dtype)."""
    _check_weight(w, "int8", name)
    wf = w.float()
    amax = wf.abs().amax(dim=1)
    scales = torch.where(amax > 0, amax / 127, torch.ones_like(amax)).to(dtype or w.dtype)
    q = torch.round(wf / scales.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return QuantizedWeight("int8", q.contiguous(), scales, None, None, tuple(w.shape))


def quantize_int4(w: torch.Tensor, group_size: int = 128, symmetric: bool = True, name: str | None = None,
                  dtype: torch.dtype | None = None) -> QuantizedWeight:
    """Group-wise int4 along K (see the module docstring and docs/QUANT_FORMAT.md).

    symmetric:  s = max|W_g| / 7, z = 8 (implicit), q = clamp(round(W / s) + 8, 0, 15)
    asymmetric: s = (max(W_g, 0) - min(W_g, 0)) / 15, z = round(-min(W_g, 0) / s) in 0..15,
                q = clamp(round(W / s) + z, 0, 15)
    A group of zeros gets s = 1 (and z = 0). Scales and zeros are stored in `dtype` (default w's).
    """
    what = _check_weight(w, "int4", name)
    n, k = w.shape
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"{what}: group_size {group_size} is not one of {INT4_GROUP_SIZES}")
    if k % group_size:
        raise ValueError(f"{what}: in_features {k} is not a multiple of group_size {group_size}")
    dtype = dtype or w.dtype
    wg = w.float().reshape(n, k // group_size, group_size)
    if symmetric:
        step = wg.abs().amax(dim=2) / 7
    else:
        lo, hi = wg.amin(dim=2).clamp(max=0), wg.amax(dim=2).clamp(min=0)
        step = (hi - lo) / 15
    scales = torch.where(step > 0, step, torch.ones_like(step)).to(dtype)
    sf = scales.float()
    if symmetric:
        zeros, zf = None, torch.full_like(sf, INT4_SYMMETRIC_ZERO)
    else:
        zeros = torch.round(-lo / sf).clamp_(0, 15).to(dtype)
        zf = zeros.float()
    q = (torch.round(wg / sf[..., None]) + zf[..., None]).clamp_(0, 15).to(torch.uint8)
    return QuantizedWeight("int4", pack_int4(q.reshape(n, k)), scales, zeros, group_size, (n, k))


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., K] (0..15, K even) -> bytes [..., K // 2]: low nibble k = 2j, high k = 2j + 1."""
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4: the last dim {q.shape[-1]} must be even")
    q = q.to(torch.uint8)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Bytes [..., K // 2] -> uint8 codes [..., K]; the inverse of pack_int4."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


def dequantize_parts(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                     group_size: int | None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dense W from the packed tensors of some rows (int8 when group_size is None, else int4),
    computed in fp32 and returned in `dtype` (default: the scales' dtype)."""
    dtype = dtype or scales.dtype
    if group_size is None:
        return (qweight.float() * scales.float()[..., None]).to(dtype)
    q = unpack_int4(qweight).float()
    q = q.unflatten(-1, (q.shape[-1] // group_size, group_size))
    z = INT4_SYMMETRIC_ZERO if zeros is None else zeros.float()[..., None]
    return ((q - z) * scales.float()[..., None]).flatten(-2).to(dtype)


def dequantize(qw: QuantizedWeight) -> torch.Tensor:
    """The dense [N, K] weight, in the scales' dtype."""
    return dequantize_parts(qw.qweight, qw.scales, qw.zeros, qw.group_size)


def embedding_rows(qw: QuantizedWeight, ids: torch.Tensor) -> torch.Tensor:
    """dequantize(qw)[ids] ([*ids.shape, K]) without dequantizing the rest of the table."""
    def rows(t):
        return None if t is None else t[ids]
    return dequantize_parts(rows(qw.qweight), rows(qw.scales), rows(qw.zeros), qw.group_size)
