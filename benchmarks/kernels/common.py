"""Timing and bandwidth accounting shared by the kernel benchmarks.

On a CUDA device each benchmark times gemforge's "triton" backend against its peers (torch eager,
torch.compile of the reference, and for attention SDPA on dense tensors); on a CPU it times the
"cpu" backend (the C++ kernels of csrc/cpu/, where _C is built) against the torch reference on the
bundled nano model's shapes, so CI exercises the files in seconds. The subject is timed by
pytest-benchmark (wall clock, synchronised) and, like every peer, by CUDA events (median, L2 flushed)
and on a GPU also replayed from a CUDA graph (no launch overhead: `<impl>_graph_us`);
benchmark.extra_info gets each one's microseconds and GB/s — bytes counted once: every input read
once, every output written once — and the subject's speedup over each peer.
GEMFORGE_BENCH_COMPILE=0 leaves out the torch.compile peers (they compile for minutes).
GEMFORGE_BENCH_LOG=FILE appends each benchmark's extra_info to FILE as a JSON line as soon as it is
measured (pytest-benchmark's own JSON is written only at the end of the run).
"""
from __future__ import annotations

import json
import os
import time
import warnings
from typing import Callable

import torch

from gemforge.kernels import select
from gemforge.kernels.registry import unavailable_reason

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
COMPILE = os.environ.get("GEMFORGE_BENCH_COMPILE", "1") != "0"


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def device_time(fn: Callable[[], object]) -> float:
    """Seconds per call: median over CUDA-event timings on GPU, over perf_counter timings on CPU."""
    if ON_GPU:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e-3
    fn()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def graph_time(fn: Callable[[], object], calls: int = 20, replays: int = 5) -> float | None:
    """Seconds per call of fn replayed from a CUDA graph, the L2 cache flushed before each call and
    the flushes' own time subtracted: device time without launch overhead, as in the engine's
    CUDA-graph steps (do_bench's event timing includes the host's launch time wherever that is the
    longer). None where fn cannot be captured (it synchronises with the host)."""
    l2_bytes = torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
    flush = torch.empty(2 * l2_bytes // 4, dtype=torch.int32, device="cuda")

    def capture(body):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            body()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                body()
        return graph

    def seconds(graph):
        graph.replay()
        times = []
        for _ in range(replays):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e-3)
        return sorted(times)[len(times) // 2]

    try:
        both = capture(lambda: (flush.zero_(), fn()))
    except Exception:  # (a failed capture leaves the stream usable again once it is torn down)
        torch.cuda.synchronize()
        return None
    only = capture(flush.zero_)
    return max(0.0, seconds(both) - seconds(only)) / calls


def compiled(fn: Callable, *args) -> Callable[[], object] | None:
    """A zero-argument call of torch.compile(fn) on args, or None (with a warning) if compiling fails."""
    if not COMPILE:
        return None
    try:
        cfn = torch.compile(fn)
        cfn(*args)
    except Exception as e:  # a peer that cannot compile is left out, not a failure
        warnings.warn(f"torch.compile of {getattr(fn, '__name__', fn)} failed: {type(e).__name__}: {e}")
        return None
    return lambda: cfn(*args)


def op_impls(op: str, *args, compile_ref: bool = True) -> dict[str, Callable[[], object] | None]:
    """Zero-argument calls of `op` on args: {"triton", "torch", "torch.compile"} on GPU; {"cpu",
    "torch"} on CPU ({"torch"} where the C++ CPU kernels were not built)."""
    ref = select(op, "torch", DEVICE)
    if not ON_GPU:
        if unavailable_reason(op, "cpu", "cpu") is not None:
            return {"torch": lambda: ref(*args)}
        cpu = select(op, "cpu", DEVICE)
        return {"cpu": lambda: cpu(*args), "torch": lambda: ref(*args)}
    tri = select(op, "triton", DEVICE)
    return {"triton": lambda: tri(*args), "torch": lambda: ref(*args),
            "torch.compile": compiled(ref, *args) if compile_ref else None}


def compare(benchmark, impls: dict[str, Callable[[], object] | None], bytes_moved: int) -> None:
    """Benchmark the first entry of impls with pytest-benchmark; record GB/s and speedups vs the others."""
    name, subject = next(iter(impls.items()))
    times = {k: device_time(fn) for k, fn in impls.items() if fn is not None}
    info = benchmark.extra_info
    info["impl"], info["bytes"] = name, bytes_moved
    for k, t in times.items():
        info[f"{k}_us"] = round(t * 1e6, 2)
        info[f"{k}_GBps"] = round(bytes_moved / t / 1e9, 1)
        if k != name:
            info[f"speedup_vs_{k}"] = round(t / times[name], 2)
    if ON_GPU:  # the same without launch overhead; not the torch references (some read the device)
        for k, fn in impls.items():
            t = graph_time(fn) if fn is not None and k not in ("torch", "torch.compile") else None
            if t:
                info[f"{k}_graph_us"] = round(t * 1e6, 2)
                info[f"{k}_graph_GBps"] = round(bytes_moved / t / 1e9, 1)
    if os.environ.get("GEMFORGE_BENCH_LOG"):
        with open(os.environ["GEMFORGE_BENCH_LOG"], "a") as f:
            f.write(json.dumps({"benchmark": benchmark.name, **info}) + "\n")
    sync = torch.cuda.synchronize if ON_GPU else (lambda: None)
    rounds = max(3, min(50, int(0.2 / max(times[name], 1e-6))))
    benchmark.pedantic(lambda: (subject(), sync()), rounds=rounds, warmup_rounds=1)


# The CodeGemma shapes on GPU; the bundled nano model's on CPU.
if ON_GPU:
    MODELS = {"2b": dict(hidden=2048, heads=8, kv_heads=1, head_dim=256, inter=16384),
              "7b": dict(hidden=3072, heads=16, kv_heads=16, head_dim=256, inter=24576)}
    TOKENS = (1, 16, 128, 512)
else:
    MODELS = {"nano": dict(hidden=256, heads=4, kv_heads=4, head_dim=64, inter=1024)}
    TOKENS = (1, 8, 64)
DTYPE = torch.bfloat16
