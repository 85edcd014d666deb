"""CUDA (gemforge.kernels._C) backends against their peers on CodeGemma shapes, on a CUDA device.

Peers: the Triton backend and the torch reference of the same op; for the quantized GEMVs also
the same CUDA kernel launched with one CTA per 16 rows (each staging x: its grid before it kept
only the CTAs the device holds at once), dense bf16 cuBLAS (F.linear) and torch's own weight-only
kernels (torch._weight_int8pack_mm, torch._weight_int4pack_mm) where this torch build has them; the
dense GEMV (that kernel over a plain bf16 weight) against cuBLAS. GB/s in benchmark.extra_info
counts every input read once and every output written once (common.compare); for the GEMVs that is
dominated by the (packed) weight bytes. Skipped without CUDA or without the built extension.
"""
from __future__ import annotations

import importlib
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from common import DTYPE, MODELS, ON_GPU, compare, nbytes
import gemforge.kernels._native  # noqa: F401  (registers the cuda backends)
from gemforge.kernels import AttnMetadata, select
from gemforge.kernels.quant import quantize_int4, quantize_int8


def _skip_reason():
    if not ON_GPU:
        return "needs a CUDA device"
    try:
        importlib.import_module("gemforge.kernels._C")
    except ImportError as e:
        return f"gemforge.kernels._C is not built ({e})"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))
DEV = "cuda"
DECODE_TOKENS = (1, 16, 128)


def impls(op, *args):
    """cuda first (the benchmarked subject), then triton and torch."""
    return {b: (lambda fn=select(op, b, DEV): fn(*args)) for b in ("cuda", "triton", "torch")}


# The GEMVs first: they decide defaults still off (the tensor-core int4 kernel, the dense GEMV), and
# the GPU suite's part keeps what ran before its time limit.
GEMV_SHAPES = {  # (N, K) of the projections that dominate decode
    "2b_qkv": (2560, 2048), "2b_gate_up": (32768, 2048), "2b_down": (2048, 16384),
    "7b_qkv": (12288, 3072), "7b_gate_up": (49152, 3072), "7b_down": (3072, 24576),
}


def _try_peer(name, fn):
    try:
        fn()
        return fn
    except Exception as e:  # a peer this torch build lacks on CUDA is left out
        warnings.warn(f"{name} unavailable: {type(e).__name__}: {e}")
        return None


def _torch_int8_peer(x, qw):
    if not hasattr(torch, "_weight_int8pack_mm"):
        return None
    return _try_peer("torch._weight_int8pack_mm", lambda: torch._weight_int8pack_mm(x, qw.qweight, qw.scales))


