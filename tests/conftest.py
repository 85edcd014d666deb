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


@pytest.fixture
def nan_empty(monkeypatch):
    """Make torch.empty and torch.empty_like return NaN-filled float tensors for the test's
    duration, so an output (or scratch) element that a kernel allocates but never writes shows up
    as NaN."""
    for name in ("empty", "empty_like"):
        real = getattr(torch, name)

        def poisoned(*args, _real=real, **kwargs):
            t = _real(*args, **kwargs)
            return t.fill_(float("nan")) if t.is_floating_point() else t

        monkeypatch.setattr(torch, name, poisoned)
