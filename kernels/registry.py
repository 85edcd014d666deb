"""Backend registry: every op has up to four implementations: "cuda" and "cpu" (gemforge's own C++
kernels in csrc/, for CUDA and CPU tensors), "triton", and "torch" (the reference, runs anywhere).

`select(op, backend, device)` returns the function to call. An explicit backend that cannot run
on `device` raises `BackendUnavailable`; "auto" walks the op's preference order (on a CPU: "cpu",
then "torch") and logs one line the first time it falls back. The model resolves its ops once at
build time, so a captured CUDA graph always replays the same path.
"""
from __future__ import annotations

import importlib
import logging
import os
from typing import Callable

log = logging.getLogger("gemforge.kernels")

BACKENDS = ("cuda", "triton", "cpu", "torch")
_IMPLS: dict[str, dict[str, Callable]] = {}
_PREFERENCE: dict[str, tuple[str, ...]] = {}
_warned: set[tuple[str, str]] = set()


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run the op on this device."""


def register(op: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator: record `fn` as `backend`'s implementation of `op`."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} for op {op!r}; expected one of {BACKENDS}")

    def deco(fn: Callable) -> Callable:
        _IMPLS.setdefault(op, {})[backend] = fn
        return fn

    return deco


def prefer(op: str, *order: str) -> None:
    """Set the order "auto" tries for `op` on a CUDA device (measured by the benchmarks)."""
    _PREFERENCE[op] = tuple(order)


def preference(op: str) -> tuple[str, ...]:
    """The order "auto" tries for `op` on a CUDA device."""
    return _PREFERENCE.get(op, ("cuda", "triton", "torch"))


def _native_ext():
    try:
        return importlib.import_module("gemforge.kernels._C")
    except ImportError:
        return None


def unavailable_reason(op: str, backend: str, device: str) -> str | None:
    """None if `backend` can run `op` on `device` (a torch device type), else the reason."""
    if backend not in _IMPLS.get(op, {}):
        return f"op {op!r} has no {backend} implementation"
    if backend == "torch":
        return None
    if backend == "triton":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton is not installed"
        if device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return f"triton needs a CUDA device or TRITON_INTERPRET=1 (tensors are on {device})"
    if backend == "cuda":
        if device != "cuda":
            return f"the CUDA backend needs a CUDA device (tensors are on {device})"
        ext = _native_ext()
        if ext is None or not getattr(ext, "WITH_CUDA", False):
            return "gemforge.kernels._C was built without CUDA kernels (no nvcc at install time?)"
        return None
    if backend == "cpu":
        if device != "cpu":
            return f"the CPU backend needs CPU tensors (tensors are on {device})"
        if _native_ext() is None:
            return "gemforge.kernels._C was not built (no cmake or C++ compiler at install time?)"
        return None
    return f"unknown backend {backend!r}"


def select(op: str, backend: str = "auto", device="cpu") -> Callable:
    """The implementation of `op` to use on `device` ("cpu", "cuda" or a torch.device)."""
    if op not in _IMPLS:
        raise KeyError(f"unknown op {op!r}; registered: {sorted(_IMPLS)}")
    dev = device.type if hasattr(device, "type") else str(device).split(":")[0]
    if backend != "auto":
        why = unavailable_reason(op, backend, dev)
        if why is not None:
            raise BackendUnavailable(f"{op}: backend {backend!r} unavailable: {why}")
        return _IMPLS[op][backend]
    order = preference(op) if dev == "cuda" else ("cpu", "torch")
    skipped = []
    for b in order:
        why = unavailable_reason(op, b, dev)
        if why is None:
            if skipped and (op, b) not in _warned:
                _warned.add((op, b))
                log.info("%s: using %s backend (%s)", op, b, "; ".join(skipped))
            return _IMPLS[op][b]
        if b in _IMPLS[op]:
            skipped.append(f"{b}: {why}")
    raise BackendUnavailable(f"{op}: no backend can run on {dev}: {'; '.join(skipped)}")


def backends(op: str) -> tuple[str, ...]:
    """The backends that have an implementation of `op` (available or not)."""
    return tuple(b for b in BACKENDS if b in _IMPLS.get(op, {}))
