"""Test configuration: which (device, backend) pairs this machine can run.

Without a GPU, Triton kernels run on the CPU under TRITON_INTERPRET=1; that must be set before
triton compiles anything, so it is set here, before fastopt is imported.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fastopt  # noqa: E402,F401
from fastopt import _backend  # noqa: E402


def device_backends():
    """[(device, backend)] for every kernel backend runnable here, plus the torch reference."""
    pairs = [("cpu", b) for b in _backend.available_backends("cpu")]
    if torch.cuda.is_available():
        pairs += [("cuda", b) for b in _backend.available_backends("cuda")]
    return pairs


DEVICE_BACKENDS = device_backends()
KERNEL_DEVICE_BACKENDS = [(d, b) for d, b in DEVICE_BACKENDS if b != "torch"]


def triton_device():
    """Where the Triton kernels run here: "cuda", "cpu" (under TRITON_INTERPRET=1) or None."""
    if torch.cuda.is_available() and _backend.has_triton():
        return "cuda"
    if _backend.has_triton() and _backend.triton_interpret():
        return "cpu"
    return None


TRITON_DEVICE = triton_device()
NEEDS_TRITON = pytest.mark.skipif(TRITON_DEVICE is None, reason="triton cannot run here (no CUDA, no TRITON_INTERPRET)")


def pytest_report_header(config):
    return f"fastopt backends under test: {DEVICE_BACKENDS}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
