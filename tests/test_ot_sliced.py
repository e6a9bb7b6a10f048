"""fastopt.ot.sliced: SW_p against POT (same projections), max-SW, v-DSW, the vMF sampler, control variates.

Upstream references: ``ot.sliced_wasserstein_distance``, ``ot.wasserstein_1d``, ``ot.emd2`` and
``ot.max_sliced_wasserstein_distance`` (POT), with the numpy backend and, for gradients, the torch one.
"""
import math

import numpy as np
import pytest
import torch

from fastopt._backend import BackendUnavailableError
from fastopt.ot import sliced as S

ot = pytest.importorskip("ot")

F64 = torch.float64


def points(n, d, seed, scale=1.0, shift=0.0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=F64) * scale + shift).to(dtype)


def weights(n, seed, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, generator=g, dtype=F64) + 0.05).to(dtype)


def pot_sw(x, y, a, b, projections, p):
    norm = lambda w: None if w is None else (w / w.sum()).numpy()  # noqa: E731
    return ot.sliced_wasserstein_distance(x.numpy(), y.numpy(), norm(a), norm(b), projections=projections.numpy(), p=p)


# -- SW_p against POT -------------------------------------------------------------------------------
@pytest.mark.parametrize("n,m", [(30, 30), (30, 17), (1, 9), (24, 36)])
@pytest.mark.parametrize("weighted", ["none", "a", "b", "both"])
@pytest.mark.parametrize("p", [1, 2, 3.5])
def test_sw_matches_pot(n, m, weighted, p):
    x, y = points(n, 4, 1), points(m, 4, 2, scale=1.5, shift=0.3)
    a = weights(n, 3) if weighted in ("a", "both") else None
    b = weights(m, 4) if weighted in ("b", "both") else None
    P = S.random_projections(4, 40, dtype=F64, seed=5)
    ours = S.sliced_wasserstein(x, y, a, b, projections=P, p=p)
    assert ours.dtype == F64 and ours.shape == ()
    assert ours.item() == pytest.approx(pot_sw(x, y, a, b, P, p), rel=1e-9)


@pytest.mark.parametrize("weighted", [False, True])
def test_sw_matches_pot_large(weighted):
    """Big enough for the NumPy sort path; n != m with uniform weights takes the exact merged grid."""
    x, y = points(4000, 3, 1), points(3000, 3, 2, scale=0.7, shift=0.5)
    a, b = (weights(4000, 3), weights(3000, 4)) if weighted else (None, None)
    P = S.random_projections(3, 60, dtype=F64, seed=0)
    assert S.sliced_wasserstein(x, y, a, b, projections=P).item() == pytest.approx(pot_sw(x, y, a, b, P, 2), rel=1e-9)


def test_sw_float32_close_to_float64_pot():
    x, y = points(500, 5, 1), points(500, 5, 2, shift=0.2)
    P = S.random_projections(5, 50, dtype=F64, seed=0)
    ours = S.sliced_wasserstein(x.float(), y.float(), projections=P.float())
    assert ours.dtype == torch.float32
    assert ours.item() == pytest.approx(pot_sw(x, y, None, None, P, 2), rel=1e-5)


def test_sw_identical_inputs_is_zero_and_seeded_draws_repeat():
    x = points(50, 3, 1)
    assert S.sliced_wasserstein(x, x.clone(), seed=0).item() == 0.0
    y = points(40, 3, 2)
    v1, P1 = S.sliced_wasserstein(x, y, seed=7, return_projections=True)
    v2, P2 = S.sliced_wasserstein(x, y, generator=torch.Generator().manual_seed(7), return_projections=True)
    assert P1.shape == (3, 50) and torch.equal(P1, P2) and v1.item() == v2.item()
    assert S.sliced_wasserstein(x, y, seed=8).item() != v1.item()


