"""Sinkhorn–Newton–Sparse (fastopt.ot.newton) against POT (exact OT and Sinkhorn) and the Sinkhorn reference."""
import math

import numpy as np
import ot
import pytest
import torch

from fastopt.ot import newton
from fastopt.ot.newton import lyapunov, sinkhorn_newton_sparse, sparsify_plan
from fastopt.reference.ot import sinkhorn_reference, sqeuclidean_cost


@pytest.fixture(autouse=True)
def _one_thread():
    """The problems here are small (at most 100 x 100): extra threads only add OpenMP barriers, which make
    a run several times slower when other processes compete for the cores.  Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _clouds(n, m, seed, dtype=torch.float64, weights=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, generator=g, dtype=torch.float64)
    y = torch.rand(m, 2, generator=g, dtype=torch.float64)
    C = sqeuclidean_cost(x, y)
    if weights:
        a = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
        b = torch.rand(m, generator=g, dtype=torch.float64) + 0.5
    else:
        a, b = torch.ones(n, dtype=torch.float64), torch.ones(m, dtype=torch.float64)
    return C.to(dtype), (a / a.sum()).to(dtype), (b / b.sum()).to(dtype)


def _marginal_error(P, a, b):
    return float(((P.sum(-1) - a).square().sum(-1) + (P.sum(-2) - b).square().sum(-1)).sqrt().max())


# -- (a) the plan tends to the exact (LP) plan as eps -> 0 ----------------------------------------
def test_converges_to_exact_ot_as_eps_shrinks():
    C, a, b = _clouds(30, 40, seed=0)
    G = torch.from_numpy(ot.emd(a.numpy(), b.numpy(), C.numpy()))
    W = float(ot.emd2(a.numpy(), b.numpy(), C.numpy()))
    gaps, dists = [], []
    for eps in (3e-2, 1e-2, 3e-3, 1e-3, 3e-4):
        res = sinkhorn_newton_sparse(C, a, b, eps, return_plan=True)
        assert res.log["stop"] == "tol" and bool(res.log["converged"])
        assert _marginal_error(res.plan, a, b) <= 1e-10
        gaps.append(float((res.plan * C).sum()) - W)
        dists.append(float((res.plan - G).abs().sum()))
    assert all(gap > 0 for gap in gaps)  # the entropic plan is feasible, so it costs more than the LP optimum
    assert all(g1 < 0.5 * g0 for g0, g1 in zip(gaps, gaps[1:])), gaps
    assert all(d1 < d0 for d0, d1 in zip(dists, dists[1:])), dists
    assert gaps[-1] / W < 1e-3  # eps = 3e-4 (cost range ~2): <P, C> within 0.1% of ot.emd2 (measured 2.2e-4)
    assert dists[-1] < 0.1  # L1 distance to ot.emd's plan (measured 0.045; total mass 2 for disjoint plans)


def test_plan_matches_pot_sinkhorn():
    C, a, b = _clouds(25, 35, seed=1)
    eps = 0.01
    res = sinkhorn_newton_sparse(C, a, b, eps, return_plan=True)
    P_pot = ot.sinkhorn(a.numpy(), b.numpy(), C.numpy(), eps, method="sinkhorn_log", stopThr=1e-13,
                        numItermax=100000)
    np.testing.assert_allclose(res.plan.numpy(), P_pot, atol=1e-11, rtol=0)
    # the dual value is OT_eps = <P, C> + eps KL(P | a b^T) and the maximum of the Lyapunov potential
    P = res.plan
    kl = float((P * (P / (a[:, None] * b[None, :])).log()).sum())
    value = float(res.log["value"])
    assert value == pytest.approx(float((P * C).sum()) + eps * kl, abs=1e-10)
    assert float(lyapunov(C, a, b, res.f, res.g, eps)) == pytest.approx(value, abs=1e-12)
    assert float(lyapunov(C, a, b, res.f + 1e-3 * torch.randn(25, dtype=torch.float64), res.g, eps)) < value


# -- (b) far fewer iterations than Sinkhorn, same potentials -------------------------------------
def test_fewer_iterations_than_sinkhorn_same_potentials():
    C, a, b = _clouds(100, 100, seed=1, weights=False)
    eps, tol = 2e-3, 1e-10
    f_sk, g_sk, it_sk, err_sk = sinkhorn_reference(C, a.log(), b.log(), eps, n_iter=20000, tol=tol)
    assert float(err_sk) <= tol
    res = sinkhorn_newton_sparse(C, a, b, eps, tol=tol)
    log = res.log
    assert log["stop"] == "tol" and float(log["err"]) <= tol
    assert log["iterations"] == log["sinkhorn_iters"] + log["newton_iters"]
    # measured: Sinkhorn 7030 iterations, SNS 90 Sinkhorn + 10 Newton (696 CG products on the sparse Hessian)
    assert log["iterations"] * 5 <= it_sk, (log["iterations"], it_sk)
    assert log["newton_iters"] <= 20
    # the error history ends at the final error and the Newton stage converges fast
    assert log["err_history"][-1] == pytest.approx(float(log["err"]))
    assert log["iter_history"][-1] == log["iterations"]
    newton_errs = log["err_history"][-log["newton_iters"] - 1:]
    assert newton_errs[-1] < 1e-6 * newton_errs[0]
    # potentials: equal up to the additive constant (f + t, g - t)
    shift = float((res.f - f_sk).mean())
    torch.testing.assert_close(res.f - shift, f_sk, atol=1e-8, rtol=0)
    torch.testing.assert_close(res.g + shift, g_sk, atol=1e-8, rtol=0)


def test_converges_where_sinkhorn_stalls():
    # eps = 1e-3 on 80 points: Sinkhorn is still at 1e-6 after 3000 iterations, SNS reaches 1e-10 in < 400
    C, a, b = _clouds(80, 80, seed=0, weights=False)
    eps = 1e-3
    _, _, it_sk, err_sk = sinkhorn_reference(C, a.log(), b.log(), eps, n_iter=3000, tol=1e-10)
    assert it_sk == 3000 and float(err_sk) > 1e-7
    res = sinkhorn_newton_sparse(C, a, b, eps)
    assert float(res.log["err"]) <= 1e-10 and res.log["iterations"] < 400


def test_tiny_eps_uses_sinkhorn_fallback():
    # eps = 1e-4 (cost range 2): the first Newton directions are huge (nearly decoupled clusters), the line
    # search rejects them and Sinkhorn iterations take over until Newton steps are accepted again
    C, a, b = _clouds(12, 15, seed=3)
    res = sinkhorn_newton_sparse(C, a, b, 1e-4, sinkhorn_iters=50, return_plan=True)
    assert res.log["fallbacks"] >= 1
    assert res.log["stop"] == "tol" and _marginal_error(res.plan, a, b) <= 1e-10
    W = float(ot.emd2(a.numpy(), b.numpy(), C.numpy()))
    assert 0 < float((res.plan * C).sum()) - W < 1e-3 * W


# -- (c) the sparsified Hessian keeps the requested entries --------------------------------------
@pytest.mark.parametrize("rho,n,m", [(0.1, 20, 30), (0.05, 17, 23), (1.0, 5, 7), (1e-6, 10, 10)])
def test_sparsify_fraction_keeps_largest_entries(rho, n, m):
    P = torch.rand(2, n, m, dtype=torch.float64)
    rows, cols, vals = sparsify_plan(P, rho)
    K = max(1, math.ceil(round(rho * n * m, 6)))
    assert rows.shape == cols.shape == vals.shape == (2, K)
    for i in range(2):
        torch.testing.assert_close(vals[i], P[i, rows[i], cols[i]])
        assert len({(int(r), int(c)) for r, c in zip(rows[i], cols[i])}) == K  # distinct entries
        kept = torch.zeros(n, m, dtype=torch.bool)
        kept[rows[i], cols[i]] = True
        if K < n * m:
            assert float(P[i][kept].min()) >= float(P[i][~kept].max())


def test_sparsify_per_row_keeps_row_topk():
    P = torch.rand(3, 11, 9, dtype=torch.float64)
    rows, cols, vals = sparsify_plan(P, 4)
    assert rows.shape == (3, 44)
    for i in range(3):
        counts = torch.bincount(rows[i], minlength=11)
        assert counts.tolist() == [4] * 11
        for r in range(11):
            mine = sorted(vals[i][rows[i] == r].tolist())
            assert mine == pytest.approx(sorted(P[i, r].topk(4).values.tolist()))
    assert sparsify_plan(P, 100)[0].shape == (3, 99)  # k > m keeps whole rows


def test_sparse_hessian_operator_is_psd_and_counts_logged():
    C, a, b = _clouds(15, 12, seed=4)
    eps = 0.01
    f, g, _, _ = sinkhorn_reference(C, a.log(), b.log(), eps, n_iter=30, tol=0.0)
    P = (a.log()[:, None] + b.log()[None, :] + (f[:, None] + g[None, :] - C) / eps).exp()
    rows, cols, vals = sparsify_plan(P[None], 0.2)
    d = torch.cat([P.sum(-1), P.sum(-2)])[None]
    M = torch.stack([newton._hessian_matvec(e[None], d, rows, cols, vals, 15)[0]
                     for e in torch.eye(27, dtype=torch.float64)])
    S = torch.zeros(15, 12, dtype=torch.float64)
    S[rows[0], cols[0]] = vals[0]
    dense = torch.cat([torch.cat([torch.diag(P.sum(-1)), S], 1), torch.cat([S.T, torch.diag(P.sum(-2))], 1)])
    torch.testing.assert_close(M, dense)
    assert int((dense != 0).sum()) == 15 + 12 + 2 * rows.shape[-1]  # n + m + 2K nonzeros
    assert float(torch.linalg.eigvalsh(dense).min()) > -1e-14
    res = sinkhorn_newton_sparse(C, a, b, eps, sparsity=0.2, sparsity_growth=1.0)
    assert res.log["hessian_nnz"] == [math.ceil(0.2 * 15 * 12)] * res.log["newton_iters"]
    res = sinkhorn_newton_sparse(C, a, b, eps, sparsity=3, sparsity_growth=1.0)
    assert res.log["hessian_nnz"] == [3 * 15] * res.log["newton_iters"]
    assert res.log["stop"] == "tol"


def test_sparsity_growth_when_newton_is_slow():
    C, a, b = _clouds(60, 60, seed=5, weights=False)
    fixed = sinkhorn_newton_sparse(C, a, b, 0.02, sparsity=2, sparsity_growth=1.0, newton_iters=15)
    grown = sinkhorn_newton_sparse(C, a, b, 0.02, sparsity=2)
    assert grown.log["stop"] == "tol"
    assert grown.log["hessian_nnz"][-1] > grown.log["hessian_nnz"][0] == 2 * 60
    assert grown.log["newton_iters"] < fixed.log["newton_iters"] or float(fixed.log["err"]) > 1e-10


# -- batches, padding, dtypes ---------------------------------------------------------------------
def test_batched_with_zero_weights_matches_single_solves():
    Cs, as_, bs = zip(*[_clouds(20, 26, seed=s) for s in range(3)])
    C, a, b = torch.stack(Cs), torch.stack(as_), torch.stack(bs)
    a[1, :4] = 0
    a[1] /= a[1].sum()
    b[2, -5:] = 0
    b[2] /= b[2].sum()
    eps = 5e-3
    res = sinkhorn_newton_sparse(C.view(3, 1, 20, 26), a.view(3, 1, 20), b.view(3, 1, 26), eps, return_plan=True)
    assert res.f.shape == (3, 1, 20) and res.plan.shape == (3, 1, 20, 26) and res.log["err"].shape == (3, 1)
    assert float(res.f[1, 0, :4].abs().max()) == 0 and float(res.g[2, 0, -5:].abs().max()) == 0
    assert float(res.plan[1, 0, :4].abs().max()) == 0 and float(res.plan[2, 0, :, -5:].abs().max()) == 0
    for i in range(3):
        single = sinkhorn_newton_sparse(C[i], a[i], b[i], eps, return_plan=True)
        torch.testing.assert_close(res.plan[i, 0], single.plan, atol=1e-9, rtol=0)  # both within tol 1e-10
        with np.errstate(divide="ignore"):  # POT takes log(0) of the zero weights
            P_pot = ot.sinkhorn(a[i].numpy(), b[i].numpy(), C[i].numpy(), eps, method="sinkhorn_log",
                                stopThr=1e-13, numItermax=100000)
        np.testing.assert_allclose(res.plan[i, 0].numpy(), P_pot, atol=1e-9, rtol=0)


def test_float32_close_to_float64():
    C, a, b = _clouds(40, 30, seed=6)
    eps = 5e-3
    r64 = sinkhorn_newton_sparse(C, a, b, eps, return_plan=True)
    r32 = sinkhorn_newton_sparse(C.float(), a.float(), b.float(), eps, return_plan=True)
    assert r32.f.dtype == torch.float32 and r32.log["tol"] == 1e-5
    assert bool(r32.log["converged"]) and _marginal_error(r32.plan.double(), a, b) <= 2e-5
    assert float((r32.plan.double() - r64.plan).abs().max()) < 1e-4
    # the fp32 plan is no further from the fp64 plan than an fp32 Sinkhorn run to the same tolerance
    f, g, _, _ = sinkhorn_reference(C.float(), a.float().log(), b.float().log(), eps, n_iter=20000, tol=1e-5)
    P_sk = (a.float().log()[:, None] + b.float().log()[None, :] + (f[:, None] + g[None, :] - C.float()) / eps).exp()
    assert float((r32.plan.double() - r64.plan).abs().max()) <= 2 * float((P_sk.double() - r64.plan).abs().max())


def test_empty_batch_and_single_point():
    res = sinkhorn_newton_sparse(torch.zeros(0, 4, 5, dtype=torch.float64), eps=0.1, return_plan=True)
    assert res.f.shape == (0, 4) and res.plan.shape == (0, 4, 5) and res.log["iterations"] == 0
    C = torch.tensor([[0.3, 0.1, 0.7]], dtype=torch.float64)
    res = sinkhorn_newton_sparse(C, eps=0.05, return_plan=True)  # one source: the plan is b
    torch.testing.assert_close(res.plan, torch.full((1, 3), 1 / 3, dtype=torch.float64), atol=1e-12, rtol=0)


def test_warm_start_from_solution_needs_no_newton_step():
    C, a, b = _clouds(30, 30, seed=7)
    first = sinkhorn_newton_sparse(C, a, b, 0.01)
    again = sinkhorn_newton_sparse(C, a, b, 0.01, f=first.f, g=first.g, sinkhorn_iters=0)
    assert again.log["newton_iters"] == 0 and again.log["iterations"] == 0
    torch.testing.assert_close(again.f, first.f)
    # a warm start within sinkhorn_tol skips stage 1 (on float32 kernels it would blur the potentials)
    again = sinkhorn_newton_sparse(C, a, b, 0.01, f=first.f, g=first.g)
    assert again.log["iterations"] == 0 and again.log["err_history"] == [float(again.log["err"])]
    torch.testing.assert_close(again.f, first.f)
    noise = torch.randn(30, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    near = sinkhorn_newton_sparse(C, a, b, 0.01, f=first.f + 1e-4 * noise, g=first.g)
    assert near.log["sinkhorn_iters"] == 0 and 1 <= near.log["newton_iters"] <= 5 and near.log["stop"] == "tol"
    far = sinkhorn_newton_sparse(C, a, b, 0.01, f=first.f + 0.05 * noise, g=first.g)
    assert far.log["sinkhorn_iters"] > 0 and far.log["stop"] == "tol"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    C, a, b = _clouds(64, 48, seed=8)
    cpu = sinkhorn_newton_sparse(C, a, b, 3e-3, return_plan=True)
    gpu = sinkhorn_newton_sparse(C.cuda(), a.cuda(), b.cuda(), 3e-3, return_plan=True)
    assert gpu.f.is_cuda and gpu.log["stop"] == "tol"
    torch.testing.assert_close(gpu.plan.cpu(), cpu.plan, atol=1e-10, rtol=0)


# -- (d) errors -----------------------------------------------------------------------------------
@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if the solver starts iterating (errors must come before any work)."""
    def boom(*args, **kwargs):
        raise AssertionError("the solver started working before rejecting its input")

    monkeypatch.setattr(newton, "_iterate", boom)
    monkeypatch.setattr(newton, "_pcg", boom)


