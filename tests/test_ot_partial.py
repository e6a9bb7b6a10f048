"""fastopt.ot.partial: partial_wasserstein against POT's entropic_partial_wasserstein (plans, both values,
points and dense costs, weights, batches, every backend against the fp64 reference), its envelope
gradients against finite differences, and progressive_partial_ot against a float64 transcription of the
official P²OT update equations; input errors."""
import math

import numpy as np
import pytest
import torch

from fastopt.ot import partial_wasserstein, progressive_partial_ot
from fastopt.reference.ot import cost_matrix

from conftest import DEVICE_BACKENDS

ot = pytest.importorskip("ot")

BACKENDS = [b for d, b in DEVICE_BACKENDS if d == "cpu"]
KERNELS = [b for b in BACKENDS if b != "torch"]


def _clouds(B, n, m, d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, n, d, generator=gen, dtype=torch.float64)
    y = torch.randn(B, m, d, generator=gen, dtype=torch.float64) * 0.8 + 0.5
    return x, y


def _weights(n, seed, total=1.0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.rand(n, generator=gen, dtype=torch.float64) + 0.2
    return w / w.sum() * total


def _pot(a, b, C, eps, mass, n_iter):
    P, log = ot.partial.entropic_partial_wasserstein(a.numpy(), b.numpy(), C.numpy(), eps, m=mass, numItermax=n_iter,
                                                     stopThr=0, log=True)
    return P, float(log["partial_w_dist"])


# -- against POT ------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", [
    dict(cost="sqeuclidean", eps=0.5, mass=0.5, it=50, wa=1.0, wb=1.0),
    dict(cost="sqeuclidean", eps=0.1, mass=0.9, it=300, wa=1.0, wb=1.3),
    dict(cost="euclidean", eps=1.0, mass=0.2, it=200, wa=0.7, wb=1.0),
    dict(cost="sqeuclidean", eps=0.3, mass=0.7, it=100, wa=0.7, wb=None),  # mass = |a| (all of a moves)
])
@pytest.mark.parametrize("dense", [False, True])
def test_matches_pot_plan_and_values(case, dense):
    x, y = _clouds(1, 13, 17, 2)
    a = _weights(13, 1, case["wa"])
    b = _weights(17, 2, case["wb"]) if case["wb"] is not None else None
    C = cost_matrix(x[0], y[0], case["cost"])
    eps, mass, it = case["eps"], case["mass"], case["it"]
    kw = dict(mass=mass, eps=eps, n_iter=it, tol=0.0, backend="torch")
    if dense:
        res = partial_wasserstein(a=a, b=b, cost_matrix=C, **kw)
    else:
        res = partial_wasserstein(x[0], y[0], a, b, cost=case["cost"], **kw)
    b_np = b if b is not None else torch.full((17,), 1 / 17, dtype=torch.float64)
    P_pot, dist = _pot(a, b_np, C, eps, mass, it)
    P = res.plan()
    assert res.n_iter == it and P.dtype == torch.float64
    np.testing.assert_allclose(P.numpy(), P_pot, rtol=1e-9, atol=1e-14 * P_pot.max())
    assert abs(float(res.transport_cost) - dist) <= 1e-10 * abs(dist)
    assert res.log["partial_w_dist"] is res.transport_cost
    reg = (P_pot * C.numpy()).sum() + eps * (P_pot * np.log(P_pot)).sum()
    assert abs(float(res.value) - reg) <= 1e-10 * (abs(reg) + 1)
    assert abs(float(P.sum()) - mass) < 1e-12  # (the last projection of an iteration is onto the mass)


def test_converges_to_pot_fixed_point_and_stops_on_tol():
    x, y = _clouds(1, 11, 9, 3, seed=3)
    C = cost_matrix(x[0], y[0], "sqeuclidean")
    res = partial_wasserstein(x[0], y[0], mass=0.6, eps=0.4, tol=1e-11, n_iter=20000, backend="torch")
    assert res.converged and res.n_iter < 20000 and float(res.error) < 1e-11
    P_pot, _ = _pot(torch.full((11,), 1 / 11, dtype=torch.float64), torch.full((9,), 1 / 9, dtype=torch.float64), C,
                    0.4, 0.6, 20000)
    P = res.plan()
    np.testing.assert_allclose(P.numpy(), P_pot, rtol=1e-8, atol=1e-13)
    # at the fixed point every constraint holds: the mass, and the marginals at most a and b
    assert abs(float(P.sum()) - 0.6) < 1e-12
    assert float(P.sum(1).max()) <= (1 + 1e-9) / 11 and float(P.sum(0).max()) <= (1 + 1e-9) / 9