def test_random_projections_uniform_on_sphere():
    P = S.random_projections(4, 200_000, dtype=F64, seed=0)
    torch.testing.assert_close(P.norm(dim=0), torch.ones(200_000, dtype=F64))
    # E[theta] = 0 and E[theta theta^T] = I / d for the uniform distribution on S^{d-1}
    assert P.mean(1).abs().max().item() < 5 * 0.5 / math.sqrt(200_000)
    torch.testing.assert_close(P @ P.T / 200_000, torch.eye(4, dtype=F64) / 4, atol=5e-3, rtol=0)


# -- the 1-D primitive ----------------------------------------------------------------------------
@pytest.mark.parametrize("p", [1, 2, 1.5])
def test_wasserstein_1d_matches_pot_batched(p):
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(23, 5, generator=g, dtype=F64), torch.randn(31, 5, generator=g, dtype=F64) + 0.2
    a1 = weights(23, 1)
    b_full = torch.rand(31, 5, generator=g, dtype=F64) + 0.1
    b_full = b_full / b_full.sum(0)
    ours = S.wasserstein_1d(u, v, a1, b_full, p=p)
    ref = ot.wasserstein_1d(u.numpy(), v.numpy(), (a1 / a1.sum()).numpy(), b_full.numpy(), p=p)
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-10)
    # atoms along dim=1
    ours_t = S.wasserstein_1d(u.T, v.T, a1, b_full.T, p=p, dim=1)
    np.testing.assert_allclose(ours_t.numpy(), ref, rtol=1e-10)
    np.testing.assert_allclose(S.wasserstein_1d(u, v, p=p).numpy(), ot.wasserstein_1d(u.numpy(), v.numpy(), p=p),
                               rtol=1e-10)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("p", [1, 2, 3])
def test_wasserstein_1d_matches_emd2(seed, p):
    g = torch.Generator().manual_seed(seed)
    n, m = 3 + seed, 7 - seed
    u, v = torch.randn(n, generator=g, dtype=F64), torch.randn(m, generator=g, dtype=F64)
    a, b = torch.rand(n, generator=g, dtype=F64) + 0.1, torch.rand(m, generator=g, dtype=F64) + 0.1
    a, b = a / a.sum(), b / b.sum()
    M = (u[:, None] - v[None, :]).abs().numpy() ** p
    assert S.wasserstein_1d(u, v, a, b, p=p).item() == pytest.approx(ot.emd2(a.numpy(), b.numpy(), M), rel=1e-9)


def test_weights_equal_repeated_points():
    """Integer weights k_i are the uniform measure with atom i repeated k_i times, for every estimator."""
    x, y = points(12, 3, 1), points(9, 3, 2, shift=0.4)
    ka = torch.randint(1, 4, (12,), generator=torch.Generator().manual_seed(3))
    kb = torch.randint(1, 4, (9,), generator=torch.Generator().manual_seed(4))
    xr, yr = x.repeat_interleave(ka, 0), y.repeat_interleave(kb, 0)
    a, b = ka.to(F64), kb.to(F64)
    P = S.random_projections(3, 30, dtype=F64, seed=0)
    for cv in S.CONTROL_VARIATES:
        assert S.sliced_wasserstein(x, y, a, b, projections=P, control_variate=cv).item() == pytest.approx(
            S.sliced_wasserstein(xr, yr, projections=P, control_variate=cv).item(), rel=1e-10)
    theta = S.max_sliced_wasserstein(x, y, a, b, seed=0)[1]
    assert S.max_sliced_wasserstein(x, y, a, b, init=theta, n_iter=0)[0].item() == pytest.approx(
        S.max_sliced_wasserstein(xr, yr, init=theta, n_iter=0)[0].item(), rel=1e-10)