@pytest.mark.parametrize("eps", [0, -1.0, math.nan, math.inf, "0.1", None, torch.tensor([0.1, 0.2])])
def test_bad_eps(no_work, eps):
    C, a, b = _clouds(5, 6, seed=0)
    with pytest.raises(ValueError, match="eps"):
        sinkhorn_newton_sparse(C, a, b, eps)


def test_bad_weights_cost_shapes(no_work):
    C, a, b = _clouds(5, 6, seed=0)
    cases = [
        (dict(a=-a), "non-negative"),
        (dict(a=torch.where(torch.arange(5) == 2, math.nan, a)), "finite"),
        (dict(b=torch.where(torch.arange(6) == 0, math.inf, b)), "finite"),
        (dict(b=torch.zeros(6, dtype=torch.float64)), "positive total mass"),
        (dict(C=torch.where(C > 0.5, math.inf, C)), "C must be finite"),
        (dict(C=C.to(torch.int64)), "float32 or float64"),
        (dict(C=C[0]), r"\(\.\.\., n, m\)"),
        (dict(C=[[1.0]]), "torch.Tensor"),
        (dict(a=a[:4]), "shape"),
        (dict(b=torch.ones(2, 7, dtype=torch.float64) / 7), "shape"),
        (dict(b=torch.ones(2, 6, dtype=torch.float64) / 6), "broadcast"),
        (dict(a=2 * a), "same total mass"),
        (dict(a=a.to("meta")), "meta"),
        (dict(sparsity=0.0), "sparsity"),
        (dict(sparsity=1.5), "sparsity"),
        (dict(sparsity=0), "sparsity"),
        (dict(sparsity=True), "sparsity"),
        (dict(tol=0.0), "tol"),
        (dict(cg_tol=1.0), "cg_tol"),
        (dict(newton_iters=-1), "newton_iters"),
        (dict(sinkhorn_iters=2.5), "sinkhorn_iters"),
        (dict(ls_beta=1.0), "ls_beta"),
        (dict(sparsity_growth=0.5), "sparsity_growth"),
        (dict(f=torch.zeros(4, dtype=torch.float64)), "warm start"),
    ]
    for kwargs, match in cases:
        args = dict(C=C, a=a, b=b)
        args.update(kwargs)
        with pytest.raises(ValueError, match=match):
            sinkhorn_newton_sparse(args.pop("C"), eps=0.1, **args)


