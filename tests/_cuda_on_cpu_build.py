"""Builds the CUDA-on-CPU test module: fastopt's CUDA sources (csrc/cuda/*.cu) compiled a second time as C++
against the CPU execution layer csrc/cuda_on_cpu/ (test-only, never in the wheel).

The module is the whole native ABI (csrc/bindings.cpp with FASTOPT_WITH_CUDA, the CPU entry points with
their baseline kernels, the .cu files), so its ``<name>_cuda`` functions take exactly the arguments of
``fastopt._C``'s.  It is built with g++ into ``build/cuda_on_cpu/<hash of the sources and flags>/`` (reused
while nothing changed) and loaded under a private name, so it never shadows ``fastopt._C``.

    python tests/_cuda_on_cpu_build.py          # build (or find) it and print its path

``build(src_root, out_dir)`` builds from another source tree (the mutation tests build a mutated copy).
"""
import concurrent.futures
import hashlib
import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CUDA_SOURCES = ["csrc/cuda/adam.cu", "csrc/cuda/elementwise.cu", "csrc/cuda/lowbit.cu", "csrc/cuda/sparse.cu",
                "csrc/cuda/saf.cu"]
CPU_SOURCES = ["csrc/bindings.cpp", "csrc/cpu/adam.cpp", "csrc/cpu/elementwise.cpp", "csrc/cpu/lowbit.cpp",
               "csrc/cpu/sparse.cpp", "csrc/cpu/ot.cpp", "csrc/cpu/saf.cpp"]
CPU_KERNEL_SOURCES = ["csrc/cpu/adam_kernels.cpp", "csrc/cpu/elementwise_kernels.cpp", "csrc/cpu/lowbit_kernels.cpp",
                      "csrc/cpu/ot_kernels.cpp", "csrc/cpu/saf_kernels.cpp"]
# As CMakeLists.txt's FASTOPT_CXX_FLAGS (no fused multiply-add unless written), -O1: the kernels run
# small tensors here, and -O1 compiles the many op instantiations about twice as fast as -O3.
FLAGS = ["-std=c++17", "-O1", "-fPIC", "-fvisibility=hidden", "-fno-math-errno", "-fno-trapping-math",
         "-ffp-contract=off", "-Wall", "-Wno-unknown-pragmas", "-Wno-unused-parameter", "-Wno-unused-function"]
DEFINES = ["-DFASTOPT_CUDA_ON_CPU", "-DFASTOPT_WITH_CUDA"]
MODULE = "_C"  # PYBIND11_MODULE(_C, ...) in bindings.cpp; loaded under a private name


def _includes(src_root):
    import pybind11

    return [f"-I{src_root / 'csrc/cuda_on_cpu/include'}", f"-I{src_root / 'csrc/include'}", f"-I{src_root / 'csrc'}",
            f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}"]


def _digest(src_root, extra):
    h = hashlib.sha256()
    h.update(" ".join(FLAGS + DEFINES + list(extra) + [sys.version]).encode())
    for d in ("csrc",):
        for p in sorted((src_root / d).rglob("*")):
            if p.is_file() and p.suffix in (".h", ".cuh", ".cu", ".cpp"):
                h.update(str(p.relative_to(src_root)).encode())
                h.update(p.read_bytes())
    return h.hexdigest()[:16]


def module_path(out_dir):
    return Path(out_dir) / (MODULE + sysconfig.get_config_var("EXT_SUFFIX"))


def build(src_root=ROOT, out_dir=None, jobs=None, extra_flags=(), verbose=False, reuse=None):
    """Compile and link the module from ``src_root``; returns its path (cached by a hash of the sources).

    ``reuse=(built_module_path, changed_sources)``: compile only ``changed_sources`` (paths relative to the
    root, e.g. a mutated .cu file) and take every other object file from that earlier build."""
    src_root = Path(src_root).resolve()
    if out_dir is None:
        out_dir = ROOT / "build" / "cuda_on_cpu" / _digest(src_root, extra_flags)
    out_dir = Path(out_dir)
    so = module_path(out_dir)
    if so.exists():
        return so
    obj_dir = out_dir / "obj"
    obj_dir.mkdir(parents=True, exist_ok=True)
    inc = _includes(src_root)
    jobs = jobs or os.cpu_count() or 1

    def compile_one(src):
        rel = Path(src)
        obj = obj_dir / (rel.name + ".o")
        if reuse is not None and src not in reuse[1]:
            shutil.copyfile(Path(reuse[0]).parent / "obj" / obj.name, obj)
            return obj
        cmd = ["g++"]
        if rel.suffix == ".cu":
            cmd += ["-x", "c++"]
        cmd += [*FLAGS, *DEFINES, *extra_flags, *inc]
        if src in CPU_KERNEL_SOURCES:
            cmd.append("-DFASTOPT_CPU_NS=baseline")
        cmd += ["-fopenmp", "-c", str(src_root / rel), "-o", str(obj)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"cuda-on-cpu build: compiling {src} failed:\n{' '.join(cmd)}\n{r.stderr[-6000:]}")
        if verbose and r.stderr:
            print(r.stderr, file=sys.stderr)
        return obj

    # the biggest translation units first, so the pool ends evenly
    order = CUDA_SOURCES + CPU_KERNEL_SOURCES + CPU_SOURCES
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        objs = list(pool.map(compile_one, order))
    tmp = so.with_suffix(".tmp")
    cmd = ["g++", "-shared", "-fopenmp", *[str(o) for o in objs], "-o", str(tmp)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"cuda-on-cpu build: linking failed:\n{r.stderr[-6000:]}")
    os.replace(tmp, so)
    return so


def load(path):
    """Import the built module from ``path`` under a private name (fastopt._C is left alone)."""
    loader = importlib.machinery.ExtensionFileLoader(MODULE, str(path))
    spec = importlib.util.spec_from_file_location(MODULE, str(path), loader=loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


if __name__ == "__main__":
    print(build(verbose=True))
