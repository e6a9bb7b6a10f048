"""Which backends exist on this install, and which one runs a given tensor.

Backends (see docs/architecture.md): ``cuda`` (fastopt._C built with nvcc), ``triton`` (fused GPU kernels with no
compile step; on a CPU only under ``TRITON_INTERPRET=1``, which is how CI tests them), ``cpu``
(fastopt._C's OpenMP kernels) and ``torch`` (the pure-PyTorch reference, available everywhere).
``auto`` picks cuda > triton for CUDA tensors and cpu > torch for CPU tensors.
"""
import functools
import importlib
import os
import warnings
from typing import Any, Dict, List, NamedTuple, Tuple, Union

import torch

BACKENDS = ("auto", "cuda", "triton", "cpu", "torch")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that this install or this tensor's device cannot run."""


@functools.lru_cache(maxsize=None)
def _load_native():
    try:
        return importlib.import_module("fastopt._C"), None
    except ImportError as e:
        return None, str(e)


BUILD_HINT = ("build it with `pip install --no-build-isolation .` in the source tree (needs a C++ compiler, "
              "cmake and pybind11; nvcc for the CUDA kernels)")


# NOTE: [backends under torch.compile]  Which backends this install has is decided once, outside any
# graph: the functions below import modules (importlib, lru_cache) that dynamo cannot trace, so they
# are marked assume_constant_result -- dynamo calls them at trace time and bakes in the answer.
_constant = torch.compiler.assume_constant_result


@_constant
def native_error():
    """Why fastopt._C cannot be imported (the ImportError's text), or None when it can."""
    return _load_native()[1]


def native():
    """The native module fastopt._C, or a clear error (with the import error) when it cannot be imported."""
    mod, err = _load_native()
    if mod is None:
        raise BackendUnavailableError(
            f"fastopt._C cannot be imported ({err}); {BUILD_HINT}, or use backend='torch'")
    return mod


_warned_fallback = False


def _warn_fallback(device):
    """Warn once per process that backend='auto' runs the slow torch reference because fastopt._C is missing."""
    global _warned_fallback
    if _warned_fallback:
        return
    _warned_fallback = True
    warnings.warn(
        f"fastopt: backend='auto' runs the pure-PyTorch reference for {device.type} tensors (much slower than "
        f"the fused kernels) because fastopt._C cannot be imported ({native_error()}); {BUILD_HINT}. "
        "Pass backend='torch' to choose the reference explicitly (no warning). This warning is shown once.",
        RuntimeWarning, stacklevel=3)


@functools.lru_cache(maxsize=None)
def _load_triton():
    try:
        return importlib.import_module("fastopt.triton_kernels"), None
    except ImportError as e:
        return None, str(e)


def triton_kernels():
    mod, err = _load_triton()
    if mod is None:
        raise BackendUnavailableError(f"the triton backend is unavailable ({err}); pip install triton")
    return mod


@_constant
def triton_interpret():
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@_constant
def has_cpu():
    return _load_native()[0] is not None


@_constant
def has_cuda():
    mod = _load_native()[0]
    return mod is not None and bool(getattr(mod, "with_cuda", False))


@_constant
def has_triton():
    return _load_triton()[0] is not None


def build_info() -> Dict[str, Any]:
    """What this install has: a dict used by ``python -m fastopt.info`` and the benchmark report."""
    mod, err = _load_native()
    triton_mod, triton_err = _load_triton()
    info = {
        "native_module": mod is not None,
        "native_error": err,
        "cpu": mod is not None,
        "cuda_kernels_built": has_cuda(),
        "cpu_isa": mod.cpu_isa() if mod is not None else None,
        "triton": triton_mod is not None,
        "triton_error": triton_err,
        "triton_interpret": triton_interpret(),
        "torch": torch.__version__,
        "torch_cuda_available": torch.cuda.is_available(),
    }
    if triton_mod is not None:
        import triton

        info["triton_version"] = triton.__version__
    return info


def available_backends(device: Union[torch.device, str, int]) -> List[str]:
    """The fastopt backends usable for tensors on ``device``, best first ('torch' always last)."""
    device = torch.device(device)
    out = []
    if device.type == "cuda":
        if has_cuda():
            out.append("cuda")
        if has_triton() and not triton_interpret():
            out.append("triton")
    elif device.type == "cpu":
        if has_cpu():
            out.append("cpu")
        if has_triton() and triton_interpret():
            out.append("triton")
    out.append("torch")
    return out


def _unavailable_reason(backend, device):
    """What this install lacks for ``backend`` (the import error itself), appended to the error message."""
    if backend in ("cpu", "cuda"):
        err = native_error()
        if err is not None:
            return f"; fastopt._C cannot be imported ({err}); {BUILD_HINT}"
        if backend == "cuda" and not has_cuda():
            return "; this fastopt._C was built without its CUDA part (nvcc was not found, or FASTOPT_SKIP_CUDA=1)"
    if backend == "triton" and not has_triton():
        return f"; fastopt.triton_kernels cannot be imported ({_load_triton()[1]})"
    return ""


