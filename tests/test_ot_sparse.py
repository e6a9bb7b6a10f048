"""Sparsity-constrained OT (fastopt.ot.sparse_ot) against POT's ot.smooth, ot.emd2 and a brute force."""
import contextlib
import io
import itertools
import math

import numpy as np
import ot
import pytest
import torch

from fastopt.ot import sparse_ot
from fastopt.ot.sparse_ot import sparse_simplex_projection, sparsity_constrained_ot

# POT's ot.smooth passes scipy's deprecated `disp` option to L-BFGS-B
pytestmark = pytest.mark.filterwarnings("ignore:.*disp.*:DeprecationWarning")


@pytest.fixture(autouse=True)
def _one_thread():
    """Small problems: one thread avoids OpenMP barrier stalls when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _problem(n, m, seed, dtype=torch.float64):
    rng = np.random.default_rng(seed)
    x, y = rng.random((n, 2)), rng.random((m, 2))
    C = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
    a, b = rng.random(n) + 0.5, rng.random(m) + 0.5
    return (torch.tensor(C, dtype=dtype), torch.tensor(a / a.sum(), dtype=dtype),
            torch.tensor(b / b.sum(), dtype=dtype))


def _pot(fn, C, a, b, reg, **kwargs):
    """POT's ot.smooth solvers (their sparse projection prints debug output: swallowed)."""
    with contextlib.redirect_stdout(io.StringIO()):
        T, log = fn(a.numpy(), b.numpy(), C.numpy(), reg, stopThr=1e-14, numItermax=20000, log=True, **kwargs)
    return torch.from_numpy(T), -float(log["res"].fun)


def _nnz_per_column(T):
    return (T > 0).sum(-2)


# -- the k-sparse simplex projection ---------------------------------------------------------------
def test_sparse_simplex_projection_is_the_best_k_subset():
    g = torch.Generator().manual_seed(0)
    V = torch.randn(50, 7, generator=g, dtype=torch.float64) * 2
    for k in (1, 2, 3, 7):
        Y = sparse_simplex_projection(V, k)
        assert bool((Y >= 0).all()) and bool(((Y > 0).sum(-1) <= k).all())
        torch.testing.assert_close(Y.sum(-1), torch.ones(50, dtype=torch.float64))
        for v, y in zip(V, Y):  # brute force: the closest point over all supports of size k
            best = min(float((sparse_simplex_projection(v[list(s)], k) - v[list(s)]).square().sum()
                             + v[[i for i in range(7) if i not in s]].square().sum())
                       for s in itertools.combinations(range(7), k))
            assert float((y - v).square().sum()) == pytest.approx(best, abs=1e-12)
        with contextlib.redirect_stdout(io.StringIO()):
            ref = ot.utils.projection_sparse_simplex(V.numpy(), k, axis=1)
        np.testing.assert_allclose(Y.numpy(), ref, atol=1e-12)
    torch.testing.assert_close(sparse_simplex_projection(V.T, 3, dim=0), sparse_simplex_projection(V, 3).T)


# -- constraint and marginals ----------------------------------------------------------------------
@pytest.mark.parametrize("method", ["semi-dual", "dual"])
def test_columns_have_at_most_k_nonzeros(method):
    C, a, b = _problem(40, 8, seed=1)
    for k in (5, 8, 12):
        res = sparsity_constrained_ot(C, a, b, k=k, reg=0.5, method=method)
        assert int(_nnz_per_column(res.plan).max()) <= k
        assert res.log["max_nnz_per_column"] <= k
        assert bool((res.plan >= 0).all())
        if method == "semi-dual":  # every column sums exactly to b_j
            torch.testing.assert_close(res.plan.sum(0), b, atol=1e-14, rtol=0)
            assert res.beta is None
        else:
            assert res.beta.shape == (8,)


