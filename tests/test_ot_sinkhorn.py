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


# -- non-finite inputs, d = 0, and eps huge against the costs ------------------------------------------

def test_softmin_reference_is_the_textbook_soft_minimum():
    """The spec of the soft-minimum pass equals ``-eps LSE(log w + (g - C) / eps) + eps log |w|`` where
    that is well conditioned (fp64, moderate eps), with no-mass columns skipped."""
    from fastopt.reference.ot import softmin_reference
    gen = torch.Generator().manual_seed(3)
    C = torch.rand(2, 7, 11, generator=gen, dtype=torch.float64) * 4
    w = torch.rand(2, 11, generator=gen, dtype=torch.float64)
    w[0, 3] = 0.0
    g = torch.randn(2, 11, generator=gen, dtype=torch.float64)
    for eps in (0.05, 0.7, 30.0):
        lw = torch.where(w > 0, w.log(), float("-inf"))
        textbook = (-eps * torch.logsumexp(lw[:, None, :] + (g[:, None, :] - C) / eps, dim=-1)
                    + eps * w.sum(1).log()[:, None])
        torch.testing.assert_close(softmin_reference(C, w, g, eps), textbook, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", KERNELS)
def test_ot_softmin_pass_matches_reference_and_opcheck(backend):
    from fastopt._ops import ot_softmin, ot_softmin_
    from fastopt.reference.ot import softmin_reference
    gen = torch.Generator().manual_seed(4)
    for d, cost in ((2, 0), (3, 1), (6, 0)):
        x, y = torch.randn(2, 9, d, generator=gen), torch.randn(2, 300, d, generator=gen)
        w = torch.rand(2, 300, generator=gen) + 0.05
        w[0, :260] = 0.0  # a block of columns with no mass, and single ones
        w[1, 7] = 0.0
        g = torch.randn(2, 300, generator=gen)
        for dense in (False, True):
            C64 = cost_matrix(x.double(), y.double(), ("sqeuclidean", "euclidean")[cost])
            C32 = C64.float()
            for eps in (1e-3, 0.3, 10.0, 1e4, 1e8):
                ref = softmin_reference(C64, w.double(), g.double(), eps)
                out = torch.empty(2, 9)
                if dense:
                    ot_softmin(None, None, C32, w, g, out, eps, 0, backend)
                else:
                    ot_softmin(x, y, None, w, g, out, eps, cost, backend)
                err = float((out.double() - ref).abs().max())
                assert err <= 2e-6 * (1 + float(ref.abs().max())), (d, cost, dense, eps, err)
    torch.library.opcheck(ot_softmin_, (x, y, None, w, g, torch.empty(2, 9), 0.5, 0, backend))
    with pytest.raises(ValueError, match="contiguous"):
        ot_softmin(x, y, None, w[:, :299], g, torch.empty(2, 9), 0.5, 0, backend)


EPS_SWEEP = [1e3, 1e5, 1e8, 1e10]


def _large_eps_inputs():
    gen = torch.Generator().manual_seed(14)
    x = torch.randn(2, 25, 3, generator=gen)
    y = torch.randn(2, 31, 3, generator=gen) * 0.8 + 0.5
    return x, y


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("eps", EPS_SWEEP)
def test_fp32_is_accurate_when_eps_is_huge_against_the_costs(backend, eps):
    """eps = 1e8 against costs of about 5 (fp64 gives [6.91, 5.98] on these points): the textbook fp32
    form log b + (g - C) / eps rounds (g - C) / eps away (tens off at eps = 1e8, 1e-3 off already at
    eps = 1e5, with converged=True).  Every backend is within a few fp32 ulps of fp64 on the same
    inputs, points and dense costs, balanced (default weights) and unbalanced, and so are the
    potentials and the gradients."""
    x, y = _large_eps_inputs()
    kw = dict(eps=eps, n_iter=200, tol=1e-6)
    ref = sinkhorn(x.double(), y.double(), backend="torch", **kw)
    got = sinkhorn(x, y, backend=backend, **kw)
    assert ref.converged and got.converged and float(got.error.max()) < 1e-6
    rel = ((got.value.double() - ref.value).abs() / ref.value.abs()).max()
    assert float(rel) < 1e-6, (float(rel), got.value.tolist(), ref.value.tolist())
    scale = float(cost_matrix(x.double(), y.double(), "sqeuclidean").max())
    for name in ("f", "g"):
        err = float((getattr(got, name).double() - getattr(ref, name)).abs().max())
        assert err < 2e-6 * scale, (name, err)
    # the value tends to the mean cost of the independent coupling a (x) b
    mean_cost = cost_matrix(x.double(), y.double(), "sqeuclidean").mean((1, 2))
    assert float(((ref.value - mean_cost).abs() / mean_cost).max()) < 50 * scale / eps
    # dense costs and unbalanced (rho = 1), with weights as given in fp32 (their fp32 mass is honoured:
    # the fp64 run gets the same numbers)
    C = cost_matrix(x, y, "euclidean")
    a = torch.rand(2, 25, generator=torch.Generator().manual_seed(1)) + 0.2
    a = a / a.sum(1, keepdim=True)
    b = torch.full((2, 31), 1.0 / 31)
    for rho in (None, 1.0):
        ref = sinkhorn(cost_matrix=C.double(), a=a.double(), b=b.double(), rho=rho, backend="torch", **kw)
        got = sinkhorn(cost_matrix=C, a=a, b=b, rho=rho, backend=backend, **kw)
        rel = ((got.value.double() - ref.value).abs() / ref.value.abs()).max()
        assert got.converged and float(rel) < 1e-6, (rho, float(rel), got.value.tolist(), ref.value.tolist())
    # gradients: points (envelope theorem) and weights (the potentials)
    xx, x64 = x.clone().requires_grad_(), x.double().requires_grad_()
    g32 = torch.autograd.grad(sinkhorn(xx, y, backend=backend, **kw).value.sum(), xx)[0]
    g64 = torch.autograd.grad(sinkhorn(x64, y.double(), backend="torch", **kw).value.sum(), x64)[0]
    torch.testing.assert_close(g32.double(), g64, rtol=1e-5, atol=1e-5 * float(g64.abs().max()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_or_malformed_init_is_an_error(backend):
    """A NaN in ``init`` would give a silent NaN value: every bad warm start is refused before any work,
    on every backend."""
    x, y = torch.randn(5, 2), torch.randn(6, 2)
    good = sinkhorn(x, y, eps=0.5, backend=backend)
    f, g = good.f, good.g
    nan_f = f.clone()
    nan_f[2] = float("nan")
    inf_g = g.clone()
    inf_g[0] = float("inf")
    for init, err, match in (
        ((nan_f, g), ValueError, "init f has non-finite"),
        ((f, inf_g), ValueError, "init g has non-finite"),
        ((f.double() * 1e300, g), ValueError, "init f has non-finite"),  # overflows fp32
        ((f[:4], g), ValueError, "init f has shape"),
        ((f,), TypeError, "pair"),
        ((f, g.int()), TypeError, "init g must be a real floating-point"),
    ):
        with pytest.raises(err, match=match):
            sinkhorn(x, y, eps=0.5, init=init, backend=backend)
    # a finite warm start from a solution converges at once to the same value
    warm = sinkhorn(x, y, eps=0.5, init=(f + 1e3, g - 1e3), backend=backend)
    assert warm.n_iter == 10 and warm.converged
    torch.testing.assert_close(warm.value, good.value, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rho", [None, 2.0])
def test_zero_dimensional_points_have_zero_cost(backend, rho):
    """d = 0: every cost is 0 (an empty sum), on every backend alike: the same result as a zero cost
    matrix; balanced, the value is 0, the plan a (x) b and the potentials 0; the gradient has the
    points' (empty) shape."""
    gen = torch.Generator().manual_seed(2)
    a = torch.rand(2, 5, generator=gen) + 0.1
    b = torch.rand(2, 7, generator=gen) + 0.1
    a, b = a / a.sum(1, keepdim=True), b / b.sum(1, keepdim=True)
    x = torch.zeros(2, 5, 0, requires_grad=True)
    y = torch.zeros(2, 7, 0)
    res = sinkhorn(x, y, a, b, eps=0.3, rho=rho, backend=backend)
    ref = sinkhorn(cost_matrix=torch.zeros(2, 5, 7, dtype=torch.float64), a=a.double(), b=b.double(), eps=0.3,
                   rho=rho, backend="torch")
    assert res.converged
    torch.testing.assert_close(res.value.double(), ref.value, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(res.plan().double(), ref.plan(), rtol=1e-6, atol=1e-7)
    if rho is None:
        torch.testing.assert_close(res.plan(), a[:, :, None] * b[:, None, :], rtol=1e-6, atol=0)
    (gx,) = torch.autograd.grad(res.value.sum(), x)
    assert gx.shape == (2, 5, 0)
    # default (uniform, mass exactly 1) weights, unbatched and ragged: exactly 0
    one = sinkhorn(torch.zeros(4, 0), torch.zeros(3, 0), eps=1.0, rho=rho, backend=backend)
    assert one.plan().shape == (4, 3)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    ragged = sinkhorn(x.detach(), y, eps=0.3, x_mask=mask, rho=rho, backend=backend)
    if rho is None:
        for r in (one, ragged):
            assert r.value.abs().max() == 0 and r.f.abs().max() == 0 and r.g.abs().max() == 0
        torch.testing.assert_close(ragged.plan()[1], torch.outer(mask[1] / 2.0, torch.full((7,), 1 / 7)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_out_of_range_are_errors(backend):
    """What would give NaN/inf silently (or loop on a NaN tolerance) is a ValueError before any work."""
    x, y = torch.randn(5, 2), torch.randn(6, 2)
    with pytest.raises(ValueError, match="tol"):
        sinkhorn(x, y, eps=1.0, tol=float("nan"), backend=backend)
    with pytest.raises(ValueError, match="outside the range"):
        sinkhorn(x, y, eps=1e-40, backend=backend)       # 1/eps overflows fp32
    with pytest.raises(ValueError, match="too close to the torch.float32 range"):
        sinkhorn(x * 1e20, y, eps=1.0, backend=backend)  # |x - y|^2 overflows fp32
    with pytest.raises(ValueError, match="too close to the torch.float32 range"):
        sinkhorn(x * 1e20, y, eps=1e20, cost="euclidean", backend=backend)  # |x - y| fits, its square not
    with pytest.raises(ValueError, match="out of"):
        sinkhorn(x, y, eps=1e-32, backend=backend)       # cost / eps beyond 1e30
    with pytest.raises(ValueError, match="out of"):
        sinkhorn(x, y, eps=1e33, backend=backend)        # cost / eps below 1e-30
    with pytest.raises(ValueError, match="non-finite"):
        sinkhorn(cost_matrix=torch.tensor([[0.0, float("inf")]]), eps=1.0, backend=backend)
    with pytest.raises(ValueError, match="finite and non-negative"):
        sinkhorn(x, y, torch.tensor([0.2, 0.2, float("nan"), 0.2, 0.2]), eps=1.0, backend=backend)
    with pytest.raises(ValueError, match="eps"):
        sinkhorn(x, y, eps=float("nan"), backend=backend)
    # the limits themselves still solve, finitely
    for eps in (1e-6, 1e12):
        res = sinkhorn(x, y, eps=eps, n_iter=50, backend=backend)
        assert bool(torch.isfinite(res.value)) and bool(torch.isfinite(res.f).all())


def test_softmin_triton_kernel_compiles_for_sm90():
    """The soft-minimum variant of the Triton OT kernel (MODE 2, points and dense) lowers to an sm_90
    cubin, like the variants tests/test_triton_aot.py compiles (same helper, no GPU needed)."""
    pytest.importorskip("triton")
    from triton.backends import backends
    if "nvidia" not in backends:
        pytest.skip("triton has no NVIDIA backend")
    from test_triton_aot import _compile
    sig = {"x_ptr": "*fp32", "y_ptr": "*fp32", "cm_ptr": "*fp32", "h_ptr": "*fp32", "c_ptr": "*fp32",
           "out_ptr": "*fp32", "n": "i32", "m": "i32", "inv_eps": "fp32"}
    for dense in (False, True):
        _compile("ot", "_ot_kernel", sig, {"D": 3, "D_PAD": 4, "COST": 0, "MODE": 2, "DENSE": dense,
                                           "BLOCK_N": 64, "BLOCK_M": 64}, 4)


# -- semi-relaxed OT (a rho pair, inf = exact marginal) ----------------------------------------------

@pytest.mark.parametrize("side", [0, 1])
def test_semi_relaxed_matches_pot_with_one_infinite_reg_m(side):
    x, y = _clouds(1, 19, 26, 3, seed=31, dtype=torch.float64)
    a, b = _weights(1, 19, 5)[0], _weights(1, 26, 6)[0] * 0.7
    C = cost_matrix(x[0], y[0], "sqeuclidean")
    eps, r = 0.4, 1.5
    reg_m = (math.inf, r) if side == 0 else (r, math.inf)
    G = ot.unbalanced.sinkhorn_unbalanced(a.numpy(), b.numpy(), C.numpy(), eps, reg_m, reg_type="kl",
                                          numItermax=20000, stopThr=1e-15)
    res = sinkhorn(cost_matrix=C, a=a, b=b, eps=eps, rho=reg_m, tol=1e-13, n_iter=20000, backend="torch")
    assert res.converged
    P = res.plan()
    np.testing.assert_allclose(P.numpy(), G, rtol=1e-7, atol=1e-14)
    exact, w = (P.sum(1), a) if side == 0 else (P.sum(0), b)
    torch.testing.assert_close(exact, w, rtol=1e-9, atol=1e-14)        # the infinite side is exact

    def kl(p, q):
        return (p * torch.log(p / q) - p + q).sum()

    relaxed = r * (kl(P.sum(0), b) if side == 0 else kl(P.sum(1), a))
    primal = (P * C).sum() + eps * kl(P, a[:, None] * b[None]) + relaxed
    assert abs(float(res.value - primal)) < 1e-9 * max(1.0, abs(float(primal)))


@pytest.mark.parametrize("backend", KERNELS)
def test_semi_relaxed_kernels_match_the_fp64_reference(backend):
    x, y = _clouds(2, 37, 29, 3, seed=12)
    a = _weights(2, 37, 3).float()
    kw = dict(eps=0.3, rho=(2.0, math.inf), n_iter=50, tol=0.0)
    ref = sinkhorn(x.double(), y.double(), a.double(), backend="torch", **kw)
    got = sinkhorn(x, y, a, backend=backend, **kw)
    torch.testing.assert_close(got.value.double(), ref.value, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(got.f.double(), ref.f, rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(got.g.double(), ref.g, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("rho", [(math.inf, 0.8), (1.3, math.inf)])
def test_semi_relaxed_gradients_match_finite_differences(rho):
    x, y = _clouds(1, 4, 5, 2, seed=23, dtype=torch.float64)
    x, y = x[0].requires_grad_(), y[0]
    a, b = _weights(1, 4, 1)[0].requires_grad_(), (_weights(1, 5, 2)[0] * 1.3).requires_grad_()
    kw = dict(eps=0.5, rho=rho, tol=1e-14, n_iter=50000, backend="torch")
    gx, ga, gb = torch.autograd.grad(sinkhorn(x, y, a, b, **kw).value, (x, a, b))
    h = 1e-6
    for t, grad in ((x, gx), (a, ga), (b, gb)):
        num = torch.zeros_like(t)
        for idx in np.ndindex(*t.shape):
            with torch.no_grad():
                t[idx] += h
                up = float(sinkhorn(x, y, a, b, **kw).value)
                t[idx] -= 2 * h
                down = float(sinkhorn(x, y, a, b, **kw).value)
                t[idx] += h
            num[idx] = (up - down) / (2 * h)
        torch.testing.assert_close(grad, num, rtol=1e-5, atol=1e-7)


def test_rho_pair_errors_and_equivalences():
    x, y = _clouds(1, 7, 8, 2, seed=3)
    with pytest.raises(ValueError, match="rho_b"):
        sinkhorn(x[0], y[0], eps=1.0, rho=(1.0, -2.0))
    with pytest.raises(ValueError, match="pair"):
        sinkhorn(x[0], y[0], eps=1.0, rho=(1.0, 2.0, 3.0))
    with pytest.raises(TypeError, match="rho_a"):
        sinkhorn(x[0], y[0], eps=1.0, rho=("1", 2.0))
    # a pair of equal sides is the scalar; (inf, inf) is balanced (and checks the masses)
    kw = dict(eps=0.5, n_iter=40, tol=0.0, backend="torch")
    torch.testing.assert_close(sinkhorn(x[0], y[0], rho=(0.7, 0.7), **kw).f, sinkhorn(x[0], y[0], rho=0.7, **kw).f)
    torch.testing.assert_close(sinkhorn(x[0], y[0], rho=(math.inf, math.inf), **kw).value,
                               sinkhorn(x[0], y[0], **kw).value)
    with pytest.raises(ValueError, match="mass"):
        sinkhorn(x[0], y[0], b=torch.full((8,), 0.2), rho=(math.inf, math.inf), **kw)
    sinkhorn(x[0], y[0], b=torch.full((8,), 0.2), rho=(math.inf, 1.0), **kw)  # semi-relaxed: masses may differ


# -- the debiased divergence with symmetric updates ---------------------------------------------------

@pytest.mark.parametrize("rho", [None, 2.0])
def test_symmetric_divergence_equals_three_plain_solves_in_fewer_passes(rho):
    x, y = _clouds(1, 30, 35, 2, seed=14, dtype=torch.float64)
    x, y = x[0].requires_grad_(), y[0].requires_grad_()
    from fastopt.ot.sinkhorn import _divergence
    kw = dict(tol=1e-11, n_iter=20000, backend="torch", check_every=1)
    s1, w1 = _divergence(x, y, None, None, 0.5, "sqeuclidean", None, None, rho, True, kw)
    s0, w0 = _divergence(x, y, None, None, 0.5, "sqeuclidean", None, None, rho, False, kw)
    assert abs(float(s1 - s0)) < 1e-9
    g1 = torch.autograd.grad(s1, (x, y))
    g0 = torch.autograd.grad(s0, (x, y))
    for u, v in zip(g1, g0):
        torch.testing.assert_close(u, v, rtol=1e-7, atol=1e-9)
    assert w1["xy"] == w0["xy"] and w1["passes"] < w0["passes"], (w1, w0)
    assert w1["xx"] < 2 * w0["xx"] and w1["yy"] < 2 * w0["yy"], (w1, w0)  # fewer passes for each self term


@pytest.mark.parametrize("backend", [b for b in KERNELS if b != "triton"])  # (interpreted Triton is slow)
def test_symmetric_divergence_batched_masked_on_kernels(backend):
    x, y = _clouds(2, 30, 24, 3, seed=17)
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[1, 22:] = False
    kw = dict(eps=0.2, tol=1e-6, x_mask=mask, backend=backend)
    s = sinkhorn_divergence(x, y, **kw)
    for i in range(2):
        xi = x[i][mask[i]]
        ref = sinkhorn_divergence(xi.double(), y[i].double(), eps=0.2, tol=1e-10, backend="torch", symmetric=False)
        assert abs(float(s[i]) - float(ref)) < 1e-4 * max(1.0, abs(float(ref))), (i, float(s[i]), float(ref))


def test_symmetric_divergence_errors():
    x, y = _clouds(1, 6, 7, 2, seed=3)
    with pytest.raises(ValueError, match="one rho"):
        sinkhorn_divergence(x[0], y[0], eps=0.5, rho=(math.inf, 1.0))
    with pytest.raises(TypeError, match="symmetric"):
        sinkhorn_divergence(x[0], y[0], eps=0.5, symmetric="yes")
