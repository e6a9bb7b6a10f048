"""The optimizers' own host code copies nothing host-to-device in the steady state (issue 18).

A ``TorchDispatchMode`` records every tensor made from host data (``aten.lift_fresh``: a
``torch.tensor(...)`` / ``torch.as_tensor(float)``, which on a GPU is a host-to-device copy from pageable
memory that stalls the host) whose innermost Python caller outside torch is a file of ``fastopt/``
(the launchers under ``triton_kernels/`` have their own test, tests/test_triton_launch_cache.py).  The
third step over the same parameters, and a ``clip_grad_norm_``, must make none: per-layout tables are
cached, scalars are filled on the device.  Runs on the cpu backend (the same host code as cuda and triton).
"""
import os
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastopt
from fastopt import lowbit

TORCH_DIR = os.path.dirname(torch.__file__)
PKG = os.path.dirname(os.path.abspath(fastopt.__file__))


class HostTensors(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.made = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.lift_fresh.default:
            f = sys._getframe(1)
            while f is not None and f.f_code.co_filename.startswith(TORCH_DIR):
                f = f.f_back
            if f is not None and os.path.abspath(f.f_code.co_filename).startswith(PKG):
                self.made.append(f"{os.path.relpath(f.f_code.co_filename, PKG)}:{f.f_lineno}")
        return func(*args, **(kwargs or {}))


CASES = {
    "AdamW": (fastopt.AdamW, {}),
    "Lamb": (fastopt.Lamb, {}),
    "Lamb-pre_norm": (fastopt.Lamb, {"pre_norm": True}),
    "AdamP": (fastopt.AdamP, {}),
    "AdamP-cautious": (fastopt.AdamP, {"cautious": True}),
    "AdamP-use_gc": (fastopt.AdamP, {"use_gc": True}),
    "SGDP": (fastopt.SGDP, {}),
    "SGDSaI": (fastopt.SGDSaI, {}),
    "Lion-use_gc": (fastopt.Lion, {"use_gc": True}),
    "Lion-cautious": (fastopt.Lion, {"cautious": True}),
    "Adan-use_gc": (fastopt.Adan, {"use_gc": True}),
    "AdamW8bit": (lowbit.AdamW8bit, {}),
}


def test_the_instrument_sees_a_host_tensor():
    """A tensor made from host data in a file of fastopt/ is counted; one made here is not."""
    from fastopt.optim import _pytorch_optimizer as zoo

    with HostTensors() as mode:
        torch.tensor([1.0, 2.0])
        exec(compile("torch.tensor([3.0])", zoo.__file__, "exec"), {"torch": torch})
    assert len(mode.made) == 1 and mode.made[0].startswith("optim")


@pytest.mark.parametrize("name", sorted(CASES))
def test_steady_state_step_makes_no_host_tensor(name):
    cls, kw = CASES[name]
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s)) for s in [(64, 32), (256,), (8, 4, 8)]]
    opt = cls(ps, lr=1e-3, backend="cpu", **kw)
    for i in range(3):
        for p in ps:
            p.grad = torch.randn(p.shape)
        if i < 2:
            opt.step()
            continue
        with HostTensors() as mode:
            opt.step()
            fastopt.clip_grad_norm_(ps, 1.0, backend="cpu")
        assert mode.made == [], f"{name}: tensors made from host data each step at {mode.made}"
