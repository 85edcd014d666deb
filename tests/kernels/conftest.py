"""Fixtures shared by the kernel tests."""
from dataclasses import dataclass

import pytest

from gemforge.kernels import _native
from gemforge.kernels.registry import unavailable_reason


@dataclass(frozen=True)
class Kernel:
    backend: str
    device: str


@pytest.fixture(params=["triton", "cpu"])
def kernel(request, device, monkeypatch):
    """The implementation a kernel test checks: the Triton kernel on the test device (the interpreter
    on a CPU), then gemforge's C++ CPU kernel on CPU tensors (skipped where _C was not built; long
    prefill chunks, which the "cpu" backend hands to torch, stay with the C++ kernel here)."""
    if request.param == "cpu":
        why = unavailable_reason("attention", "cpu", "cpu")  # the same for every op: is _C built?
        if why:
            pytest.skip(why)
        monkeypatch.setattr(_native, "CPU_TORCH_PREFILL_TOKENS", 1 << 30)
        return Kernel("cpu", "cpu")
    return Kernel("triton", device)