# -- batches, layouts, sort paths -----------------------------------------------------------------
@pytest.mark.parametrize("per_batch_projections", [False, True])
def test_batched_matches_loop(per_batch_projections):
    B, d = 3, 4
    x = torch.stack([points(20, d, i) for i in range(B)])
    y = torch.stack([points(13, d, 10 + i, shift=0.2 * i) for i in range(B)])
    a = torch.stack([weights(20, 20 + i) for i in range(B)])
    P = S.random_projections(d, 25, batch_shape=(B,) if per_batch_projections else (), dtype=F64, seed=0)
    for cv in S.CONTROL_VARIATES:
        batched = S.sliced_wasserstein(x, y, a, None, projections=P, control_variate=cv)
        loop = torch.stack([S.sliced_wasserstein(x[i], y[i], a[i], projections=P[i] if per_batch_projections else P,
                                                 control_variate=cv) for i in range(B)])
        assert batched.shape == (B,)
        torch.testing.assert_close(batched, loop, rtol=1e-12, atol=0)
    # a 2-D batch and a random shared draw: the same directions as an explicit call
    x2, y2 = x.reshape(1, B, 20, d).expand(2, B, 20, d), y.reshape(1, B, 13, d).expand(2, B, 13, d)
    v, P2 = S.sliced_wasserstein(x2, y2, seed=3, return_projections=True)
    assert v.shape == (2, B) and P2.shape == (d, 50)
    torch.testing.assert_close(v[1], S.sliced_wasserstein(x, y, projections=P2), rtol=1e-12, atol=0)


def test_empty_batch_and_single_points():
    x, y = torch.randn(0, 5, 3, dtype=F64), torch.randn(0, 4, 3, dtype=F64)
    for cv in S.CONTROL_VARIATES:
        assert S.sliced_wasserstein(x, y, torch.ones(5, dtype=F64), seed=0, control_variate=cv).shape == (0,)
    value, theta = S.max_sliced_wasserstein(x, y, seed=0)
    assert value.shape == (0,) and theta.shape == (0, 3)
    value, mu = S.vmf_distributional_sliced_wasserstein(x, y, seed=0)
    assert value.shape == (0,) and mu.shape == (0, 3)
    # one point each, one direction: SW_2 = |theta^T (x - y)|
    x1, y1 = points(1, 3, 0), points(1, 3, 1)
    P = S.random_projections(3, 1, dtype=F64, seed=0)
    assert S.sliced_wasserstein(x1, y1, projections=P).item() == pytest.approx(((x1 - y1) @ P).abs().item(), rel=1e-12)


def test_non_contiguous_inputs():
    big_x, big_y = points(40, 8, 1), points(30, 8, 2)
    x, y = big_x[::2, ::2], big_y[:, 1::2]
    P = S.random_projections(4, 20, dtype=F64, seed=0)
    assert S.sliced_wasserstein(x, y, projections=P).item() == pytest.approx(
        S.sliced_wasserstein(x.contiguous(), y.contiguous(), projections=P).item(), rel=1e-13)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("weighted", [False, True])
def test_numpy_sort_path_matches_torch_sort(monkeypatch, dtype, weighted):
    x = points(3000, 4, 1, dtype=dtype).requires_grad_()
    y = points(2500, 4, 2, shift=0.3, dtype=dtype).requires_grad_()
    a = weights(3000, 3, dtype=dtype).requires_grad_() if weighted else None
    P = S.random_projections(4, 16, dtype=dtype, seed=0)
    inputs = [t for t in (x, y, a) if t is not None]
    runs = []
    for use_numpy in (True, False):
        monkeypatch.setattr(S, "_NUMPY_SORT", use_numpy)
        v = S.sliced_wasserstein(x, y, a, projections=P)
        runs.append((v, torch.autograd.grad(v, inputs)))
    (v1, g1), (v2, g2) = runs
    assert v1.item() == v2.item()  # the sort is exact: same values, same arithmetic
    for t1, t2 in zip(g1[:2], g2[:2]):
        torch.testing.assert_close(t1, t2, rtol=0, atol=0)
    if weighted:  # equal cumulative weights of u and v (ties) may be merged in either order
        torch.testing.assert_close(g1[2], g2[2], rtol=1e-5, atol=1e-6 * g2[2].abs().max().item())


