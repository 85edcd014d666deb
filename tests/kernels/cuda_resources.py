"""What compiled CUDA code costs a thread, without a GPU: registers, stack frame, shared and local
memory of every kernel in a cubin or a host library's fatbins (`cuobjdump -res-usage`, bundled with
Triton), and registers and spilled bytes from the log of `ptxas -v`; and each kernel's SASS
instructions (`cuobjdump --dump-sass`). A stack frame holds spilled
registers, or an array the code indexes at run time (libdevice's sin/cos keep one for huge
arguments): only ptxas tells the two apart."""
from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import triton

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


@dataclass
class KernelResources:
    arch: str       # e.g. "sm_90a"
    name: str       # mangled
    registers: int  # per thread
    stack: int      # stack frame bytes per thread
    shared: int     # static shared memory bytes per block
    local: int      # local memory bytes per thread


def resource_usage(path: Path) -> list[KernelResources]:
    """Every kernel of every architecture in the file at `path`."""
    out = subprocess.run([str(CUOBJDUMP), "-res-usage", str(path)], capture_output=True, text=True, check=True).stdout
    found, arch, name = [], "", ""
    for line in out.splitlines():
        if m := re.match(r"\s*arch = (\S+)", line):
            arch = m.group(1)
        elif m := re.match(r"\s*Function (\S+):$", line):
            name = m.group(1)
        elif "REG:" in line and name:
            f = dict(tok.split(":", 1) for tok in line.split())
            found.append(KernelResources(arch, name, int(f["REG"]), int(f["STACK"]), int(f["SHARED"]), int(f["LOCAL"])))
            name = ""
    return found


def ptxas_log_resources(log: str) -> tuple[int, int] | None:
    """(registers, spill-store bytes) per thread from `ptxas -v` output about one kernel (None when
    the log has no register count)."""
    regs, spills = re.search(r"Used (\d+) registers", log), re.search(r"(\d+) bytes spill stores", log)
    return (int(regs.group(1)), int(spills.group(1)) if spills else 0) if regs else None


def sass(path: Path, arch: str) -> dict[str, list[str]]:
    """{kernel (mangled): its SASS instructions in address order, e.g. "@P0 LDG.E.128 R4, desc[UR4][R2.64]"}
    for the `arch` (e.g. "sm_90a") code in the file at `path`."""
    out = subprocess.run([str(CUOBJDUMP), "--dump-sass", "-arch", arch, str(path)], capture_output=True, text=True,
                         check=True).stdout
    kernels: dict[str, list[str]] = {}
    code = None
    for line in out.splitlines():
        if m := re.match(r"\s*Function : (\S+)", line):
            code = kernels.setdefault(m.group(1), [])
        elif code is not None and (m := re.match(r"\s*/\*[0-9a-f]+\*/\s+(.*?)\s*;", line)):
            code.append(m.group(1))
    return kernels