def test_bench_suite_methods_reach_the_tolerance():
    from fastopt.bench import ot_newton as bench

    config = bench.Config(60, 0.01)
    C, a, b = bench.make_problem(config, "cpu")
    points = bench.make_points(config, "cpu")
    iters, plans = {}, {}
    for method in bench.METHODS:
        plan, info = bench.solver(method, C, a, b, config.eps, points)()
        assert bench.marginal_error(plan, a, b) <= bench.TOL, method
        iters[method], plans[method] = info["iters"], plan
    assert iters["fastopt-sns"] * 5 <= iters["torch-sinkhorn-log"] == iters["pot-sinkhorn-log"]
    assert iters["fastopt-sns"] == iters["fastopt-sns-torch"] == iters["fastopt-sns-points"]
    torch.testing.assert_close(plans["fastopt-sns-points"], plans["fastopt-sns"], atol=1e-12, rtol=0)


# -- (e) the online problem (points) and the float32 Sinkhorn stage --------------------------------
from fastopt import _backend, _ops  # noqa: E402
from fastopt.reference.ot import cost_matrix as dense_cost  # noqa: E402

HAS_CPU_KERNELS = "cpu" in _backend.available_backends("cpu")


def _points(B, n, m, d, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, n, d, generator=g, dtype=torch.float64)
    y = torch.rand(B, m, d, generator=g, dtype=torch.float64)
    a = torch.rand(B, n, generator=g, dtype=torch.float64) + 0.5
    b = torch.rand(B, m, generator=g, dtype=torch.float64) + 0.5
    return x, y, a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)


