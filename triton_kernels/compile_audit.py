"""Compile every Triton launch for an H100 (sm_90) on a machine without a GPU, and measure the result.

:func:`capture` installs a stand-in Triton driver (target ``cuda`` sm_90, warp 32; no device) and a
``jit_cache_hook`` that records each launch the real launchers make -- the kernel, its specialization
(argument types, alignment attributes, constexprs) and its options, exactly as ``JITFunction.run``
computed them -- and returns before anything runs.  Nothing is hand-written: whatever a launcher
would launch on a GPU is what gets compiled.  Autotuned kernels go through every config (the stand-in
benchmarker "times" each once).  :func:`compile_all` then compiles each distinct launch once, in worker
processes (``JITFunction.preload`` of the recorded specialization: Triton's own deserialization),
and reports per kernel: registers, local memory (spills) and static/dynamic shared memory from the
cubin (``cuobjdump --dump-resource-usage``, shipped with Triton), and the PTX's global load/store
instructions by width.

Run in a process without ``TRITON_INTERPRET`` (under the interpreter ``@triton.jit`` builds interpreted
functions, which cannot be compiled); the tensors the launchers see are CPU tensors, whose addresses
only feed the alignment specialization.  Results written by the launches are garbage (nothing runs).
"""
import collections
import contextlib
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

import torch

TARGET = ("cuda", 90, 32)
SMEM_LIMIT = 227 * 1024  # H100 / H200: the most dynamic shared memory one block may opt in to


class Sm90Driver:
    """A Triton driver with an sm_90 target and no device: enough for ``JITFunction.run`` and the
    autotuner to specialize and 'benchmark' launches that the hook stops before they run."""

    def __init__(self):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget(*TARGET)

    def is_active(self):
        return True

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_benchmarker(self):
        def bench(kernel_call, quantiles=None, **_):
            kernel_call()
            return [1.0, 1.0, 1.0] if quantiles else 1.0
        return bench

    def map_python_to_cpp_type(self, ty):  # pragma: no cover - only for launchers, never built here
        raise NotImplementedError


Launch = collections.namedtuple("Launch", "kernel key repr data")

_capturing = [False]


def capturing():
    """True inside :func:`capture` (launchers that insist on CUDA tensors accept CPU ones then)."""
    return _capturing[0]


@contextlib.contextmanager
def capture():
    """Within the block, Triton launches compile nothing and run nothing: each distinct one is recorded
    (yields the list of :class:`Launch`, in first-launch order)."""
    from triton import knobs
    from triton.runtime.driver import driver

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("compile_audit.capture needs a process without TRITON_INTERPRET")
    launches, seen = [], set()

    def hook(*, key, repr, fn, compile, is_manual_warmup, already_compiled):
        k = (fn.module, fn.name, str(key))
        if k not in seen:
            seen.add(k)
            launches.append(Launch(fn.name, k, repr, compile["specialization_data"]))
        return True  # handled: JITFunction.run returns before compiling or launching

    old_hook = knobs.runtime.jit_cache_hook
    driver.set_active(Sm90Driver())
    knobs.runtime.jit_cache_hook = hook
    _capturing[0] = True
    try:
        yield launches
    finally:
        _capturing[0] = False
        knobs.runtime.jit_cache_hook = old_hook
        driver.reset_active() if _has_default_driver() else setattr(driver, "_active", None)


def _has_default_driver():
    try:
        import triton.runtime.driver as d
        d.driver.default  # noqa: B018
        return True
    except Exception:  # noqa: BLE001 - no GPU driver here
        return False


# -- compiling (in workers) -------------------------------------------------------------------------------

_LOAD_RE = re.compile(r"\b(ld|st)\.global(?:\.[a-z0-9_]+)*?(?:\.(v[248]))?\.(b8|b16|b32|b64|b128|u8|u16|u32|u64|s8|s16|s32|s64|f32|f16|bf16|f64)\b")


def ptx_memory_ops(ptx):
    """{"ld.v4.b32": count, "st.b16": count, ...}: the PTX's global loads and stores by vector width and
    element size."""
    counts = collections.Counter()
    for op, vec, ty in _LOAD_RE.findall(ptx):
        counts[f"{op}{'.' + vec if vec else ''}.{ty}"] += 1
    return dict(counts)