def test_batched_equals_separate_solves_with_masks():
    x, y = _clouds(3, 10, 12, 2, seed=4)
    x_mask = torch.ones(3, 10, dtype=torch.bool)
    y_mask = torch.ones(3, 12, dtype=torch.bool)
    x_mask[1, 7:] = False
    y_mask[2, 5:] = False
    kw = dict(mass=0.4, eps=0.3, n_iter=60, tol=0.0, backend="torch")
    batched = partial_wasserstein(x, y, x_mask=x_mask, y_mask=y_mask, **kw)
    P = batched.plan()
    assert P.shape == (3, 10, 12)
    for i in range(3):
        nx, ny = int(x_mask[i].sum()), int(y_mask[i].sum())
        one = partial_wasserstein(x[i, :nx], y[i, :ny], **kw)
        torch.testing.assert_close(P[i, :nx, :ny], one.plan(), rtol=1e-10, atol=1e-14)
        assert float(P[i, nx:].abs().sum() + P[i, :, ny:].abs().sum()) == 0.0
        torch.testing.assert_close(batched.value[i], one.value, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(batched.transport_cost[i], one.transport_cost, rtol=1e-10, atol=1e-12)


# -- every kernel backend against the fp64 reference ----------------------------------------------------

@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("case", ["points", "euclidean", "dense"])
def test_kernels_vs_fp64_reference(backend, case):
    small = backend == "triton"
    B, n, m = (2, 9, 7) if small else (2, 40, 33)
    x, y = _clouds(B, n, m, 3, seed=5)
    a = torch.stack([_weights(n, 6), _weights(n, 7)])
    b = torch.stack([_weights(m, 8, 1.2), _weights(m, 9, 0.8)])
    cost = "euclidean" if case == "euclidean" else "sqeuclidean"
    kw = dict(mass=0.5, eps=0.3, n_iter=4 if small else 60, tol=0.0)

    def run(dt, backend_):
        if case == "dense":
            return partial_wasserstein(a=a.to(dt), b=b.to(dt), cost_matrix=cost_matrix(x, y, cost).to(dt),
                                       backend=backend_, **kw)
        return partial_wasserstein(x.to(dt), y.to(dt), a.to(dt), b.to(dt), cost=cost, backend=backend_, **kw)

    ref, got = run(torch.float64, "torch"), run(torch.float32, backend)
    assert got.value.dtype == torch.float32 and got.n_iter == ref.n_iter
    P_ref, P = ref.plan(), got.plan().double()
    assert float((P - P_ref).abs().max()) <= 2e-5 * float(P_ref.max())
    torch.testing.assert_close(got.value.double(), ref.value, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(got.transport_cost.double(), ref.transport_cost, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("backend", KERNELS)
def test_kernel_gradients_match_torch(backend):
    n, m = (6, 5) if backend == "triton" else (30, 25)
    x, y = _clouds(2, n, m, 2, seed=10)
    grads = {}
    for b_ in ("torch", backend):
        xx, yy = x.float().clone().requires_grad_(), y.float().clone().requires_grad_()
        res = partial_wasserstein(xx, yy, mass=0.7, eps=0.4, n_iter=4 if backend == "triton" else 40, tol=0.0,
                                  backend=b_)
        (res.value * torch.tensor([1.0, -2.0])).sum().backward()
        grads[b_] = (xx.grad, yy.grad)
    for g_ref, g in zip(grads["torch"], grads[backend]):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5)


# -- gradients ------------------------------------------------------------------------------------------

def _converged(**kw):
    return partial_wasserstein(eps=0.5, mass=0.6, tol=1e-13, n_iter=50000, backend="torch", **kw)


def test_gradient_wrt_points_matches_finite_differences():
    x, y = _clouds(1, 7, 6, 2, seed=11)
    x, y = x[0], y[0]
    xx, yy = x.clone().requires_grad_(), y.clone().requires_grad_()
    res = _converged(x=xx, y=yy)
    assert res.converged
    res.value.backward()
    gen = torch.Generator().manual_seed(12)
    h = 1e-5
    for t, g in ((x, xx.grad), (y, yy.grad)):
        d = torch.randn(t.shape, generator=gen, dtype=torch.float64)
        if t is x:
            up, down = _converged(x=x + h * d, y=y).value, _converged(x=x - h * d, y=y).value
        else:
            up, down = _converged(x=x, y=y + h * d).value, _converged(x=x, y=y - h * d).value
        fd = float((up - down) / (2 * h))
        assert abs(float((g * d).sum()) - fd) <= 1e-6 * (abs(fd) + 1e-3)


def test_gradient_wrt_cost_matrix_is_the_plan_and_matches_finite_differences():
    x, y = _clouds(1, 6, 8, 2, seed=13)
    C = cost_matrix(x[0], y[0], "sqeuclidean")
    a, b = _weights(6, 14), _weights(8, 15, 1.4)
    CC = C.clone().requires_grad_()
    res = _converged(a=a, b=b, cost_matrix=CC)
    res.value.backward()
    torch.testing.assert_close(CC.grad, res.plan(), rtol=1e-12, atol=0)
    d = torch.randn(C.shape, generator=torch.Generator().manual_seed(16), dtype=torch.float64)
    h = 1e-5
    fd = float((_converged(a=a, b=b, cost_matrix=C + h * d).value
                - _converged(a=a, b=b, cost_matrix=C - h * d).value) / (2 * h))
    assert abs(float((CC.grad * d).sum()) - fd) <= 1e-6 * (abs(fd) + 1e-3)


# -- progressive partial OT ------------------------------------------------------------------------------

def _ppot_reference(log_p, rho, eps, gamma, n_iter=1000, tol=1e-6, semi=True, b=None):
    """The official P²OT scaling iteration, transcribed from its equations in float64 numpy: the cost
    -log p with a virtual class of cost 0, Pa = 1/N, Pb = rho/K (1 - rho virtual), b <- b^(gamma/(gamma+eps))
    on the real classes, stop when |b - b_prev|_2 <= tol; returns (N a Q b^T, iterations, b)."""
    N, K = log_p.shape
    Q = np.exp(-np.concatenate([-log_p, np.zeros((N, 1))], 1) / eps)
    pa = np.full(N, 1.0 / N)
    pb = np.full(K + 1, rho / K)
    pb[-1] = 1 - rho
    b = np.full(K + 1, 1.0 / (K + 1)) if b is None else b.copy()
    power, err, it = gamma / (gamma + eps), 1.0, 0
    while err > tol and it < n_iter:
        last = b.copy()
        a = pa / (Q @ b)
        b = pb / (Q.T @ a)
        if semi:
            b[:-1] = b[:-1] ** power
        err = np.linalg.norm(b - last)
        it += 1
    return N * a[:, None] * Q * b[None], it, b


def _log_p(N, K, seed, scale=2.0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(N, K, generator=gen, dtype=torch.float64) * scale, 1).to(dtype)


@pytest.mark.parametrize("rho,eps,gamma,semi", [(0.3, 0.1, 1.0, True), (1.0, 0.5, 2.0, True), (0.6, 0.2, 1.0, False),
                                                (0.0, 0.3, 0.5, True), (0.8, 0.05, 5.0, True)])
def test_ppot_matches_official_equations(rho, eps, gamma, semi):
    lp = _log_p(60, 5, seed=int(rho * 10))
    P, it, b = _ppot_reference(lp.numpy(), rho, eps, gamma, semi=semi)
    res = progressive_partial_ot(lp, rho, eps=eps, gamma=gamma, semi_relaxed=semi, backend="torch")
    assert res.n_iter == it and res.converged == (it < 1000)
    np.testing.assert_allclose(res.plan.numpy(), P[:, :-1], rtol=1e-9, atol=1e-13)
    np.testing.assert_allclose(res.virtual.numpy(), P[:, -1], rtol=1e-9, atol=1e-13)
    np.testing.assert_allclose(res.b.numpy(), b, rtol=1e-9, atol=1e-300)
    assert torch.equal(res.labels, res.plan.argmax(-1))
    np.testing.assert_allclose(float(res.value), (P[:, :-1] * -lp.numpy()).sum() / 60, rtol=1e-9)


def test_ppot_warm_start_and_iteration_cap():
    lp = _log_p(40, 4, seed=21)
    _, _, b_prev = _ppot_reference(lp.numpy(), 1.0, 0.2, 1.0)  # rho = 1: the virtual scaling is 0
    assert b_prev[-1] == 0.0
    P, it, b = _ppot_reference(lp.numpy(), 0.5, 0.2, 1.0, b=b_prev, n_iter=7, tol=0.0)
    res = progressive_partial_ot(lp, 0.5, eps=0.2, gamma=1.0, init=torch.from_numpy(b_prev), n_iter=7, tol=0.0)
    assert res.n_iter == it == 7 and not res.converged
    np.testing.assert_allclose(res.plan.numpy(), P[:, :-1], rtol=1e-9, atol=1e-13)
    np.testing.assert_allclose(float(res.error), np.linalg.norm(b - _ppot_reference(
        lp.numpy(), 0.5, 0.2, 1.0, b=b_prev, n_iter=6, tol=0.0)[2]), rtol=1e-9)


@pytest.mark.parametrize("backend", KERNELS)
def test_ppot_kernels_batched_vs_fp64(backend):
    N = 12 if backend == "triton" else 200
    lp = torch.stack([_log_p(N, 6, seed=30), _log_p(N, 6, seed=31, scale=4.0)])
    kw = dict(eps=0.2, gamma=1.0, n_iter=4 if backend == "triton" else 300)
    ref = progressive_partial_ot(lp, 0.4, backend="torch", **kw)
    got = progressive_partial_ot(lp.float(), 0.4, backend=backend, **kw)
    assert got.plan.dtype == torch.float32 and got.plan.shape == (2, N, 6)
    assert float((got.plan.double() - ref.plan).abs().max()) < 2e-5
    for i in range(2):
        one = progressive_partial_ot(lp[i], 0.4, backend="torch", **{**kw, "n_iter": ref.n_iter, "tol": 0.0})
        torch.testing.assert_close(ref.plan[i], one.plan, rtol=1e-10, atol=1e-14)


# -- errors ----------------------------------------------------------------------------------------------

def test_input_errors():
    x, y = _clouds(1, 5, 4, 2)
    x, y = x[0], y[0]
    with pytest.raises(ValueError, match=r"partial_wasserstein: mass must be at most min\(\|a\|, \|b\|\)"):
        partial_wasserstein(x, y, b=torch.full((4,), 0.2, dtype=torch.float64), mass=0.9, eps=0.1)
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="partial_wasserstein: mass must be a finite number > 0"):
            partial_wasserstein(x, y, mass=bad, eps=0.1)
    with pytest.raises(TypeError, match="partial_wasserstein: mass"):
        partial_wasserstein(x, y, mass="half", eps=0.1)
    with pytest.raises(ValueError, match="partial_wasserstein: eps"):
        partial_wasserstein(x, y, mass=0.5, eps=0.0)
    with pytest.raises(ValueError, match="partial_wasserstein: pass either the points"):
        partial_wasserstein(x, y, mass=0.5, eps=0.1, cost_matrix=cost_matrix(x, y, "sqeuclidean"))
    with pytest.raises(ValueError, match="partial_wasserstein: a has negative weights"):
        partial_wasserstein(x, y, a=torch.tensor([0.5, 0.5, 0.5, -0.5, 0.0], dtype=torch.float64), mass=0.5, eps=0.1)
    with pytest.raises(ValueError, match="partial_wasserstein: x has non-finite"):
        partial_wasserstein(x * math.inf, y, mass=0.5, eps=0.1)
    with pytest.raises(ValueError, match="partial_wasserstein: cost must be one of"):
        partial_wasserstein(x, y, mass=0.5, eps=0.1, cost="l1")
    with pytest.raises(ValueError, match="partial_wasserstein: n_iter"):
        partial_wasserstein(x, y, mass=0.5, eps=0.1, n_iter=0)
    lp = _log_p(6, 3, seed=0)
    with pytest.raises(ValueError, match="progressive_partial_ot: log_p must hold log-probabilities"):
        progressive_partial_ot(lp + 1.0, 0.5, eps=0.1, gamma=1.0)
    with pytest.raises(ValueError, match=r"progressive_partial_ot: rho must be a finite number in \[0, 1\]"):
        progressive_partial_ot(lp, 1.5, eps=0.1, gamma=1.0)
    with pytest.raises(ValueError, match="progressive_partial_ot: gamma"):
        progressive_partial_ot(lp, 0.5, eps=0.1, gamma=0.0)
    with pytest.raises(ValueError, match="progressive_partial_ot: eps"):
        progressive_partial_ot(lp, 0.5, eps=-0.1, gamma=1.0)
    with pytest.raises(ValueError, match="progressive_partial_ot: init must have shape"):
        progressive_partial_ot(lp, 0.5, eps=0.1, gamma=1.0, init=torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="progressive_partial_ot: log_p has non-finite"):
        progressive_partial_ot(torch.full((4, 3), math.nan), 0.5, eps=0.1, gamma=1.0)
