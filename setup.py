"""Install gemforge: `kernels/` -> gemforge.kernels, `engine/` -> gemforge.engine.

The native extension gemforge.kernels._C is built by CMake from csrc/: its CPU kernels always
(needs cmake and a C++ compiler with OpenMP), its CUDA kernels when nvcc is found.
GEMFORGE_SKIP_CUDA_BUILD=1 leaves the CUDA kernels out, GEMFORGE_SKIP_NATIVE_BUILD=1 the whole
extension (every op then runs its Triton or torch backend); GEMFORGE_CUDA_ARCHS (default "80;90a")
picks the CUDA targets. Where the CUDA headers are (beside nvcc), the same CMake run also builds
gemforge.kernels._C_emu, the CUDA kernels on an emulated device for CPU tests (csrc/emu/;
GEMFORGE_SKIP_CUDA_EMULATOR=1 leaves it out).
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def find_nvcc():
    nvcc = shutil.which("nvcc")
    if nvcc:
        return nvcc
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return None


def cuda_headers():
    """The CUDA toolkit's include directory (where nvcc is, or CUDA_HOME, CUDA_PATH, /usr/local/cuda) that the
    emulated kernels need, or None."""
    if os.environ.get("GEMFORGE_SKIP_CUDA_EMULATOR") == "1":
        return None
    nvcc = find_nvcc()
    homes = [Path(nvcc).resolve().parent.parent] if nvcc else []
    homes += [Path(h) for h in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda") if h]
    return next((h / "include" for h in homes if (h / "include" / "cuda_bf16.h").exists()), None)


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configures and builds CMakeLists.txt into the extension's output directory."""

    def build_extension(self, ext):
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        if ext.name.endswith("_C_emu"):  # built by _C's CMake run, into the same directory
            if not Path(self.get_ext_fullpath(ext.name)).exists():
                raise RuntimeError(f"gemforge: CMake did not build {ext.name} (CUDA headers at {cuda_headers()})")
            return
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        import pybind11

        archs = os.environ.get("GEMFORGE_CUDA_ARCHS", "80;90a")
        nvcc = None if os.environ.get("GEMFORGE_SKIP_CUDA_BUILD") == "1" else find_nvcc()
        cfg = [
            "cmake", str(ROOT), "-DCMAKE_BUILD_TYPE=Release",
            f"-DGEMFORGE_OUTPUT_DIR={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
        ]
        if nvcc:
            cfg += [f"-DGEMFORGE_CUDA_ARCHS={archs}", f"-DCMAKE_CUDA_COMPILER={nvcc}"]
        else:
            cfg += ["-DGEMFORGE_CUDA=OFF"]
        headers = cuda_headers()
        cfg += [f"-DCUDAToolkit_ROOT={headers.parent}"] if headers else ["-DGEMFORGE_CUDA_EMULATOR=OFF"]
        if shutil.which("ninja"):
            cfg += ["-G", "Ninja"]
        print(f"gemforge: building the native extension: CPU kernels"
              + (f" and CUDA kernels for sm archs {archs}" if nvcc else " (no CUDA: nvcc not found or skipped)"),
              flush=True)
        subprocess.run(cfg, cwd=build_dir, check=True)
        jobs = str(os.cpu_count() or 2)
        subprocess.run(["cmake", "--build", ".", "-j", jobs], cwd=build_dir, check=True)


def ext_modules():
    if os.environ.get("GEMFORGE_SKIP_NATIVE_BUILD") == "1":
        print("gemforge: GEMFORGE_SKIP_NATIVE_BUILD=1, installing without the native extension", flush=True)
        return []
    if not (ROOT / "CMakeLists.txt").exists():
        return []
    if shutil.which("cmake") is None:
        print("gemforge: cmake not found, installing without the native extension", flush=True)
        return []
    emulated = [CMakeExtension("gemforge.kernels._C_emu")] if cuda_headers() else []
    return [CMakeExtension("gemforge.kernels._C"), *emulated]


setup(
    packages=["gemforge.kernels", "gemforge.engine", "gemforge.engine.server"],
    package_dir={"gemforge.kernels": "kernels", "gemforge.engine": "engine",
                 "gemforge.engine.server": "engine/server"},
    ext_modules=ext_modules(),
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
