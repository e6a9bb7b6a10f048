"""fastopt.ot.monge_gap against ott-jax's monge_gap_from_samples (value and jax.grad, float64, both costs,
weights, several eps; ott's Sinkhorn threshold tightened so that the comparison is about the formula, not
the stopping rule), the value convention (fastopt's sinkhorn value is ott's reg_ot_cost), the gap's
properties (>= eps H(a); about eps H(a) for an optimal map at small eps), batches, gradients in the
weights, the kernel backends (cpu against ott; cpu and triton, under TRITON_INTERPRET=1, against torch on a
tiny case), and the errors."""
import math

import pytest
import torch

from fastopt.ot import monge_gap, sinkhorn

from conftest import DEVICE_BACKENDS

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
ott_mg = pytest.importorskip("ott.neural.methods.monge_gap")
from ott.geometry import costs  # noqa: E402

BACKENDS = [b for d, b in DEVICE_BACKENDS if d == "cpu"]
KERNELS = [b for b in BACKENDS if b != "torch"]
SOLVE_KERNELS = [b for b in KERNELS if b != "triton"]  # (converged solves: too slow for the Triton interpreter)
N, D = 24, 3
OTT_COSTS = {"sqeuclidean": costs.SqEuclidean(), "euclidean": costs.Euclidean()}
TIGHT = dict(threshold=1e-13, max_iterations=50_000, inner_iterations=10)


def _jitted(cost):
    """jax.value_and_grad (in the source and the image) of ott's monge_gap_from_samples plus the weighted
    displacement (ott's function averages c(x_i, Tx_i) uniformly; its **kwargs pass a, b to the solver),
    jit-compiled once per cost for the shapes used here."""
    def f(x, t, a, eps):
        gap, out = ott_mg.monge_gap_from_samples(x, t, cost_fn=OTT_COSTS[cost], epsilon=eps, a=a, b=a,
                                                 return_output=True, **TIGHT)
        disp = jax.vmap(OTT_COSTS[cost])(x, t)
        return gap - jnp.mean(disp) + jnp.sum(a * disp), (out.reg_ot_cost, out.ent_reg_cost)
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))


_OTT = {}
_costs = []


def _ott(x, t, a, eps, cost):
    if cost not in _OTT:
        _OTT[cost] = _jitted(cost)
    with jax.enable_x64(True):
        args = [jnp.asarray(v.detach().double().numpy()) for v in (x, t, a)]
        (v, (reg, ent)), (gx, gt) = _OTT[cost](*args, jnp.float64(eps))
        _costs[:] = [float(reg), float(ent)]  # (ott's reg_ot_cost and ent_reg_cost of the last problem)
        return float(v), torch.from_numpy(jax.device_get(gx).copy()), torch.from_numpy(jax.device_get(gt).copy())


