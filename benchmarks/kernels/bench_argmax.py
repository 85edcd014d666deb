"""The greedy pick: argmax over fp32 logits [rows, vocab] (nano's 8192, CodeGemma's 256000).
On a CPU the "cpu" backend against torch's max(-1); on a GPU there is only torch's."""
import pytest
import torch
from common import ON_GPU, compare, nbytes, op_impls


@pytest.mark.skipif(ON_GPU, reason="argmax is torch's on a GPU: there is no gemforge kernel to time")
@pytest.mark.parametrize("vocab", [8192, 256000])
@pytest.mark.parametrize("rows", [1, 64, 256])
def test_argmax(benchmark, rows, vocab):
    benchmark.group = f"argmax-{vocab}"
    scores = torch.randn(rows, vocab)
    compare(benchmark, op_impls("argmax", scores), nbytes(scores) + rows * 8)
