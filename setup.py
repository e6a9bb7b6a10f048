"""Build script: CMake builds the native module fastopt._C (CPU always, CUDA when nvcc is found).

Environment variables:
  FASTOPT_SKIP_CUDA=1         build the CPU kernels only, even when nvcc is present
  FASTOPT_CUDA_ARCHS="80;90"  CUDA architectures, one -gencode each (default: 80;90)
  FASTOPT_BUILD_JOBS=N        parallel compile jobs (default: the number of CPUs)
  CMAKE_ARGS="..."            extra arguments passed to cmake
"""
import os
import shlex
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        try:
            import pybind11
        except ImportError as e:  # pragma: no cover - a build-environment error
            raise RuntimeError("fastopt needs pybind11 to build: pip install pybind11") from e
        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_temp = Path(self.build_temp).resolve() / "cmake"
        build_temp.mkdir(parents=True, exist_ok=True)
        skip_cuda = os.environ.get("FASTOPT_SKIP_CUDA", "0").lower() in ("1", "true", "yes", "on")
        args = [
            f"-S{ROOT}",
            f"-B{build_temp}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out.parent}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DFASTOPT_SKIP_CUDA={'ON' if skip_cuda else 'OFF'}",
            f"-DFASTOPT_CUDA_ARCHS={os.environ.get('FASTOPT_CUDA_ARCHS', '80;90')}",
        ]
        if _have_ninja():
            args.append("-GNinja")
        args += shlex.split(os.environ.get("CMAKE_ARGS", ""))
        jobs = os.environ.get("FASTOPT_BUILD_JOBS", str(os.cpu_count() or 1))
        subprocess.run(["cmake", *args], check=True)
        subprocess.run(["cmake", "--build", str(build_temp), "--parallel", jobs], check=True)


def _have_ninja():
    try:
        subprocess.run(["ninja", "--version"], check=True, capture_output=True)
        return True
    except (OSError, subprocess.CalledProcessError):
        return False


def _packages():
    """Every package under fastopt/ (found, so a new subpackage cannot be forgotten), plus triton_kernels/
    and its subpackages, which install as fastopt.triton_kernels (DESIGN.md's layout)."""
    found = find_packages(include=["fastopt", "fastopt.*"])
    found += ["fastopt.triton_kernels"] + [f"fastopt.triton_kernels.{p}" for p in find_packages("triton_kernels")]
    return found


setup(
    packages=_packages(),
    package_dir={"fastopt.triton_kernels": "triton_kernels"},
    package_data={"fastopt": ["py.typed"]},
    ext_modules=[CMakeExtension("fastopt._C")],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
