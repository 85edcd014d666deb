"""linear: dense, and weight-only int8 / int4 (W8A16, W4A16) on every available backend."""
import zlib

import pytest
import torch
import torch.nn.functional as F
from numerics import assert_close

from gemforge.kernels import BackendUnavailable, backends, linear, select
from gemforge.kernels._native import cpu_packs_linear
from gemforge.kernels.linear import PackedWeight, TileConfig, quant_matmul_triton
from gemforge.kernels.quant import dequantize, quantize_int4, quantize_int8
from gemforge.kernels.registry import unavailable_reason

FORMATS = {  # name -> (quantize, group_size)
    "int8": (lambda w: quantize_int8(w), None),
    "int4-g128": (lambda w: quantize_int4(w, 128), 128),
    "int4-g64-asym": (lambda w: quantize_int4(w, 64, symmetric=False), 64),
    "int4-g32": (lambda w: quantize_int4(w, 32), 32),
}
LOWP = (torch.float16, torch.bfloat16)


@pytest.fixture
def gen(request):
    """A generator seeded from the test id: a fresh seed per case, reproducible."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.name.encode()))


def _problem(fmt, m, n, k, dtype, device, gen, bias=True):
    """x [m, k], a quantized [n, k] weight, bias [n] (all in dtype, on device) and the fp32 reference."""
    x = torch.randn(m, k, generator=gen).to(dtype)
    w = torch.randn(n, k, generator=gen).to(dtype) * 0.05
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    qw = FORMATS[fmt][0](w).to(device)
    ref32 = F.linear(x.float(), dequantize(qw).cpu().float(), None if b is None else b.float())
    return x.to(device), qw, None if b is None else b.to(device), ref32


def _available(op, device):
    dev = torch.device(device).type
    return [b for b in backends(op) if unavailable_reason(op, b, dev) is None]


@pytest.mark.parametrize("dtype", LOWP + (torch.float32,))
@pytest.mark.parametrize("m", [1, 3, 16, 33, 130])
@pytest.mark.parametrize("fmt", FORMATS)
def test_triton_quant_matmul(fmt, m, dtype, device, gen, nan_empty):
    """Every output written (torch.empty NaN-filled), within 2x the low-precision torch error of fp32."""
    n, k = 97, 256
    x, qw, b, ref32 = _problem(fmt, m, n, k, dtype, device, gen, bias=m != 16)
    y = quant_matmul_triton(x, qw.qweight, qw.scales, qw.zeros, qw.group_size, b)
    ref_lp = linear(x, qw, b, backend="torch")
    assert_close(y.cpu(), ref32, ref_lp.cpu(), what=f"{fmt} M={m} {dtype}")


@pytest.mark.parametrize("config", [TileConfig(16, 32, 64, 4, 2, split_k=3), TileConfig(32, 16, 32, 4, 2, split_k=2)])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("with_bias", [True, False])
def test_triton_split_k_and_tiles(fmt, config, with_bias, device, gen, nan_empty):
    """Explicit tile shapes and K split in uneven parts (int8: K = 200 leaves a ragged last K tile),
    the partials summed (and biased) by the split-sum kernel; the fp32 partials' workspace is
    NaN-filled too."""
    m, n, k = 5, 37, 200 if fmt == "int8" else 384
    x, qw, b, ref32 = _problem(fmt, m, n, k, torch.float16, device, gen, bias=with_bias)
    y = quant_matmul_triton(x, qw.qweight, qw.scales, qw.zeros, qw.group_size, b, config=config)
    assert_close(y.cpu(), ref32, linear(x, qw, b, backend="torch").cpu(), what=f"{fmt} {config}")


@pytest.mark.parametrize("fmt", FORMATS)
def test_linear_dispatch_every_backend(fmt, device, gen):
    """linear() on a QuantizedWeight, leading dims flattened, on each backend this device can run."""
    x, qw, b, ref32 = _problem(fmt, 6, 769, 256, torch.bfloat16, device, gen)
    x3 = x.reshape(2, 3, 256)
    ref_lp = linear(x3, qw, b, backend="torch")
    assert ref_lp.shape == (2, 3, 769) and ref_lp.dtype == torch.bfloat16
    for backend in _available(f"linear_{qw.fmt}", device):
        y = linear(x3, qw, b, backend=backend)
        assert_close(y.cpu(), ref32.reshape(2, 3, 769), ref_lp.cpu(), what=f"{fmt} {backend}")


@pytest.mark.parametrize("dtype", LOWP + (torch.float32,))
def test_dense_linear_every_backend(dtype, device, gen):
    x = torch.randn(2, 7, 96, generator=gen).to(dtype)
    w = torch.randn(769, 96, generator=gen).to(dtype)
    b = torch.randn(769, generator=gen).to(dtype)
    ref32 = F.linear(x.float(), w.float(), b.float())
    ref_lp = F.linear(x, w, b)
    for backend in _available("linear", device):
        y = linear(x.to(device), w.to(device), b.to(device), backend=backend)
        assert_close(y.cpu(), ref32, ref_lp, what=f"dense {backend} {dtype}")


def test_select(device):
    assert select("linear_int4", "triton", device) is quant_matmul_triton  # CPU: TRITON_INTERPRET=1
    assert select("linear_int8", "triton", device) is quant_matmul_triton
    cpu = "cpu" if unavailable_reason("linear_int8", "cpu", "cpu") is None else "torch"  # (is _C built?)
    assert select("linear_int8", "auto", "cpu") is select("linear_int8", cpu, "cpu")
    with pytest.raises(BackendUnavailable, match="linear_int4: backend 'cuda' unavailable"):
        select("linear_int4", "cuda", "cpu")


def test_feature_mismatch_is_a_clear_error(device):
    qw = quantize_int4(torch.randn(8, 128)).to(device)
    with pytest.raises(ValueError, match="linear_int4: x has 96 features, the weight 128"):
        linear(torch.randn(1, 96, device=device), qw, backend="triton")


def test_empty_batch(device):
    qw = quantize_int8(torch.randn(8, 32)).to(device)
    assert linear(torch.randn(0, 32, device=device), qw, backend="triton").shape == (0, 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows", [1, 2, 4, 8, 9])
@pytest.mark.parametrize("n, k", [(33, 67), (1031, 257)], ids=["small", "1MiB"])
def test_torch_linear_few_rows_on_cpu(rows, dtype, n, k):
    """The CPU's few-row path ((w @ x^T)^T in fp32; one row times a weight of 1 MiB or more as two
    rows) equals F.linear, bias included, on [rows, k] activations ([1, 1, k] for one row)."""
    g = torch.Generator().manual_seed(rows + n)
    x = torch.randn(rows, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    if rows == 1:
        x = x.reshape(1, 1, k)
    got = linear(x, w, b, backend="torch")
    assert got.shape == (*x.shape[:-1], n) and got.is_contiguous()
    if dtype == torch.bfloat16:  # bf16 takes F.linear itself
        assert torch.equal(got, F.linear(x, w, b))
    else:
        torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("n,k", [(1, 1), (17, 3), (40, 64), (33, 67)])
def test_packed_weight_round_trips(n, k):
    """PackedWeight.pack puts w[16 b + c, 2 p + j] at data[b, p, c, j] (zero-padded); unpack and the
    embedding lookup `rows` read back exactly w and w[ids]."""
    g = torch.Generator().manual_seed(n * 100 + k)
    w = torch.randn(n, k, generator=g).bfloat16()
    p = PackedWeight.pack(w)
    assert p.data.shape == (-(-n // 16), -(-k // 2), 16, 2) and p.shape == (n, k)
    assert torch.equal(p.data[0, 0, 0, 0], w[0, 0])
    if n > 1 and k > 2:
        assert torch.equal(p.data[0, 1, 1, 0], w[1, 2])
    assert torch.equal(p.unpack(), w)
    ids = torch.randint(0, n, (3, 5), generator=g)
    assert torch.equal(p.rows(ids), w[ids])


packed_cpu = pytest.mark.skipif(not cpu_packs_linear(), reason="gemforge._C lacks the AVX512-BF16 linear")


@packed_cpu
@pytest.mark.parametrize("rows", [1, 2, 3, 6, 7, 13, 130])
@pytest.mark.parametrize("n,k,with_bias", [(33, 67, True), (64, 256, False), (1000, 96, False), (40, 2051, True)])
def test_cpu_linear_packed(rows, n, k, with_bias, nan_empty):
    """The C++ packed bf16 linear against torch: every tile height (1-6 rows), more rows than one
    120-row block, N not a multiple of its 16-column blocks or 4- and 8-block groups, odd K, K over
    several 1024-element slices, bias. Judged like every kernel: error <= 2 x torch-in-bf16's + floor."""
    g = torch.Generator().manual_seed(rows * 7919 + n + k)
    x = torch.randn(rows, k, generator=g).bfloat16()
    w = (torch.randn(n, k, generator=g) / k ** 0.5).bfloat16()
    b = torch.randn(n, generator=g).bfloat16() if with_bias else None
    got = linear(x, PackedWeight.pack(w), b, backend="cpu")
    assert got.shape == (rows, n) and got.dtype == torch.bfloat16
    assert_close(got, F.linear(x.float(), w.float(), None if b is None else b.float()), F.linear(x, w, b))
    assert torch.equal(linear(x, PackedWeight.pack(w), b, backend="torch"), F.linear(x, w, b))


