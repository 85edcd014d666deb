"""gemforge.kernels: the op functions the model calls, each with cuda / triton / cpu / torch backends."""
from .registry import BackendUnavailable, backends, register, select
from .rms_norm import rms_norm
from .gelu_and_mul import gelu_and_mul
from .rotary import rope_inv_freq, rotary
from .attention import AttnMetadata, RotaryWrite, attention, rotary_write_kv, write_kv
from .linear import linear
from .argmax import argmax
from . import _native  # noqa: F401,E402  registers the "cuda" and "cpu" backends (_C is imported lazily)

__all__ = [
    "AttnMetadata", "BackendUnavailable", "RotaryWrite", "argmax", "attention", "backends", "gelu_and_mul", "linear",
    "register", "rms_norm", "rope_inv_freq", "rotary", "rotary_write_kv", "select", "write_kv",
]