def _problem(seed, weighted, n=N, d=D, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    A = torch.randn(d, d, generator=g, dtype=torch.float64)
    t = torch.tanh(x @ A) + 0.3 * x + 0.5  # a non-optimal map
    a = torch.rand(n, generator=g, dtype=torch.float64) + 0.2 if weighted else torch.full((n,), 1.0 / n,
                                                                                          dtype=torch.float64)
    return x.to(dtype), t.to(dtype), a / a.sum()


def _ours(x, t, a, eps, cost, backend="torch", dtype=torch.float64, weighted=True, **kw):
    xs, ts = (v.detach().to(dtype).requires_grad_() for v in (x, t))
    gap = monge_gap(xs, ts, a.to(dtype) if weighted else None, eps=eps, cost=cost, backend=backend, **kw)
    gx, gt = torch.autograd.grad(gap, (xs, ts))
    return gap.detach().double(), gx.double(), gt.double()


@pytest.mark.parametrize("cost", ["sqeuclidean", "euclidean"])
@pytest.mark.parametrize("seed,eps,weighted", [(0, 0.05, False), (1, 0.5, False), (2, 0.1, True),
                                               (3, 1.0, True)])
def test_matches_ott_value_and_gradients(cost, seed, eps, weighted):
    x, t, a = _problem(seed, weighted)
    v_ref, gx_ref, gt_ref = _ott(x, t, a, eps, cost)
    gap, gx, gt = _ours(x, t, a, eps, cost, weighted=weighted, tol=1e-13, n_iter=50_000)
    assert abs(gap.item() - v_ref) <= 1e-9 * max(1.0, abs(v_ref))
    torch.testing.assert_close(gt, gt_ref, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-7, atol=1e-9)
    assert gt.abs().max() > 1e-3  # (a gradient that could not be zero)


def test_value_convention_matches_ott_reg_and_ent_reg_costs():
    """fastopt's sinkhorn value is ott's reg_ot_cost (KL convention); ott's ent_reg_cost (the Monge gap's
    W_eps) is that minus eps (H(a) + H(b)); the gap is the displacement minus ent_reg_cost."""
    x, t, a = _problem(5, True)
    eps = 0.2
    _ott(x, t, a, eps, "sqeuclidean")
    reg, ent = _costs
    gap, res = monge_gap(x, t, a, eps=eps, tol=1e-13, n_iter=50_000, return_output=True, backend="torch")
    h = -(a * a.log()).sum().item()
    assert res.converged
    assert abs(res.value.item() - reg) <= 1e-10 * abs(reg)
    assert abs((reg - 2 * eps * h) - ent) <= 1e-10 * abs(reg)
    disp = (a * ((x - t) ** 2).sum(-1)).sum().item()
    assert abs(gap.item() - (disp - ent)) <= 1e-10 * abs(disp)
    # the same problem through fastopt.ot.sinkhorn directly
    assert abs(sinkhorn(x, t, a, a, eps=eps, tol=1e-13, n_iter=50_000, backend="torch").value.item() - reg) <= 1e-10


@pytest.mark.parametrize("backend", SOLVE_KERNELS)
@pytest.mark.parametrize("cost", ["sqeuclidean", "euclidean"])
def test_kernel_backend_matches_ott_in_float32(backend, cost):
    x, t, a = _problem(7, True)
    eps = 0.1
    v_ref, gx_ref, gt_ref = _ott(x, t, a, eps, cost)
    gap, gx, gt = _ours(x, t, a, eps, cost, backend=backend, dtype=torch.float32, tol=1e-7, n_iter=5000)
    assert abs(gap.item() - v_ref) <= 1e-4 * max(1.0, abs(v_ref))
    torch.testing.assert_close(gt, gt_ref, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("cost", ["sqeuclidean", "euclidean"])
def test_every_backend_agrees_with_torch_on_a_tiny_batch(backend, cost):
    """The same 5 iterations (tol=0) on every backend (triton under TRITON_INTERPRET=1): the float32 kernels
    against the float64 torch reference, value and gradients in x, Tx and a."""
    g = torch.Generator().manual_seed(21)
    x = torch.randn(2, 8, 2, generator=g, dtype=torch.float64)
    t = torch.tanh(x) + 0.5
    a = torch.rand(2, 8, generator=g, dtype=torch.float64) + 0.2
    out = []
    for be, dt in ((backend, torch.float32), ("torch", torch.float64)):
        xs, ts, ws = (v.to(dt).requires_grad_() for v in (x, t, a))
        gap = monge_gap(xs, ts, ws, eps=0.2, cost=cost, n_iter=5, tol=0.0, backend=be)
        (gap * torch.tensor([1.0, -2.0], dtype=dt)).sum().backward()
        out.append([v.detach().double() for v in (gap, xs.grad, ts.grad, ws.grad)])
    for mine, ref in zip(*out):
        torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch"] + SOLVE_KERNELS)
def test_batched_equals_one_by_one(backend):
    dtype = torch.float64 if backend == "torch" else torch.float32
    probs = [_problem(s, True, n=12, dtype=dtype) for s in (11, 12, 13)]
    x = torch.stack([p[0] for p in probs]).requires_grad_()
    t = torch.stack([p[1] for p in probs]).requires_grad_()
    a = torch.stack([p[2] for p in probs]).to(dtype)
    gap = monge_gap(x, t, a, eps=0.2, cost="euclidean", tol=1e-7, backend=backend)
    assert gap.shape == (3,)
    gt, = torch.autograd.grad(gap.sum(), t)
    for i, (xi, ti, ai) in enumerate(probs):
        tt = ti.clone().requires_grad_()
        gi = monge_gap(xi, tt, ai.to(dtype), eps=0.2, cost="euclidean", tol=1e-7, backend=backend)
        gti, = torch.autograd.grad(gi, tt)
        torch.testing.assert_close(gap[i].detach(), gi.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gt[i], gti, rtol=1e-4, atol=1e-6)
    # one weight vector for the whole batch
    one = monge_gap(x, t, a[0], eps=0.2, cost="euclidean", tol=1e-7, backend=backend)
    first = monge_gap(x[0], t[0], a[0], eps=0.2, cost="euclidean", tol=1e-7, backend=backend)
    torch.testing.assert_close(one[0], first, rtol=1e-5, atol=1e-6)
    # (1, n) weights for unbatched points: a scalar, like (n,) weights
    assert first.shape == () and monge_gap(x[0], t[0], a[:1], eps=0.2, cost="euclidean", tol=1e-7,
                                           backend=backend).shape == ()


@pytest.mark.parametrize("cost", ["sqeuclidean", "euclidean"])
def test_gap_is_at_least_eps_entropy_and_vanishes_for_optimal_maps(cost):
    g = torch.Generator().manual_seed(3)
    n = 20
    x = torch.randn(n, 2, generator=g, dtype=torch.float64)
    a = torch.rand(n, generator=g, dtype=torch.float64) + 0.1
    a = a / a.sum()
    h = -(a * a.log()).sum().item()
    for eps in (0.3, 3.0):
        for t in (x.flip(0), x @ torch.randn(2, 2, generator=g, dtype=torch.float64)):  # (x itself: below)
            gap = monge_gap(x, t, a, eps=eps, cost=cost, tol=1e-9, n_iter=20_000, backend="torch").item()
            assert gap >= eps * h - 1e-9
    # an optimal map (the gradient of a convex function for |x - y|^2; a translation for both costs): the
    # gap tends to eps H(a) as eps -> 0, a non-optimal one (points exchanged) keeps a gap of order 1
    x = 3 * x  # (points apart: a plan close to the map's at eps = 0.01)
    S = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    opt = x @ S + 0.7 if cost == "sqeuclidean" else x + torch.tensor([0.05, -0.03], dtype=torch.float64)
    kw = dict(eps=0.01, cost=cost, eps_scaling=0.5, backend="torch")
    gap_opt = monge_gap(x, opt, a, tol=1e-8, n_iter=5000, **kw).item()
    # (an upper bound of the gap until convergence: the dual value after an f-update is a lower bound of OT_eps)
    gap_bad = monge_gap(x, x.flip(0), a, tol=1e-3, n_iter=500, **kw).item()
    assert abs(gap_opt - 0.01 * h) <= 1e-4 * 0.01 * h
    assert gap_bad > 1.0


def test_identity_map_and_uniform_default():
    x, _, _ = _problem(4, False)
    n = x.shape[0]
    for cost in ("sqeuclidean", "euclidean"):
        t = x.clone().requires_grad_()
        gap, res = monge_gap(x, t, eps=1.0, cost=cost, tol=1e-10, n_iter=20_000, backend="torch",
                             return_output=True)
        # no displacement: the gap is -W_eps(x, x) = 2 eps log n - OT_eps(x, x)
        assert res.converged and abs(gap.item() - (2 * math.log(n) - res.value.item())) <= 1e-12
        gt, = torch.autograd.grad(gap, t)
        assert torch.isfinite(gt).all()  # (the euclidean displacement's gradient at 0 is 0, not NaN)
        uniform = torch.full((n,), 1.0 / n, dtype=torch.float64)
        torch.testing.assert_close(gap.detach(), monge_gap(x, x, uniform * 7, eps=1.0, cost=cost, tol=1e-10,
                                                           n_iter=20_000, backend="torch"), rtol=1e-12, atol=1e-12)


def test_gradient_in_the_weights_matches_finite_differences():
    x, t, a = _problem(9, True, n=10)
    w = a.clone().requires_grad_()
    kw = dict(eps=0.3, tol=1e-14, n_iter=100_000, backend="torch")
    gap = monge_gap(x, t, w, **kw)
    gw, = torch.autograd.grad(gap, w)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        v = torch.randn(a.shape, generator=g, dtype=torch.float64)
        h = 1e-5
        fd = (monge_gap(x, t, a + h * v, **kw) - monge_gap(x, t, a - h * v, **kw)).item() / (2 * h)
        assert abs(fd - (gw * v).sum().item()) <= 1e-6 * max(1.0, abs(fd))


def test_errors_name_the_function():
    x, t, a = _problem(0, True, n=6)
    cases = [
        (dict(eps=0.0), ValueError, "eps must be"),
        (dict(eps=float("nan")), ValueError, "eps must be"),
        (dict(eps="1"), TypeError, "eps must be"),
        (dict(eps=0.1, cost="cosine"), ValueError, "cost must be one of"),
        (dict(eps=0.1, n_iter=0), ValueError, "n_iter must be"),
        (dict(eps=0.1, tol=-1.0), ValueError, "tol must be"),
        (dict(eps=0.1, return_output=1), TypeError, "return_output must be a bool"),
        (dict(eps=0.1, backend="gpu"), ValueError, "unknown backend"),
        (dict(eps=1e-300), ValueError, "eps"),
    ]
    for kw, exc, msg in cases:
        with pytest.raises(exc, match="^monge_gap: .*" + msg):
            monge_gap(x, t, a, **kw)
    bad_inputs = [
        ((x, t[:5], a), "Tx must have the shape of x"),
        ((x, t.float(), a), "same dtype"),
        ((x, t, a[:5]), "a must have shape"),
        ((x, t, -a), "negative weights"),
        ((x, t, torch.zeros_like(a)), "positive"),
        ((x, t.clone().fill_(float("nan")), a), "Tx has non-finite"),
        ((x[None, None], t[None, None], a), "x must have shape"),
        ((x[:, :0], t[:, :0], a), "dimension d = 0"),
        ((x.tolist(), t, a), "x must be a torch.Tensor"),
    ]
    for args, msg in bad_inputs:
        with pytest.raises(ValueError, match="^monge_gap: .*" + msg):
            monge_gap(*args, eps=0.1)
    if "cpu" in KERNELS:  # float64 has no kernel: named backends refuse it under this function's name
        import fastopt
        with pytest.raises(fastopt.BackendUnavailableError, match="^monge_gap: "):
            monge_gap(x, t, a, eps=0.1, backend="cpu")
