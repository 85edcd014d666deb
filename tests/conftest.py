"""Shared test set-up. Without a GPU, Triton kernels run in the interpreter: the variable must be
set before triton.jit decorates anything, so it is set here, before any gemforge import."""
import os
import sys

import pytest

try:
    import torch
    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))  # tests/numerics.py and friends


@pytest.fixture
def device():
    return "cuda" if _HAS_CUDA else "cpu"