@packed_cpu
@pytest.mark.parametrize("rows", [1, 2, 5, 13, 130])
@pytest.mark.parametrize("n,k", [(16, 64), (48, 67), (80, 2051)])
def test_cpu_linear_geglu_equals_linear_then_gelu_and_mul(rows, n, k, nan_empty):
    """The fused gate_up linear + GeGLU of the C++ decoder (one or several 16-column output blocks per
    group and a partial last group; odd K over several slices) equals the two ops exactly."""
    from gemforge.kernels import _C, gelu_and_mul
    g = torch.Generator().manual_seed(rows * 31 + n + k)
    x = torch.randn(rows, k, generator=g).bfloat16()
    w = PackedWeight.pack((torch.randn(2 * n, k, generator=g) / k ** 0.5).bfloat16())
    y = torch.empty(rows, n, dtype=torch.bfloat16)
    _C.cpu.linear_packed_geglu_bf16(y.data_ptr(), x.data_ptr(), w.data.data_ptr(), rows, n, k)
    assert torch.equal(y, gelu_and_mul(linear(x, w, backend="cpu"), backend="cpu"))


@packed_cpu
@pytest.mark.parametrize("n,k", [(40, 67), (16, 256)])
def test_cpu_embedding_from_the_packed_table(n, k, nan_empty):
    """The tied embedding's C++ lookup equals torch's rows * scale in bf16 exactly; an id outside the
    vocabulary is a ValueError naming it."""
    from gemforge.kernels._native import embed_packed_cpu
    g = torch.Generator().manual_seed(n + k)
    w = PackedWeight.pack(torch.randn(n, k, generator=g).bfloat16())
    ids = torch.randint(0, n, (3, 5), generator=g)
    scale = torch.tensor(k ** 0.5, dtype=torch.bfloat16)
    assert torch.equal(embed_packed_cpu(w, ids, float(scale)), w.rows(ids) * scale)
    with pytest.raises(ValueError, match=f"embedding: token id {n} at position 1 is outside the vocabulary of {n}"):
        embed_packed_cpu(w, torch.tensor([0, n]), 1.0)
    with pytest.raises(ValueError, match=r"embedding: table data must be torch.bfloat16 \["):
        embed_packed_cpu(PackedWeight(w.data[:, :1], w.shape), ids, 1.0)  # fewer k-pairs than its shape says


