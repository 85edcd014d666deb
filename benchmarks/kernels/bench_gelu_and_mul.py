"""gelu_and_mul on the CodeGemma MLP widths."""
import pytest
import torch
from common import DEVICE, DTYPE, MODELS, TOKENS, compare, nbytes, op_impls


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("model", MODELS)
def test_gelu_and_mul(benchmark, model, tokens):
    benchmark.group = f"gelu_and_mul-{model}"
    gate_up = torch.randn(tokens, 2 * MODELS[model]["inter"], device=DEVICE, dtype=DTYPE)
    moved = nbytes(gate_up) * 3 // 2  # [T, 2I] read, [T, I] written
    compare(benchmark, op_impls("gelu_and_mul", gate_up), moved)
