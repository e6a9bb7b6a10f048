"""fastopt.ot.sinkhorn: the reference against POT and geomloss, every backend against the fp64
reference (kernel error at most 2x a same-precision torch run, STYLE.md #10), gradients, batches with
padding, half-precision inputs, eps-scaling, errors."""
import math

import numpy as np
import pytest
import torch

import fastopt
from fastopt.ot import sinkhorn, sinkhorn_divergence
from fastopt.reference.ot import cost_matrix, sinkhorn_reference

from conftest import DEVICE_BACKENDS

ot = pytest.importorskip("ot")

BACKENDS = [b for d, b in DEVICE_BACKENDS if d == "cpu"]
KERNELS = [b for b in BACKENDS if b != "torch"]


def _clouds(B, n, m, d, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, n, d, generator=gen, dtype=torch.float64)
    y = torch.randn(B, m, d, generator=gen, dtype=torch.float64) * 0.8 + 0.5
    return x.to(dtype), y.to(dtype)


def _weights(B, n, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.rand(B, n, generator=gen, dtype=torch.float64) + 0.2
    return w / w.sum(1, keepdim=True)


# -- the reference against POT ---------------------------------------------------------------------

@pytest.mark.parametrize("cost", ["sqeuclidean", "euclidean"])
def test_reference_matches_pot_sinkhorn_log(cost):
    x, y = _clouds(1, 23, 31, 2, dtype=torch.float64)
    a, b = _weights(1, 23, 1)[0], _weights(1, 31, 2)[0]
    C = cost_matrix(x[0], y[0], cost)
    eps = 0.4
    f, g, it, err = sinkhorn_reference(C, a.log(), b.log(), eps, n_iter=300, tol=0)
    G, log = ot.sinkhorn(a.numpy(), b.numpy(), C.numpy(), eps, method="sinkhorn_log", numItermax=300, stopThr=0,
                         log=True, warn=False)
    P = a[:, None] * b[None] * torch.exp((f[:, None] + g[None] - C) / eps)
    np.testing.assert_allclose(P.numpy(), G, rtol=1e-10, atol=1e-15)
    # POT's log scalings are log a + f / eps and log b + g / eps up to the gauge (f + c, g - c)
    du = torch.from_numpy(log["log_u"]) - (a.log() + f / eps)
    dv = torch.from_numpy(log["log_v"]) - (b.log() + g / eps)
    assert float(du.max() - du.min()) < 1e-9 and float(dv.max() - dv.min()) < 1e-9
    assert abs(float(du.mean() + dv.mean())) < 1e-9


def test_reference_matches_pot_unbalanced_plan_and_value():
    x, y = _clouds(1, 17, 29, 3, dtype=torch.float64)
    a, b = _weights(1, 17, 3)[0] * 1.5, _weights(1, 29, 4)[0]
    C = cost_matrix(x[0], y[0], "sqeuclidean")
    eps, rho = 0.5, 2.0
    G, log = ot.unbalanced.sinkhorn_unbalanced(a.numpy(), b.numpy(), C.numpy(), eps, rho, reg_type="kl",
                                               numItermax=20000, stopThr=1e-15, log=True)
    res = sinkhorn(cost_matrix=C, a=a, b=b, eps=eps, rho=rho, tol=1e-13, n_iter=20000, backend="torch")
    np.testing.assert_allclose(res.plan().numpy(), G, rtol=1e-7, atol=1e-14)
    assert res.converged
    # the dual value equals the primal objective of POT's plan, with generalized KL divergences
    # (POT's log["total_cost"] uses kl_div(mass=False), which drops the "- p + q" mass terms)
    P = torch.from_numpy(G)

    def kl(p, q):
        return (p * torch.log(p / q) - p + q).sum()

    primal = (P * C).sum() + eps * kl(P, a[:, None] * b[None]) + rho * kl(P.sum(1), a) + rho * kl(P.sum(0), b)
    assert abs(float(res.value - primal)) < 1e-9 * max(1.0, abs(float(primal)))
    assert abs(float((P * C).sum()) - float(log["cost"])) < 1e-12


def test_balanced_value_is_the_primal_objective():
    x, y = _clouds(1, 20, 25, 2, dtype=torch.float64)
    a, b = _weights(1, 20, 5)[0], _weights(1, 25, 6)[0]
    res = sinkhorn(x[0], y[0], a, b, eps=0.3, tol=1e-12, n_iter=5000, backend="torch")
    P = res.plan()
    C = cost_matrix(x[0], y[0], "sqeuclidean")
    primal = (P * C).sum() + 0.3 * (P * torch.log(P / (a[:, None] * b[None]))).sum()
    assert abs(float(res.value - primal)) < 1e-10
    G = ot.sinkhorn(a.numpy(), b.numpy(), C.numpy(), 0.3, method="sinkhorn_log", numItermax=5000, stopThr=1e-13)
    np.testing.assert_allclose(P.numpy(), G, atol=1e-12)


# -- every backend against the fp64 reference ---------------------------------------------------------

CASES = [  # (B, n, m, d, cost, rho, dense)
    (1, 37, 61, 3, "sqeuclidean", None, False),
    (3, 20, 33, 2, "euclidean", None, False),
    (2, 45, 19, 5, "sqeuclidean", 1.5, False),
    (2, 1, 7, 1, "sqeuclidean", None, False),
    (1, 30, 40, 17, "sqeuclidean", None, False),
    (2, 29, 31, 3, "sqeuclidean", None, True),
    (1, 26, 70, 4, "euclidean", 0.8, True),
]


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}-{c[1]}x{c[2]}-d{c[3]}-{c[4]}-rho{c[5]}-{'dense' if c[6] else 'pts'}")
def test_kernels_vs_fp64_reference(backend, case):
    B, n, m, d, cost, rho, dense = case
    x64, y64 = _clouds(B, n, m, d, seed=n + m)
    a64, b64 = _weights(B, n, 7), _weights(B, m, 8)
    if rho is not None:
        a64 = a64 * 1.3
    eps = 0.7 if cost == "euclidean" else 0.5
    C64 = cost_matrix(x64, y64, cost)
    kw = dict(eps=eps, rho=rho, n_iter=60, tol=0.0)
    ref = sinkhorn(cost_matrix=C64, a=a64, b=b64, backend="torch", **kw)

    def run(backend_):
        if dense:
            return sinkhorn(cost_matrix=C64.float(), a=a64.float(), b=b64.float(), backend=backend_, **kw)
        return sinkhorn(x64.float(), y64.float(), a64.float(), b64.float(), cost=cost, backend=backend_, **kw)

    torch32, got = run("torch"), run(backend)
    assert got.n_iter == ref.n_iter == 60
    for name in ("f", "g", "value"):
        r = getattr(ref, name)
        err_t = float((getattr(torch32, name).double() - r).abs().max())
        err_k = float((getattr(got, name).double() - r).abs().max())
        assert err_k <= 2 * err_t + 1e-5 * (1 + float(r.abs().max())), (name, err_k, err_t)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ragged_batch_with_masks_equals_separate_solves(backend):
    x, y = _clouds(3, 24, 30, 2, seed=11)
    nx_, ny_ = [24, 13, 5], [30, 30, 9]
    x_mask = torch.arange(24)[None] < torch.tensor(nx_)[:, None]
    y_mask = torch.arange(30)[None] < torch.tensor(ny_)[:, None]
    batched = sinkhorn(x, y, eps=0.3, x_mask=x_mask, y_mask=y_mask, tol=1e-6, backend=backend)
    for i in range(3):
        single = sinkhorn(x[i, :nx_[i]], y[i, :ny_[i]], eps=0.3, tol=1e-6, n_iter=batched.n_iter, backend=backend)
        torch.testing.assert_close(batched.value[i], single.value, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(batched.f[i, :nx_[i]], single.f, rtol=1e-4, atol=1e-4)
        assert bool((batched.f[i, nx_[i]:] == 0).all()) and bool((batched.g[i, ny_[i]:] == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_accumulate_in_fp32(backend, dtype):
    x, y = _clouds(2, 40, 50, 3, seed=3)
    xh, yh = x.to(dtype), y.to(dtype)
    got = sinkhorn(xh, yh, eps=0.5, n_iter=50, tol=0.0, backend=backend)
    ref = sinkhorn(xh.double(), yh.double(), eps=0.5, n_iter=50, tol=0.0, backend="torch")  # same rounded points
    assert got.f.dtype == torch.float32
    torch.testing.assert_close(got.value.double(), ref.value, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(got.f.double(), ref.f, rtol=1e-4, atol=1e-4)


# -- gradients --------------------------------------------------------------------------------------

@pytest.mark.parametrize("cost", ["sqeuclidean", "euclidean"])
@pytest.mark.parametrize("rho", [None, 1.0])
def test_envelope_gradient_matches_finite_differences(cost, rho):
    x, y = _clouds(1, 6, 5, 2, seed=21, dtype=torch.float64)
    x, y = x[0].requires_grad_(), y[0].requires_grad_()
    kw = dict(eps=0.5, cost=cost, rho=rho, tol=1e-14, n_iter=20000, backend="torch")
    res = sinkhorn(x, y, **kw)
    gx, gy = torch.autograd.grad(res.value, (x, y))
    h = 1e-6
    for pts, grad in ((x, gx), (y, gy)):
        num = torch.zeros_like(pts)
        for idx in np.ndindex(*pts.shape):
            with torch.no_grad():
                pts[idx] += h
                up = float(sinkhorn(x, y, **kw).value)
                pts[idx] -= 2 * h
                down = float(sinkhorn(x, y, **kw).value)
                pts[idx] += h
            num[idx] = (up - down) / (2 * h)
        torch.testing.assert_close(grad, num, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("cost", ["sqeuclidean", "euclidean"])
def test_kernel_gradients_match_torch(backend, cost):
    x, y = _clouds(2, 33, 27, 3, seed=5)
    grads = {}
    for b_ in ("torch", backend):
        xx, yy = x.clone().requires_grad_(), y.clone().requires_grad_()
        res = sinkhorn(xx, yy, eps=0.4, cost=cost, n_iter=80, tol=0.0, backend=b_)
        (res.value * torch.tensor([1.0, -2.0])).sum().backward()
        grads[b_] = (xx.grad, yy.grad)
    for g_ref, g in zip(grads["torch"], grads[backend]):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)


def test_weight_and_cost_matrix_gradients():
    x, y = _clouds(1, 8, 9, 2, seed=2, dtype=torch.float64)
    a, b = _weights(1, 8, 1)[0].requires_grad_(), _weights(1, 9, 2)[0]
    C = cost_matrix(x[0], y[0], "sqeuclidean").requires_grad_()
    res = sinkhorn(cost_matrix=C, a=a, b=b, eps=0.3, tol=1e-14, n_iter=20000, backend="torch")
    ga, gC = torch.autograd.grad(res.value, (a, C))
    torch.testing.assert_close(gC, res.plan(), rtol=1e-10, atol=1e-14)      # dOT/dC = P
    # along a mass-preserving direction e_i - e_j the derivative is f_i - f_j
    h = 1e-6
    with torch.no_grad():
        d = torch.zeros(8, dtype=torch.float64)
        d[1], d[4] = 1.0, -1.0
        up = sinkhorn(cost_matrix=C, a=a + h * d, b=b, eps=0.3, tol=1e-14, n_iter=20000, backend="torch").value
        down = sinkhorn(cost_matrix=C, a=a - h * d, b=b, eps=0.3, tol=1e-14, n_iter=20000, backend="torch").value
    assert abs(float((up - down) / (2 * h)) - float(ga[1] - ga[4])) < 1e-6


def test_half_input_gradients_have_the_input_dtype():
    x, y = _clouds(1, 10, 12, 3, seed=9, dtype=torch.bfloat16)
    x.requires_grad_()
    res = sinkhorn(x, y, eps=0.5, n_iter=30, backend="cpu" if "cpu" in BACKENDS else "torch")
    res.value.sum().backward()
    assert x.grad.dtype == torch.bfloat16 and bool(torch.isfinite(x.grad).all())


# -- divergence, convergence, eps-scaling -----------------------------------------------------------

def test_divergence_matches_geomloss():
    geomloss = pytest.importorskip("geomloss")
    x, y = _clouds(1, 40, 50, 2, seed=4, dtype=torch.float64)
    blur = 0.5
    # geomloss anneals eps and stops at the end of its schedule: scaling 0.999 is converged to ~1e-6
    # (0.99 is 1.5e-4 off, 0.9 6e-3)
    loss = geomloss.SamplesLoss("sinkhorn", p=2, blur=blur, debias=True, scaling=0.999, backend="tensorized")
    theirs = float(loss(x[0], y[0]))
    ours = sinkhorn_divergence(x[0], y[0], eps=2 * blur ** 2, tol=1e-12, n_iter=20000, backend="torch")
    # geomloss' cost is |x - y|^2 / 2, so eps = 2 blur^2 and its value is half of ours
    assert abs(float(ours) / 2 - theirs) < 1e-5 * max(1.0, abs(theirs))
    assert float(sinkhorn_divergence(x[0], x[0], eps=0.5, tol=1e-10, backend="torch")) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_divergence_gradient_flow_decreases(backend):
    x, y = _clouds(1, 30, 30, 2, seed=8)
    x = x[0].clone().requires_grad_()
    vals = []
    for _ in range(15):
        s = sinkhorn_divergence(x, y[0], eps=0.1, tol=1e-5, backend=backend)
        (gx,) = torch.autograd.grad(s, x)
        with torch.no_grad():
            x -= 20.0 * gx
        vals.append(float(s.detach()))
    assert vals[-1] < 0.3 * vals[0] and all(v > -1e-5 for v in vals)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])  # (the loop is backend-independent;
def test_convergence_reporting_and_eps_scaling(backend):                    # interpreted Triton is slow)
    x, y = _clouds(1, 50, 60, 2, seed=6)
    plain = sinkhorn(x, y, eps=0.05, tol=1e-5, n_iter=3000, backend=backend)
    assert plain.converged and float(plain.error.max()) < 1e-5 and plain.n_iter % 10 == 0
    scaled = sinkhorn(x, y, eps=0.05, tol=1e-5, n_iter=3000, eps_scaling=0.7, backend=backend)
    assert scaled.converged and scaled.n_iter < 0.9 * plain.n_iter
    torch.testing.assert_close(scaled.value, plain.value, rtol=1e-4, atol=1e-5)
    capped = sinkhorn(x, y, eps=0.05, tol=0.0, n_iter=7, backend=backend)
    assert capped.n_iter == 7 and not capped.converged


# -- errors and the custom op ------------------------------------------------------------------------

def test_errors():
    x, y = torch.randn(5, 2), torch.randn(6, 2)
    with pytest.raises(ValueError, match="eps"):
        sinkhorn(x, y, eps=0.0)
    with pytest.raises(ValueError, match="non-finite"):
        sinkhorn(torch.full((5, 2), float("nan")), y, eps=1.0)
    with pytest.raises(ValueError, match="finite and non-negative"):
        sinkhorn(x, y, -torch.ones(5) / 5, eps=1.0)
    with pytest.raises(ValueError, match="equal total masses"):
        sinkhorn(x, y, torch.ones(5), torch.ones(6), eps=1.0)
    with pytest.raises(ValueError, match="same batch and dimension"):
        sinkhorn(x, torch.randn(6, 3), eps=1.0)
    with pytest.raises(ValueError, match="not both"):
        sinkhorn(x, y, eps=1.0, cost_matrix=torch.rand(5, 6))
    with pytest.raises(ValueError, match="cost must be"):
        sinkhorn(x, y, eps=1.0, cost="cosine")
    with pytest.raises(fastopt.BackendUnavailableError, match="float64"):
        sinkhorn(x.double(), y.double(), eps=1.0, backend="cpu")
    with pytest.raises(TypeError, match="bool"):
        sinkhorn(x, y, eps=1.0, x_mask=torch.ones(5))
    with pytest.raises(ValueError, match="rho"):
        sinkhorn(x, y, eps=1.0, rho=-1.0)
    with pytest.raises(ValueError, match="no valid point"):
        sinkhorn(x, y, eps=1.0, x_mask=torch.zeros(5, dtype=torch.bool))


@pytest.mark.parametrize("backend", KERNELS)
def test_ot_pass_opcheck(backend):
    from fastopt import _ops
    x, y = torch.randn(2, 9, 3), torch.randn(2, 11, 3)
    h, c = torch.randn(2, 11), torch.randn(2, 9)
    torch.library.opcheck(_ops.ot_pass_, (x, y, None, h, None, torch.empty(2, 9), 0.5, 0, 0, backend))
    torch.library.opcheck(_ops.ot_pass_, (x, y, None, h, c, torch.empty(2, 9, 3), 0.5, 1, 1, backend))
    out = torch.empty(2, 9)
    _ops.ot_pass(x, y, None, h, None, out, 0.5, 0, 0, backend)
    expect = torch.logsumexp(h[:, None, :] - cost_matrix(x, y, "sqeuclidean") / 0.5, dim=-1)
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)
    assert math.isfinite(float(out.sum()))
