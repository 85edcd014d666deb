"""Shared test set-up. Without a GPU, Triton kernels run in the interpreter: the variable must be
set before triton.jit decorates anything, so it is set here, before any gemforge import."""
import functools
import importlib
import importlib.util
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


@functools.cache
def _load_emulated_device():
    """gemforge.kernels._C_emu, or the build of it at GEMFORGE_C_EMU (test_cuda_memcheck's AddressSanitizer one)."""
    path = os.environ.get("GEMFORGE_C_EMU")
    if not path:
        return importlib.import_module("gemforge.kernels._C_emu")
    spec = importlib.util.spec_from_file_location("gemforge.kernels._C_emu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def cuda_wrappers_on_cpu(monkeypatch):
    """gemforge.kernels._native with the "cuda" wrappers' device check and stream lookup out of the way, so that
    CPU tensors reach their launches (whatever _ext() then is)."""
    import gemforge.kernels._native as native
    monkeypatch.setattr(native, "_check_device", lambda *args, **kwargs: None)
    monkeypatch.setattr(native, "_stream", lambda t: 0)
    return native


@pytest.fixture
def emulated_cuda(monkeypatch, cuda_wrappers_on_cpu):
    """Sends the "cuda" backend's launches to the emulated device (gemforge.kernels._C_emu, csrc/emu/), which
    takes CPU tensors: the wrappers take them (cuda_wrappers_on_cpu) and registry.select hands out the "cuda"
    backend for them. Skips where _C_emu was not built."""
    try:
        emu = _load_emulated_device()
    except ImportError as e:
        pytest.skip(f"gemforge.kernels._C_emu is not built ({e})")
    from gemforge.kernels import registry
    native = cuda_wrappers_on_cpu
    monkeypatch.setattr(emu, "cpu", native._ext().cpu, raising=False)  # (the CPU kernels stay _C's)
    monkeypatch.setattr(native, "_ext", lambda: emu)
    real = registry.unavailable_reason
    monkeypatch.setattr(registry, "unavailable_reason", lambda op, backend, device: (
        None if backend == "cuda" and "cuda" in registry.backends(op) else real(op, backend, device)))
    return emu


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