# -- gradients ------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,m,weighted", [(6, 6, False), (5, 7, False), (5, 7, True)])
def test_gradcheck(n, m, weighted):
    x = points(n, 3, 1).requires_grad_()
    y = points(m, 3, 2, shift=0.3).requires_grad_()
    ab = (weights(n, 3).requires_grad_(), weights(m, 4).requires_grad_()) if weighted else ()
    P = S.random_projections(3, 4, dtype=F64, seed=0)

    def f(x, y, *ab):
        return S.sliced_wasserstein(x, y, *ab, projections=P, p=1.5)
    assert torch.autograd.gradcheck(f, (x, y, *ab))


@pytest.mark.parametrize("weighted", [False, True])
def test_gradients_match_pot_torch_backend(weighted):
    x = points(40, 3, 1).requires_grad_()
    y = points(25, 3, 2, shift=0.3).requires_grad_()
    a, b = (weights(40, 3).requires_grad_(), weights(25, 4).requires_grad_()) if weighted else (None, None)
    P = S.random_projections(3, 30, dtype=F64, seed=0)
    inputs = [t for t in (x, y, a, b) if t is not None]
    ours = S.sliced_wasserstein(x, y, a, b, projections=P, p=2)
    norm = lambda w: None if w is None else w / w.sum()  # noqa: E731
    ref = ot.sliced_wasserstein_distance(x, y, norm(a), norm(b), projections=P, p=2)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-12)
    for g_ours, g_ref in zip(torch.autograd.grad(ours, inputs), torch.autograd.grad(ref, inputs)):
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_computed_in_float32(dtype):
    x = points(64, 3, 1, dtype=dtype).requires_grad_()
    y = points(48, 3, 2, dtype=dtype)
    P = S.random_projections(3, 20, seed=0)
    v = S.sliced_wasserstein(x, y, projections=P)
    assert v.dtype == torch.float32
    assert v.item() == S.sliced_wasserstein(x.float(), y.float(), projections=P).item()
    v.backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad.float()).all() and x.grad.float().abs().sum() > 0
    assert S.max_sliced_wasserstein(x, y, seed=0)[0].dtype == torch.float32


# -- max-SW -------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(3))
def test_max_sw_at_least_pot_random_search(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(40, 5, generator=g, dtype=F64) @ torch.randn(5, 5, generator=g, dtype=F64)
    y = torch.randn(30, 5, generator=g, dtype=F64) + 0.2
    value, theta = S.max_sliced_wasserstein(x, y, seed=seed)
    P = ot.sliced.get_random_projections(5, 5000, seed=seed)
    pot = ot.max_sliced_wasserstein_distance(x.numpy(), y.numpy(), projections=P)
    assert value.item() >= pot - 1e-12
    assert theta.norm().item() == pytest.approx(1.0, abs=1e-12)
    # the returned direction attains the returned value
    assert S.sliced_wasserstein(x, y, projections=theta[:, None]).item() == pytest.approx(value.item(), rel=1e-12)


def brute_force_max_2d(x, y, a, p):
    """max over theta in S^1 of W_p(theta#x, theta#y): a grid of angles, then a finer grid around the best."""
    def best(angles):
        grid = torch.stack([angles.cos(), angles.sin()])
        w = S.wasserstein_1d(x @ grid, y @ grid, a, p=p)
        return angles[w.argmax()].item(), w.max().item() ** (1 / p)
    step = math.pi / 20_000
    angle, _ = best(torch.arange(20_000, dtype=F64) * step)  # W(theta) = W(-theta): half a turn
    return best(torch.linspace(angle - 2 * step, angle + 2 * step, 20_001, dtype=F64))[1]


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("p", [1, 2])
def test_max_sw_exact_in_2d(seed, p):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(25, 2, generator=g, dtype=F64) * torch.tensor([1.0, 3.0], dtype=F64)
    y = torch.randn(35, 2, generator=g, dtype=F64)
    a = torch.rand(25, generator=g, dtype=F64)
    value, _ = S.max_sliced_wasserstein(x, y, a, p=p, seed=seed)
    assert value.item() == pytest.approx(brute_force_max_2d(x, y, a, p), rel=1e-7)


def test_max_sw_batched_and_gradient():
    x = torch.stack([points(30, 4, i) for i in range(3)]).requires_grad_()
    y = torch.stack([points(20, 4, 10 + i, scale=1 + i) for i in range(3)])
    value, theta = S.max_sliced_wasserstein(x, y, seed=0)
    assert value.shape == (3,) and theta.shape == (3, 4)
    for i in range(3):
        assert value[i].item() == pytest.approx(S.max_sliced_wasserstein(x[i], y[i], seed=i)[0].item(), rel=1e-4)
    # the gradient is the one at the fixed maximizing direction (envelope theorem)
    (g,) = torch.autograd.grad(value.sum(), x)
    ref = sum(S.sliced_wasserstein(x[i], y[i], projections=theta[i][:, None]) for i in range(3))
    (g_ref,) = torch.autograd.grad(ref, x)
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=0)


