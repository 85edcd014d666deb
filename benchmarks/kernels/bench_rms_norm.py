"""rms_norm (plain and fused with the residual add) on the CodeGemma hidden sizes."""
import pytest
import torch
from common import DEVICE, DTYPE, MODELS, TOKENS, compare, nbytes, op_impls


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("model", MODELS)
def test_rms_norm(benchmark, model, tokens, fused):
    benchmark.group = f"rms_norm-{model}"
    hidden = MODELS[model]["hidden"]
    x = torch.randn(tokens, hidden, device=DEVICE, dtype=DTYPE)
    w = torch.randn(hidden, device=DEVICE, dtype=DTYPE)
    res = torch.randn_like(x) if fused else None
    moved = nbytes(x, w, x) + (2 * nbytes(x) if fused else 0)  # x, w read, y written (+ residual read, r written)
    compare(benchmark, op_impls("rms_norm", x, w, 1e-6, res), moved)
