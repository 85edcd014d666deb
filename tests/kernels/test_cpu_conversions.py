"""The C++ CPU kernels convert fp16/bf16 by bit manipulation (csrc/cpu/common.h); these checks are
exact: every finite value survives the round trip, and rounding matches torch's bit for bit."""
import pytest
import torch

from gemforge.kernels import select
from gemforge.kernels.gelu_and_mul import gelu_and_mul_ref
from gemforge.kernels.registry import unavailable_reason

pytestmark = pytest.mark.skipif(unavailable_reason("rotary", "cpu", "cpu") is not None, reason="gemforge._C not built")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_every_finite_value_round_trips(dtype):
    """Rotary at position 0 is x * 1 - 0 * 0: it must write back every finite value, subnormals
    and signed zeros included, bit for bit."""
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    values = bits[torch.isfinite(bits.float())]
    d = 64
    values = torch.cat([values, values[: (-len(values)) % (d // 2)]])  # whole half-rows
    q = torch.zeros(len(values) * 2 // d, 1, d, dtype=dtype)
    q[:, 0, : d // 2] = values.view(-1, d // 2)  # the second halves stay 0
    k = torch.zeros(q.shape[0], 1, d, dtype=dtype)
    before = q.clone()
    select("rotary", "cpu", "cpu")(q, k, torch.zeros(q.shape[0], dtype=torch.long), 10000.0)
    assert torch.equal(q.view(torch.int16), before.view(torch.int16))


@pytest.mark.parametrize("dtype,exponents", [(torch.float16, (-9, 4)), (torch.bfloat16, (-41, 37))], ids=str)
def test_rounding_equals_torch(dtype, exponents):
    """gelu(g) is exactly g for g >= 10 in fp32 (both formulas), so gelu_and_mul returns g * u
    rounded once: products from the subnormal range to overflow must round as torch rounds."""
    g = torch.Generator().manual_seed(11)
    n = 4096
    gate = (10 + 90 * torch.rand(n, generator=g)).to(dtype)
    up = (torch.randn(n, generator=g) * torch.logspace(*exponents, n)).to(dtype)
    gu = torch.stack([gate, up]).view(1, 2 * n)  # one row: [gate | up]
    ours = select("gelu_and_mul", "cpu", "cpu")(gu)
    theirs = gelu_and_mul_ref(gu)
    subnormal = (theirs != 0) & (theirs.abs() < torch.finfo(dtype).tiny)
    assert torch.isinf(theirs).any() and subnormal.sum() > 10  # the test reaches both ends
    assert torch.equal(ours.view(torch.int16), theirs.view(torch.int16))