def dtype_code(dtype):
    return _DTYPE_CODES[dtype]


def check_backend_name(backend):
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


class OpCaps(NamedTuple):
    """What the kernels of one family of ops can run: the kernel backends that implement it, the
    storage dtypes they take, and whether ``auto`` uses a kernel for CPU tensors (the Triton-only ops
    run on a CPU only under the interpreter, a test vehicle, so ``auto`` keeps them on torch there)."""

    kernels: Tuple[str, ...]
    dtypes: Tuple[torch.dtype, ...] = KERNEL_DTYPES
    auto_on_cpu: bool = True


# The capability table: every entry point resolves its backend through :func:`resolve` with its row.
CAPABILITIES: Dict[str, OpCaps] = {
    # optimizer steps (Adam, the elementwise ops, low-bit states), the blockwise codec, N:M masks
    "optimizer": OpCaps(("cuda", "triton", "cpu")),
    # the entropic-OT passes (Sinkhorn, its divergence, the soft-minimum): C++ on CPUs, Triton on GPUs
    "ot": OpCaps(("triton", "cpu")),
    # sliced Wasserstein's projection + sort and Muon's Newton-Schulz: Triton only
    "sliced": OpCaps(("triton",), auto_on_cpu=False),
    "newton_schulz": OpCaps(("triton",), auto_on_cpu=False),
    # SAF's fused gather / softmax-KL / scatter pass (fastopt.sharpness): C++ on CPUs, CUDA or Triton on GPUs
    "saf": OpCaps(("cuda", "triton", "cpu")),
    # dense M-FAC's two window passes (fastopt.MFAC): C++ on CPUs, Triton on GPUs (no CUDA kernel)
    "mfac": OpCaps(("triton", "cpu")),
    # LightSB's fused log-sum-exp passes with their gradients (fastopt.ot.LightSB): C++ on CPUs, Triton on GPUs
    "lightsb": OpCaps(("triton", "cpu"), dtypes=(torch.float32,)),
    # WTA-CRS's row pass (fastopt.nn.WTACRSLinear: row norms + the gather of the kept rows): C++ on CPUs, Triton on GPUs
    "wtacrs": OpCaps(("triton", "cpu")),
    # magnitude selection (fastopt.sparse.select: pruning thresholds / masks): C++ on CPUs, Triton on GPUs
    "select": OpCaps(("triton", "cpu")),
}


def resolve(backend, device, dtype, dense=True, *, op="optimizer", reason=None, name=None):
    """The backend that runs tensors of ``dtype`` and layout ``dense`` on ``device`` for the op family
    ``op`` (a row of :data:`CAPABILITIES`).

    ``auto`` picks the first kernel backend of the row usable here (cuda > triton for CUDA tensors,
    cpu for CPU tensors) and falls back to ``torch`` for what no kernel handles (other dtypes, non-dense
    layouts, or ``reason``: why the caller's kernels cannot take this problem); an explicitly named
    backend raises BackendUnavailableError instead.  ``name`` prefixes the messages (the public function).
    """
    check_backend_name(backend)
    device = torch.device(device)
    caps = CAPABILITIES[op]
    where = f"{name}: " if name else ""
    if reason is None and dtype not in caps.dtypes:
        reason = f"dtype {dtype}"
    if reason is None and not dense:
        reason = "non-dense (overlapping or strided) tensors"
    if backend == "auto":
        if reason is not None or (device.type == "cpu" and not caps.auto_on_cpu):
            return "torch"
        usable = available_backends(device)
        # (triton on a CPU is the interpreter: never chosen by auto)
        chosen = next((b for b in caps.kernels if b in usable and (b != "triton" or device.type == "cuda")), "torch")
        if chosen == "torch" and device.type in ("cpu", "cuda") and native_error() is not None \
                and any(b in ("cpu", "cuda") for b in caps.kernels):
            _warn_fallback(device)
        return chosen
    if backend == "torch":
        return backend
    if backend not in caps.kernels:
        others = " or ".join(repr(b) for b in caps.kernels + ("torch",) if b != backend)
        raise BackendUnavailableError(f"{where}no {backend!r} kernel; use backend={others} or 'auto'")
    if reason is not None:
        raise BackendUnavailableError(f"{where}backend {backend!r} does not support {reason}; use backend='torch' "
                                      "or 'auto'")
    if backend not in available_backends(device):
        why = {
            "cuda": "needs CUDA tensors and fastopt._C built with nvcc",
            "cpu": "needs CPU tensors and fastopt._C",
            "triton": "needs triton and CUDA tensors (or CPU tensors under TRITON_INTERPRET=1)",
        }[backend]
        raise BackendUnavailableError(f"{where}backend {backend!r} cannot run on device {device}: it {why}"
                                      + _unavailable_reason(backend, device))
    return backend
