"""fastopt.clip_grad_norm_ vs torch.nn.utils.clip_grad_norm_ on every backend."""
import pytest
import torch

import fastopt
from conftest import DEVICE_BACKENDS
from helpers import ODD_SHAPES, make_params


def twin_grads(shapes, dtypes, device, scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a, b = [], []
    for i, s in enumerate(shapes):
        dtype = dtypes[i % len(dtypes)]
        p = torch.randn(s, generator=gen)
        g = (torch.randn(s, generator=gen) * scale).to(device=device, dtype=dtype)
        pa = torch.nn.Parameter(p.to(device=device, dtype=dtype))
        pb = torch.nn.Parameter(p.to(device=device, dtype=dtype))
        pa.grad, pb.grad = g.clone(), g.clone()
        a.append(pa)
        b.append(pb)
    return a, b


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("max_norm", [0.5, 1e9])
def test_matches_torch_fp32(device, backend, max_norm):
    a, b = twin_grads(ODD_SHAPES, [torch.float32], device)
    ta = torch.nn.utils.clip_grad_norm_(a, max_norm)
    tb = fastopt.clip_grad_norm_(b, max_norm, backend=backend)
    torch.testing.assert_close(ta, tb, rtol=1e-5, atol=1e-6)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-7)
    if max_norm == 1e9:  # below the threshold the gradients are scaled by exactly 1
        for x, y in zip(a, b):
            assert torch.equal(x.grad, y.grad)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_mixed_dtypes(device, backend):
    a, b = twin_grads([(97,), (13, 31), (300,)], [torch.float32, torch.bfloat16, torch.float16], device)
    ta = torch.nn.utils.clip_grad_norm_(a, 0.3)
    tb = fastopt.clip_grad_norm_(b, 0.3, backend=backend)
    torch.testing.assert_close(ta.float(), tb.float(), rtol=2e-3, atol=1e-4)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad.float(), y.grad.float(), rtol=1.6e-2, atol=1e-3)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_nonfinite(device, backend):
    a, b = twin_grads([(10,), (20,)], [torch.float32], device)
    b[1].grad[3] = float("inf")
    before = [p.grad.clone() for p in b]
    with pytest.raises(RuntimeError, match="non-finite"):
        fastopt.clip_grad_norm_(b, 1.0, error_if_nonfinite=True, backend=backend)
    for g, p in zip(before, b):
        assert torch.equal(g, p.grad)
    total = fastopt.clip_grad_norm_(b, 1.0, backend=backend)
    assert total.isinf()


def test_other_norm_types_and_edge_cases():
    a, b = twin_grads([(10,), (20,)], [torch.float32], "cpu", scale=3.0)
    ta = torch.nn.utils.clip_grad_norm_(a, 1.0, norm_type="inf")
    tb = fastopt.clip_grad_norm_(b, 1.0, norm_type="inf")
    torch.testing.assert_close(ta, tb)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad)
    assert float(fastopt.clip_grad_norm_([torch.nn.Parameter(torch.ones(3))], 1.0)) == 0.0
    with pytest.raises(ValueError, match="unknown backend"):
        fastopt.clip_grad_norm_(b, 1.0, backend="nope")


def test_single_tensor_and_generator():
    p = torch.nn.Parameter(make_params([(50,)])[0])
    p.grad = torch.full((50,), 2.0)
    total = fastopt.clip_grad_norm_((q for q in [p]), 1.0)
    torch.testing.assert_close(total, torch.tensor(50 ** 0.5 * 2.0))
    torch.testing.assert_close(p.grad.norm(), torch.tensor(1.0), rtol=1e-5, atol=1e-5)
