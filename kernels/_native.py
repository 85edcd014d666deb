"""The "cuda" and "cpu" backends of each op: thin wrappers over gemforge.kernels._C (csrc/).

Each wrapper has exactly its op's torch-reference signature, validates devices, dtypes, shapes and
strides (ValueError naming the tensor and what was expected), allocates the outputs and calls the
kernel with raw data pointers (CUDA: on torch's current stream; CPU: _C.cpu, on torch's OpenMP
pool, without the GIL). One validation serves both backends of an op. _C is imported on first
call, never at import time, so this module imports fine where the extension was not built;
registry.select() only hands out these backends when _C imports (and, for "cuda", has CUDA).

"cuda" coverage: rms_norm, gelu_and_mul, rotary, write_kv (fp32/fp16/bf16); attention for decode
batches (max_query_len == 1; anything else is delegated to the "triton" backend) and linear_int8 /
linear_int4 for M <= 16 rows (more rows, or int8 with K % 16 != 0, go to "triton") in fp16/bf16.
"cpu" coverage: rms_norm, gelu_and_mul, rotary, write_kv, argmax (fp32) and attention (any mix of prefill chunks,
decode tokens and verify windows; outside the bf16 kernel, CPU_TORCH_PREFILL_TOKENS) in
fp32/fp16/bf16; bf16 linear over a PackedWeight and linear_int8 / linear_int4 over the stored
quantized layouts for bf16 x with K a multiple of 32 (AVX512-BF16 builds; plain dense weights, and
other quantized cases, go to torch).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import math

import torch

from .argmax import argmax_ref
from .attention import AttnMetadata, RotaryWrite
from .linear import PackedWeight
from .registry import prefer, preference, register, select
from .rotary import rope_inv_freq

# The generic C++ attention kernel (fp32, fp16, and bf16 without AVX512-BF16 or with a head_dim that
# is not a multiple of 32 up to 256) hands a batch holding a chunk of this many new tokens to torch,
# whose SDPA does long causal blocks as matrix products. Measured on the 2-core CI CPU, 4 sequences:
# at 64 new tokens each the generic kernel took 0.5x (nano heads) / 0.9x (2B heads) torch's time, at
# 128 1.0x / 1.2x, at 256 1.5x / 1.3x. The bf16 kernel beats SDPA at every length (0.2-1.0x its time
# at 64-2048 tokens, ad-hoc timing) and keeps every batch.
CPU_TORCH_PREFILL_TOKENS = 128

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # csrc/common/dtype.h
_HALF = (torch.float16, torch.bfloat16)
MAX_GEMV_ROWS = 1  # measured on H100: from 4 rows up the Triton GEMM is 2-15x faster
FUSED_ROWS = 4  # rows of x a linear normalises itself, or applies GeGLU on the CUDA cores (kFusedMaxRows)
MMA_NORM_BYTES = 40 * 1024  # x [M, K] a tensor-core linear normalises in shared memory (kMmaNormSmem)
# Ops whose CUDA backend runs its tensor-core kernel by default: "linear", "linear_int8" and "linear_int4"
# up to MAX_MMA_ROWS rows (csrc/mma_gemv.cu: dense_mma, w8a16_mma, w4a16_mma; by sm_90a SASS the int4
# loop issues 2.6x fewer instructions per weight byte than the CUDA-core GEMV at one row and 4.9x at four,
# the int8 one 13% fewer at one row), "attention" where a KV head has up to 8 query heads
# (csrc/attention.cu; 1-2 instructions per K/V byte in its loops against 9-13 for the CUDA-core kernel,
# whose 2B decode read 0.57 TB/s on an H100). None yet: written without a GPU (they pass tests/gpu on the
# emulated device of csrc/emu/), each joins when the GPU suite has checked and timed it (tests/gpu, the
# cuda_mma peers of bench_cuda_ops, bench_decode's int4-mma, int8-mma and none-dmma).
TENSOR_CORE_OPS: set[str] = set()
MAX_MMA_ROWS = 16
# The model's RMSNorms, GeGLU and RoPE with the cache write in its linears' launches where those run a CUDA
# GEMV (CUDA cores or tensor cores, up to FUSED_ROWS rows of x; GeGLU and RoPE on the tensor cores up to 16):
# `norm=`, `geglu=True` and `rope=` below (csrc/common/linear.cuh: the input normalised as it is staged, a
# warp's or lane's rows a gate row and its up row, or the two rows of a head that RoPE rotates together).
# Four launches a layer fewer at batch 1. engine.model.Ops reads it when a model is built; bench_decode's
# "-unfused" variants turn it off to time the difference.
FUSE_INTO_LINEARS = True
# Programmatic dependent launch of the CUDA kernels on sm_90+ (csrc/common/launch.cuh): each may be scheduled
# while the kernel before it in the stream finishes (its CTAs start, the GEMVs ask for their first weight rows
# in L2, then wait), across the five to seven kernel boundaries of a decoder layer at batch 1 (Triton's
# attention kernels join in: kernels/attention.py). Off until the GPU suite has timed it (bench_decode's "-pdl").
PROGRAMMATIC_LAUNCH = False
KERNEL_VARIANTS = ("mma", "gemv", "dmma", "unfused", "pdl")


@contextlib.contextmanager
def kernel_variant(variant: str | None):
    """While a model is built and run, kernels other than the defaults (None: the defaults): "mma" the
    quantized linears on the tensor cores (up to MAX_MMA_ROWS rows), "gemv" the dense one-row linears on the
    CUDA GEMV instead of cuBLAS, "dmma" the dense linears of up to MAX_MMA_ROWS rows on the tensor cores
    instead, "unfused" the RMSNorms, GeGLU and RoPE with the cache write as kernels of their own
    (FUSE_INTO_LINEARS off), "pdl" programmatic dependent launches (PROGRAMMATIC_LAUNCH on). For the
    benchmarks that time them against the defaults and the GPU tests that check them end to end."""
    if variant not in (None, *KERNEL_VARIANTS):
        raise ValueError(f"kernel_variant: unknown variant {variant!r}; expected one of {KERNEL_VARIANTS}")
    global FUSE_INTO_LINEARS
    ops, linear, fuse, pdl = set(TENSOR_CORE_OPS), preference("linear"), FUSE_INTO_LINEARS, PROGRAMMATIC_LAUNCH
    try:
        if variant == "mma":
            TENSOR_CORE_OPS.update(("linear_int4", "linear_int8"))
        elif variant == "unfused":
            FUSE_INTO_LINEARS = False
        elif variant in ("gemv", "dmma"):
            prefer("linear", "cuda", "torch")
            if variant == "dmma":
                TENSOR_CORE_OPS.add("linear")
        elif variant == "pdl":
            set_programmatic_launch(True)
        yield
    finally:
        TENSOR_CORE_OPS.clear()
        TENSOR_CORE_OPS.update(ops)
        prefer("linear", *linear)
        FUSE_INTO_LINEARS = fuse
        set_programmatic_launch(pdl)


def set_programmatic_launch(on: bool) -> None:
    """PROGRAMMATIC_LAUNCH for every later launch, the CUDA kernels' (where _C is built) and Triton's."""
    global PROGRAMMATIC_LAUNCH
    PROGRAMMATIC_LAUNCH = bool(on)
    with contextlib.suppress(ImportError):
        _apply_launch_mode(_ext())


def _apply_launch_mode(ext) -> None:
    """PROGRAMMATIC_LAUNCH into _C (also when set in this file: _ext() applies it on import)."""
    if hasattr(ext, "set_programmatic_launch"):  # (built with CUDA)
        ext.set_programmatic_launch(PROGRAMMATIC_LAUNCH)


def _tensor_cores(op: str, asked: bool | None) -> bool:
    return op in TENSOR_CORE_OPS if asked is None else asked


@functools.cache
def _ext():
    ext = importlib.import_module("gemforge.kernels._C")
    _apply_launch_mode(ext)
    return ext


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def _launch(kind: str, kernel: str, like: torch.Tensor, *args) -> None:
    """Call _C's `kernel` ("cuda": with like's current stream appended) or _C.cpu's ("cpu")."""
    if kind == "cuda":
        getattr(_ext(), kernel)(*args, _stream(like))
    else:
        getattr(_ext().cpu, kernel)(*args)