@pytest.mark.parametrize("method", ["semi-dual", "dual"])
def test_inactive_constraint_gives_the_unconstrained_plan_with_exact_marginals(method):
    C, a, b = _problem(30, 7, seed=2)
    reg = 0.2
    free = sparsity_constrained_ot(C, a, b, k=30, reg=reg, method=method)
    k = int(_nnz_per_column(free.plan).max())  # the unconstrained plan's largest column support
    assert k < 30
    res = sparsity_constrained_ot(C, a, b, k=k, reg=reg, method=method)
    torch.testing.assert_close(res.plan, free.plan, atol=1e-8, rtol=0)
    # marginals: semi-dual rows to the gradient tolerance (1e-9 per entry), columns exact; dual both 1e-9
    assert float((res.plan.sum(1) - a).abs().max()) <= 1e-9
    assert float((res.plan.sum(0) - b).abs().max()) <= (1e-14 if method == "semi-dual" else 1e-9)
    assert float(res.log["value"]) == pytest.approx(float(res.log["primal"]), abs=1e-9)  # no duality gap


def test_binding_constraint_reports_row_error_and_dual_bound():
    C, a, b = _problem(20, 8, seed=3)
    semi = sparsity_constrained_ot(C, a, b, k=3, reg=1.0)
    dual = sparsity_constrained_ot(C, a, b, k=3, reg=1.0, method="dual")
    # measured row errors |T1 - a|_1 ~ 0.1-0.2: with 3 entries per column the relaxation's maximum is a kink
    assert float(semi.log["err_a"]) == pytest.approx(float((semi.plan.sum(1) - a).abs().sum()))
    assert float(semi.log["err_b"]) <= 1e-14
    # max dual <= max semi-dual; both maximizers stop at a kink within ~1e-9 of their maxima (measured: equal to
    # 1e-9 relative, the dual slightly above by 1.5e-10)
    assert float(dual.log["value"]) <= float(semi.log["value"]) * (1 + 1e-8)
    assert float(semi.log["value"]) - float(dual.log["value"]) <= 1e-6 * float(semi.log["value"])


# -- POT cross-checks -----------------------------------------------------------------------------
@pytest.mark.parametrize("method,pot_fn", [("semi-dual", ot.smooth.smooth_ot_semi_dual),
                                           ("dual", ot.smooth.smooth_ot_dual)])
@pytest.mark.parametrize("reg", [1.0, 0.05])
def test_no_constraint_matches_pot_quadratic_ot(method, pot_fn, reg):
    C, a, b = _problem(25, 12, seed=4)
    res = sparsity_constrained_ot(C, a, b, k=25, reg=reg, method=method, tol=1e-11)
    T_pot, value_pot = _pot(pot_fn, C, a, b, reg, reg_type="l2")
    # POT's reg is ours: Omega(T) = reg / 2 |T|^2 (ot.smooth.SquaredL2(gamma=reg))
    assert float(res.log["value"]) == pytest.approx(value_pot, abs=1e-10)
    torch.testing.assert_close(res.plan, T_pot, atol=1e-6, rtol=0)
    assert float(res.log["primal"]) == pytest.approx(float(res.log["value"]), abs=1e-9)  # no duality gap
    assert float(res.log["primal"]) == pytest.approx(float((T_pot * C).sum() + 0.5 * reg * T_pot.square().sum()),
                                                     abs=1e-7)


@pytest.mark.parametrize("seed", [5, 6])
@pytest.mark.parametrize("method", ["semi-dual", "dual"])
def test_binding_constraint_at_least_as_good_as_pot(seed, method):
    C, a, b = _problem(30, 8, seed=seed)
    k, reg = 5, 0.5
    res = sparsity_constrained_ot(C, a, b, k=k, reg=reg, method=method)
    pot_fn = ot.smooth.smooth_ot_semi_dual if method == "semi-dual" else ot.smooth.smooth_ot_dual
    T_pot, value_pot = _pot(pot_fn, C, a, b, reg, reg_type="sparsity_constrained", max_nz=k)
    assert int(_nnz_per_column(T_pot).max()) <= k
    # both maximize the same concave (semi-)dual; POT's L-BFGS-B stops at kinks, ours gets at least as high
    value = float(res.log["value"])
    assert value >= value_pot - 1e-10
    assert value - value_pot <= 1e-3 * value_pot


