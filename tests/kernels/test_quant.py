"""Weight-only quantized formats (kernels/quant.py) against docs/QUANT_FORMAT.md."""
import zlib

import numpy as np
import pytest
import torch

from gemforge.kernels.quant import (QuantizedWeight, dequantize, embedding_rows, pack_int4, quantize_int4,
                                    quantize_int8, unpack_int4)


@pytest.fixture
def gen(request):
    """A generator seeded from the test id: a fresh seed per case, reproducible."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.name.encode()))


def _int4_spec(w: torch.Tensor, g: int, symmetric: bool):
    """docs/QUANT_FORMAT.md written out element by element, in fp32: (packed bytes, scales, zeros)."""
    f32 = np.float32
    n, k = w.shape
    packed = torch.zeros(n, k // 2, dtype=torch.uint8)
    scales, zeros = torch.zeros(n, k // g), torch.zeros(n, k // g)
    for r in range(n):
        for c in range(k // g):
            grp = [f32(v) for v in w[r, c * g:(c + 1) * g].tolist()]
            if symmetric:
                s, z = max(abs(v) for v in grp) / f32(7), 8
            else:
                lo, hi = min(min(grp), f32(0)), max(max(grp), f32(0))
                s = (hi - lo) / f32(15)
                z = int(np.round(-lo / s))
            scales[r, c], zeros[r, c] = float(s), z
            for i, v in enumerate(grp):
                q = min(max(int(np.round(v / s)) + z, 0), 15)
                kk = c * g + i
                packed[r, kk // 2] |= q << (4 * (kk % 2))
    return packed, scales, zeros


@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_matches_the_written_spec(symmetric, gen):
    w = torch.randn(3, 64, generator=gen)
    qw = quantize_int4(w, group_size=32, symmetric=symmetric)
    packed, scales, zeros = _int4_spec(w, 32, symmetric)
    torch.testing.assert_close(qw.scales, scales, rtol=0, atol=0)
    assert torch.equal(qw.qweight, packed)
    assert qw.zeros is None if symmetric else torch.equal(qw.zeros, zeros)


@pytest.mark.parametrize("n,k", [(1, 2), (7, 64), (769, 256)])
def test_pack_unpack_roundtrip(n, k, gen):
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen)
    packed = pack_int4(q)
    assert packed.shape == (n, k // 2) and packed.dtype == torch.uint8
    assert torch.equal(packed, q[:, 0::2] + 16 * q[:, 1::2])  # low nibble k = 2j, high nibble k = 2j + 1
    assert torch.equal(unpack_int4(packed), q)
    with pytest.raises(ValueError, match="must be even"):
        pack_int4(q[:, :1])


def _step_bound(qw: QuantizedWeight, w: torch.Tensor) -> torch.Tensor:
    """Per-element bound on |W - dequant(W)|: s / 2, widened by the scale's own rounding (a clamped
    end of the range) and the output dtype's rounding."""
    s = qw.scales.float()
    s = s[:, None] if qw.group_size is None else s.repeat_interleave(qw.group_size, dim=1)
    eps = torch.finfo(qw.scales.dtype).eps
    return s * (0.5 + 15 * eps) + w.float().abs() * eps


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [7, 769])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_roundtrip(symmetric, group_size, n, dtype, gen):
    k = 256
    w = (torch.randn(n, k, generator=gen) * 0.05 + 0.01).to(dtype)
    w[0, :group_size] = 0  # a group of zeros: scale 1, reconstructed exactly
    qw = quantize_int4(w, group_size=group_size, symmetric=symmetric, name="w")
    assert (qw.fmt, qw.group_size, qw.shape) == ("int4", group_size, (n, k))
    assert qw.qweight.shape == (n, k // 2) and qw.qweight.dtype == torch.uint8
    assert qw.scales.shape == (n, k // group_size) and qw.scales.dtype == dtype
    assert qw.scales[0, 0] == 1
    if symmetric:
        assert qw.zeros is None
    else:
        z = qw.zeros.float()
        assert qw.zeros.dtype == dtype and torch.equal(z, z.round()) and z.min() >= 0 and z.max() <= 15
    wd = dequantize(qw)
    assert wd.dtype == dtype and wd.shape == (n, k)
    assert (w.float() - wd.float()).abs().le(_step_bound(qw, w)).all()
    assert torch.equal(wd[0, :group_size], w[0, :group_size])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k", [(7, 33), (769, 256)])
def test_int8_roundtrip(n, k, dtype, gen):
    w = (torch.randn(n, k, generator=gen) * 0.05).to(dtype)
    w[1] = 0
    qw = quantize_int8(w, name="w")
    assert (qw.fmt, qw.group_size, qw.zeros, qw.shape) == ("int8", None, None, (n, k))
    assert qw.qweight.dtype == torch.int8 and qw.qweight.shape == (n, k)
    assert qw.scales.dtype == dtype and qw.scales.shape == (n,) and qw.scales[1] == 1
    assert qw.qweight.abs().max() <= 127
    wd = dequantize(qw)
    assert wd.dtype == dtype and (w.float() - wd.float()).abs().le(_step_bound(qw, w)).all()
    assert torch.equal(wd[1], w[1])


@pytest.mark.parametrize("fmt,bound", [("int8", 0.0082), ("int4-g128", 0.12), ("int4-g128-asym", 0.104),
                                       ("int4-g32", 0.1)])
def test_relative_rms_error_on_gaussian_weights(fmt, bound, gen):
    w = torch.randn(256, 1024, generator=gen)
    qw = (quantize_int8(w) if fmt == "int8" else
          quantize_int4(w, group_size=int(fmt.split("-")[1][1:]), symmetric="asym" not in fmt))
    rel_rms = ((dequantize(qw) - w).pow(2).mean() / w.pow(2).mean()).sqrt().item()
    assert rel_rms < bound, f"{fmt}: relative RMS error {rel_rms:.4f}"


def test_clear_errors():
    with pytest.raises(ValueError, match=r"int4 quantization of layers\.0\.mlp\.down_proj: in_features 770 is "
                                         r"not a multiple of group_size 128"):
        quantize_int4(torch.randn(4, 770), name="layers.0.mlp.down_proj")
    with pytest.raises(ValueError, match="int4 quantization of weight: group_size 48 is not one of"):
        quantize_int4(torch.randn(4, 96), group_size=48)
    with pytest.raises(ValueError, match=r"int8 quantization of lm_head: expected a 2-D floating"):
        quantize_int8(torch.randn(4), name="lm_head")
    with pytest.raises(ValueError, match="int8 quantization of w: the weight holds 1 non-finite"):
        quantize_int8(torch.tensor([[1.0, float("inf")]]), name="w")
    with pytest.raises(ValueError, match=r"scales is torch.float32 \(3,\), expected float \(4,\)"):
        QuantizedWeight("int8", torch.zeros(4, 8, dtype=torch.int8), torch.ones(3), None, None, (4, 8))


@pytest.mark.parametrize("fmt", ["int8", "int4", "int4-asym"])
def test_nbytes_and_to(fmt):
    n, k = 12, 256
    w = torch.randn(n, k, dtype=torch.bfloat16)
    qw = quantize_int8(w) if fmt == "int8" else quantize_int4(w, group_size=64, symmetric=fmt == "int4")
    expected = {"int8": n * k + 2 * n,
                "int4": n * k // 2 + 2 * n * k // 64,
                "int4-asym": n * k // 2 + 2 * 2 * n * k // 64}[fmt]
    assert qw.nbytes == expected
    moved = qw.to("cpu")
    assert moved.device.type == "cpu" and moved.nbytes == expected and torch.equal(dequantize(moved), dequantize(qw))


@pytest.mark.parametrize("fmt", ["int8", "int4", "int4-asym"])
def test_embedding_rows(fmt, gen):
    table = torch.randn(50, 128, generator=gen).to(torch.bfloat16)
    qw = quantize_int8(table) if fmt == "int8" else quantize_int4(table, group_size=32, symmetric=fmt == "int4")
    ids = torch.randint(0, 50, (3, 5), generator=gen)
    rows = embedding_rows(qw, ids)
    assert rows.shape == (3, 5, 128) and rows.dtype == torch.bfloat16
    assert torch.equal(rows, dequantize(qw)[ids])
