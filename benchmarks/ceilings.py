"""Measure the machine's ceilings: device copy bandwidth (bytes read + written) and bf16 matmul.

    python benchmarks/ceilings.py OUT.json
"""
import json
import sys
import time

import torch


def timed(fn, iters: int = 20, warmup: int = 3) -> float:
    """Mean seconds per call of fn (CUDA-synchronised)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """GB/s of a device-to-device copy, counting bytes read and written."""
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    return 2 * nbytes / timed(lambda: b.copy_(a)) / 1e9


def matmul_tflops(n: int = 8192) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    return 2 * n ** 3 / timed(lambda: a @ b, iters=10) / 1e12


def main(out: str) -> dict:
    res = {"device": torch.cuda.get_device_name(), "copy_GBps": round(copy_bandwidth(), 1),
           "bf16_matmul_TFLOPs": round(matmul_tflops(), 1), "torch": torch.__version__}
    with open(out, "w") as f:
        json.dump(res, f, indent=2)
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "ceilings.json")
