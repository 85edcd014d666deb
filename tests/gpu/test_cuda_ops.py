"""Every "cuda" backend against its torch reference on random data (fresh seed per case, odd sizes,
fp16 and bf16), judged by numerics.assert_close: error(cuda) <= 2 x error(torch in the same low
precision) + floor, both against the reference run in fp32. Outputs are NaN-poisoned (nan_empty).

Each case runs twice: on the GPU ("cuda", skipped without one) and on the emulated device of csrc/emu/
("emulated": the same kernels built as host C++ into gemforge.kernels._C_emu, each CUDA thread a fiber,
mma.sync by its fragment layout; CPU tensors), so that CI runs every kernel's code without a GPU. The
emulation runs the kernels' arithmetic, indexing, barriers and warp collectives; it cannot show races
the GPU's memory model allows, timing, or what the compiler does to the code."""
import importlib
import math
import sys

import pytest
import torch

import gemforge.kernels._native as native
from gemforge.kernels import AttnMetadata, select
from gemforge.kernels.quant import quantize_int4, quantize_int8
from numerics import assert_close


def _skip_reason():
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        importlib.import_module("gemforge.kernels._C")
    except ImportError as e:
        return f"gemforge.kernels._C is not built ({e})"
    return None


HALF = (torch.float16, torch.bfloat16)


def dtype_id(dtype):
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


DEV = "cuda"  # the torch device of the running case: "cpu" on the emulated device


def _no_triton(op, backend="auto", device="cpu"):
    """select() for the emulated cases: what a wrapper hands to Triton is tests/kernels' (the interpreter)."""
    if backend == "triton":
        pytest.skip(f"{op}: the wrapper delegates this case to Triton")
    return select(op, backend, device)


@pytest.fixture(autouse=True, params=[pytest.param("cuda", marks=pytest.mark.gpu), "emulated"])
def cuda_device(request, monkeypatch):
    """Where each case runs: the GPU, or the emulated device (the conftest's emulated_cuda) with CPU tensors."""
    if request.param == "cuda":
        why = _skip_reason()
        if why is not None:
            pytest.skip(why)
    else:
        request.getfixturevalue("emulated_cuda")
        monkeypatch.setattr(native, "select", _no_triton)
        monkeypatch.setattr(sys.modules[__name__], "DEV", "cpu")
    return request.param


@pytest.fixture(autouse=True)
def _seed(request):
    torch.manual_seed(hash(request.node.nodeid) % (2**31))


def cuda(op):
    return select(op, "cuda", DEV)


def ref(op):
    return select(op, "torch", DEV)


# -------------------------------------------------------------------------------- rms_norm
@pytest.mark.parametrize("dtype", (torch.float32, *HALF), ids=dtype_id)
@pytest.mark.parametrize("hidden", (8, 769, 2048, 3072))
@pytest.mark.parametrize("tokens", (1, 7, 83))
@pytest.mark.parametrize("fused", (False, True))
def test_rms_norm(nan_empty, dtype, hidden, tokens, fused):
    x = torch.randn(tokens, hidden, device=DEV).to(dtype)
    w = (0.1 * torch.randn(hidden, device=DEV)).to(dtype)
    res = torch.randn(tokens, hidden, device=DEV).to(dtype) if fused else None
    out = cuda("rms_norm")(x, w, 1e-6, res)
    lp = ref("rms_norm")(x, w, 1e-6, res)
    r32 = ref("rms_norm")(x.float(), w.float(), 1e-6, None if res is None else res.float())
    if fused:
        assert torch.equal(out[1], lp[1]), "residual sum must equal torch's x + residual exactly"
        out, lp, r32 = out[0], lp[0], r32[0]
    assert_close(out, r32, lp, what=f"rms_norm {dtype} {hidden}")


def test_rms_norm_strided_rows(nan_empty):
    buf = torch.randn(5, 3 * 1024, device=DEV, dtype=torch.bfloat16)
    x = buf[:, 1024:2048]  # a row-strided view
    w = torch.randn(1024, device=DEV, dtype=torch.bfloat16)
    assert_close(cuda("rms_norm")(x, w, 1e-6), ref("rms_norm")(x.float(), w.float(), 1e-6),
                 ref("rms_norm")(x, w, 1e-6))


# ---------------------------------------------------------------------------- gelu_and_mul
@pytest.mark.parametrize("dtype", (torch.float32, *HALF), ids=dtype_id)
@pytest.mark.parametrize("inter", (8, 769, 2048, 16384))
@pytest.mark.parametrize("tokens", (1, 7, 83))
def test_gelu_and_mul(nan_empty, dtype, inter, tokens):
    gu = (2 * torch.randn(tokens, 2 * inter, device=DEV)).to(dtype)
    assert_close(cuda("gelu_and_mul")(gu), ref("gelu_and_mul")(gu.float()), ref("gelu_and_mul")(gu))