def resource_usage(cubin):
    """{"REG", "STACK", "SHARED", "LOCAL"} of the cubin's kernel, from ``cuobjdump --dump-resource-usage``."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if m is None:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{out}")
    return dict(zip(("REG", "STACK", "SHARED", "LOCAL"), map(int, m.groups())))


def _worker_init():
    os.environ.pop("TRITON_INTERPRET", None)
    from triton.runtime.driver import driver

    import fastopt.triton_kernels  # noqa: F401  (registers every jit function for preload; the modules
    driver.set_active(Sm90Driver())  # the package does not import are imported by _compile_one)


def _compile_one(item):
    """Compile one recorded launch; a dict of what it measured (or the error)."""
    import json as _json

    import triton.runtime.jit as jit

    kernel, data = item
    name = _json.loads(data)["name"]
    module, qualname = name.rsplit(".", 1)
    importlib.import_module(module)  # (its jit functions register on import)
    fn = jit._triton_jit_function_registry[f"{module}:{qualname}"]
    import time

    t0 = time.perf_counter()
    try:
        ck = fn.preload(data)
    except Exception as e:  # noqa: BLE001 - reported per launch
        return dict(kernel=kernel, error=f"{type(e).__name__}: {e}"[:4000])
    md = ck.metadata
    usage = resource_usage(ck.asm["cubin"])
    return dict(kernel=kernel, seconds=round(time.perf_counter() - t0, 3), num_warps=md.num_warps, num_stages=md.num_stages, enable_fp_fusion=md.enable_fp_fusion,
                dynamic_shared=md.shared, **usage, mem_ops=ptx_memory_ops(ck.asm["ptx"]))


def compile_all(launches, workers=2):
    """Compile each recorded launch for sm_90 (``workers`` processes); a list of result dicts, each with
    the launch's ``kernel``, ``repr`` (signature and options) and ``constexprs``."""
    import concurrent.futures
    import multiprocessing

    items = [(ln.kernel, ln.data) for ln in launches]
    if workers <= 1:
        _worker_init()
        results = [_compile_one(it) for it in items]
    else:
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init) as pool:
            results = list(pool.map(_compile_one, items))
    for ln, r in zip(launches, results):
        d = json.loads(ln.data)
        r["repr"] = ln.repr
        names = list(d["signature"])
        r["constexprs"] = {names[k[0]] if len(k) == 1 else str(k): _short(v)
                           for k, v in zip(d["constant_keys"], d["constant_vals"])}
        r["signature"] = d["signature"]
    return results


def _short(v):
    if isinstance(v, dict):
        if "jit_function" in v:
            return v["jit_function"].split(":")[-1]
        if "constexpr" in v:
            return v["constexpr"]
    return v


def select(launches, kernels):
    """The launches of the kernels named in ``kernels`` (comma-separated kernel names, e.g.
    ``"_lowbit_kernel,_codec_kernel"``; empty: all of them).  ``FASTOPT_AUDIT_KERNELS`` passes it to
    :func:`main`: while changing one kernel, compile only its variants."""
    names = {k.strip() for k in kernels.split(",") if k.strip()}
    return [ln for ln in launches if ln.kernel in names] if names else list(launches)


# Kernels the test script's ``exercise()`` does not launch: "module:function" entries, each called under
# :func:`capture` after it (the function launches every variant its kernel's launcher can start).
EXERCISES = ["fastopt.triton_kernels.saf:audit_exercise", "fastopt.triton_kernels.mfac:audit_exercise",
             "fastopt.triton_kernels.sam:audit_exercise", "fastopt.triton_kernels.adahessian:audit_exercise",
             "fastopt.triton_kernels.classic:audit_exercise", "fastopt.triton_kernels.lightsb:audit_exercise"]


def main(argv=None):
    """``python -m fastopt.triton_kernels.compile_audit OUT.json SCRIPT.py``: run ``SCRIPT.py``'s
    ``exercise()`` under :func:`capture`, compile every launch (or those of the kernels named in
    ``FASTOPT_AUDIT_KERNELS``, comma-separated: :func:`select`), write the results as JSON."""
    out, script = (argv or sys.argv[1:])[:2]
    import runpy

    with capture() as launches:
        runpy.run_path(script)["exercise"]()
        for entry in EXERCISES:
            module, fn = entry.split(":")
            getattr(importlib.import_module(module), fn)()
    launches = select(launches, os.environ.get("FASTOPT_AUDIT_KERNELS", ""))
    results = compile_all(launches, workers=int(os.environ.get("FASTOPT_AUDIT_WORKERS", str(os.cpu_count() or 2))))
    with open(out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    from fastopt.triton_kernels.compile_audit import main as _main  # the package's module, not __main__

    _main()