def _torch_int4_peer(x, n, k, group):
    if not (hasattr(torch, "_weight_int4pack_mm") and hasattr(torch, "_convert_weight_to_int4pack")):
        return None
    try:  # tinygemm layout; random codes, as only the timing matters
        packed = torch._convert_weight_to_int4pack(
            torch.randint(0, 256, (n, k // 2), device=DEV, dtype=torch.uint8), 8)
        sz = torch.randn(k // group, n, 2, device=DEV, dtype=torch.bfloat16)
    except Exception as e:
        warnings.warn(f"torch._convert_weight_to_int4pack unavailable: {type(e).__name__}: {e}")
        return None
    return _try_peer("torch._weight_int4pack_mm", lambda: torch._weight_int4pack_mm(x, packed, group, sz))


@pytest.mark.parametrize("shape", GEMV_SHAPES)
@pytest.mark.parametrize("fmt", ("int8", "int4"))
def test_linear_quant(benchmark, shape, fmt):
    """One row of x: the CUDA GEMV serves MAX_GEMV_ROWS = 1 (more rows go to the Triton GEMM, which
    bench_linear times at 1 to 512 rows)."""
    n, k, m = *GEMV_SHAPES[shape], 1
    w = torch.randn(n, k, device=DEV, dtype=DTYPE)
    x = torch.randn(m, k, device=DEV, dtype=DTYPE)
    qw = quantize_int8(w) if fmt == "int8" else quantize_int4(w, 128)
    args = (x, qw.qweight, qw.scales, qw.zeros, qw.group_size, None)
    fns = impls(f"linear_{fmt}", *args)
    flat = select(f"linear_{fmt}", "cuda", DEV)  # one CTA per 16 rows, x staged by each (the grid before)
    fns["cuda_cta_per_rows"] = lambda: flat(*args, max_ctas=2**31 - 1)
    fns["cuda_prefetch"] = lambda: flat(*args, prefetch=True)  # next rows into L2 ahead
    fns["cuda_mma"] = lambda: flat(*args, tensor_cores=True)  # the tensor-core kernel (off until timed here)
    fns["cublas_bf16"] = lambda: F.linear(x, w)
    fns[f"torch_{fmt}"] = _torch_int8_peer(x, qw) if fmt == "int8" else _torch_int4_peer(x, n, k, 128)
    parts = [t for t in (qw.qweight, qw.scales, qw.zeros, x) if t is not None]
    compare(benchmark, fns, nbytes(*parts) + m * n * x.element_size())


@pytest.mark.parametrize("shape", ("2b_gate_up", "2b_down", "7b_qkv", "7b_gate_up", "7b_down"))
@pytest.mark.parametrize("m", (4, 8, 16))
@pytest.mark.parametrize("fmt", ("int4", "int8"))
def test_linear_quant_rows(benchmark, shape, m, fmt):
    """int4 (g128) and int8 on the tensor cores at 4-16 rows of x (decode batches; one row is
    test_linear_quant's cuda_mma), against the Triton GEMM that serves those rows now, cuBLAS over the
    bf16 weight and torch's own weight-only kernel."""
    n, k = GEMV_SHAPES[shape]
    w = torch.randn(n, k, device=DEV, dtype=DTYPE)
    x = torch.randn(m, k, device=DEV, dtype=DTYPE)
    qw = quantize_int8(w) if fmt == "int8" else quantize_int4(w, 128)
    args = (x, qw.qweight, qw.scales, qw.zeros, qw.group_size, None)
    cuda = select(f"linear_{fmt}", "cuda", DEV)
    fns = {"cuda_mma": lambda: cuda(*args, tensor_cores=True), "triton": lambda: cuda(*args, tensor_cores=False),
           "cublas_bf16": lambda: F.linear(x, w),
           f"torch_{fmt}": _torch_int8_peer(x, qw) if fmt == "int8" else _torch_int4_peer(x, n, k, 128)}
    parts = [t for t in (qw.qweight, qw.scales, qw.zeros, x) if t is not None]
    compare(benchmark, fns, nbytes(*parts) + m * n * x.element_size())


DENSE_SHAPES = {**GEMV_SHAPES, "7b_o": (3072, 4096), "2b_lm_head": (256000, 2048)}


@pytest.mark.parametrize("shape", DENSE_SHAPES)
@pytest.mark.parametrize("m", (1, 8, 16))
def test_linear_dense(benchmark, shape, m):
    """bf16 linears of decode batches: at one row the quantized GEMV's kernel over the plain weight, at
    1-16 rows the tensor-core kernel (dense_mma), against cuBLAS (F.linear, "auto"'s choice for dense
    weights until this says otherwise)."""
    n, k = DENSE_SHAPES[shape]
    w = torch.randn(n, k, device=DEV, dtype=DTYPE)
    x = torch.randn(m, k, device=DEV, dtype=DTYPE)
    ours = select("linear", "cuda", DEV)
    fns = {"cuda_mma": lambda: ours(x, w, tensor_cores=True), "cublas": lambda: F.linear(x, w)}
    if m == 1:
        fns.update(cuda=lambda: ours(x, w, tensor_cores=False), cuda_prefetch=lambda: ours(x, w, prefetch=True))
    compare(benchmark, fns, nbytes(w, x) + m * n * x.element_size())


def one_row_linear(shape: str, fmt: str):
    """(x [1, K], the CUDA linear of a random weight of GEMV_SHAPES[shape] in fmt as a function of its keyword
    arguments, the weight's tensors): the one-row linears the fused epilogues are timed on."""
    n, k = GEMV_SHAPES[shape]
    w = torch.randn(n, k, device=DEV, dtype=DTYPE)
    x = torch.randn(1, k, device=DEV, dtype=DTYPE)
    if fmt == "dense":
        return x, (lambda **kw: select("linear", "cuda", DEV)(x, w, **kw)), [w]
    qw = quantize_int8(w) if fmt == "int8" else quantize_int4(w, 128)
    cuda = select(f"linear_{fmt}", "cuda", DEV)
    return (x, lambda **kw: cuda(x, qw.qweight, qw.scales, qw.zeros, qw.group_size, **kw),
            [t for t in (qw.qweight, qw.scales, qw.zeros) if t is not None])


@pytest.mark.parametrize("shape", ("2b_gate_up", "7b_gate_up"))
@pytest.mark.parametrize("fmt", ("int4", "int8", "dense"))
def test_linear_geglu(benchmark, shape, fmt):
    """The gate_up projection at one row with GeGLU in the linear's epilogue (geglu=True, "auto"'s path
    for the model: kernels._native.FUSE_INTO_LINEARS) against the same linear then the gelu_and_mul kernel, on
    the CUDA-core GEMV and on the tensor-core kernel."""
    x, lin, parts = one_row_linear(shape, fmt)
    gelu = select("gelu_and_mul", "cuda", DEV)
    fns = {"cuda_geglu": lambda: lin(tensor_cores=False, geglu=True),
           "cuda_then_gelu": lambda: gelu(lin(tensor_cores=False)),
           "cuda_mma_geglu": lambda: lin(tensor_cores=True, geglu=True),
           "cuda_mma_then_gelu": lambda: gelu(lin(tensor_cores=True))}
    compare(benchmark, fns, nbytes(*parts, x) + GEMV_SHAPES[shape][0] // 2 * x.element_size())


@pytest.mark.parametrize("shape", ("2b_qkv", "7b_qkv"))
@pytest.mark.parametrize("fmt", ("int4", "int8", "dense"))
def test_linear_rope(benchmark, shape, fmt):
    """The QKV projection at one row with RoPE and the cache write in the linear's epilogue (rope=, "auto"'s
    path for the model: kernels._native.FUSE_INTO_LINEARS) against the same linear then rotary_write_kv
    ("auto"'s kernel for it: Triton's), on the CUDA-core GEMV and on the tensor-core kernel."""
    from gemforge.kernels import RotaryWrite

    x, lin, parts = one_row_linear(shape, fmt)
    hk, d = (1, 256) if shape == "2b_qkv" else (16, 256)
    caches = [torch.zeros(64, 16, hk, d, device=DEV, dtype=DTYPE) for _ in range(2)]
    rope = RotaryWrite(torch.tensor([1000], device=DEV), 10000.0, *caches, torch.tensor([77], device=DEV))
    fns = {"cuda_rope": lambda: lin(tensor_cores=False, rope=rope),
           "cuda_then_rope": lambda: rope.apply(lin(tensor_cores=False)),
           "cuda_mma_rope": lambda: lin(tensor_cores=True, rope=rope),
           "cuda_mma_then_rope": lambda: rope.apply(lin(tensor_cores=True))}
    compare(benchmark, fns, nbytes(*parts, x) + (GEMV_SHAPES[shape][0] + 2 * hk * d) * x.element_size())


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("tokens", DECODE_TOKENS)
@pytest.mark.parametrize("fused", (False, True))
def test_rms_norm(benchmark, model, tokens, fused):
    h = MODELS[model]["hidden"]
    x, w = torch.randn(tokens, h, device=DEV, dtype=DTYPE), torch.randn(h, device=DEV, dtype=DTYPE)
    res = torch.randn_like(x) if fused else None
    compare(benchmark, impls("rms_norm", x, w, 1e-6, res), nbytes(x, w, x) + (2 * nbytes(x) if fused else 0))


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("tokens", DECODE_TOKENS)
def test_gelu_and_mul(benchmark, model, tokens):
    gu = torch.randn(tokens, 2 * MODELS[model]["inter"], device=DEV, dtype=DTYPE)
    compare(benchmark, impls("gelu_and_mul", gu), nbytes(gu) * 3 // 2)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("tokens", DECODE_TOKENS)
def test_rotary(benchmark, model, tokens):
    c = MODELS[model]
    hq, hk, d = c["heads"], c["kv_heads"], c["head_dim"]
    qkv = torch.randn(tokens, (hq + 2 * hk) * d, device=DEV, dtype=DTYPE)
    q = qkv[:, : hq * d].view(tokens, hq, d)
    k = qkv[:, hq * d: (hq + hk) * d].view(tokens, hk, d)
    pos = torch.randint(0, 4096, (tokens,), device=DEV)
    compare(benchmark, impls("rotary", q, k, pos, 10000.0), 2 * (nbytes(q) + nbytes(k)) + nbytes(pos))


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("batch", (1, 16, 64))
@pytest.mark.parametrize("context", (512, 4096))
def test_decode_attention(benchmark, model, batch, context):
    c = MODELS[model]
    hq, hk, d, bs = c["heads"], c["kv_heads"], c["head_dim"], 16
    per = math.ceil(context / bs)
    k_cache = torch.randn(batch * per, bs, hk, d, device=DEV, dtype=DTYPE)
    v_cache = torch.randn_like(k_cache)
    table = torch.randperm(batch * per, device=DEV, dtype=torch.int32).view(batch, per)
    meta = AttnMetadata(positions=torch.full((batch,), context - 1, device=DEV),
                        cu_seqlens_q=torch.arange(batch + 1, device=DEV, dtype=torch.int32),
                        context_lens=torch.full((batch,), context, device=DEV, dtype=torch.int32),
                        block_tables=table, slot_mapping=torch.full((batch,), -1, device=DEV),
                        max_query_len=1, max_context_len=context)
    q = torch.randn(batch, hq, d, device=DEV, dtype=DTYPE)
    fns = impls("attention", q, k_cache, v_cache, meta, d ** -0.5)
    cuda = select("attention", "cuda", DEV)  # its partitions on the tensor cores (off by default until timed)
    fns["cuda_mma"] = lambda: cuda(q, k_cache, v_cache, meta, d ** -0.5, tensor_cores=True)
    if batch * context > 16 * 512:
        fns.pop("torch")  # the per-sequence Python loop reference takes seconds here
    compare(benchmark, fns, 2 * batch * context * hk * d * k_cache.element_size() + 2 * nbytes(q))


# --------------------------------------------------------------------------- quantized GEMV
