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
