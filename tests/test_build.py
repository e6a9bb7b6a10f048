"""The install itself: what was built, and the command-line entry points."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import fastopt
from fastopt import _backend


def test_native_module_built():
    """fastopt._C must be built on every install that runs the tests (CI included)."""
    info = _backend.build_info()
    assert info["native_module"], info["native_error"]
    assert "cpu" in _backend.available_backends("cpu")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on this machine")
def test_cuda_part_built_when_nvcc_present():
    """With nvcc on PATH the CUDA kernels are compiled (CI has nvcc and no GPU: this is what checks
    that every .cu file still compiles), unless FASTOPT_SKIP_CUDA was set for the build."""
    if os.environ.get("FASTOPT_SKIP_CUDA", "0") not in ("", "0"):
        pytest.skip("FASTOPT_SKIP_CUDA is set")
    assert _backend.has_cuda()


def test_info_command():
    out = subprocess.run([sys.executable, "-m", "fastopt.info", "--json"], check=True, capture_output=True,
                         text=True).stdout
    info = json.loads(out)
    assert info["auto"]["cpu"] == "cpu"
    assert info["available"]["cpu"][-1] == "torch"
    assert info["native_module"] is True


def test_auto_resolution():
    assert _backend.resolve("auto", "cpu", torch.float32) == "cpu"
    assert _backend.resolve("auto", "cpu", torch.float64) == "torch"
    assert _backend.resolve("auto", "cpu", torch.float32, dense=False) == "torch"
    expected_cuda = "cuda" if _backend.has_cuda() else ("triton" if _backend.has_triton() else "torch")
    assert _backend.resolve("auto", "cuda", torch.bfloat16) == expected_cuda
    with pytest.raises(ValueError, match="unknown backend"):
        _backend.resolve("fast", "cpu", torch.float32)


def test_triton_kernels_installed_as_subpackage():
    if not _backend.has_triton():
        pytest.skip("triton not installed")
    import fastopt.triton_kernels as tk

    assert callable(tk.adam_step) and callable(tk.multi_tensor_apply)
    assert fastopt.__version__


_WITHOUT_NATIVE = r"""
import sys, warnings
sys.modules["fastopt._C"] = None          # the import of fastopt._C fails as it does on an install without it
import torch, fastopt
from fastopt import _backend
p = torch.nn.Parameter(torch.ones(4)); p.grad = torch.ones(4)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(2):                    # two optimizers, two steps: one warning in all
        opt = fastopt.AdamW([p], lr=0.1)
        opt.step()
fallback = [w for w in caught if "fastopt._C" in str(w.message)]
assert len(fallback) == 1, [str(w.message) for w in caught]
msg = str(fallback[0].message)
assert "backend='auto' runs the pure-PyTorch reference" in msg and "halted; None in sys.modules" in msg, msg
assert "pip install --no-build-isolation ." in msg, msg
assert opt.param_groups[0]["backend"] == "auto" and float(p[0]) < 1.0
for make in (lambda: fastopt.AdamW([p], backend="cpu").step(), _backend.native,
             lambda: fastopt.sparse.nm_mask(torch.randn(4, 8), 2, 4, backend="cpu")):
    try:
        make()
    except _backend.BackendUnavailableError as e:
        assert "halted; None in sys.modules" in str(e) and "pip install --no-build-isolation ." in str(e), str(e)
    else:
        raise AssertionError("no BackendUnavailableError")
print("ok")
"""


def test_missing_native_module_warns_once_and_names_the_import_error():
    """Without fastopt._C: backend='auto' warns once, naming the import error and how to build;
    every BackendUnavailableError for the cpu backend carries the import error."""
    out = subprocess.run([sys.executable, "-c", _WITHOUT_NATIVE], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout + out.stderr