# -- the vMF sampler and v-DSW ---------------------------------------------------------------------
def mean_resultant_length(d, kappa):
    """A_d(kappa) = I_{d/2}(kappa) / I_{d/2-1}(kappa) (scipy's scaled Bessel ive, else the power series)."""
    if kappa == 0:
        return 0.0
    try:
        from scipy.special import ive
        return float(ive(d / 2, kappa) / ive(d / 2 - 1, kappa))
    except ImportError:
        def bessel(nu):
            return sum((kappa / 2) ** (2 * k + nu) / (math.factorial(k) * math.gamma(k + nu + 1)) for k in range(200))
        return bessel(d / 2) / bessel(d / 2 - 1)


@pytest.mark.parametrize("d,kappa", [(2, 1.0), (3, 5.0), (5, 10.0), (10, 0.5), (40, 100.0), (3, 1e4), (4, 0.0)])
def test_vmf_sampler_statistics(d, kappa):
    n = 20_000
    g = torch.Generator().manual_seed(d)
    mu = torch.randn(d, generator=g, dtype=F64)
    s = S.sample_vmf(mu * 3.0, kappa, n, seed=0)  # mu is normalized inside
    mu = mu / mu.norm()
    assert s.shape == (n, d) and s.dtype == F64
    torch.testing.assert_close(s.norm(dim=-1), torch.ones(n, dtype=F64))
    w = s @ mu
    se = w.std().item() / math.sqrt(n)
    assert abs(w.mean().item() - mean_resultant_length(d, kappa)) < 4.5 * se
    # the mean is A_d(kappa) mu: no component orthogonal to mu beyond Monte-Carlo noise
    orth = s - w[:, None] * mu
    assert orth.mean(0).norm().item() < 4.5 * math.sqrt((orth.pow(2).sum(1).mean().item()) / n)


def test_vmf_sampler_batched_and_reparameterized():
    mu = torch.randn(2, 3, 4, dtype=F64)
    s = S.sample_vmf(mu, 50.0, 7, seed=0)
    assert s.shape == (2, 3, 7, 4)
    assert ((s * (mu / mu.norm(dim=-1, keepdim=True))[..., None, :]).sum(-1) > 0.5).all()
    # with a fixed generator state the draw is a smooth function of mu: gradients w.r.t. mu flow
    mu = torch.randn(2, 4, dtype=F64, requires_grad=True)
    def draw(m):
        return S.sample_vmf(m, 3.0, 5, generator=torch.Generator().manual_seed(0))
    assert torch.autograd.gradcheck(draw, (mu,))
    e1 = torch.tensor([1.0, 0, 0], dtype=F64)  # mu = e_1: the reflection is the identity, still exact
    assert (S.sample_vmf(e1, 1e4, 100, seed=0) @ e1).min().item() > 0.99