def _check_device(op: str, kind: str, **tensors) -> None:
    """Every given tensor on one device of `kind` ("cuda": the current CUDA device). Written for a
    per-call cost of about a microsecond: CPU ops are called per layer per step."""
    on_kind = "is_cuda" if kind == "cuda" else "is_cpu"
    for name, t in tensors.items():
        if t is not None and not getattr(t, on_kind):
            raise ValueError(f"{op}: {name} must be a {kind.upper()} tensor, got device {t.device}")
    if kind == "cpu":
        return  # one CPU device
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"{op}: tensors are on different devices: {devices}")
    first = next(iter(devices.values()))
    if kind == "cuda" and first.index is not None and first.index != torch.cuda.current_device():
        raise ValueError(f"{op}: tensors are on {first} but the current CUDA device is "
                         f"cuda:{torch.cuda.current_device()} (use torch.cuda.device)")


def _empty_as(t: torch.Tensor) -> torch.Tensor:
    """A contiguous uninitialised tensor of t's shape, dtype and device (empty_like: a third of
    torch.empty's cost on a CPU)."""
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def _check_dtype(op: str, name: str, t: torch.Tensor, allowed) -> None:
    if t.dtype not in allowed:
        raise ValueError(f"{op}: {name} has dtype {t.dtype}, expected one of {tuple(allowed)}")


def _check_like(op: str, name: str, t: torch.Tensor, shape: tuple, dtype: torch.dtype) -> None:
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
        raise ValueError(f"{op}: {name} must be {dtype} of shape {tuple(shape)}, got {t.dtype} {tuple(t.shape)}")


