"""fastopt.Lion (reference and cpu kernel) vs pytorch_optimizer.Lion and lion_pytorch.Lion."""
import pytest
import torch

import fastopt
from helpers import clone_params, make_params, run_side_by_side

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
    base = make_params(SHAPES)
    up_p, fo_p = clone_params(base), clone_params(base)
    up = po.Lion(up_p, **cfg)
    fo = fastopt.Lion(fo_p, backend=backend, **cfg)
    run_side_by_side([up, fo], [up_p, fo_p], steps=10)
    for a, b in zip(up_p, fo_p):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(up.state[a]["exp_avg"], fo.state[b]["exp_avg"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_matches_lion_pytorch(backend):
    lion_pytorch = pytest.importorskip("lion_pytorch")
    base = make_params(SHAPES)
    up_p, fo_p = clone_params(base), clone_params(base)
    # lion-pytorch: decoupled decay p *= 1 - lr * wd, the pytorch_optimizer default
    up = lion_pytorch.Lion(up_p, lr=3e-3, betas=(0.9, 0.99), weight_decay=0.1)
    fo = fastopt.Lion(fo_p, lr=3e-3, betas=(0.9, 0.99), weight_decay=0.1, backend=backend)
    run_side_by_side([up, fo], [up_p, fo_p], steps=10)
    for a, b in zip(up_p, fo_p):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(up.state[a]["exp_avg"], fo.state[b]["exp_avg"], rtol=1e-5, atol=1e-6)


# -- issue 15: use_gc and cautious, fused, on every backend ------------------------------------------
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
    base = make_params(SHAPES + [(1, 5), (3, 1)])
    up_p, fo_p = clone_params(base), clone_params(base)
    up = po.Lion(up_p, **cfg)
    fo = fastopt.Lion(fo_p, backend=backend, **cfg)
    run_side_by_side([up, fo], [up_p, fo_p], steps=8)
    for a, b in zip(up_p, fo_p):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fo.state[b]["exp_avg"], up.state[a]["exp_avg"], rtol=1e-5, atol=1e-6)


def test_cautious_mask_changes_the_step():
    """The cautious runs differ from the plain ones (the option is not silently ignored)."""
    base = make_params(SHAPES)
    a_p, b_p = clone_params(base), clone_params(base)
    a = fastopt.Lion(a_p, lr=1e-2)
    b = fastopt.Lion(b_p, lr=1e-2, cautious=True, use_gc=True)
    run_side_by_side([a, b], [a_p, b_p], steps=3)
    assert any(not torch.equal(x, y) for x, y in zip(a_p, b_p))