def anisotropic_problem(seed=0):
    x = points(200, 5, seed)
    y = points(200, 5, seed + 1) * torch.tensor([1, 1, 1, 1, 3.0], dtype=F64)
    return x, y


def test_vdsw_optimizes_the_mean_direction():
    x, y = anisotropic_problem()
    start = torch.tensor([1.0, 1, 1, 1, 0], dtype=F64)
    v0, _ = S.vmf_distributional_sliced_wasserstein(x, y, kappa=50.0, n_iter=0, init=start, seed=0)
    v, mu = S.vmf_distributional_sliced_wasserstein(x, y, kappa=50.0, n_iter=20, init=start, seed=0)
    assert abs(mu[-1].item()) > 0.95  # the axis along which y is stretched
    assert v.item() > 1.5 * v0.item()
    max_sw = S.max_sliced_wasserstein(x, y, seed=0)[0].item()
    assert 0.8 * max_sw < v.item() <= max_sw * (1 + 1e-9)  # an average over directions is below the max


def test_vdsw_kappa_zero_is_sw_and_projections_reproduce_value():
    x, y = anisotropic_problem(3)
    v, _, P = S.vmf_distributional_sliced_wasserstein(x, y, kappa=0.0, n_projections=20_000, n_iter=1, seed=0,
                                                      return_projections=True)
    # kappa = 0: uniform directions (second moment I / d), and the value is SW's (standard errors ~0.8%)
    torch.testing.assert_close(P @ P.T / 20_000, torch.eye(5, dtype=F64) / 5, atol=5e-3, rtol=0)
    sw = S.sliced_wasserstein(x, y, n_projections=20_000, seed=1)
    assert v.item() == pytest.approx(sw.item(), rel=0.03)
    xg = x.clone().requires_grad_()
    v, mu, P = S.vmf_distributional_sliced_wasserstein(xg, y, kappa=10.0, n_projections=30, seed=0,
                                                       return_projections=True)
    assert P.shape == (5, 30) and mu.shape == (5,)
    ref = S.sliced_wasserstein(xg, y, projections=P)
    assert v.item() == pytest.approx(ref.item(), rel=1e-12)
    torch.testing.assert_close(torch.autograd.grad(v, xg)[0], torch.autograd.grad(ref, xg)[0], rtol=1e-12, atol=0)


def test_vdsw_batched():
    x = torch.stack([anisotropic_problem(i)[0] for i in range(2)])
    y = torch.stack([anisotropic_problem(i)[1] for i in range(2)])
    v, mu = S.vmf_distributional_sliced_wasserstein(x, y, kappa=50.0, n_iter=20, seed=0)
    assert v.shape == (2,) and mu.shape == (2, 5)
    assert (mu[:, -1].abs() > 0.95).all()