# -- the objective against unregularized OT --------------------------------------------------------
def test_value_between_emd_and_its_k1_bound_and_decreasing_to_emd():
    C, a, b = _problem(12, 12, seed=8)
    W = float(ot.emd2(a.numpy(), b.numpy(), C.numpy()))
    sum_b2 = float(b.square().sum())
    for k in (1, 3, 12):
        values = []
        for reg in (1.0, 0.3, 0.1, 0.03, 0.01):
            v = float(sparsity_constrained_ot(C, a, b, k=k, reg=reg).log["value"])
            # emd2 <= max S_k <= max S_1 = emd2 + reg/2 sum_j b_j^2 (the k = 1 semi-dual is the LP's, shifted)
            assert W - 1e-10 <= v <= W + 0.5 * reg * sum_b2 + 1e-10
            values.append(v)
        assert all(v1 <= v0 + 1e-12 for v0, v1 in zip(values, values[1:])), values  # decreases as reg -> 0
        assert values[-1] - W < 0.01 * 0.5 * sum_b2 + 1e-9
        if k == 1:
            np.testing.assert_allclose(values, [W + 0.5 * r * sum_b2 for r in (1.0, 0.3, 0.1, 0.03, 0.01)],
                                       rtol=0, atol=1e-9)


def test_primal_cost_of_feasible_plans_tends_to_emd():
    C, a, b = _problem(15, 15, seed=9)
    W = float(ot.emd2(a.numpy(), b.numpy(), C.numpy()))
    costs = []
    for reg in (1.0, 0.1, 0.01):
        res = sparsity_constrained_ot(C, a, b, k=15, reg=reg, tol=1e-11)
        assert float(res.log["err_a"]) <= 1e-7
        costs.append(float((res.plan * C).sum()))
    assert all(c >= W - 1e-9 for c in costs)
    assert costs[0] > costs[1] > costs[2] and costs[2] - W < 1e-3


# -- brute force on a tiny problem ------------------------------------------------------------------
def _equality_qp(C, a, b, reg, mask):
    """min <T, C> + reg/2 |T|^2 subject to the marginals and T = 0 off ``mask`` (no sign constraint), in closed
    form: ``t = (A^T lam - c) / reg`` with ``A A^T lam = reg rhs + A c``; None if the marginals cannot be met."""
    n, m = C.shape
    idx = np.argwhere(mask)
    A = np.zeros((n + m, len(idx)))
    for t, (i, j) in enumerate(idx):
        A[i, t] = A[n + j, t] = 1
    rhs, c = np.r_[a, b], C[mask]
    lam = np.linalg.pinv(A @ A.T) @ (reg * rhs + A @ c)
    t = (A.T @ lam - c) / reg
    if np.abs(A @ t - rhs).max() > 1e-10:
        return None
    return t


def _brute_force(C, a, b, reg, k):
    """The constrained optimum by enumeration: for every positive set F with at most k entries per column, the
    equality-constrained minimizer on F; the optimum is the best one that is >= 0 (the optimal plan solves
    the equality-constrained problem on its own support, where the strictly convex objective has one
    minimizer)."""
    n, m = C.shape
    per_column = [s for r in range(1, k + 1) for s in itertools.combinations(range(n), r)]
    best = math.inf
    for cols in itertools.product(per_column, repeat=m):
        mask = np.zeros((n, m), dtype=bool)
        for j, rows in enumerate(cols):
            mask[list(rows), j] = True
        if not mask.any(1).all():
            continue
        t = _equality_qp(C, a, b, reg, mask)
        if t is not None and t.min() >= -1e-12:
            best = min(best, float(C[mask] @ t + 0.5 * reg * t @ t))
    return best


def test_brute_force_over_supports_tiny():
    n, m, k = 4, 3, 2
    tight = 0
    for seed in range(6):
        rng = np.random.default_rng(100 + seed)
        C, a, b = rng.random((n, m)), rng.random(n) + 0.5, rng.random(m) + 0.5
        a, b = a / a.sum(), b / b.sum()
        for reg in (1.0, 0.1):
            best = _brute_force(C, a, b, reg, k)
            res = sparsity_constrained_ot(torch.tensor(C), torch.tensor(a), torch.tensor(b), k=k, reg=reg, tol=1e-11)
            value = float(res.log["value"])
            assert value <= best + 1e-9  # the semi-dual is a lower bound on the constrained optimum
            if float(res.log["err_a"]) <= 1e-7:  # a feasible plan: the relaxation is tight, the plan optimal
                tight += 1
                assert value == pytest.approx(best, abs=1e-8)
                assert float(res.log["primal"]) == pytest.approx(best, abs=1e-8)
            else:  # infeasible plan (row error 5e-3 .. 0.2): measured gaps 2e-5 .. 6.3% of the optimum
                assert float(res.log["err_a"]) > 1e-3 and best - value <= 0.1 * best
    assert tight >= 4  # measured 6 of the 12 (instance, reg) pairs


