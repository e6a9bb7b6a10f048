"""The OT Triton kernels compile for an H100 (sm_90) on a machine without a GPU.

Under TRITON_INTERPRET=1 the kernels run as NumPy, which checks their math but not that Triton can
lower them: a construct the interpreter accepts (a sort of 64-bit keys, a scatter store, a block too
large for the registers) may still fail in the compiler.  Triton's NVIDIA backend ships its own
ptxas, so ``triton.compile`` for a ``GPUTarget`` produces a cubin here, as it would on the GPU.
The compile runs in a subprocess without TRITON_INTERPRET (conftest sets it for this process, and
then ``@triton.jit`` makes interpreted functions, which cannot be compiled).
"""
import os
import subprocess
import sys
import textwrap

import pytest

triton = pytest.importorskip("triton")

from triton.backends import backends as _triton_backends  # noqa: E402

pytestmark = pytest.mark.skipif("nvidia" not in _triton_backends, reason="triton has no NVIDIA backend")

H100 = ("cuda", 90, 32)


def _compile(module, kernel, signature, constexprs, num_warps):
    """Compile ``fastopt.triton_kernels.<module>.<kernel>`` for sm_90 in a fresh interpreter; its stdout."""
    code = textwrap.dedent(f"""
        import importlib
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        fn = getattr(importlib.import_module("fastopt.triton_kernels.{module}"), "{kernel}")
        constexprs = {constexprs!r}
        sig = dict({signature!r}, **{{k: "constexpr" for k in constexprs}})
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=GPUTarget{H100!r},
                           options={{"num_warps": {num_warps}}})
        print("cubin", len(k.asm["cubin"]), "sm_90" in k.asm["ptx"])
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    word, size, arch = out.stdout.split()[-3:]
    assert word == "cubin" and int(size) > 0 and arch == "True", out.stdout


def test_sliced_kernel_compiles_for_sm90():
    sig = {"x_ptr": "*fp32", "y_ptr": "*fp32", "dir_ptr": "*fp32", "wpp_ptr": "*fp32", "cx_ptr": "*fp32",
           "cy_ptr": "*fp32", "n": "i32", "L": "i32", "d": "i32", "dir_bstride": "i32", "p": "fp32", "inv_n": "fp32"}
    # the gradient variant (64-bit key sorts, scatter stores) with the general-p cost
    _compile("sliced", "_sw_kernel", sig, {"PROJECTED": False, "P_KIND": 0, "GRAD": True, "BLOCK": 1024}, 4)


def test_sinkhorn_kernel_compiles_for_sm90():
    sig = {"x_ptr": "*fp32", "y_ptr": "*fp32", "cm_ptr": "*fp32", "h_ptr": "*fp32", "c_ptr": "*fp32",
           "out_ptr": "*fp32", "n": "i32", "m": "i32", "inv_eps": "fp32"}
    # the gradient pass on the Euclidean cost (the longest path through the kernel)
    _compile("ot", "_ot_kernel", sig, {"D": 3, "D_PAD": 4, "COST": 1, "MODE": 1, "DENSE": False,
                                       "BLOCK_N": 64, "BLOCK_M": 32}, 4)


def _jit_functions():
    import importlib
    import pkgutil

    import fastopt.triton_kernels as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"fastopt.triton_kernels.{info.name}")
        for name, obj in vars(mod).items():
            fn = getattr(obj, "fn", None)  # JITFunction, or InterpretedFunction under TRITON_INTERPRET=1
            if type(obj).__name__ in ("JITFunction", "InterpretedFunction") and getattr(fn, "__module__", None) == mod.__name__:
                yield mod, name, fn


def test_jit_code_reads_only_constexpr_globals():
    """Triton's code generator refuses a plain int/float global inside @triton.jit code (NameError:
    "Cannot access global variable ... instantiated as constexpr"); the interpreter does not, so
    such a kernel passes every CPU test and fails on the first GPU launch.  Every global the jit code
    of fastopt.triton_kernels names must be a module, a callable (jit function, builtin), a dtype or
    a ``tl.constexpr``."""
    import types

    import triton.language as tl

    def names(code):
        out = set(code.co_names)
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                out |= names(const)
        return out

    bad, seen = [], 0
    for mod, name, fn in _jit_functions():
        seen += 1
        for g in sorted(names(fn.__code__)):
            val = vars(mod).get(g, tl)  # absent: a builtin or an attribute name
            if not (isinstance(val, (types.ModuleType, tl.constexpr, tl.dtype)) or callable(val)):
                bad.append(f"{mod.__name__}.{name} reads global {g} = {val!r}")
    assert seen >= 20, f"found only {seen} jit functions"
    assert not bad, "\n".join(bad)
