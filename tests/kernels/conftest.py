"""Fixtures shared by the kernel tests."""
import pytest
import torch


@pytest.fixture
def nan_empty(monkeypatch):
    """Make torch.empty return NaN-filled float tensors for the test's duration, so an output (or
    scratch) element that a kernel allocates but never writes shows up as NaN."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", empty)