# -- batches, dtypes, devices ----------------------------------------------------------------------
def test_batched_matches_single():
    problems = [_problem(16, 5, seed=s) for s in range(3)]
    C = torch.stack([p[0] for p in problems])
    a = torch.stack([p[1] for p in problems])
    b = torch.stack([p[2] for p in problems])
    res = sparsity_constrained_ot(C, a, b, k=4, reg=0.3, tol=1e-11)
    assert res.plan.shape == (3, 16, 5) and res.log["value"].shape == (3,)
    for i in range(3):
        single = sparsity_constrained_ot(C[i], a[i], b[i], k=4, reg=0.3, tol=1e-11)
        assert float(res.log["value"][i]) == pytest.approx(float(single.log["value"]), abs=1e-9)


def test_float32():
    C, a, b = _problem(20, 6, seed=10)
    r64 = sparsity_constrained_ot(C, a, b, k=20, reg=0.3)
    r32 = sparsity_constrained_ot(C.float(), a.float(), b.float(), k=20, reg=0.3, tol=1e-6)
    assert r32.plan.dtype == torch.float32
    assert float(r32.log["value"]) == pytest.approx(float(r64.log["value"]), rel=1e-5)
    assert float((r32.plan.double() - r64.plan).abs().max()) < 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    C, a, b = _problem(64, 8, seed=11)
    cpu = sparsity_constrained_ot(C, a, b, k=10, reg=0.3)
    gpu = sparsity_constrained_ot(C.cuda(), a.cuda(), b.cuda(), k=10, reg=0.3)
    assert gpu.plan.is_cuda and int(_nnz_per_column(gpu.plan).max()) <= 10
    assert float(gpu.log["value"].cpu()) == pytest.approx(float(cpu.log["value"]), rel=1e-7)


# -- errors ----------------------------------------------------------------------------------------
def test_errors_before_any_work(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the solver started working before rejecting its input")

    monkeypatch.setattr(sparse_ot, "_minimize_bfgs", boom)
    C, a, b = _problem(6, 3, seed=0)
    cases = [
        (dict(k=0), "k"),
        (dict(k=2.0), "k"),
        (dict(k=True), "k"),
        (dict(k=1), "k \\* m >= n"),
        (dict(reg=0.0), "reg"),
        (dict(reg=math.nan), "reg"),
        (dict(tol=-1.0), "tol"),
        (dict(max_iter=0), "max_iter"),
        (dict(history_size="big"), "history_size"),
        (dict(method="primal"), "method"),
        (dict(a=-a), "> 0"),
        (dict(a=torch.zeros(6, dtype=torch.float64)), "> 0"),
        (dict(b=torch.where(torch.arange(3) == 1, math.inf, b)), "finite"),
        (dict(C=torch.where(C > 0.3, math.nan, C)), "C must be finite"),
        (dict(C=C.to(torch.int32)), "float32 or float64"),
        (dict(C=C[0]), r"\(\.\.\., n, m\)"),
        (dict(a=a[:5]), "shape"),
        (dict(b=torch.ones(4, dtype=torch.float64) / 4), "shape"),
        (dict(a=3 * a), "same total mass"),
        (dict(b=b.to("meta")), "meta"),
    ]
    for kwargs, match in cases:
        args = dict(C=C, a=a, b=b, k=2)
        args.update(kwargs)
        with pytest.raises(ValueError, match=match):
            sparsity_constrained_ot(args.pop("C"), **args)
    with pytest.raises(ValueError, match="k"):
        sparse_simplex_projection(torch.zeros(3), 0)