# -- control variates ---------------------------------------------------------------------------
def gaussian_problem(shift, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = 10
    x = torch.randn(300, d, generator=g, dtype=F64) * torch.linspace(0.3, 1.5, d, dtype=F64)
    y = torch.randn(250, d, generator=g, dtype=F64) * 0.5 + shift * torch.randn(d, generator=g, dtype=F64)
    return x, y


def estimates(x, y, L, seeds, seed):
    """SW_2^2 by each estimator over ``seeds`` independent draws of L directions (one batched call each)."""
    P = S.random_projections(x.shape[-1], L, batch_shape=(seeds,), dtype=F64, seed=seed)
    xb, yb = x.expand(seeds, *x.shape), y.expand(seeds, *y.shape)
    return {cv: S.sliced_wasserstein(xb, yb, projections=P, control_variate=cv) ** 2 for cv in S.CONTROL_VARIATES}


def test_control_variates_reduce_variance():
    # measured on this problem (L=16, 200 draws): variance ratios ~0.14 (lower) and ~0.13 (upper)
    x, y = gaussian_problem(1.0)
    est = estimates(x, y, L=16, seeds=200, seed=1)
    plain = est[None].var()
    assert (est["lower"].var() / plain).item() < 0.35
    assert (est["upper"].var() / plain).item() < 0.35
    # with equal means the lower control variate is ~0 and cannot help, but the upper one does (~0.11)
    x, y = gaussian_problem(0.0)
    est = estimates(x, y, L=16, seeds=200, seed=2)
    assert (est["upper"].var() / est[None].var()).item() < 0.3


def test_control_variates_agree_in_mean():
    x, y = gaussian_problem(1.0)
    P = S.random_projections(10, 20_000, dtype=F64, seed=0)
    plain = S.sliced_wasserstein(x, y, projections=P).item() ** 2  # Monte-Carlo standard error ~0.6%
    # many directions: mean(C) -> E[C] (the closed forms), the correction stays within plain MC's error
    ref = S.sliced_wasserstein(x, y, projections=P, control_variate="upper").item() ** 2
    assert plain == pytest.approx(ref, rel=0.02)
    lower = S.sliced_wasserstein(x, y, projections=P, control_variate="lower").item() ** 2
    assert lower == pytest.approx(ref, rel=0.01)
    # gamma is fitted on the same directions: an O(1/L) bias, measured ~-1.5% at L=16 and ~-0.2% at L=64
    for L, seeds, rel in ((16, 400, 0.03), (64, 100, 0.015)):
        for cv, values in estimates(x, y, L=L, seeds=seeds, seed=3).items():
            assert values.mean().item() == pytest.approx(ref, rel=rel), (L, cv)


def test_control_variate_gradient_flows():
    x, y = gaussian_problem(1.0)
    x = x[:6].clone().requires_grad_()
    P = S.random_projections(10, 8, dtype=F64, seed=0)
    for cv in ("lower", "upper"):
        assert torch.autograd.gradcheck(lambda x: S.sliced_wasserstein(x, y[:5], projections=P, control_variate=cv),
                                        (x,))


# -- errors -----------------------------------------------------------------------------------------
X, Y = points(5, 3, 0), points(4, 3, 1)


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(x=X.numpy()), TypeError, "x must be a torch.Tensor"),
    (dict(x=X.long()), TypeError, "x must be a floating-point"),
    (dict(y=Y.to(torch.complex64)), TypeError, "y must be real"),
    (dict(y=Y.bool()), TypeError, "y must be a floating-point"),
    (dict(x=X[0]), ValueError, "x must have shape"),
    (dict(x=X[:0]), ValueError, "x has no points"),
    (dict(y=points(4, 2, 1)), ValueError, "same dimension d"),
    (dict(x=X.expand(2, 5, 3)), ValueError, "same batch shape"),
    (dict(a=torch.tensor([1.0, 1, float("nan"), 1, 1], dtype=F64)), ValueError, "a has non-finite"),
    (dict(a=torch.tensor([1.0, 1, float("inf"), 1, 1], dtype=F64)), ValueError, "a has non-finite"),
    (dict(b=torch.tensor([1.0, -1, 1, 1], dtype=F64)), ValueError, "b has negative"),
    (dict(b=torch.zeros(4, dtype=F64)), ValueError, "b must sum to a positive"),
    (dict(a=torch.ones(4, dtype=F64)), ValueError, r"a must have shape \(5,\)"),
    (dict(a=torch.ones(5, dtype=torch.int64)), TypeError, "a must be a floating-point"),
    (dict(p=0.5), ValueError, "p must be a finite number >= 1"),
    (dict(p=float("inf")), ValueError, "p must be"),
    (dict(n_projections=0), ValueError, "n_projections must be an integer >= 1"),
    (dict(n_projections=2.5), ValueError, "n_projections must be an integer"),
    (dict(projections=torch.ones(4, 7, dtype=F64)), ValueError, "projections must have shape"),
    (dict(projections=torch.ones(3, 0, dtype=F64)), ValueError, "projections has no directions"),
    (dict(control_variate="middle"), ValueError, "control_variate must be one of"),
    (dict(control_variate="upper", p=1), ValueError, "needs p=2"),
    (dict(seed=0, generator=torch.Generator()), ValueError, "pass seed or generator"),
    (dict(backend="bogus"), ValueError, "backend must be one of"),
    (dict(backend="cuda"), BackendUnavailableError, "no .cuda. kernel"),
    (dict(backend="triton"), BackendUnavailableError, "float32"),  # X, Y are float64
])
def test_sliced_wasserstein_errors(kwargs, err, match):
    args = dict(x=X, y=Y)
    args.update(kwargs)
    x, y = args.pop("x"), args.pop("y")
    with pytest.raises(err, match=match):
        S.sliced_wasserstein(x, y, **args)


