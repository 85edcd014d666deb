"""gelu_and_mul: the Triton kernel (interpreter on CPU) and the C++ CPU kernel against the torch reference."""
import pytest
import torch
from numerics import DTYPES, assert_close

from gemforge.kernels import gelu_and_mul, select
from gemforge.kernels.gelu_and_mul import gelu_and_mul_ref, gelu_and_mul_triton

# exp(-2z) overflowing to inf for very negative gates is intended (gelu -> -0); numpy warns about it
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


def test_select_picks_triton(device):
    assert select("gelu_and_mul", "triton", device) is gelu_and_mul_triton


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens,inter", [(1, 8), (7, 769), (3, 2048)])
def test_gelu_and_mul(tokens, inter, dtype, kernel, nan_empty):
    g = torch.Generator().manual_seed(tokens * 1000 + inter)
    x = (3 * torch.randn(tokens, 2 * inter, generator=g)).to(kernel.device, dtype)
    out = gelu_and_mul(x, backend=kernel.backend)
    assert_close(out, gelu_and_mul_ref(x.float()), gelu_and_mul_ref(x))


def test_gelu_and_mul_extreme_inputs(kernel, nan_empty):
    """Large |gate| must not overflow into NaN: gelu(-inf side) -> -0, gelu(+big) -> gate."""
    gate = torch.tensor([-1e4, -200.0, -20.0, -1e-4, 0.0, 1e-4, 20.0, 200.0, 1e4])
    x = torch.cat([gate, torch.linspace(-2, 2, gate.numel())]).to(kernel.device)
    assert_close(gelu_and_mul(x, backend=kernel.backend), gelu_and_mul_ref(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gelu_and_mul_propagates_nan_where_the_reference_does(kernel, dtype, nan_empty):
    """A NaN gate or up gives NaN in its own output element only (the CPU kernel's vectorised exp takes the
    NaN through its range reduction without converting it to an integer); the rest matches the reference."""
    g = torch.Generator().manual_seed(11)
    x = (3 * torch.randn(4, 2 * 40, generator=g)).to(dtype)
    x[0, 3] = x[1, 40 + 7] = x[3, 0] = float("nan")  # gates of rows 0 and 3, an up of row 1
    out = gelu_and_mul(x.to(kernel.device), backend=kernel.backend).cpu()
    ref = gelu_and_mul_ref(x)
    assert torch.equal(out.isnan(), ref.isnan()) and int(ref.isnan().sum()) == 3
    keep = ~ref.isnan()
    assert_close(out[keep], gelu_and_mul_ref(x.float())[keep], ref[keep])


def test_gelu_and_mul_leading_dims(kernel, nan_empty):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 96, generator=g).to(kernel.device, torch.float16)
    out = gelu_and_mul(x, backend=kernel.backend)
    assert out.shape == (2, 5, 48)
    assert_close(out, gelu_and_mul_ref(x.float()), gelu_and_mul_ref(x))
