"""The CUDA kernels in the built _C (CI builds it with nvcc for sm_80 and sm_90a): for every kernel
and architecture, at most SPILL_LIMIT bytes of stack frame (where spilled registers go), no local
memory and static shared memory within the 48 KiB a block may declare, read off the binary with
cuobjdump, without a GPU. The decode attention kernel spilled 4-12 bytes (a 16-byte frame on
sm_90a) under ptxas's default register budget (96) before its launch bounds asked for 4 blocks per
SM; two quantized-GEMV tilings kept an 8-byte spill (int8 at 4 rows on sm_80, int4 at 2 rows on
sm_90a) until the kernel's grid-stride loop over row groups, which ptxas allocates without one.
And on sm_90a, where launches may be programmatic, every kernel waits for the previous one before it
touches global memory."""
import re
import importlib
from pathlib import Path

import pytest

from cuda_resources import CUOBJDUMP, resource_usage, sass

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


# SASS opcodes that read or write global memory (loads, stores, atomics, reductions, cache controls, async and
# bulk copies); shared memory's (LDS, STS) and the constant bank's (LDC) are not among them.
GLOBAL_MEMORY = re.compile(r"(LDG|STG|LD|ST|ATOMG?|RED|CCTL|LDGSTS|UBLKCP|UTMALDG|UTMASTG)(\.|$)")


@pytest.mark.skipif(_built_with_cuda() is None, reason="gemforge._C was not built with its CUDA kernels")
@pytest.mark.skipif(not CUOBJDUMP.exists(), reason=f"no cuobjdump at {CUOBJDUMP}")
def test_sm90_kernels_wait_for_the_previous_kernel_before_touching_global_memory():
    """Launched programmatically (kernels._native.PROGRAMMATIC_LAUNCH), a kernel runs beside the end of the
    one before it, whose writes it may read only after griddepcontrol.wait (SASS: ACQBULK; csrc/common/launch.cuh
    prior_grids_done). The emulated device checks the wait comes before any barrier or exit; this checks, on
    nvcc's own output, that no global memory access comes before it: in every sm_90a kernel the first such
    instruction follows the first ACQBULK, the quantized GEMV's L2 prefetches of its weights (CCTL.E.PF2, which
    no kernel writes) aside, and the trigger (PREEXIT) is there too."""
    path = _built_with_cuda()
    if not any(k.arch == "sm_90a" for k in resource_usage(path)):
        pytest.skip("_C holds no sm_90a code")
    kernels = sass(path, "sm_90a")
    assert len(kernels) > 100, sorted(kernels)
    bad = []
    for name, code in kernels.items():
        ops = [ins.split()[1 if ins.startswith("@") else 0] for ins in code]
        wait = next((i for i, op in enumerate(ops) if op.startswith("ACQBULK")), None)
        if wait is None or not any(op.startswith("PREEXIT") for op in ops):
            bad.append(f"{name}: no griddepcontrol.wait (ACQBULK) or launch_dependents (PREEXIT)")
            continue
        early = [code[i] for i, op in enumerate(ops[:wait])
                 if GLOBAL_MEMORY.match(op) and not ("quant_gemv" in name and op == "CCTL.E.PF2")]
        if early:
            bad.append(f"{name}: before the wait: {early[:3]}")
    assert not bad, "\n".join(bad)
