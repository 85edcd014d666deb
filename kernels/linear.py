"""y = x @ W^T (+ b): the one linear op of the model, dense or weight-only quantized.

`linear(x, weight)` takes a dense [N, K] tensor (op "linear"), a `PackedWeight` (op "linear_packed":
a bf16 weight in the blocked layout of the C++ CPU kernel, packed once at load) or a
`QuantizedWeight` (ops "linear_int8" / "linear_int4", formats in kernels/quant.py and
docs/QUANT_FORMAT.md). The quantized
ops share one signature, (x [M, K], qweight, scales, zeros, group_size, bias) -> y [M, N] in x's
dtype, and two backends:

- torch: dequantize to fp32, F.linear in fp32, cast to x's dtype (the CPU path and the reference);
- triton: one GEMM kernel for both formats, W8A16 / W4A16 with the dequantization fused into the
  K loop; no dequantized weight matrix is ever written. Per K tile it loads the packed bytes,
  forms the integer codes (int4: low / high nibbles minus the zero point, an integer in -15..15),
  converts them exactly to x's dtype and runs tl.dot with fp32 accumulation; the scale is applied
  to the fp32 partial product (int4: per tile, a K tile being one group; int8: once, in the
  epilogue). Tiles come from a fixed table keyed by M (decode <= 16 rows, mid, prefill), and
  K is split across programs when the output tiles alone would leave the GPU under-occupied, as in
  decode of the o / down projections; one more kernel sums the fp32 partials in a fixed order
  (deterministic), adds the bias and rounds.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .quant import QuantizedWeight, dequantize_parts
from .registry import register, select

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch backends work without Triton
    triton = None


_GEMV_PAD_NUMEL = 1 << 18  # fp32 weights from 1 MiB: one row goes as two (see _linear_torch)


def _linear_torch(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w^T (+ b) in torch. On a CPU in fp32, 1-8 rows go as (w @ x^T)^T: torch's fp32 F.linear
    takes a slow path for so few rows (on our CI machine, 12 [2048, 256] weights: 4.1 / 3.8 / 4.6 ms
    at 2 / 4 / 8 rows against 0.9 / 1.2 / 2.2 ms this way), and decode steps, speculative verify
    windows and small batches are exactly such rows. One row times a weight of 1 MiB or more goes as
    two (a copy): torch's GEMV reads the weight on one thread, about 2x slower than the two-row GEMM
    when it is not in cache (the nano target's 33.6 MB of fp32 weights: 4.3 -> 2.4 ms a step, median
    of 30); small weights stay in cache, where the GEMV is the faster (the 6.5 MB draft: 0.26 ms,
    0.55 if every weight went as two rows, 0.29 with this 1 MiB threshold). In bf16 F.linear is the
    faster (0.87 against 1.24 ms at 2 rows)."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if x.device.type == "cpu" and x.dtype == torch.float32 and 1 <= rows <= 8:
        x2 = x.reshape(rows, -1)
        pad = rows == 1 and w.numel() >= _GEMV_PAD_NUMEL
        y = torch.mm(w, x2.expand(2, -1).contiguous().t() if pad else x2.t())
        y = y.t()[:rows].contiguous().reshape(*x.shape[:-1], w.shape[0])
        return y if bias is None else y + bias
    return F.linear(x, w, bias)


@register("linear", "torch")
def linear_ref(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    return _linear_torch(x, weight, bias)


class PackedWeight(NamedTuple):
    """A bf16 weight w [N, K] in the CPU kernel's layout (csrc/cpu/linear.cpp): `data`
    [ceil(N / 16), ceil(K / 2), 16, 2] with data[b, p, c, j] = w[16 b + c, 2 p + j], zero outside w.
    One 64-byte vector holds one k-pair of 16 output columns."""
    data: torch.Tensor
    shape: tuple[int, int]
    fmt = "packed"

    @classmethod
    def pack(cls, w: torch.Tensor) -> "PackedWeight":
        n, k = w.shape
        padded = F.pad(w, (0, -k % 2, 0, -n % 16)) if k % 2 or n % 16 else w  # one copy, not two
        data = padded.view(padded.shape[0] // 16, 16, padded.shape[1] // 2, 2).permute(0, 2, 1, 3).contiguous()
        return cls(data, (n, k))

    def unpack(self) -> torch.Tensor:
        b, p = self.data.shape[:2]
        return self.data.permute(0, 2, 1, 3).reshape(16 * b, 2 * p)[: self.shape[0], : self.shape[1]]

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """w[ids]: the tied embedding's lookup, [*ids.shape, K]."""
        picked = self.data[ids.reshape(-1) // 16, :, ids.reshape(-1) % 16]  # [len(ids), K / 2, 2]
        return picked.reshape(len(picked), -1)[:, : self.shape[1]].reshape(*ids.shape, self.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


def linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """x [..., K] times weight [N, K]^T (dense tensor, PackedWeight or QuantizedWeight) -> [..., N]."""
    if isinstance(weight, torch.Tensor):
        return select("linear", backend, x.device)(x, weight, bias)
    x2 = x.reshape(-1, x.shape[-1])  # the packed and quantized ops take [M, K]
    if isinstance(weight, PackedWeight):
        y = select("linear_packed", backend, x.device)(x2, weight, bias)
    else:
        fn = select(f"linear_{weight.fmt}", backend, x.device)
        y = fn(x2, weight.qweight, weight.scales, weight.zeros, weight.group_size, bias)
    return y.reshape(*x.shape[:-1], weight.shape[0])


@register("linear_packed", "torch")
def linear_packed_ref(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    return _linear_torch(x, weight.unpack(), bias)


@register("linear_int8", "torch")
@register("linear_int4", "torch")
def linear_quant_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                     group_size: int | None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize to fp32, y = x @ W^T + b in fp32, cast to x's dtype."""
    w = dequantize_parts(qweight, scales, zeros, group_size, torch.float32)
    return _linear_torch(x.float(), w, None if bias is None else bias.float()).to(x.dtype)


class TileConfig(NamedTuple):
    """Tile shape of the quantized GEMM; split_k None = chosen from the GPU's occupancy."""
    block_m: int
    block_n: int
    block_k: int  # int8 only: int4 tiles K by its group (scale applied once per tile)
    num_warps: int
    num_stages: int
    split_k: int | None = None


# (largest M, config): decode, mid-size batches, prefill. Picked by timing the CodeGemma-7B
# projections on an H100 (benchmarks/kernels/bench_linear.py).
_TILE_TABLE = (
    (16, TileConfig(16, 64, 128, 4, 4)),
    (64, TileConfig(64, 64, 128, 4, 4)),
    (None, TileConfig(128, 128, 64, 8, 3)),
)
_MIN_K_TILES_PER_SPLIT = 8


def _tile_config(m: int) -> TileConfig:
    return next(cfg for limit, cfg in _TILE_TABLE if limit is None or m <= limit)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the Triton interpreter: any small number


def _split_k(out_tiles: int, k_tiles: int, device: torch.device) -> int:
    """Split K until there are ~2 programs per SM, keeping >= 8 K tiles per split."""
    want = 2 * _num_sms(device)
    if out_tiles >= want:
        return 1
    return max(1, min(want // out_tiles, k_tiles // _MIN_K_TILES_PER_SPLIT))


if triton is not None:
    from ._triton_utils import dot, round_to, rows

    @triton.jit
    def _quant_gemm_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, K_SPLIT,
                           stride_xm, stride_qn, stride_sn, stride_ym, stride_yk,
                           INT4: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Program (m, n, s): y[s, m-tile, n-tile] = sum over k in [s * K_SPLIT, (s+1) * K_SPLIT) of
        x[m, k] * W[n, k] (+ b[n]), W dequantized per K tile. int4: BLOCK_K is the group size, which
        divides K_SPLIT."""
        pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok, n_ok = rm < M, rn < N
        rm = rm.to(tl.int64)  # M x N logits can pass 2^31 elements
        k_lo = pid_k * K_SPLIT
        k_hi = tl.minimum(k_lo + K_SPLIT, K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_ok = rk < k_hi
            a = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            if INT4:
                rj = k0 // 2 + tl.arange(0, BLOCK_K // 2)
                b = tl.load(qw_ptr + rn[:, None] * stride_qn + rj[None, :], mask=n_ok[:, None], other=0).to(tl.int32)
                q = tl.reshape(tl.join(b & 0xF, b >> 4), (BLOCK_N, BLOCK_K))  # k = 2j: low nibble, 2j + 1: high
                s_off = rn * stride_sn + k0 // BLOCK_K  # a K tile is one group
                if HAS_ZEROS:
                    w = q.to(tl.float32) - tl.load(z_ptr + s_off, mask=n_ok, other=0.0).to(tl.float32)[:, None]
                else:
                    w = q.to(tl.float32) - 8.0
                scale = tl.load(s_ptr + s_off, mask=n_ok, other=0.0).to(tl.float32)
                acc += dot(a, tl.trans(w.to(a.dtype))) * scale[None, :]  # q - z is exact in a's dtype
            else:
                w = tl.load(qw_ptr + rn[:, None] * stride_qn + rk[None, :], mask=n_ok[:, None] & k_ok[None, :],
                            other=0)
                # through fp32: the interpreter casts int -> bf16 bitwise
                acc += dot(a, tl.trans(w.to(tl.float32).to(a.dtype)))
        if not INT4:
            acc *= tl.load(s_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        y = y_ptr + pid_k * stride_yk + rm[:, None] * stride_ym + rn[None, :]
        tl.store(y, round_to(acc, y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _split_sum_kernel(part_ptr, b_ptr, y_ptr, numel, N, SPLIT, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
        """y = sum over s of part[s] (+ b), the split-K partials [SPLIT, M, N] summed in order in fp32 and
        rounded once: one launch where a torch sum and a cast were two (three with a bias)."""
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = i < numel
        acc = tl.zeros([BLOCK], tl.float32)
        for s in range(SPLIT):
            acc += tl.load(part_ptr + s * numel + i, mask=ok, other=0.0)
        if HAS_BIAS:
            acc += tl.load(b_ptr + i % N, mask=ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + i, round_to(acc, y_ptr.dtype.element_ty), mask=ok)

    @register("linear_int8", "triton")
    @register("linear_int4", "triton")
    def quant_matmul_triton(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                            zeros: torch.Tensor | None, group_size: int | None, bias: torch.Tensor | None = None,
                            *, config: TileConfig | None = None) -> torch.Tensor:
        """y [M, N] = x [M, K] @ W^T (+ b) in x's dtype, W packed as int8 (group_size None) or int4;
        `config` overrides the tile table."""
        int4 = group_size is not None
        m, k = x.shape
        n = scales.shape[0]
        k_w = qweight.shape[1] * (2 if int4 else 1)
        if k != k_w:
            raise ValueError(f"linear_{'int4' if int4 else 'int8'}: x has {k} features, the weight {k_w}")
        x = rows(x)
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
        if not out.numel():
            return out
        cfg = config or _tile_config(m)
        block_k = group_size if int4 else cfg.block_k
        grid_mn = (triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n))
        k_tiles = triton.cdiv(k, block_k)
        split = cfg.split_k or _split_k(grid_mn[0] * grid_mn[1], k_tiles, x.device)
        k_split = triton.cdiv(k_tiles, split) * block_k
        split = triton.cdiv(k, k_split)
        dst = out if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=x.device)
        _quant_gemm_kernel[grid_mn + (split,)](
            x, qweight, scales, zeros, bias, dst, m, n, k, k_split,
            x.stride(0), qweight.stride(0), scales.stride(0), dst.stride(-2), dst.stride(0) if split > 1 else 0,
            INT4=int4, HAS_ZEROS=zeros is not None, HAS_BIAS=bias is not None and split == 1,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        if split > 1:
            block = 1024
            _split_sum_kernel[(triton.cdiv(m * n, block),)](dst, bias, out, m * n, n, split, HAS_BIAS=bias is not None,
                                                            BLOCK=block, num_warps=4)
        return out
