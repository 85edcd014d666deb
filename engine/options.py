"""EngineConfig: the engine's options, and where they are resolved and checked before anything loads:
the device (cpu, or an available cuda[:N]), the dtype ("auto": the checkpoint's, or float32 on a CPU
without native bf16), and the sizes (positive; max_model_len within the model's positions).
Each bad value raises RequestError naming its field."""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from .config import ModelConfig
from .errors import RequestError
from .loader import DTYPES, to_dtype


@dataclass
class EngineConfig:
    dtype: str = "auto"
    device: str | None = None
    backend: str = "auto"
    kv_cache_tokens: int | None = None
    block_size: int = 16
    max_model_len: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True  # share the cached blocks of identical prompt prefixes
    cuda_graphs: bool = True
    warmup: bool = True  # on a GPU: compile kernels and capture every CUDA graph at start, not mid-serving
    async_scheduling: bool | None = None  # launch each step before reading the last one's tokens; None: on a GPU
    gpu_memory_utilization: float = 0.85
    quantization: str | None = None      # "int8" | "int4": quantize while loading
    quantize_lm_head: bool = False
    group_size: int = 128
    draft_model: str | None = None       # a draft model's directory, or "[ngram]" for prompt lookup
    draft_quantization: str | None = None
    draft_vocab_size: int | None = None  # the draft proposes among this many tokens only (its LM head cut to them)
    draft_vocab_corpus: str | None = None  # text whose most frequent tokens those are (else: the tokenizer's scores)
    num_speculative_tokens: int = 4
    adaptive_lookahead: bool = True
    draft_cost: float | None = None  # a draft step in target decode steps; None: measured (StepCosts)


def check_sizes(ec: EngineConfig, cfg: ModelConfig) -> None:
    """The engine's sizes are positive integers, gpu_memory_utilization in (0, 1], and max_model_len within the
    model's positions; else RequestError naming the field."""
    for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "max_model_len", "kv_cache_tokens"):
        v = getattr(ec, name)
        if (v is not None or name in ("max_num_seqs", "max_num_batched_tokens", "block_size")) and (
                not isinstance(v, int) or isinstance(v, bool) or v <= 0):
            raise RequestError(f"{name} must be a positive integer, got {v!r}", field=name)
    if not 0 < ec.gpu_memory_utilization <= 1:
        raise RequestError(f"gpu_memory_utilization must be in (0, 1], got {ec.gpu_memory_utilization}",
                           field="gpu_memory_utilization")
    if ec.max_model_len is not None and ec.max_model_len > cfg.max_position_embeddings:
        raise RequestError(f"max_model_len {ec.max_model_len} exceeds the model's max_position_embeddings "
                           f"({cfg.max_position_embeddings})", field="max_model_len")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def host_memory_available() -> int:
    """Bytes of RAM the kernel can hand out now (/proc/meminfo's MemAvailable; else the machine's total)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_device(device: str) -> str:
    """`device` if gemforge can run there (cpu, or an available cuda[:N]); else RequestError."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise RequestError(f"device {device!r} is not a device name (cpu, cuda, cuda:N)", field="device") from None
    if d.type not in ("cpu", "cuda"):
        raise RequestError(f"device {device!r}: gemforge runs on cpu or cuda", field="device")
    if d.type == "cuda" and not torch.cuda.is_available():
        raise RequestError(f"device {device!r}: no CUDA device is available (torch.cuda.is_available() is False)",
                           field="device")
    if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
        raise RequestError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)",
                           field="device")
    return device


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 dot products in hardware (x86 AVX512-BF16 or AMX, Arm BF16),
    read from /proc/cpuinfo's flags (False where there is none, e.g. not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return bool({"avx512_bf16", "amx_bf16", "bf16"} & set(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return False


def resolve_dtype(dtype: str, cfg: ModelConfig, device: str) -> torch.dtype:
    """"auto": the checkpoint's dtype on a GPU; on a CPU, a bf16 checkpoint's bf16 where the CPU has
    native bf16 (it halves the weight reads that bound decoding; benchmarks/README.md has the figures),
    else float32 (emulated bf16 or fp16 matmuls are slow)."""
    if dtype != "auto" and dtype not in DTYPES:
        raise RequestError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}", field="dtype")
    if dtype == "auto":
        ckpt = to_dtype(cfg.dtype)
        if device.startswith("cuda"):
            return ckpt
        return ckpt if ckpt == torch.bfloat16 and cpu_has_native_bf16() else torch.float32
    return to_dtype(dtype)
