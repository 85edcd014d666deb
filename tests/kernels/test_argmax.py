"""argmax: the C++ CPU kernel against torch.max(-1).indices, exactly (ties, NaN, strided rows)."""
import pytest
import torch

from gemforge.kernels import argmax, select
from gemforge.kernels.registry import unavailable_reason

pytestmark = pytest.mark.skipif(unavailable_reason("argmax", "cpu", "cpu") is not None, reason="gemforge._C not built")


@pytest.mark.parametrize("rows,n", [(1, 1), (3, 17), (64, 8192), (5, 256000), (300, 96)])
def test_argmax_equals_torch(rows, n):
    g = torch.Generator().manual_seed(rows * 31 + n)
    x = torch.randn(rows, n, generator=g)
    x[:, n // 2] = x.max(-1).values  # a tie between n // 2 and the original maximum: the first wins
    assert torch.equal(select("argmax", "cpu", "cpu")(x), x.max(-1).indices)


def test_argmax_ties_across_lanes_and_the_tail():
    """Maxima repeated at places that share or differ in their position mod 16 (the vector lanes),
    a maximum in the tail after the last whole 16, all-equal rows, a NaN in the tail only."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(8, 100, generator=g)
    x[0, [37, 5, 21]] = 9.0      # lanes 5 and 5 (5, 21) and 5 (37): index 5 wins
    x[1, [70, 35]] = 9.0         # lane 6 (70) after lane 3 (35): 35 wins
    x[2, 97] = 9.0               # the tail (96..99)
    x[3, [3, 98]] = 9.0          # a tie between a lane and the tail: 3 wins
    x[4] = 0.0                   # all equal: 0
    x[5, 99] = float("nan")      # a NaN in the tail
    x[6, [15, 16]] = 9.0         # neighbours in different lanes: 15
    x[7, 80] = 9.0
    got = select("argmax", "cpu", "cpu")(x)
    assert torch.equal(got, x.max(-1).indices)
    assert got.tolist()[:7] == [5, 35, 97, 3, 0, 99, 15]


def test_argmax_nan_inf_and_strided_rows():
    g = torch.Generator().manual_seed(3)
    buf = torch.randn(6, 200, generator=g)
    buf[1, 50] = float("nan")
    buf[1, 120] = float("nan")
    buf[2, 17] = float("inf")
    buf[3] = float("-inf")
    x = buf[:, 10:150]  # rows with stride 200
    got = select("argmax", "cpu", "cpu")(x)
    assert torch.equal(got, x.max(-1).indices)
    assert got[1] == 40 and got[2] == 7 and got[3] == 0


def test_argmax_other_dtypes_and_shapes():
    x = torch.randn(2, 3, 11).bfloat16()
    assert torch.equal(argmax(x), x.max(-1).indices)  # bf16: torch
    y = torch.randn(2, 3, 11)
    assert torch.equal(select("argmax", "cpu", "cpu")(y), y.max(-1).indices)  # leading dims
    with pytest.raises(ValueError, match="empty last dim"):
        argmax(torch.empty(2, 0))