@packed_cpu
def test_cpu_linear_packed_nan_stays_in_its_row():
    """A NaN in x makes its own row NaN and no other: the odd-K tail pair never reads the next row."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(3, 7, generator=g).bfloat16()
    w = torch.randn(20, 7, generator=g).bfloat16()
    x[1, 0] = float("nan")
    y = linear(x, PackedWeight.pack(w), backend="cpu")
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2]]).all()


@packed_cpu
def test_cpu_linear_packed_bad_input():
    w = PackedWeight.pack(torch.randn(40, 24).bfloat16())
    with pytest.raises(ValueError, match=r"linear_packed: x must be torch.bfloat16 \[M, 24\], got torch.float32"):
        linear(torch.randn(3, 24), w, backend="cpu")
    with pytest.raises(ValueError, match=r"linear_packed: x must be torch.bfloat16 \[M, 24\], got .* \(3, 25\)"):
        linear(torch.randn(3, 25).bfloat16(), w, backend="cpu")
    with pytest.raises(ValueError, match=r"linear_packed: bias must be"):
        linear(torch.randn(3, 24).bfloat16(), w, torch.zeros(41, dtype=torch.bfloat16), backend="cpu")
    bad = PackedWeight(w.data[:, :5], w.shape)
    with pytest.raises(ValueError, match=r"linear_packed: weight data must be torch.bfloat16 \[3, 12, 16, 2\]"):
        linear(torch.randn(3, 24).bfloat16(), bad, backend="cpu")


@packed_cpu
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9, 17])
@pytest.mark.parametrize("n,k,with_bias", [(1, 256, True), (33, 384, False), (97, 1024, True)])
@pytest.mark.parametrize("fmt", FORMATS)
def test_cpu_quant_linear(fmt, rows, n, k, with_bias, gen, nan_empty):
    """The C++ weight-only int8 / int4 linear (bf16 x): every count of x rows per pass (1..8; int4
    1..4) and a partial last pass, an odd count of weight rows (one left after the pairs), several K
    groups, symmetric and asymmetric int4, bias; error <= 2 x torch-in-bf16's + floor."""
    x, qw, b, ref32 = _problem(fmt, rows, n, k, torch.bfloat16, "cpu", gen, bias=with_bias)
    got = linear(x, qw, b, backend="cpu")
    assert got.shape == (rows, n) and got.dtype == torch.bfloat16
    assert_close(got, ref32, linear(x, qw, b, backend="torch"), what=f"{fmt} rows={rows} n={n} k={k}")


