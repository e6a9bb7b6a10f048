"""Runs fastopt's ``cuda`` backend on CPU tensors through the CUDA-on-CPU module (tests/_cuda_on_cpu_build.py).

``activate(module)`` patches, in this process only:
  * ``fastopt._backend.available_backends("cpu")`` lists ``cuda`` (after ``cpu``), so an explicit
    ``backend="cuda"`` resolves for CPU tensors and the test suites' (device, backend) parametrizations
    (tests/conftest.py's DEVICE_BACKENDS) gain ("cpu", "cuda");  ``backend="auto"`` still resolves as before;
  * ``fastopt._ops._run_native``: backend ``cuda`` with CPU tensors calls ``module.<name>_cuda(*args, 0)``
    (stream 0: the layer has no streams; the optimizer steps get ``TICKET``'s address before it, or 0 while
    ``FOLD[0]`` is False), everything else as before.

As a pytest plugin (``-p _cuda_on_cpu`` with tests/ on sys.path, see README), it builds the module and
activates it before tests/conftest.py computes its parametrizations; the existing suites then run their
``cuda`` cases on the CPU:  ``PYTHONPATH=tests python -m pytest -p _cuda_on_cpu tests/test_adam.py -k cuda``.
"""
import os

if "TRITON_INTERPRET" not in os.environ:  # as tests/conftest.py, before fastopt is imported
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from fastopt import _backend, _ops  # noqa: E402

_ORIGINAL = {}
# The ticket counter of the step-increment fold (fastopt/_tickets.py's step_ticket; the layer has one stream),
# and whether the steps pass it (FOLD[0] = False: ticket 0, the separate increment launch).
TICKET = torch.zeros(1, dtype=torch.int32)
FOLD = [True]


def activate(module):
    """Route backend='cuda' on CPU tensors to ``module`` (idempotent; ``deactivate`` undoes it)."""
    if _ORIGINAL:
        _ORIGINAL["module"][0] = module
        return
    holder = [module]
    orig_available = _backend.available_backends
    orig_resolve = _backend.resolve
    orig_run = _ops._run_native
    _ORIGINAL.update(available=orig_available, resolve=orig_resolve, run=orig_run, module=holder)

    def available_backends(device):
        out = orig_available(device)
        if torch.device(device).type == "cpu" and "cuda" not in out:
            out.insert(out.index("cpu") + 1 if "cpu" in out else 0, "cuda")
        return out

    def resolve(backend, device, *args, **kwargs):
        if backend == "auto":  # auto picks what it picks without the layer
            _backend.available_backends = orig_available
            try:
                return orig_resolve(backend, device, *args, **kwargs)
            finally:
                _backend.available_backends = available_backends
        return orig_resolve(backend, device, *args, **kwargs)

    def run_native(backend, name, device, args, op):
        if backend == "cuda" and torch.device(device).type == "cpu":
            ticket = (TICKET.data_ptr() if FOLD[0] else 0,) if name in _ops._TICKET_OPS else ()
            getattr(holder[0], name + "_cuda")(*args, *ticket, 0)
            if TICKET.item() != 0:  # every launch must leave it at zero for the next one on the stream
                value = TICKET.item()
                TICKET.zero_()
                raise AssertionError(f"fastopt::{op} (cuda-on-cpu) left the step ticket counter at {value}, not 0")
            return
        orig_run(backend, name, device, args, op)

    _backend.available_backends = available_backends
    _backend.resolve = resolve
    _ops._run_native = run_native


def module():
    """The module ``activate`` routes to (None when inactive)."""
    return _ORIGINAL["module"][0] if _ORIGINAL else None


def deactivate():
    if not _ORIGINAL:
        return
    _backend.available_backends = _ORIGINAL["available"]
    _backend.resolve = _ORIGINAL["resolve"]
    _ops._run_native = _ORIGINAL["run"]
    _ORIGINAL.clear()


def load_built(**kwargs):
    import _cuda_on_cpu_build as b  # tests/ is on sys.path (pytest's rootdir-relative import, or PYTHONPATH)

    return b.load(b.build(**kwargs))


# ---- pytest plugin (-p _cuda_on_cpu) ----
# Called for -p plugins before tests/conftest.py is loaded (it computes DEVICE_BACKENDS at import).
def pytest_load_initial_conftests(early_config, parser, args):
    activate(load_built())


def pytest_report_header(config):
    return "fastopt: backend 'cuda' runs on CPU tensors through the CUDA-on-CPU layer (tests/_cuda_on_cpu.py)"
