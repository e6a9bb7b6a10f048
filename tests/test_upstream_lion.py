"""fastopt.Lion (reference and cpu kernel) vs pytorch_optimizer.Lion and lion_pytorch.Lion."""
import pytest
import torch

import fastopt
from helpers import assert_runs_close, clone_params, make_params, run_pair, run_side_by_side

po = pytest.importorskip("pytorch_optimizer")

SHAPES = [(7,), (64, 33), (5, 3, 3, 3)]
CONFIGS = [
    dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.0),
    dict(lr=3e-3, betas=(0.95, 0.98), weight_decay=0.1),
    dict(lr=3e-3, weight_decay=0.1, weight_decouple=False),
    dict(lr=3e-3, weight_decay=0.05, fixed_decay=True),
    dict(lr=3e-3, weight_decay=0.05, maximize=True),
]


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("cfg", CONFIGS)
def test_matches_pytorch_optimizer(backend, cfg):
    up, up_p, fo, fo_p = run_pair(lambda ps: po.Lion(ps, **cfg), lambda ps: fastopt.Lion(ps, backend=backend, **cfg),
                                  SHAPES, steps=10)
    assert_runs_close(up, up_p, fo, fo_p, ("exp_avg",), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_matches_lion_pytorch(backend):
    lion_pytorch = pytest.importorskip("lion_pytorch")
    # lion-pytorch: decoupled decay p *= 1 - lr * wd, the pytorch_optimizer default
    cfg = dict(lr=3e-3, betas=(0.9, 0.99), weight_decay=0.1)
    up, up_p, fo, fo_p = run_pair(lambda ps: lion_pytorch.Lion(ps, **cfg),
                                  lambda ps: fastopt.Lion(ps, **cfg, backend=backend), SHAPES, steps=10)
    assert_runs_close(up, up_p, fo, fo_p, ("exp_avg",), rtol=1e-5, atol=1e-6)


# -- use_gc and cautious, fused, on every backend -----------------------------------------------------
def _backends():
    from conftest import DEVICE_BACKENDS
    return [b for d, b in DEVICE_BACKENDS if d == "cpu"]


GC_CONFIGS = [
    dict(lr=1e-2, weight_decay=0.1, use_gc=True),
    dict(lr=1e-2, weight_decay=0.1, cautious=True),
    dict(lr=3e-3, weight_decay=0.1, weight_decouple=False, use_gc=True, cautious=True),
    dict(lr=3e-3, weight_decay=0.05, fixed_decay=True, use_gc=True, cautious=True, maximize=True),
]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("cfg", GC_CONFIGS)
def test_gc_and_cautious_match_pytorch_optimizer(backend, cfg):
    up, up_p, fo, fo_p = run_pair(lambda ps: po.Lion(ps, **cfg), lambda ps: fastopt.Lion(ps, backend=backend, **cfg),
                                  SHAPES + [(1, 5), (3, 1)], steps=8)
    assert_runs_close(fo, fo_p, up, up_p, ("exp_avg",), rtol=1e-5, atol=1e-6)


def test_cautious_mask_changes_the_step():
    """The cautious runs differ from the plain ones (the option is not silently ignored)."""
    base = make_params(SHAPES)
    a_p, b_p = clone_params(base), clone_params(base)
    a = fastopt.Lion(a_p, lr=1e-2)
    b = fastopt.Lion(b_p, lr=1e-2, cautious=True, use_gc=True)
    run_side_by_side([a, b], [a_p, b_p], steps=3)
    assert any(not torch.equal(x, y) for x, y in zip(a_p, b_p))