@packed_cpu
@pytest.mark.parametrize("rows", [32, 37, 130])
@pytest.mark.parametrize("n,k,with_bias", [(1, 256, True), (97, 1280, False), (200, 2048, True)])
@pytest.mark.parametrize("fmt", FORMATS)
def test_cpu_quant_linear_many_rows(fmt, rows, n, k, with_bias, gen, nan_empty):
    """From 32 rows of x (int4: 12) the C++ linear converts the weight into the packed bf16 layout, a
    K slice of 4 blocks of 16 weight rows at a time, and runs the dense tiles over it: tiles of 1-6
    rows, groups of 1-4 blocks (97 and 200 rows leave 3 and 1), a weight row count short of a block,
    K in one slice, in a full and a partial one (1280), in two; int4 groups of 32-128, symmetric and
    not."""
    x, qw, b, ref32 = _problem(fmt, rows, n, k, torch.bfloat16, "cpu", gen, bias=with_bias)
    got = linear(x, qw, b, backend="cpu")
    assert got.shape == (rows, n) and got.dtype == torch.bfloat16
    assert_close(got, ref32, linear(x, qw, b, backend="torch"), what=f"{fmt} rows={rows} n={n} k={k}")


@packed_cpu
@pytest.mark.parametrize("fmt", FORMATS)
def test_cpu_quant_linear_nan_stays_in_its_row_and_others_go_to_torch(fmt, gen):
    """A NaN in x makes its own row NaN and no other (int4's per-group sums of x included); fp32
    activations and K not a multiple of 32 take torch's path, which the result equals exactly."""
    for rows in (3, 40):  # (the few-row kernel, the packed tiles)
        x, qw, b, _ = _problem(fmt, rows, 40, 256, torch.bfloat16, "cpu", gen)
        x[1, 7] = float("nan")
        y = linear(x, qw, b, backend="cpu")
        assert torch.isnan(y[1]).all() and torch.isfinite(y[[0] + list(range(2, rows))]).all()
    x32, qw32, b32, _ = _problem(fmt, 3, 40, 256, torch.float32, "cpu", gen)
    assert torch.equal(linear(x32, qw32, b32, backend="cpu"), linear(x32, qw32, b32, backend="torch"))
    if fmt == "int8":
        x, qw, b, _ = _problem(fmt, 2, 40, 80, torch.bfloat16, "cpu", gen)
        assert torch.equal(linear(x, qw, b, backend="cpu"), linear(x, qw, b, backend="torch"))


def test_plain_linear_on_cpu_is_torch():
    """A plain dense weight has no "cpu" implementation: "auto" on a CPU is torch's F.linear."""
    assert "cpu" not in backends("linear")
    x, w = torch.randn(3, 24).bfloat16(), torch.randn(40, 24).bfloat16()
    assert torch.equal(linear(x, w), F.linear(x, w))
