"""The CUDA kernels in the built _C (CI builds it with nvcc for sm_80 and sm_90a): for every kernel
and architecture, at most SPILL_LIMIT bytes of stack frame (where spilled registers go), no local
memory and static shared memory within the 48 KiB a block may declare, read off the binary with
cuobjdump, without a GPU. The decode attention kernel spilled 4-12 bytes (a 16-byte frame on
sm_90a) under ptxas's default register budget (96) before its launch bounds asked for 4 blocks per
SM; two quantized-GEMV tilings kept an 8-byte spill (int8 at 4 rows on sm_80, int4 at 2 rows on
sm_90a) until the kernel's grid-stride loop over row groups, which ptxas allocates without one."""
import importlib
from pathlib import Path

import pytest

from cuda_resources import CUOBJDUMP, resource_usage

SPILL_LIMIT = 8  # bytes per thread: one spilled 8-byte slot at most (tests/kernels/triton_compile.py too)


def _built_with_cuda() -> Path | None:
    try:
        ext = importlib.import_module("gemforge.kernels._C")
    except ImportError:
        return None
    return Path(ext.__file__) if getattr(ext, "WITH_CUDA", False) else None


@pytest.mark.skipif(_built_with_cuda() is None, reason="gemforge._C was not built with its CUDA kernels")
@pytest.mark.skipif(not CUOBJDUMP.exists(), reason=f"no cuobjdump at {CUOBJDUMP}")
def test_cuda_kernels_do_not_spill_and_fit_static_shared_memory():
    kernels = resource_usage(_built_with_cuda())
    archs = {k.arch for k in kernels}  # CI builds sm_80 and sm_90a; the GPU suite its card's alone
    assert archs and archs <= {"sm_80", "sm_90a"}, archs
    for arch in archs:
        names = {k.name for k in kernels if k.arch == arch}
        for family in ("decode_partition_kernel", "decode_partition_mma_kernel", "decode_reduce_kernel",
                       "quant_gemv_kernel", "mma_gemv_kernel", "rms_norm", "rotary", "gelu_and_mul"):
            assert any(family in n for n in names), f"{arch}: no {family} in {sorted(names)}"
    bad = []
    for k in kernels:
        if k.stack > SPILL_LIMIT or k.local or k.shared > 48 * 1024:
            bad.append(f"{k.arch} {k.name}: {k.registers} registers, stack {k.stack} B, local {k.local} B, "
                       f"static shared {k.shared} B")
    assert not bad, "\n".join(bad)