# ------------------------------------------ the QKV projection with RoPE and the cache write in its epilogue
def _rope_case(dtype, m, hq, hk, d, blocks=4, block_size=16):
    """A RotaryWrite of m tokens at random positions into random slots of random caches (one slot -1: skipped
    where m > 1), and a copy of the caches."""
    caches = [torch.randn(blocks, block_size, hk, d, device=DEV).to(dtype) for _ in range(2)]
    slots = torch.randperm(blocks * block_size, device=DEV)[:m]
    if m > 1:
        slots[m // 2] = -1
    positions = torch.randint(0, 8192, (m,), device=DEV)
    return (native.RotaryWrite(positions, 10000.0, caches[0], caches[1], slots.contiguous()),
            [c.clone() for c in caches])


def _rope_reference(x, w, rope, caches, norm_weight=None):
    """The torch ops in x's dtype: (rms_norm then) the linear, rotary_write_kv into `caches`; (y, caches)."""
    y = _linear_any("torch", x if norm_weight is None else ref("rms_norm")(x, norm_weight, 1e-6), w, None)
    rope._replace(k_cache=caches[0], v_cache=caches[1]).apply(y, ref("rotary_write_kv"))
    return y, caches


def _check_rope(out, x, w, rope, before, what, norm_weight=None):
    """out and rope's caches against _rope_reference in fp32 and in x's dtype; slots not written unchanged."""
    y32, c32 = _rope_reference(x.float(), w, rope, [c.float() for c in before],
                               None if norm_weight is None else norm_weight.float())
    ylp, clp = _rope_reference(x, w, rope, [c.clone() for c in before], norm_weight)
    assert_close(out, y32, ylp, what=what)
    hk, d = before[0].shape[-2:]
    written = torch.zeros(before[0].shape[0] * before[0].shape[1], dtype=torch.bool, device=DEV)
    written[rope.slot_mapping[rope.slot_mapping >= 0]] = True
    for name, ours, want32, want, old in zip("kv", (rope.k_cache, rope.v_cache), c32, clp, before):
        ours, want32, want, old = (c.view(-1, hk, d) for c in (ours, want32, want, old))
        assert_close(ours[written], want32[written], want[written], what=f"{what} {name}_cache")
        assert torch.equal(ours[~written], old[~written]), f"{what}: {name}_cache written outside its slots"


@pytest.mark.parametrize("dtype", HALF, ids=dtype_id)
@pytest.mark.parametrize("fmt_group", (("int8", None), ("int4", 32), ("int4", 64), ("dense", None)))
@pytest.mark.parametrize("m", (1, 3, 16))
@pytest.mark.parametrize("heads", ((8, 1, 256), (3, 2, 64)))
@pytest.mark.parametrize("norm", (False, True))
@pytest.mark.parametrize("tensor_cores", (False, True))
def test_linear_rope(nan_empty, monkeypatch, dtype, fmt_group, m, heads, norm, tensor_cores):
    """rope=RotaryWrite(...): the QKV projection y [M, (Hq + 2 Hk) D] with its q and k heads rotated at each
    row's position and its k and v heads written to each row's cache slot (a slot of -1 skipped), from the
    linear's own launch, with and without the input's norm: on the CUDA-core GEMV (MAX_GEMV_ROWS raised: up to
    FUSED_ROWS rows, more by rotary_write_kv after it) and the tensor-core kernel; the 2B's heads (8 q, 1 kv,
    D = 256) and a small MHA-like shape (3 q, 2 kv, D = 64: pairs past a multiple of 8 rows). Against the torch
    linear and rotary_write_kv in fp32; the cache slots not written stay as they were, exactly."""
    fmt, group = fmt_group
    hq, hk, d = heads
    if fmt == "dense" and m > 4 and not tensor_cores:
        pytest.skip("the dense CUDA-core GEMV takes up to 4 rows")
    monkeypatch.setattr(native, "MAX_GEMV_ROWS", 16)
    n, k = (hq + 2 * hk) * d, 768
    w = _quantized(fmt, (torch.randn(n, k, device=DEV) * k ** -0.5).to(dtype), group)
    x = torch.randn(m, k, device=DEV).to(dtype)
    nw = (torch.randn(k, device=DEV) * 0.5).to(dtype) if norm else None
    rope, before = _rope_case(dtype, m, hq, hk, d)
    out = _linear_any("cuda", x, w, None, rope=rope, norm=None if nw is None else (nw, 1e-6, None),
                      tensor_cores=tensor_cores)
    _check_rope(out[0] if norm else out, x, w, rope, before,
                f"{fmt} rope M={m} heads {heads} norm {norm} tc {tensor_cores}", nw)


@pytest.mark.parametrize("fmt", ("int8", "int4", "dense"))
def test_linear_rope_unfused_paths_and_errors(nan_empty, fmt):
    """Where the projection comes from another kernel (17 rows: Triton's GEMM, cuBLAS), rope= still rotates
    and writes by rotary_write_kv; a QKV width that is not (Hq + 2 Hk) D, rope with geglu or with the L2
    prefetch: clear errors."""
    dtype = torch.bfloat16
    hq, hk, d = 2, 1, 64
    w = _quantized(fmt, torch.randn((hq + 2 * hk) * d, 256, device=DEV).to(dtype) * 0.05, 64)
    x = torch.randn(17, 256, device=DEV).to(dtype)
    rope, before = _rope_case(dtype, 17, hq, hk, d, blocks=2)
    _check_rope(_linear_any("cuda", x, w, None, rope=rope), x, w, rope, before, f"{fmt} rope unfused")
    narrow = _quantized(fmt, torch.randn((hq + 2 * hk) * d - 2, 256, device=DEV).to(dtype), 64)
    with pytest.raises(ValueError, match=r"is not \[T, \(Hq \+ 2 \* 1\) \* 64\]"):
        _linear_any("cuda", x[:1], narrow, None, rope=_rope_case(dtype, 1, hq, hk, d)[0])
    with pytest.raises(ValueError, match="geglu and rope"):
        _linear_any("cuda", x[:1], w, None, geglu=True, rope=_rope_case(dtype, 1, hq, hk, d)[0])
    with pytest.raises(ValueError, match="prefetch"):
        _linear_any("cuda", x[:1], w, None, prefetch=True, rope=_rope_case(dtype, 1, hq, hk, d)[0])


# ---------------------------------------------------------------------------------- rotary
@pytest.mark.parametrize("dtype", (torch.float32, *HALF), ids=dtype_id)
@pytest.mark.parametrize("head_dim", (64, 128, 256, 6))
@pytest.mark.parametrize("tokens", (1, 7, 83))
@pytest.mark.parametrize("heads", ((8, 1), (16, 16)))
def test_rotary(dtype, head_dim, tokens, heads):
    hq, hk = heads
    qkv = torch.randn(tokens, (hq + 2 * hk) * head_dim, device=DEV).to(dtype)
    pos = torch.randint(0, 8192, (tokens,), device=DEV)

    def split(buf):  # q, k views into the fused row, as the model passes them
        return (buf[:, : hq * head_dim].view(tokens, hq, head_dim),
                buf[:, hq * head_dim: (hq + hk) * head_dim].view(tokens, hk, head_dim))

    ours, lp, f32 = qkv.clone(), qkv.clone(), qkv.float()
    cuda("rotary")(*split(ours), pos, 10000.0)
    ref("rotary")(*split(lp), pos, 10000.0)
    ref("rotary")(*split(f32), pos, 10000.0)
    n = (hq + hk) * head_dim
    assert_close(ours[:, :n], f32[:, :n], lp[:, :n], what="rotary q,k")
    assert torch.equal(ours[:, n:], qkv[:, n:]), "rotary wrote outside q and k"


# ------------------------------------------------------------------------------ attention
def _paged_batch(ctx_lens, hk, head_dim, block_size, dtype, num_blocks_extra=3):
    """Random caches and a shuffled block table holding len(ctx_lens) sequences."""
    blocks_per = [math.ceil(c / block_size) for c in ctx_lens]
    nblocks = sum(blocks_per) + num_blocks_extra
    k_cache = torch.randn(nblocks, block_size, hk, head_dim, device=DEV).to(dtype)
    v_cache = torch.randn(nblocks, block_size, hk, head_dim, device=DEV).to(dtype)
    perm = torch.randperm(nblocks, device=DEV).int()
    table = torch.zeros(len(ctx_lens), max(blocks_per) + 1, dtype=torch.int32, device=DEV)
    at = 0
    for i, nb in enumerate(blocks_per):
        table[i, :nb] = perm[at: at + nb]
        at += nb
    return k_cache, v_cache, table


def _decode_meta(ctx_lens, table, has_token=None):
    has_token = has_token or [1] * len(ctx_lens)
    cu = torch.tensor([0, *torch.tensor(has_token).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    t = int(cu[-1])
    pos = torch.tensor([c - 1 for c, h in zip(ctx_lens, has_token) if h], dtype=torch.int64, device=DEV)
    return AttnMetadata(positions=pos, cu_seqlens_q=cu,
                        context_lens=torch.tensor(ctx_lens, dtype=torch.int32, device=DEV), block_tables=table,
                        slot_mapping=torch.full((t,), -1, dtype=torch.int64, device=DEV),
                        max_query_len=1, max_context_len=max(ctx_lens))


@pytest.mark.parametrize("dtype", HALF, ids=dtype_id)
@pytest.mark.parametrize("heads", ((8, 1), (16, 16), (8, 2)))
@pytest.mark.parametrize("head_dim", (256, 128, 64))
@pytest.mark.parametrize("block_size", (16, 32, 24))
@pytest.mark.parametrize("tensor_cores", (False, True))
def test_decode_attention(nan_empty, dtype, heads, head_dim, block_size, tensor_cores):
    """Both partition kernels (the tensor-core one where a KV head has at most 8 query heads and the block
    size is a power of two: 24 takes the other)."""
    hq, hk = heads
    ctx = [1, 17, 255, 256, 257, 1000, 1537]  # around partition edges (256 / 512 tokens)
    k_cache, v_cache, table = _paged_batch(ctx, hk, head_dim, block_size, dtype)
    meta = _decode_meta(ctx, table)
    qkv = torch.randn(len(ctx), (hq + 2 * hk) * head_dim, device=DEV).to(dtype)
    q = qkv[:, : hq * head_dim].view(len(ctx), hq, head_dim)  # token-strided view
    scale = head_dim ** -0.5
    out = cuda("attention")(q, k_cache, v_cache, meta, scale, tensor_cores=tensor_cores)
    r32 = ref("attention")(q.float(), k_cache.float(), v_cache.float(), meta, scale)
    lp = ref("attention")(q, k_cache, v_cache, meta, scale)
    assert_close(out, r32, lp, what=f"decode attention {heads} D={head_dim}")


@pytest.mark.parametrize("tensor_cores", (False, True))
def test_decode_attention_sequences_without_token(nan_empty, tensor_cores):
    """Sequences with no new token this step (cu_seqlens_q repeats) are skipped."""
    ctx = [40, 700, 9]
    k_cache, v_cache, table = _paged_batch(ctx, 1, 256, 16, torch.bfloat16)
    meta = _decode_meta(ctx, table, has_token=[1, 0, 1])
    q = torch.randn(2, 8, 256, device=DEV, dtype=torch.bfloat16)
    out = cuda("attention")(q, k_cache, v_cache, meta, 0.0625, tensor_cores=tensor_cores)
    assert_close(out, ref("attention")(q.float(), k_cache.float(), v_cache.float(), meta, 0.0625),
                 ref("attention")(q, k_cache, v_cache, meta, 0.0625))


def test_decode_attention_tensor_cores_misaligned_q_falls_back(nan_empty):
    """q rows not 16-byte aligned (a view 2 bytes into its buffer): the CUDA-core kernel serves them."""
    ctx = [300, 5]
    k_cache, v_cache, table = _paged_batch(ctx, 1, 128, 16, torch.bfloat16)
    buf = torch.randn(2 * 8 * 128 + 1, device=DEV, dtype=torch.bfloat16)
    q = buf[1:].view(2, 8, 128)
    assert q.data_ptr() % 16
    out = cuda("attention")(q, k_cache, v_cache, _decode_meta(ctx, table), 0.088, tensor_cores=True)
    meta = _decode_meta(ctx, table)
    assert_close(out, ref("attention")(q.float(), k_cache.float(), v_cache.float(), meta, 0.088),
                 ref("attention")(q, k_cache, v_cache, meta, 0.088))


def test_attention_prefill_delegates_to_triton():
    pytest.importorskip("triton")
    dtype, hq, hk, d, bs = torch.bfloat16, 8, 1, 256, 16
    ctx, new = [30, 5], [4, 5]
    k_cache, v_cache, table = _paged_batch(ctx, hk, d, bs, dtype)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32, device=DEV)
    meta = AttnMetadata(positions=torch.zeros(9, dtype=torch.int64, device=DEV), cu_seqlens_q=cu,
                        context_lens=torch.tensor(ctx, dtype=torch.int32, device=DEV), block_tables=table,
                        slot_mapping=torch.full((9,), -1, dtype=torch.int64, device=DEV),
                        max_query_len=max(new), max_context_len=max(ctx))
    q = torch.randn(9, hq, d, device=DEV, dtype=dtype)
    assert_close(cuda("attention")(q, k_cache, v_cache, meta, 0.0625),
                 ref("attention")(q.float(), k_cache.float(), v_cache.float(), meta, 0.0625),
                 ref("attention")(q, k_cache, v_cache, meta, 0.0625))


@pytest.mark.parametrize("dtype", (torch.float32, *HALF), ids=dtype_id)
@pytest.mark.parametrize("head_dim", (256, 6))
def test_write_kv(dtype, head_dim):
    tokens, hk, bs, nb = 83, 2, 16, 12
    kv = torch.randn(tokens, 3 * hk * head_dim, device=DEV).to(dtype)  # strided views, like fused qkv
    k = kv[:, : hk * head_dim].view(tokens, hk, head_dim)
    v = kv[:, 2 * hk * head_dim:].view(tokens, hk, head_dim)
    slots = torch.randperm(nb * bs, device=DEV)[:tokens]
    slots[::5] = -1
    caches = [torch.full((nb, bs, hk, head_dim), float("nan"), device=DEV, dtype=dtype) for _ in range(4)]
    cuda("write_kv")(k, v, caches[0], caches[1], slots)
    ref("write_kv")(k, v, caches[2], caches[3], slots)
    for ours, theirs in ((caches[0], caches[2]), (caches[1], caches[3])):
        assert torch.equal(ours.nan_to_num(123.0), theirs.nan_to_num(123.0))


# ---------------------------------------------------------------------- quantized linear
def _check_linear(fmt, qw, x, bias, **kw):
    args = (qw.qweight, qw.scales, qw.zeros, qw.group_size, bias)
    out = cuda(f"linear_{fmt}")(x, *args, **kw)
    r32 = ref(f"linear_{fmt}")(x.float(), *args[:-1], None if bias is None else bias.float())
    lp = ref(f"linear_{fmt}")(x, *args)
    assert_close(out, r32, lp, what=f"linear_{fmt} M={x.shape[0]} {tuple(qw.shape)}")


@pytest.mark.parametrize("dtype", HALF, ids=dtype_id)
@pytest.mark.parametrize("m", (1, 2, 3, 8, 16))
@pytest.mark.parametrize("nk", ((257, 784), (1024, 2048), (96, 24576)))
@pytest.mark.parametrize("with_bias", (False, True))
@pytest.mark.parametrize("tensor_cores", (False, True))
def test_linear_int8(nan_empty, dtype, m, nk, with_bias, tensor_cores):
    """The CUDA-core GEMV (one row; more go to the Triton GEMM) and the tensor-core kernel (up to 16 rows,
    K a multiple of 64: K = 784 takes the others)."""
    n, k = nk
    qw = quantize_int8(torch.randn(n, k, device=DEV).to(dtype))
    x = torch.randn(m, k, device=DEV).to(dtype)
    bias = torch.randn(n, device=DEV).to(dtype) if with_bias else None
    _check_linear("int8", qw, x, bias, tensor_cores=tensor_cores)


@pytest.mark.parametrize("dtype", HALF, ids=dtype_id)
@pytest.mark.parametrize("m", (1, 9, 16))
@pytest.mark.parametrize("k_split", (1, 8))
@pytest.mark.parametrize("nk", ((8209, 192), (33, 24576)))
def test_linear_int8_tensor_cores_k_split(nan_empty, dtype, m, k_split, nk):
    """The int8 tensor-core kernel with the K split (K = 192: 3 chunks for 8 warps), W's rows past a
    multiple of 16, one or two tiles of 8 rows of x."""
    n, k = nk
    qw = quantize_int8(torch.randn(n, k, device=DEV).to(dtype))
    x = torch.randn(m, k, device=DEV).to(dtype)
    _check_linear("int8", qw, x, torch.randn(n, device=DEV).to(dtype), tensor_cores=True, k_split=k_split)


@pytest.mark.parametrize("dtype", HALF, ids=dtype_id)
@pytest.mark.parametrize("m", (1, 3, 5, 16))
@pytest.mark.parametrize("nk", ((257, 768), (1024, 2048), (96, 24576)))
@pytest.mark.parametrize("group", (32, 64, 128))
@pytest.mark.parametrize("symmetric", (True, False))
@pytest.mark.parametrize("tensor_cores", (False, True))
def test_linear_int4(nan_empty, dtype, m, nk, group, symmetric, tensor_cores):
    """The CUDA-core GEMV (one row; more go to the Triton GEMM) and the tensor-core kernel (up to 16 rows)."""
    n, k = nk
    qw = quantize_int4(torch.randn(n, k, device=DEV).to(dtype), group, symmetric)
    x = torch.randn(m, k, device=DEV).to(dtype)
    bias = torch.randn(n, device=DEV).to(dtype) if m == 3 else None
    _check_linear("int4", qw, x, bias, tensor_cores=tensor_cores)


@pytest.mark.parametrize("dtype", HALF, ids=dtype_id)
@pytest.mark.parametrize("m", (1, 7, 9, 16))
@pytest.mark.parametrize("k_split", (1, 2, 8))
@pytest.mark.parametrize("nk_group", (((8209, 96), 32), ((257, 3072), 128), ((33, 24576), 64)))
def test_linear_int4_tensor_cores_k_split(nan_empty, dtype, m, k_split, nk_group):
    """The tensor-core kernel with each K split of a tile (8 warps over K = 96 in groups of 32: five
    warps with no group), rows of W past a multiple of 16, one or two tiles of 8 rows of x, asymmetric."""
    (n, k), group = nk_group
    qw = quantize_int4(torch.randn(n, k, device=DEV).to(dtype), group, symmetric=False)
    x = torch.randn(m, k, device=DEV).to(dtype)
    _check_linear("int4", qw, x, torch.randn(n, device=DEV).to(dtype), tensor_cores=True, k_split=k_split)


def test_linear_int4_tensor_cores_misaligned_x_falls_back(nan_empty):
    """x not 16-byte aligned (a view 2 bytes into its buffer): served by the other kernels, still right."""
    qw = quantize_int4(torch.randn(300, 256, device=DEV, dtype=torch.bfloat16), 64)
    for m in (1, 5):
        x = torch.randn(m * 256 + 1, device=DEV, dtype=torch.bfloat16)[1:].view(m, 256)
        assert x.data_ptr() % 16
        _check_linear("int4", qw, x, None, tensor_cores=True)


@pytest.mark.parametrize("fmt", ("int8", "int4"))
@pytest.mark.parametrize("with_bias", (False, True))
@pytest.mark.parametrize("nk_ctas", (((257, 768), 3), ((96, 24576), 2), ((8209, 1024), 0), ((2051, 3072), 1)))
@pytest.mark.parametrize("prefetch", (False, True))
def test_linear_quant_grid_stride(nan_empty, fmt, with_bias, nk_ctas, prefetch):
    """Few CTAs looping over many row groups: x staged once (one tile) or per tile (K = 24576), the
    device-sized grid on a tall weight, and a single CTA doing every row (one row of x: the CUDA GEMV's
    case, MAX_GEMV_ROWS; more rows go to the Triton GEMM); with and without the L2 prefetch of the
    next row group (up to and past the last row)."""
    (n, k), max_ctas = nk_ctas
    w = torch.randn(n, k, device=DEV, dtype=torch.bfloat16)
    qw = quantize_int8(w) if fmt == "int8" else quantize_int4(w, 64, symmetric=False)
    x = torch.randn(1, k, device=DEV, dtype=torch.bfloat16)
    _check_linear(fmt, qw, x, torch.randn(n, device=DEV, dtype=torch.bfloat16) if with_bias else None,
                  max_ctas=max_ctas, prefetch=prefetch)


@pytest.mark.parametrize("fmt", ("int8", "int4"))
def test_linear_quant_many_rows_delegates_to_triton(fmt):
    pytest.importorskip("triton")
    w = torch.randn(64, 256, device=DEV, dtype=torch.bfloat16)
    qw = quantize_int8(w) if fmt == "int8" else quantize_int4(w, 64)
    _check_linear(fmt, qw, torch.randn(17, 256, device=DEV, dtype=torch.bfloat16), None)


@pytest.mark.parametrize("dtype", HALF, ids=dtype_id)
@pytest.mark.parametrize("nk_ctas", (((257, 784), 0), ((2048, 2048), 0), ((96, 24576), 0), ((8209, 1024), 0),
                                     ((2051, 3072), 1), ((257, 784), 3)))
@pytest.mark.parametrize("with_bias", (False, True))
def test_linear_dense(nan_empty, dtype, nk_ctas, with_bias):
    """The dense GEMV (the quantized GEMV's kernel over a plain 16-bit weight) at one row, against
    F.linear in fp32: x staged once or in K tiles, device-sized and capped grids."""
    (n, k), max_ctas = nk_ctas
    w = torch.randn(n, k, device=DEV).to(dtype) * 0.05
    x = torch.randn(1, k, device=DEV).to(dtype)
    bias = torch.randn(n, device=DEV).to(dtype) if with_bias else None
    out = cuda("linear")(x, w, bias, max_ctas=max_ctas, prefetch=max_ctas == 3, tensor_cores=False)
    r32 = ref("linear")(x.float(), w.float(), None if bias is None else bias.float())
    assert_close(out, r32, ref("linear")(x, w, bias), what=f"dense gemv {(n, k)} ctas {max_ctas}")


@pytest.mark.parametrize("dtype", HALF, ids=dtype_id)
@pytest.mark.parametrize("m", (1, 5, 8, 9, 16))
@pytest.mark.parametrize("nk", ((257, 96), (2048, 2048), (33, 24576)))
@pytest.mark.parametrize("k_split", (0, 1, 8))
def test_linear_dense_tensor_cores(nan_empty, dtype, m, nk, k_split):
    """The dense tensor-core kernel at 1-16 rows (one or two mma column tiles), rows of W past a multiple
    of 16, K split among 1-8 warps (K = 96: 3 chunks, so some warps get none) or as chosen, with a bias."""
    n, k = nk
    w = torch.randn(n, k, device=DEV).to(dtype) * 0.05
    x = torch.randn(m, k, device=DEV).to(dtype)
    bias = torch.randn(n, device=DEV).to(dtype)
    out = cuda("linear")(x, w, bias, tensor_cores=True, k_split=k_split)
    r32 = ref("linear")(x.float(), w.float(), bias.float())
    assert_close(out, r32, ref("linear")(x, w, bias), what=f"dense mma {(n, k)} M={m} split {k_split}")


def test_linear_dense_falls_back_to_torch():
    """More rows than the GEMV serves, fp32, K not a multiple of 8: cuBLAS, exactly."""
    bf = torch.bfloat16
    for x, w in ((torch.randn(3, 64, device=DEV, dtype=bf), torch.randn(40, 64, device=DEV, dtype=bf)),
                 (torch.randn(1, 64, device=DEV), torch.randn(40, 64, device=DEV)),
                 (torch.randn(1, 60, device=DEV).half(), torch.randn(40, 60, device=DEV).half())):
        assert torch.equal(cuda("linear")(x, w), ref("linear")(x, w))


# ------------------------------------------------------- linears with GeGLU in their epilogue
def _quantized(fmt, w, group):
    if fmt == "dense":
        return w
    return quantize_int8(w) if fmt == "int8" else quantize_int4(w, group, symmetric=group != 64)


def _linear_any(backend, x, w, bias, **kw):
    if isinstance(w, torch.Tensor):  # (the fp32 reference takes the weight in fp32)
        return select("linear", backend, DEV)(x, w.to(x.dtype), bias, **kw)
    return select(f"linear_{w.fmt}", backend, DEV)(x, w.qweight, w.scales, w.zeros, w.group_size, bias, **kw)


@pytest.mark.parametrize("dtype", HALF, ids=dtype_id)
@pytest.mark.parametrize("fmt_group", (("int8", None), ("int4", 32), ("int4", 64), ("dense", None)))
@pytest.mark.parametrize("m", (1, 3, 16))
@pytest.mark.parametrize("nk_ctas", (((2, 256), 0), ((258, 768), 3), ((34, 24576), 0)))
@pytest.mark.parametrize("tensor_cores", (False, True))
def test_linear_geglu(nan_empty, monkeypatch, dtype, fmt_group, m, nk_ctas, tensor_cores):
    """geglu=True: gelu_and_mul(x W^T + b) [M, N/2] from the linear's own launch, W's rows [gate; up], on the
    CUDA-core GEMV (MAX_GEMV_ROWS raised: up to FUSED_ROWS rows fused, 16 by the gelu_and_mul kernel
    after it) and the tensor-core kernel; one pair of
    rows, pairs past a multiple of 8 (a warp's / tile's), 3 CTAs looping over 17 groups of pairs, x in one
    or several shared-memory tiles; int4 symmetric (g32) and not (g64). Against the torch linear and
    gelu_and_mul in fp32."""
    fmt, group = fmt_group
    (n, k), max_ctas = nk_ctas
    kw = {"tensor_cores": True} if tensor_cores else {"tensor_cores": False, "max_ctas": max_ctas}
    if fmt == "dense" and m > 4 and not tensor_cores:
        pytest.skip("the dense CUDA-core GEMV takes up to 4 rows")
    monkeypatch.setattr(native, "MAX_GEMV_ROWS", 16)
    w = _quantized(fmt, (torch.randn(n, k, device=DEV) * k ** -0.5).to(dtype), group)  # (products of O(1): fp16)
    x = torch.randn(m, k, device=DEV).to(dtype)
    bias = torch.randn(n, device=DEV).to(dtype) if m == 3 else None
    out = _linear_any("cuda", x, w, bias, geglu=True, **kw)
    r32 = ref("gelu_and_mul")(_linear_any("torch", x.float(), w, None if bias is None else bias.float()))
    lp = ref("gelu_and_mul")(_linear_any("torch", x, w, bias))
    assert out.shape == (m, n // 2)
    assert_close(out, r32, lp, what=f"{fmt} geglu M={m} {(n, k)} tensor cores {tensor_cores}")


@pytest.mark.parametrize("fmt", ("int8", "int4", "dense"))
def test_linear_geglu_unfused_paths(nan_empty, fmt):
    """Where the linear's product comes from another kernel (more rows than its CUDA kernels take: Triton's
    GEMM, cuBLAS), geglu=True still returns gelu_and_mul of it; an odd number of rows, or geglu with the L2
    prefetch, raises."""
    dtype = torch.bfloat16
    w = _quantized(fmt, torch.randn(64, 256, device=DEV).to(dtype) * 0.05, 64)
    x = torch.randn(17, 256, device=DEV).to(dtype)
    out = _linear_any("cuda", x, w, None, geglu=True)
    assert_close(out, ref("gelu_and_mul")(_linear_any("torch", x.float(), w, None)),
                 ref("gelu_and_mul")(_linear_any("torch", x, w, None)), what=f"{fmt} geglu unfused")
    odd = _quantized(fmt, torch.randn(63, 256, device=DEV).to(dtype), 64)
    with pytest.raises(ValueError, match="even number of weight rows"):
        _linear_any("cuda", x[:1], odd, None, geglu=True)
    with pytest.raises(ValueError, match="prefetch"):
        _linear_any("cuda", x[:1], w, None, geglu=True, prefetch=True)


# ------------------------------------------------------------ linears that normalise their input
@pytest.mark.parametrize("dtype", HALF, ids=dtype_id)
@pytest.mark.parametrize("fmt_group", (("int8", None), ("int4", 64), ("dense", None)))
@pytest.mark.parametrize("m", (1, 4))
@pytest.mark.parametrize("nk", ((130, 3072), (34, 8192)))
@pytest.mark.parametrize("residual, geglu", ((False, False), (True, False), (True, True)))
@pytest.mark.parametrize("tensor_cores", (False, True))
def test_linear_norm(nan_empty, monkeypatch, dtype, fmt_group, m, nk, residual, geglu, tensor_cores):
    """norm=(weight, eps, residual): y = rms_norm(x (+ residual)) W^T (with geglu, gelu_and_mul of it) and
    the residual stream x + residual (or x itself), from the linear's own launch: on the CUDA-core GEMV (x
    staged in one or several tiles: int4 at 4 rows of K = 3072 takes two) and on the tensor-core kernel
    (which takes M * K * 2 <= 40 KiB: at 4 rows of K = 8192 the rms_norm kernel runs first instead). Against
    the torch rms_norm and linear in fp32; the stream exactly as torch adds in the dtype."""
    fmt, group = fmt_group
    n, k = nk
    monkeypatch.setattr(native, "MAX_GEMV_ROWS", 4)
    w = _quantized(fmt, (torch.randn(n, k, device=DEV) * k ** -0.5).to(dtype), group)
    x = torch.randn(m, k, device=DEV).to(dtype) * 3
    res = torch.randn(m, k, device=DEV).to(dtype) if residual else None
    nw = (torch.randn(k, device=DEV) * 0.5).to(dtype)
    kw = {"tensor_cores": tensor_cores}
    out, stream = _linear_any("cuda", x, w, None, norm=(nw, 1e-6, res), geglu=geglu, **kw)

    def reference(xx, rr, ww):
        normed, _ = ref("rms_norm")(xx, ww, 1e-6, rr if rr is not None else torch.zeros_like(xx))
        y = _linear_any("torch", normed, w, None)
        return ref("gelu_and_mul")(y) if geglu else y
    r32 = reference(x.float(), None if res is None else res.float(), nw.float())
    assert_close(out, r32, reference(x, res, nw), what=f"{fmt} norm M={m} {(n, k)} geglu {geglu} tc {tensor_cores}")
    if res is None:
        assert stream is x
    else:
        assert torch.equal(stream, x + res)


def test_linear_norm_tensor_cores_shared_memory_bound(nan_empty):
    """The tensor-core kernel normalises x of up to MMA_NORM_BYTES (4 rows of K = 5120: 40 KiB) itself and
    refuses a byte more with a clear error; the wrapper, sharing the bound, hands larger x to the rms_norm
    kernel first (if the two bounds disagreed, the fused call below would raise)."""
    dtype = torch.bfloat16
    m, k = 4, native.MMA_NORM_BYTES // (4 * 2)
    qw = quantize_int4((torch.randn(64, k, device=DEV) * k ** -0.5).to(dtype), 64)
    x, nw = torch.randn(m, k, device=DEV).to(dtype), torch.randn(k, device=DEV).to(dtype)
    out, _ = _linear_any("cuda", x, qw, None, norm=(nw, 1e-6, None), tensor_cores=True)
    normed = ref("rms_norm")(x, nw, 1e-6)
    assert_close(out, _linear_any("torch", normed.float(), qw, None), _linear_any("torch", normed, qw, None),
                 what="norm at the shared-memory bound")


def test_linear_norm_tensor_cores_refuses_past_the_bound():
    """(Its own test: under tests/test_cuda_memcheck.py's preloaded AddressSanitizer a C++ throw aborts.)"""
    dtype = torch.bfloat16
    m, k = 4, native.MMA_NORM_BYTES // (4 * 2)
    nw = torch.randn(k, device=DEV).to(dtype)
    wide = torch.randn(m, k + 64, device=DEV).to(dtype)
    qw2 = quantize_int4(torch.randn(64, k + 64, device=DEV).to(dtype), 64)
    y = torch.empty(m, 64, device=DEV, dtype=dtype)
    with pytest.raises((RuntimeError, ValueError), match="the norm takes M \\* K \\* 2 <= 40960"):
        native._ext().w4a16_mma(y.data_ptr(), wide.data_ptr(), qw2.qweight.data_ptr(), qw2.scales.data_ptr(), 0, 0,
                                m, 64, k + 64, 64, 0, False, nw.data_ptr(), 0, 0, 1e-6, (0,) * 8, 2, 0)


def test_linear_norm_falls_back_to_its_op(nan_empty, monkeypatch):
    """Rows past FUSED_ROWS, a residual of strided rows: the rms_norm kernel runs first, the result the same."""
    monkeypatch.setattr(native, "MAX_GEMV_ROWS", 16)
    dtype = torch.bfloat16
    qw = quantize_int8((torch.randn(64, 512, device=DEV) * 0.05).to(dtype))
    nw = torch.randn(512, device=DEV).to(dtype)
    for m, strided in ((5, False), (2, True)):
        x = torch.randn(m, 512, device=DEV).to(dtype)
        res = torch.randn(m, 1024, device=DEV).to(dtype)[:, :512] if strided else torch.randn(m, 512, device=DEV).to(dtype)
        out, stream = _linear_any("cuda", x, qw, None, norm=(nw, 1e-6, res))
        normed, r = ref("rms_norm")(x, nw, 1e-6, res)
        assert torch.equal(stream, r)
        assert_close(out, _linear_any("torch", normed.float(), qw, None), _linear_any("torch", normed, qw, None),
                     what=f"norm fallback M={m}")


def test_bad_inputs_raise_value_error():
    x = torch.randn(2, 64, device=DEV, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="weight"):
        cuda("rms_norm")(x, torch.ones(63, device=DEV, dtype=torch.bfloat16), 1e-6)
    with pytest.raises(ValueError, match="x has dtype"):
        qw = quantize_int8(torch.randn(8, 64, device=DEV))
        cuda("linear_int8")(x.float(), qw.qweight, qw.scales, None, None, None)
    with pytest.raises(ValueError, match="contiguous"):
        cuda("gelu_and_mul")(torch.randn(8, 4, device=DEV, dtype=torch.float16).t())
