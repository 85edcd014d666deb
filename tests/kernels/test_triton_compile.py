"""Every Triton launch of the real model shapes compiles for sm_90 and sm_80 and fits their shared
memory, with the Triton installed here and with the GPU machine's (3.6, which `make install` puts in
.venv/triton-3.6): tests/kernels/triton_compile.py, one process per Triton version, run side by side."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("triton_compile.py")
TRITON_36 = Path(sys.prefix) / "triton-3.6"


def _start(extra_path: Path | None) -> subprocess.Popen:
    """The check, in a process without the interpreter, `extra_path` (another Triton) first on its path."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(extra_path), env.get("PYTHONPATH")]))
    return subprocess.Popen([sys.executable, str(SCRIPT), "--arch", "90", "--arch", "80"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.skipif(not (TRITON_36 / "triton").is_dir(), reason=f"Triton 3.6 is not installed in {TRITON_36}")
def test_every_launch_compiles_for_the_gpus():
    runs = {"": _start(None), "Triton 3.6.": _start(TRITON_36)}
    failed = []
    for version, proc in runs.items():
        out, _ = proc.communicate(timeout=900)
        if proc.returncode != 0 or "all fit" not in out or f"\n{version}" not in f"\n{out}":
            failed.append(f"--- {version or 'current Triton'} (exit {proc.returncode}):\n{out[-6000:]}")
    assert not failed, "\n".join(failed)