@pytest.mark.parametrize("fn,kwargs,err,match", [
    (S.max_sliced_wasserstein, dict(n_iter=-1), ValueError, "n_iter must be an integer >= 0"),
    (S.max_sliced_wasserstein, dict(lr=0.0), ValueError, "lr must be a finite number > 0"),
    (S.max_sliced_wasserstein, dict(n_init=0), ValueError, "n_init must be"),
    (S.max_sliced_wasserstein, dict(init=torch.zeros(3, dtype=F64)), ValueError, "init must be a finite non-zero"),
    (S.max_sliced_wasserstein, dict(init=torch.ones(4, dtype=F64)), ValueError, "init must have shape"),
    (S.max_sliced_wasserstein, dict(p=0), ValueError, "p must be"),
    (S.vmf_distributional_sliced_wasserstein, dict(kappa=-1.0), ValueError, "kappa must be a finite number >= 0"),
    (S.vmf_distributional_sliced_wasserstein, dict(n_projections=0), ValueError, "n_projections must be"),
    (S.vmf_distributional_sliced_wasserstein, dict(b=-torch.ones(4, dtype=F64)), ValueError, "b has negative"),
])
def test_optimized_estimators_errors(fn, kwargs, err, match):
    with pytest.raises(err, match=match):
        fn(X, Y, **kwargs)


def test_sampler_and_1d_errors():
    with pytest.raises(ValueError, match="d >= 2"):
        S.vmf_distributional_sliced_wasserstein(X[:, :1], Y[:, :1])
    with pytest.raises(ValueError, match="mu must have shape"):
        S.sample_vmf(torch.ones(1), 1.0, 3)
    with pytest.raises(ValueError, match="n_samples must be"):
        S.sample_vmf(torch.ones(3), 1.0, 0)
    with pytest.raises(TypeError, match="mu must be a floating-point"):
        S.sample_vmf(torch.ones(3, dtype=torch.int32), 1.0, 3)
    with pytest.raises(ValueError, match="u_weights must have shape"):
        S.wasserstein_1d(torch.zeros(4), torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError, match="same batch shape"):
        S.wasserstein_1d(torch.zeros(4, 2), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="p must be"):
        S.wasserstein_1d(torch.zeros(4), torch.zeros(3), p=0.9)


# -- the benchmark suite compares like with like ------------------------------------------------------
def test_bench_suite_methods_agree():
    from fastopt.bench.harness import Bar, Context, Unsupported
    from fastopt.bench.ot_sliced import BASELINE, SW_SUITE

    ctx = Context(device=torch.device("cpu"), quick=True)
    values = {}
    for case in SW_SUITE.cases(ctx):
        try:
            values[case.method] = float(case.setup().fn())
        except Unsupported:
            continue
    assert set(values) == {"fastopt", BASELINE, "pot-numpy"}
    for method, value in values.items():  # POT sums the 1/n quantile steps in fp32: ~1e-5 off
        assert value == pytest.approx(values["fastopt"], rel=1e-4), method
    assert SW_SUITE.bars(Context(device=torch.device("cuda"))) == [
        Bar("100000x100000-d3-L1000", "fastopt", "speedup_vs_pot_torch", 5.0)]
