"""rms_norm: the Triton kernel (interpreter on CPU) and the C++ CPU kernel against the torch reference."""
import pytest
import torch
from numerics import DTYPES, assert_close

from gemforge.kernels import rms_norm, select
from gemforge.kernels.rms_norm import rms_norm_ref, rms_norm_triton

EPS = 1e-6


def test_select_picks_triton(device):
    assert select("rms_norm", "triton", device) is rms_norm_triton


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [8, 769, 2048, 3072])
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "residual"])
def test_rms_norm(hidden, dtype, fused, kernel, nan_empty):
    g = torch.Generator().manual_seed(hidden * 10 + fused)
    tokens = 7
    x = torch.randn(tokens, hidden, generator=g).to(kernel.device, dtype)
    w = (0.5 * torch.randn(hidden, generator=g)).to(kernel.device, dtype)
    res = torch.randn(tokens, hidden, generator=g).to(kernel.device, dtype) if fused else None
    got = rms_norm(x, w, EPS, res, backend=kernel.backend)
    ref_lp = rms_norm_ref(x, w, EPS, res)
    if not fused:
        assert_close(got, rms_norm_ref(x.float(), w.float(), EPS), ref_lp)
        return
    y, r = got
    assert torch.equal(r, ref_lp[1]), "the fused residual sum must be x + residual rounded to x.dtype"
    # y normalises the rounded sum r, so the fp32 reference starts from r too
    assert_close(y, rms_norm_ref(r.float(), w.float(), EPS), ref_lp[0])


def test_rms_norm_leading_dims_and_strided_rows(kernel, nan_empty):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 96, generator=g).to(kernel.device, torch.bfloat16)[..., :64]  # rows with stride 96
    w = torch.randn(64, generator=g).to(kernel.device, torch.bfloat16)
    y = rms_norm(x, w, EPS, backend=kernel.backend)
    assert y.shape == x.shape
    assert_close(y, rms_norm_ref(x.float(), w.float(), EPS), rms_norm_ref(x, w, EPS))


def test_rms_norm_empty(kernel):
    x = torch.empty(0, 16, device=kernel.device)
    assert rms_norm(x, torch.zeros(16, device=kernel.device), EPS, backend=kernel.backend).shape == (0, 16)