class _LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest tensor (elements) that any operation returns while active."""

    def __init__(self):
        super().__init__()
        self.most = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.most = max(self.most, t.numel())
        return out


@pytest.mark.parametrize("cost,sparsity", [("sqeuclidean", None), ("euclidean", 3)])
def test_online_points_match_the_dense_cost(cost, sparsity):
    # rows in blocks of 7 (several blocks, the last one short), a zero weight in each batch entry
    x, y, a, b = _points(2, 33, 27, 3, seed=11)
    a[0, 5] = b[1, -1] = 0
    a, b = a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)
    C = dense_cost(x, y, cost)
    eps = 4e-3 if cost == "sqeuclidean" else 2e-2
    kw = dict(eps=eps, sparsity=sparsity, return_plan=True, backend="torch")
    dense = sinkhorn_newton_sparse(C, a, b, **kw)
    online = sinkhorn_newton_sparse(a=a, b=b, x=x, y=y, cost=cost, block_rows=7, **kw)
    assert dense.log["stop"] == online.log["stop"] == "tol"
    for key in ("sinkhorn_iters", "newton_iters", "cg_iters", "hessian_nnz", "fallbacks"):
        assert online.log[key] == dense.log[key], key
    assert dense.log["newton_iters"] >= 2
    # the same operations entry by entry: only the block sums round differently
    torch.testing.assert_close(online.f, dense.f, atol=1e-12, rtol=0)
    torch.testing.assert_close(online.g, dense.g, atol=1e-12, rtol=0)
    torch.testing.assert_close(online.plan, dense.plan, atol=1e-14, rtol=0)
    torch.testing.assert_close(online.log["value"], dense.log["value"], atol=1e-13, rtol=0)
    assert _marginal_error(online.plan, a, b) <= 1e-10
    assert online.plan.shape == (2, 33, 27) and float(online.plan[0, 5].abs().max()) == 0
    assert sinkhorn_newton_sparse(x=x, y=y, eps=eps, cost=cost, backend="torch").plan is None


def test_online_sparsify_by_blocks_keeps_the_same_entries():
    x, y, a, b = _points(2, 23, 19, 2, seed=12)
    f = torch.randn(2, 23, dtype=torch.float64) * 0.05
    g = torch.randn(2, 19, dtype=torch.float64) * 0.05
    prob = newton._OnlineProblem(x, y, "sqeuclidean", a, b, 0.01, 5)
    P = newton._Problem(dense_cost(x, y, "sqeuclidean"), a, b, 0.01).plan(f, g)
    for mode, count in (("top", 37), ("top", 23 * 19), ("row", 4)):
        rows, cols, vals = prob.sparsify(None, f, g, mode, count)
        r0, c0, v0 = newton._sparsify(P, mode, count)
        assert rows.shape == r0.shape
        for i in range(2):
            key = rows[i] * 19 + cols[i]
            assert sorted(key.tolist()) == sorted((r0[i] * 19 + c0[i]).tolist())
            torch.testing.assert_close(vals[i], P[i].reshape(-1)[key], atol=1e-15, rtol=0)


def test_online_newton_stage_holds_no_n_by_m_tensor():
    # every tensor of the online solve (stage 1 on the torch reference in blocks, Newton in blocks of 6 rows)
    # stays below n * m / 3 entries; the dense solve of the same problem does form n x m tensors
    x, y, a, b = _points(1, 48, 40, 2, seed=13)
    n, m, d, block = 48, 40, 2, 6
    kw = dict(eps=1e-2, backend="torch", sparsity=0.15, sparsity_growth=1.0)
    with _LargestTensor() as online:
        res = sinkhorn_newton_sparse(a=a, b=b, x=x, y=y, block_rows=block, **kw)
    assert res.log["stop"] == "tol" and res.log["newton_iters"] >= 2
    K = math.ceil(0.15 * n * m)
    # the largest: the costs' (block, n or m, d) difference, or the running top-K merged with a block's
    assert online.most <= max(block * max(n, m) * d, K + block * m) < n * m / 3, online.most
    with _LargestTensor() as dense:
        sinkhorn_newton_sparse(dense_cost(x, y, "sqeuclidean"), a, b, **kw)
    assert dense.most >= n * m


def test_online_errors(no_work):
    x, y, a, b = _points(1, 6, 5, 2, seed=0)
    C = dense_cost(x, y, "sqeuclidean")
    cases = [
        (dict(C=C, x=x, y=y), "not both"),
        (dict(x=x), "both points"),
        (dict(y=y), "both points"),
        (dict(), "give the cost C or the points"),
        (dict(x=x, y=y[..., :1]), "dimension"),
        (dict(x=x, y=y.float()), "same dtype"),
        (dict(x=x.half(), y=y.half()), "float32 or float64"),
        (dict(x=x.int(), y=y.int()), "float32 or float64"),
        (dict(x=x, y=torch.where(y > 0.5, math.nan, y)), "finite"),
        (dict(x=x, y=y, cost="cosine"), "cost must be one of"),
        (dict(x=x, y=y, a=a[..., :4]), "shape"),
        (dict(x=x, y=y, b=2 * b), "same total mass"),
        (dict(x=x, y=y, block_rows=0), "block_rows"),
        (dict(C=C, block_rows=4), "block_rows"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match="^sinkhorn_newton_sparse: .*" + match):
            sinkhorn_newton_sparse(eps=0.1, **kwargs)


@pytest.mark.skipif(not HAS_CPU_KERNELS, reason="needs fastopt._C")
@pytest.mark.parametrize("online", [False, True])
def test_float64_sinkhorn_stage_on_float32_kernels(monkeypatch, online):
    calls = []
    real = _ops.ot_softmin
    monkeypatch.setattr(_ops, "ot_softmin", lambda *args: (calls.append(args[-1]), real(*args))[1])
    x, y, a, b = _points(1, 50, 40, 2, seed=14)
    C = dense_cost(x, y, "sqeuclidean")
    eps, tol = 3e-3, 1e-8
    problem = dict(x=x, y=y) if online else dict(C=C)
    ref = sinkhorn_newton_sparse(C, a, b, eps, tol=tol, return_plan=True, backend="torch")
    assert calls == [] and ref.log["sinkhorn_backend"] == "torch/float64"
    for backend in ("auto", "cpu"):
        calls.clear()
        res = sinkhorn_newton_sparse(a=a, b=b, eps=eps, tol=tol, return_plan=True, backend=backend, **problem)
        assert calls and set(calls) == {"cpu"} and res.log["sinkhorn_backend"] == "cpu/float32"
        assert res.f.dtype == res.plan.dtype == torch.float64 and res.log["stop"] == "tol"
        assert _marginal_error(res.plan, a, b) <= tol  # Newton in float64 reaches the float64 tolerance
        assert res.log["newton_iters"] <= ref.log["newton_iters"] + 2
        torch.testing.assert_close(res.plan, ref.plan, atol=1e-9, rtol=0)
        torch.testing.assert_close(res.log["value"], ref.log["value"], atol=1e-9, rtol=0)
    # costs against eps beyond float32's reach for stage 1: auto runs the float64 reference, cpu refuses
    calls.clear()
    small = sinkhorn_newton_sparse(a=a, b=b, eps=1e-6, newton_iters=0, sinkhorn_iters=10, **problem)
    assert calls == [] and small.log["sinkhorn_backend"] == "torch/float64"
    with pytest.raises(_backend.BackendUnavailableError, match="sinkhorn_newton_sparse: backend 'cpu' .*float32"):
        sinkhorn_newton_sparse(a=a, b=b, eps=1e-6, backend="cpu", **problem)


@pytest.mark.skipif(not HAS_CPU_KERNELS, reason="needs fastopt._C")
def test_fallback_runs_float32_only_far_from_the_optimum(monkeypatch):
    # every Newton step rejected: the fallback Sinkhorn iterations run on the float32 kernels while the
    # error is above sinkhorn_tol, in float64 below it (float32 would undo what float64 Newton reached)
    used = []
    real = newton._iterate
    monkeypatch.setattr(newton, "_iterate", lambda prob, *args: (used.append(prob.work_dtype), real(prob, *args))[1])
    monkeypatch.setattr(newton, "_line_search", lambda prob, *args: (
        torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.bool)))
    C, a, b = _clouds(20, 25, seed=2)
    res = sinkhorn_newton_sparse(C, a, b, 0.01, newton_iters=1)
    assert res.log["fallbacks"] == 1 and res.log["sinkhorn_iters"] > 10
    assert used[0] == torch.float32 and used[-1] == torch.float64 and used.count(torch.float64) == 1
    used.clear()
    res = sinkhorn_newton_sparse(C, a, b, 0.01, newton_iters=1, sinkhorn_iters=0)
    assert res.log["fallbacks"] == 1 and used == [torch.float32]


@pytest.mark.skipif(not HAS_CPU_KERNELS, reason="needs fastopt._C")
def test_float32_online_state_by_the_kernels(monkeypatch):
    # float32 points on a kernel backend: the Newton stage's row and column sums of P are the kernels'
    # soft-minimum passes (two per state); same solve as the dense float32 problem up to float32 rounding
    x, y, a, b = (t.float() for t in _points(1, 40, 30, 2, seed=15))
    eps = 5e-3
    dense = sinkhorn_newton_sparse(dense_cost(x, y, "sqeuclidean"), a, b, eps, return_plan=True)
    calls = []
    real = _ops.ot_softmin
    monkeypatch.setattr(_ops, "ot_softmin", lambda *args: (calls.append(args[-1]), real(*args))[1])
    res = sinkhorn_newton_sparse(a=a, b=b, x=x, y=y, eps=eps, return_plan=True)
    log = res.log
    assert log["stop"] == "tol" and log["newton_iters"] >= 2 and res.plan.dtype == torch.float32
    assert len(calls) >= 2 * log["sinkhorn_iters"] + 2 * (log["newton_iters"] + 1)
    assert _marginal_error(res.plan.double(), a.double(), b.double()) <= 2e-5
    assert float((res.plan - dense.plan).abs().max()) < 1e-5