def _check_contiguous(op: str, name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous, got strides {t.stride()} for shape {tuple(t.shape)}")


def _check_heads_dense(op: str, name: str, t: torch.Tensor) -> None:
    """t is [T, H, D] with any token stride but dense heads and dims (a view into a fused qkv row)."""
    if t.dim() != 3 or t.stride(2) != 1 or (t.shape[1] > 1 and t.stride(1) != t.shape[2]):
        raise ValueError(f"{op}: {name} must be [tokens, heads, head_dim] with head/dim strides "
                         f"({t.shape[2] if t.dim() == 3 else 'D'}, 1), got shape {tuple(t.shape)} strides {t.stride()}")


def _row_stride(op: str, name: str, t: torch.Tensor) -> int:
    """Stride between rows of t viewed as [rows, last dim]; needs a unit last stride."""
    if t.is_contiguous():
        return t.shape[-1]
    if t.stride(-1) != 1 and t.shape[-1] > 1:
        raise ValueError(f"{op}: {name} must have a contiguous last dim, got strides {t.stride()}")
    try:
        rows = t.view(-1, t.shape[-1])
    except RuntimeError:
        raise ValueError(f"{op}: {name} of shape {tuple(t.shape)} strides {t.stride()} is not a set of evenly "
                         "spaced rows") from None
    return rows.stride(0) if rows.shape[0] > 1 else t.shape[-1]


# ---------------------------------------------------------------------------- elementwise ops
def _rms_norm(kind: str, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None):
    op = "rms_norm"
    _check_device(op, kind, x=x, weight=weight, residual=residual)
    _check_dtype(op, "x", x, _DTYPE_CODES)
    hidden = x.shape[-1]
    _check_like(op, "weight", weight, (hidden,), x.dtype)
    _check_contiguous(op, "weight", weight)
    x_stride = _row_stride(op, "x", x)
    y = _empty_as(x)
    r, res_stride = None, 0
    if residual is not None:
        _check_like(op, "residual", residual, x.shape, x.dtype)
        res_stride = _row_stride(op, "residual", residual)
        r = _empty_as(x)
    rows = x.numel() // hidden if hidden else 0
    _launch(kind, "rms_norm", x, y.data_ptr(), 0 if r is None else r.data_ptr(), x.data_ptr(),
            0 if residual is None else residual.data_ptr(), weight.data_ptr(), rows, hidden,
            x_stride, res_stride, float(eps), _DTYPE_CODES[x.dtype])
    return y if residual is None else (y, r)


@register("rms_norm", "cuda")
def rms_norm_cuda(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    return _rms_norm("cuda", x, weight, eps, residual)


@register("rms_norm", "cpu")
def rms_norm_cpu(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    return _rms_norm("cpu", x, weight, eps, residual)


def _gelu_and_mul(kind: str, gate_up: torch.Tensor) -> torch.Tensor:
    op = "gelu_and_mul"
    _check_device(op, kind, gate_up=gate_up)
    _check_dtype(op, "gate_up", gate_up, _DTYPE_CODES)
    _check_contiguous(op, "gate_up", gate_up)
    if gate_up.shape[-1] % 2:
        raise ValueError(f"{op}: last dim of gate_up must be even, got shape {tuple(gate_up.shape)}")
    n = gate_up.shape[-1] // 2
    out = torch.empty((*gate_up.shape[:-1], n), dtype=gate_up.dtype, device=gate_up.device)
    rows = out.numel() // n if n else 0
    _launch(kind, "gelu_and_mul", gate_up, out.data_ptr(), gate_up.data_ptr(), rows, n, _DTYPE_CODES[gate_up.dtype])
    return out


@register("gelu_and_mul", "cuda")
def gelu_and_mul_cuda(gate_up: torch.Tensor) -> torch.Tensor:
    return _gelu_and_mul("cuda", gate_up)


@register("gelu_and_mul", "cpu")
def gelu_and_mul_cpu(gate_up: torch.Tensor) -> torch.Tensor:
    return _gelu_and_mul("cpu", gate_up)


def _rotary(kind: str, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, theta: float) -> None:
    op = "rotary"
    _check_device(op, kind, q=q, k=k, positions=positions)
    _check_dtype(op, "q", q, _DTYPE_CODES)
    _check_heads_dense(op, "q", q)
    _check_heads_dense(op, "k", k)
    tokens, hq, head_dim = q.shape
    if k.dtype != q.dtype or k.shape[0] != tokens or k.shape[2] != head_dim or head_dim % 2:
        raise ValueError(f"{op}: k {k.dtype} {tuple(k.shape)} must match q {q.dtype} {tuple(q.shape)} "
                         "in dtype, tokens and (even) head_dim")
    _check_like(op, "positions", positions, (tokens,), torch.int64)
    _check_contiguous(op, "positions", positions)
    inv_freq = rope_inv_freq(head_dim, theta, q.device)
    _launch(kind, "rotary", q, q.data_ptr(), k.data_ptr(), positions.data_ptr(), inv_freq.data_ptr(), tokens, hq,
            k.shape[1], head_dim, q.stride(0), k.stride(0), _DTYPE_CODES[q.dtype])


@register("rotary", "cuda")
def rotary_cuda(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, theta: float) -> None:
    _rotary("cuda", q, k, positions, theta)


@register("rotary", "cpu")
def rotary_cpu(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, theta: float) -> None:
    _rotary("cpu", q, k, positions, theta)


# ---------------------------------------------------------------------------------- attention
def _check_caches(op: str, k_cache: torch.Tensor, v_cache: torch.Tensor, dtype: torch.dtype) -> None:
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check_contiguous(op, name, c)
        if c.dim() != 4 or c.dtype != dtype:
            raise ValueError(f"{op}: {name} must be {dtype} [blocks, block_size, kv_heads, head_dim], "
                             f"got {c.dtype} {tuple(c.shape)}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"{op}: k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")


def _write_kv(kind: str, k, v, k_cache, v_cache, slot_mapping) -> None:
    op = "write_kv"
    _check_device(op, kind, k=k, v=v, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)
    _check_dtype(op, "k", k, _DTYPE_CODES)
    _check_caches(op, k_cache, v_cache, k.dtype)
    _check_heads_dense(op, "k", k)
    _check_heads_dense(op, "v", v)
    if k.shape != v.shape or v.dtype != k.dtype or tuple(k.shape[1:]) != tuple(k_cache.shape[2:]):
        raise ValueError(f"{op}: k {tuple(k.shape)} and v {tuple(v.shape)} must both be "
                         f"[tokens, {k_cache.shape[2]}, {k_cache.shape[3]}] of dtype {k_cache.dtype}")
    _check_like(op, "slot_mapping", slot_mapping, (k.shape[0],), torch.int64)
    _check_contiguous(op, "slot_mapping", slot_mapping)
    args = (k.data_ptr(), v.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), slot_mapping.data_ptr(),
            k.shape[0], k.shape[1] * k.shape[2], k.stride(0), v.stride(0), k.element_size())
    # On the CPU the kernel also bounds-checks the slots (a host read, free there).
    _launch(kind, "write_kv", k, *args, *((k_cache.shape[0] * k_cache.shape[1],) if kind == "cpu" else ()))


@register("write_kv", "cuda")
def write_kv_cuda(k, v, k_cache, v_cache, slot_mapping) -> None:
    _write_kv("cuda", k, v, k_cache, v_cache, slot_mapping)


@register("write_kv", "cpu")
def write_kv_cpu(k, v, k_cache, v_cache, slot_mapping) -> None:
    _write_kv("cpu", k, v, k_cache, v_cache, slot_mapping)


def _rotary_write_kv(kind: str, q, k, v, positions, theta, k_cache, v_cache, slot_mapping) -> None:
    """The two kernels in turn (the fused op's one-launch version is Triton's)."""
    _rotary(kind, q, k, positions, theta)
    _write_kv(kind, k, v, k_cache, v_cache, slot_mapping)


register("rotary_write_kv", "cuda")(functools.partial(_rotary_write_kv, "cuda"))
rotary_write_kv_cpu = register("rotary_write_kv", "cpu")(functools.partial(_rotary_write_kv, "cpu"))


@functools.lru_cache(maxsize=None)
def _partition_size(hq: int, hk: int, head_dim: int) -> int:
    return _ext().decode_partition_size(hq, hk, head_dim)


def _check_attention(kind: str, q, k_cache, v_cache, meta: AttnMetadata, dtypes) -> None:
    """The arguments of paged attention, as both native kernels read them."""
    op = "attention"
    _check_device(op, kind, q=q, k_cache=k_cache, v_cache=v_cache, cu_seqlens_q=meta.cu_seqlens_q,
                  context_lens=meta.context_lens, block_tables=meta.block_tables)
    _check_dtype(op, "q", q, dtypes)
    _check_heads_dense(op, "q", q)
    _check_caches(op, k_cache, v_cache, q.dtype)
    hq, head_dim, hk = q.shape[1], q.shape[2], k_cache.shape[2]
    if k_cache.shape[3] != head_dim or hq % hk:
        raise ValueError(f"{op}: q {tuple(q.shape)} does not fit cache {tuple(k_cache.shape)} "
                         "(head_dim must match, query heads a multiple of kv heads)")
    b = meta.num_seqs
    _check_like(op, "meta.context_lens", meta.context_lens, (b,), torch.int32)
    _check_like(op, "meta.cu_seqlens_q", meta.cu_seqlens_q, (b + 1,), torch.int32)
    if meta.block_tables.dim() != 2 or meta.block_tables.shape[0] != b or meta.block_tables.dtype != torch.int32 \
            or meta.block_tables.stride(1) != 1:
        raise ValueError(f"{op}: meta.block_tables must be int32 [{b}, max_blocks] with unit column stride, got "
                         f"{meta.block_tables.dtype} {tuple(meta.block_tables.shape)} strides {meta.block_tables.stride()}")
    for name in ("context_lens", "cu_seqlens_q"):
        _check_contiguous(op, f"meta.{name}", getattr(meta, name))


@register("attention", "cuda")
def attention_cuda(q, k_cache, v_cache, meta: AttnMetadata, scale: float, *,
                   tensor_cores: bool | None = None) -> torch.Tensor:
    """Split-K decode kernel when every sequence has at most one new token; else the Triton kernel.
    tensor_cores (None: whether "attention" is in TENSOR_CORE_OPS): the partitions' products on the
    tensor cores where a KV head has at most 8 query heads (csrc/attention.cu)."""
    if meta.max_query_len > 1:
        return select("attention", "triton", q.device)(q, k_cache, v_cache, meta, scale)
    _check_attention("cuda", q, k_cache, v_cache, meta, _HALF)
    tokens, hq, head_dim = q.shape
    hk, b = k_cache.shape[2], meta.num_seqs
    if head_dim not in (64, 128, 256):
        raise ValueError(f"attention: the CUDA decode kernel supports head_dim 64, 128, 256, got {head_dim}")
    out = torch.empty((tokens, hq, head_dim), dtype=q.dtype, device=q.device)
    if tokens == 0 or b == 0:
        return out
    part = _partition_size(hq, hk, head_dim)
    max_parts = max(1, math.ceil(meta.max_context_len / part))
    acc = m = s = None
    if max_parts > 1:
        acc = torch.empty((b, hq, max_parts, head_dim), dtype=torch.float32, device=q.device)
        m = torch.empty((b, hq, max_parts), dtype=torch.float32, device=q.device)
        s = torch.empty((b, hq, max_parts), dtype=torch.float32, device=q.device)
    _ext().decode_attention(
        out.data_ptr(), 0 if acc is None else acc.data_ptr(), 0 if m is None else m.data_ptr(),
        0 if s is None else s.data_ptr(), q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
        meta.cu_seqlens_q.data_ptr(), meta.context_lens.data_ptr(), meta.block_tables.data_ptr(), b, q.stride(0),
        meta.block_tables.stride(0), hq, hk, head_dim, k_cache.shape[1], max_parts, float(scale),
        _tensor_cores("attention", tensor_cores), _DTYPE_CODES[q.dtype], _stream(q))
    return out


@register("attention", "cpu")
def attention_cpu(q, k_cache, v_cache, meta: AttnMetadata, scale: float) -> torch.Tensor:
    """One kernel for every mix of prefill chunks, decode tokens and verify windows; see
    CPU_TORCH_PREFILL_TOKENS for the long chunks the generic kernel leaves to torch."""
    if meta.max_query_len >= CPU_TORCH_PREFILL_TOKENS and not _cpu_bf16_attention(q):
        return select("attention", "torch", q.device)(q, k_cache, v_cache, meta, scale)
    _check_attention("cpu", q, k_cache, v_cache, meta, _DTYPE_CODES)
    tokens, hq, head_dim = q.shape
    out = _empty_as(q)
    if tokens == 0 or meta.num_seqs == 0:
        return out
    tables = meta.block_tables
    _ext().cpu.paged_attention(
        out.data_ptr(), q.data_ptr(), tokens, k_cache.data_ptr(), v_cache.data_ptr(), meta.cu_seqlens_q.data_ptr(),
        meta.context_lens.data_ptr(), tables.data_ptr(), meta.num_seqs, q.stride(0), tables.stride(0),
        tables.shape[1], hq, k_cache.shape[2], head_dim, k_cache.shape[1], k_cache.shape[0], float(scale),
        _DTYPE_CODES[q.dtype])
    return out


# ----------------------------------------------------------------------------- dense linear
def _cpu_bf16_attention(q: torch.Tensor) -> bool:
    """Whether the C++ bf16 attention kernel (not the generic one) takes q (csrc/cpu/attention.cpp)."""
    return q.dtype == torch.bfloat16 and q.shape[-1] % 32 == 0 and q.shape[-1] <= 256 and cpu_packs_linear()


def cpu_packs_linear() -> bool:
    """Whether _C has the packed bf16 linear (built, for a CPU with AVX512-BF16)."""
    try:
        return bool(_ext().cpu.HAS_BF16_DOT)
    except ImportError:
        return False


def _check_packed(op: str, name: str, w: PackedWeight) -> None:
    """w.data is the contiguous bf16 [ceil(N / 16), ceil(K / 2), 16, 2] its shape (N, K) says."""
    n, k = w.shape
    if w.data.dtype != torch.bfloat16 or tuple(w.data.shape) != (-(-n // 16), -(-k // 2), 16, 2):
        raise ValueError(f"{op}: {name} data must be torch.bfloat16 [{-(-n // 16)}, {-(-k // 2)}, 16, 2] for "
                         f"shape {(n, k)}, got {w.data.dtype} {tuple(w.data.shape)}")
    _check_contiguous(op, name, w.data)


@register("linear_packed", "cpu")
def linear_packed_cpu(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """bf16 x [M, K] @ w^T (+ b) over a PackedWeight: the C++ AVX512-BF16 kernel."""
    op = "linear_packed"
    if not cpu_packs_linear():
        raise ValueError(f"{op}: gemforge._C was built without AVX512-BF16; keep the weight unpacked")
    _check_device(op, "cpu", x=x, weight=weight.data, bias=bias)
    n, k = weight.shape
    if x.dim() != 2 or x.shape[1] != k or x.dtype != torch.bfloat16:
        raise ValueError(f"{op}: x must be torch.bfloat16 [M, {k}], got {x.dtype} {tuple(x.shape)}")
    _check_packed(op, "weight", weight)
    if bias is not None:
        _check_like(op, "bias", bias, (n,), x.dtype)
        _check_contiguous(op, "bias", bias)
    x = x.contiguous()
    y = torch.empty((x.shape[0], n), dtype=x.dtype)
    _ext().cpu.linear_packed_bf16(y.data_ptr(), x.data_ptr(), weight.data.data_ptr(),
                                  0 if bias is None else bias.data_ptr(), x.shape[0], n, k)
    return y


def embed_packed_cpu(table: PackedWeight, ids: torch.Tensor, scale: float) -> torch.Tensor:
    """table.rows(ids) * scale in bf16 (the product in fp32, rounded once, as torch multiplies two
    bf16 tensors): the C++ gather from the packed table."""
    op = "embedding"
    if not cpu_packs_linear():
        raise ValueError(f"{op}: gemforge._C was built without AVX512-BF16")
    _check_device(op, "cpu", table=table.data, ids=ids)
    if ids.dtype != torch.int64:
        raise ValueError(f"{op}: ids must be int64, got {ids.dtype}")
    _check_packed(op, "table", table)
    n, k = table.shape
    flat = ids.reshape(-1).contiguous()
    out = torch.empty((*ids.shape, k), dtype=torch.bfloat16)
    _ext().cpu.embed_packed_bf16(out.data_ptr(), table.data.data_ptr(), flat.data_ptr(), flat.numel(), n, k, float(scale))
    return out


# ----------------------------------------------------------------------------------- argmax
@register("argmax", "cpu")
def argmax_cpu(scores: torch.Tensor) -> torch.Tensor:
    """fp32 rows with a unit last stride: the C++ kernel; anything else: torch."""
    if scores.dtype != torch.float32 or scores.stride(-1) != 1 or scores.dim() == 0:
        return argmax_ref(scores)
    _check_device("argmax", "cpu", scores=scores)
    n = scores.shape[-1]
    stride = _row_stride("argmax", "scores", scores)
    out = torch.empty(scores.shape[:-1], dtype=torch.int64)
    _ext().cpu.argmax(out.data_ptr(), scores.data_ptr(), out.numel(), n, stride)
    return out


# ------------------------------------------------------------------------- quantized linear
class _Fusion:
    """What a CUDA linear is asked to make besides x W^T: GeGLU of its product (geglu), the RMSNorm of its
    input (norm = (weight, eps, residual or None)) and RoPE with the cache write of a QKV projection (rope, a
    RotaryWrite), each in the linear's own launch where its kernel can (`geglu_fused`, `norm_fused`,
    `rope_fused`), else by the op's own kernel before or after it."""

    _NO_ROPE = (0,) * 8

    def __init__(self, op: str, n: int, geglu: bool, norm, prefetch: bool, rope: RotaryWrite | None = None):
        if geglu and n % 2:
            raise ValueError(f"{op}: geglu needs an even number of weight rows (gate and up), got {n}")
        if (geglu or norm is not None or rope is not None) and prefetch:
            raise ValueError(f"{op}: prefetch is not available with geglu, norm or rope")
        if geglu and rope is not None:
            raise ValueError(f"{op}: geglu and rope cannot be asked together")
        self.op, self.n, self.geglu, self.norm, self.rope = op, n, geglu, norm, rope
        self.geglu_fused = self.norm_fused = self.rope_fused = False
        self.stream = None  # the residual stream x (+ residual), where norm was asked

    def fuse(self, x: torch.Tensor, tensor_cores: bool, gemv: bool) -> torch.Tensor:
        """Decides what the kernel about to run makes (tensor_cores / gemv: which runs; neither: another op's
        kernel); returns the x to hand it: normalised here where the kernel will not do it."""
        m, k = x.shape
        paired = tensor_cores or (gemv and m <= FUSED_ROWS)  # (the kernels that pair rows: geglu, rope)
        self.geglu_fused = self.geglu and paired
        self.rope_fused = self.rope is not None and paired and self._rope_fits(x)
        if self.norm is None:
            return x
        weight, eps, residual = self.norm
        self.norm_fused = ((tensor_cores and m * k * x.element_size() <= MMA_NORM_BYTES) or gemv) and m <= FUSED_ROWS \
            and x.is_contiguous() and weight.is_contiguous() and (residual is None or residual.is_contiguous())
        if self.norm_fused:
            _check_like(self.op, "norm weight", weight, (k,), x.dtype)
            if residual is not None:
                _check_like(self.op, "residual", residual, x.shape, x.dtype)
            self.stream = x if residual is None else _empty_as(x)
            return x
        if residual is None:
            self.stream = x
            return _rms_norm("cuda", x, weight, eps, None)
        x, self.stream = _rms_norm("cuda", x, weight, eps, residual)
        return x

    def _rope_fits(self, x: torch.Tensor) -> bool:
        """Whether the kernel can take rope as given (else rotary_write_kv runs after it, and checks it)."""
        r, m = self.rope, x.shape[0]
        if r.k_cache.dim() != 4:
            return False
        kv_heads, head_dim = r.k_cache.shape[-2:]
        q_size = self.n - 2 * kv_heads * head_dim
        return (r.k_cache.shape == r.v_cache.shape and r.k_cache.dtype == x.dtype
                and r.v_cache.dtype == x.dtype and r.k_cache.is_contiguous() and r.v_cache.is_contiguous()
                and q_size > 0 and q_size % head_dim == 0 and head_dim % 2 == 0
                and all(t.dtype == torch.int64 and t.shape == (m,) and t.is_contiguous() and t.device == x.device
                        for t in (r.positions, r.slot_mapping))
                and r.k_cache.device == x.device and r.v_cache.device == x.device)

    def launch_args(self) -> tuple:
        """(geglu, norm_weight, residual, r_out, eps, rope) for the kernel (csrc/ops.h)."""
        rope = self._NO_ROPE
        if self.rope_fused:
            r = self.rope
            kv_heads, head_dim = r.k_cache.shape[-2:]
            inv_freq = rope_inv_freq(head_dim, r.theta, r.k_cache.device)
            rope = (r.positions.data_ptr(), inv_freq.data_ptr(), r.slot_mapping.data_ptr(), r.k_cache.data_ptr(),
                    r.v_cache.data_ptr(), self.n // head_dim - 2 * kv_heads, kv_heads, head_dim)
        if not self.norm_fused:
            return self.geglu_fused, 0, 0, 0, 0.0, rope
        weight, eps, residual = self.norm
        return (self.geglu_fused, weight.data_ptr(), 0 if residual is None else residual.data_ptr(),
                0 if residual is None else self.stream.data_ptr(), float(eps), rope)

    def out_features(self, n: int) -> int:
        return n // 2 if self.geglu_fused else n

    def result(self, y: torch.Tensor):
        """The op's result from its kernel's output y: GeGLU applied, RoPE and the cache write done, and with
        norm the residual stream too."""
        if self.geglu and not self.geglu_fused:
            y = _gelu_and_mul("cuda", y)
        if self.rope is not None and not self.rope_fused:
            self.rope.apply(y)
        return y if self.norm is None else (y, self.stream)


def _linear_quant(kind: str, fmt: str, x, qweight, scales, zeros, group_size, bias, max_ctas: int = 0,
                  prefetch: bool = False, tensor_cores: bool | None = None, k_split: int = 0, geglu: bool = False,
                  norm: tuple | None = None, rope: RotaryWrite | None = None):
    """The CUDA GEMV (up to MAX_GEMV_ROWS rows; with tensor_cores up to MAX_MMA_ROWS; more go to
    Triton) or the C++ CPU kernel (bf16 x, K a multiple of 32; anything else goes to torch). max_ctas
    (CUDA GEMV): 0 lets the kernel size its grid; n > 0 caps it at n CTAs (tests, benchmarks); prefetch
    (CUDA GEMV): each warp requests its next rows' weights into L2 as it starts a row group (a variant
    the benchmarks time, off by default); tensor_cores (CUDA; None follows TENSOR_CORE_OPS; int8 needs K a
    multiple of 64); k_split (tensor cores): warps sharing a tile's K, 0 = chosen. CUDA only: geglu returns
    gelu_and_mul(x W^T) [M, N/2] (W's rows [gate; up]); norm = (weight, eps, residual or None) takes x
    through rms_norm(x (+ residual), weight, eps) first and returns (y, x + residual or x); rope (a RotaryWrite,
    y the QKV projection) rotates y's q and k heads and writes its k and v heads to the cache: each in the
    GEMV's own launch where it can (_Fusion), else by their ops' kernels."""
    op = f"linear_{fmt}"
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be [M, K], got shape {tuple(x.shape)}")
    m, k = x.shape
    fusion = _Fusion(op, qweight.shape[0], geglu, norm, prefetch, rope) if kind == "cuda" else None
    tensor_cores = (kind == "cuda" and _tensor_cores(op, tensor_cores) and m <= MAX_MMA_ROWS and x.data_ptr() % 16 == 0
                    and (fmt == "int4" or k % 64 == 0))
    gemv = kind == "cuda" and not tensor_cores and m <= MAX_GEMV_ROWS and not (fmt == "int8" and k % 16)
    if kind == "cuda":
        x = fusion.fuse(x, tensor_cores, gemv)
    if kind == "cuda" and not (tensor_cores or gemv):
        return fusion.result(select(op, "triton", x.device)(x, qweight, scales, zeros, group_size, bias))
    if kind == "cpu":
        if not (cpu_packs_linear() and x.dtype == torch.bfloat16 and k % 32 == 0):
            return select(op, "torch", x.device)(x, qweight, scales, zeros, group_size, bias)
        x = x.contiguous()
    _check_device(op, kind, x=x, qweight=qweight, scales=scales, zeros=zeros, bias=bias)
    _check_dtype(op, "x", x, _HALF)
    _check_contiguous(op, "x", x)
    n = qweight.shape[0]
    if fmt == "int8":
        _check_like(op, "qweight", qweight, (n, k), torch.int8)
        _check_like(op, "scales", scales, (n,), x.dtype)
        if zeros is not None:
            raise ValueError(f"{op}: int8 weights are symmetric; zeros must be None")
    else:
        if group_size not in (32, 64, 128) or k % group_size:
            raise ValueError(f"{op}: group_size must be 32, 64 or 128 and divide K={k}, got {group_size}")
        _check_like(op, "qweight", qweight, (n, k // 2), torch.uint8)
        _check_like(op, "scales", scales, (n, k // group_size), x.dtype)
        if zeros is not None:
            _check_like(op, "zeros", zeros, (n, k // group_size), x.dtype)
            _check_contiguous(op, "zeros", zeros)
    for name, t in (("qweight", qweight), ("scales", scales)):
        _check_contiguous(op, name, t)
    if bias is not None:
        _check_like(op, "bias", bias, (n,), x.dtype)
        _check_contiguous(op, "bias", bias)
    y = torch.empty((m, fusion.out_features(n) if fusion else n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return fusion.result(y) if fusion else y
    b = 0 if bias is None else bias.data_ptr()
    if kind == "cpu":
        if fmt == "int8":
            _ext().cpu.linear_int8_bf16(y.data_ptr(), x.data_ptr(), qweight.data_ptr(), scales.data_ptr(), b, m, n, k)
        else:
            _ext().cpu.linear_int4_bf16(y.data_ptr(), x.data_ptr(), qweight.data_ptr(), scales.data_ptr(),
                                        0 if zeros is None else zeros.data_ptr(), b, m, n, k, group_size)
    elif tensor_cores and fmt == "int8":
        _ext().w8a16_mma(y.data_ptr(), x.data_ptr(), qweight.data_ptr(), scales.data_ptr(), b, m, n, k, k_split,
                         *fusion.launch_args(), _DTYPE_CODES[x.dtype], _stream(x))
    elif tensor_cores:
        _ext().w4a16_mma(y.data_ptr(), x.data_ptr(), qweight.data_ptr(), scales.data_ptr(),
                         0 if zeros is None else zeros.data_ptr(), b, m, n, k, group_size, k_split,
                         *fusion.launch_args(), _DTYPE_CODES[x.dtype], _stream(x))
    elif fmt == "int8":
        _ext().w8a16_gemm(y.data_ptr(), x.data_ptr(), qweight.data_ptr(), scales.data_ptr(), b, m, n, k,
                          max_ctas, prefetch, *fusion.launch_args(), _DTYPE_CODES[x.dtype], _stream(x))
    else:
        _ext().w4a16_gemm(y.data_ptr(), x.data_ptr(), qweight.data_ptr(), scales.data_ptr(),
                          0 if zeros is None else zeros.data_ptr(), b, m, n, k, group_size, max_ctas, prefetch,
                          *fusion.launch_args(), _DTYPE_CODES[x.dtype], _stream(x))
    return fusion.result(y) if fusion else y


@register("linear", "cuda")
def linear_cuda(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                max_ctas: int = 0, prefetch: bool = False, tensor_cores: bool | None = None,
                k_split: int = 0, geglu: bool = False, norm: tuple | None = None, rope: RotaryWrite | None = None):
    """Dense x [..., K] @ weight [N, K]^T (+ b) in fp16/bf16, up to MAX_GEMV_ROWS rows, K a multiple of
    8: the quantized GEMV's kernel over the plain weight (csrc/quant_gemv.cu, DenseFormat); with
    tensor_cores (None: TENSOR_CORE_OPS) up to MAX_MMA_ROWS rows, K a multiple of 32, on the tensor cores
    (dense_mma); anything else: torch (cuBLAS), which also stays "auto"'s choice until the GPU suite has
    timed them (benchmarks/kernels/bench_cuda_ops.py::test_linear_dense). geglu, norm and rope (x [M, K]) as
    for the quantized linears (_linear_quant); after cuBLAS by their ops."""
    op = "linear"
    _check_device(op, "cuda", x=x, weight=weight, bias=bias)
    if (norm is not None or rope is not None) and x.dim() != 2:
        raise ValueError(f"{op}: with norm or rope, x must be [M, K], got shape {tuple(x.shape)}")
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
    fusion = _Fusion(op, weight.shape[0], geglu, norm, prefetch, rope)
    ours = (x.dtype in _HALF and weight.dtype == x.dtype and k % 8 == 0 and weight.dim() == 2
            and weight.is_contiguous() and weight.data_ptr() % 16 == 0)
    if ours:
        if weight.shape[1] != k:
            raise ValueError(f"{op}: x has {k} features, the weight {tuple(weight.shape)}")
        if bias is not None:
            _check_like(op, "bias", bias, (weight.shape[0],), x.dtype)
            _check_contiguous(op, "bias", bias)
    x2 = x if x.dim() == 2 else x.reshape(rows, k)
    if ours:
        x2 = x2.contiguous()
    mma = ours and _tensor_cores(op, tensor_cores) and rows <= MAX_MMA_ROWS and k % 32 == 0 and x2.data_ptr() % 16 == 0
    gemv = ours and not mma and rows <= MAX_GEMV_ROWS
    x2 = fusion.fuse(x2, mma, gemv)
    n = weight.shape[0]
    if not (mma or gemv):
        y = select(op, "torch", x.device)(x2, weight, bias)
    else:
        y = torch.empty((rows, fusion.out_features(n)), dtype=x.dtype, device=x.device)
        b = 0 if bias is None else bias.data_ptr()
        if rows and n and mma:
            _ext().dense_mma(y.data_ptr(), x2.data_ptr(), weight.data_ptr(), b, rows, n, k, k_split,
                             *fusion.launch_args(), _DTYPE_CODES[x.dtype], _stream(x))
        elif rows and n:
            _ext().dense_gemv(y.data_ptr(), x2.data_ptr(), weight.data_ptr(), b, rows, n, k, max_ctas, prefetch,
                              *fusion.launch_args(), _DTYPE_CODES[x.dtype], _stream(x))
    out = fusion.result(y)
    return out if norm is not None else out.reshape(*x.shape[:-1], out.shape[-1])


# cuBLAS first for dense weights: the CUDA GEMV above is a peer to be timed, not yet a measured win.
prefer("linear", "torch", "cuda")


@register("linear_int8", "cuda")
def linear_int8_cuda(x, qweight, scales, zeros, group_size, bias=None, *, max_ctas: int = 0,
                     prefetch: bool = False, tensor_cores: bool | None = None, k_split: int = 0,
                     geglu: bool = False, norm: tuple | None = None, rope: RotaryWrite | None = None):
    return _linear_quant("cuda", "int8", x, qweight, scales, zeros, group_size, bias, max_ctas, prefetch, tensor_cores,
                         k_split, geglu, norm, rope)


@register("linear_int4", "cuda")
def linear_int4_cuda(x, qweight, scales, zeros, group_size, bias=None, *, max_ctas: int = 0,
                     prefetch: bool = False, tensor_cores: bool | None = None, k_split: int = 0,
                     geglu: bool = False, norm: tuple | None = None, rope: RotaryWrite | None = None):
    return _linear_quant("cuda", "int4", x, qweight, scales, zeros, group_size, bias, max_ctas, prefetch, tensor_cores,
                         k_split, geglu, norm, rope)


# The linears that take geglu, norm and rope (FUSE_INTO_LINEARS).
FUSING_LINEARS = frozenset({linear_cuda, linear_int8_cuda, linear_int4_cuda})


@register("linear_int8", "cpu")
def linear_int8_cpu(x, qweight, scales, zeros, group_size, bias=None) -> torch.Tensor:
    return _linear_quant("cpu", "int8", x, qweight, scales, zeros, group_size, bias)


@register("linear_int4", "cpu")
def linear_int4_cpu(x, qweight, scales, zeros, group_size, bias=None) -> torch.Tensor:
    return _linear_quant("cpu", "int4", x, qweight, scales, zeros, group_size, bias)
