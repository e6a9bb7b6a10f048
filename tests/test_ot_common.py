"""What the OT solvers share: the result convention (fastopt.ot.OTResult), the argument checks
(fastopt/ot/_checks.py: one rule and one message per kind of argument, naming the function) and the
backend resolver (the "ot" row of _backend.CAPABILITIES runs the Sinkhorn stage of
Sinkhorn-Newton-Sparse on the kernels)."""
import dataclasses

import pytest
import torch

import fastopt
from fastopt import _backend, _ops
from fastopt.ot import (OTResult, SinkhornResult, SNSResult, SparseOTResult, max_sliced_wasserstein, sinkhorn,
                        sinkhorn_newton_sparse, sliced_wasserstein, sparsity_constrained_ot, wasserstein_1d)
from fastopt.reference.ot import sqeuclidean_cost

HAS_CPU_KERNELS = "cpu" in _backend.available_backends("cpu")


def _problem(B=2, n=7, m=5, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, n, 2, generator=g, dtype=torch.float64)
    y = torch.rand(B, m, 2, generator=g, dtype=torch.float64)
    a = torch.rand(B, n, generator=g, dtype=torch.float64) + 0.5
    b = torch.rand(B, m, generator=g, dtype=torch.float64) + 0.5
    a, b = a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)
    return sqeuclidean_cost(x, y).to(dtype), a.to(dtype), b.to(dtype), x.to(dtype), y.to(dtype)


# -- one result convention ----------------------------------------------------------------------------
def _solve_all(B=2):
    C, a, b, x, y = _problem(B)
    return {
        "sinkhorn": sinkhorn(x, y, a, b, eps=0.1, tol=1e-9),
        "sinkhorn_newton_sparse": sinkhorn_newton_sparse(C, a, b, 0.1),
        "sparsity_constrained_ot": sparsity_constrained_ot(C, a, b, k=7),  # (k = n: smooth, reaches tol)
    }


def test_every_solver_result_has_the_common_attributes():
    for name, res in _solve_all().items():
        assert isinstance(res, OTResult), name
        assert res.value.shape == (2,) and res.value.dtype == torch.float64, name
        assert isinstance(res.n_iter, int) and res.n_iter > 0, name
        assert res.error.shape == (2,) and bool((res.error >= 0).all()), name
        assert res.converged is True, name
        log = res.log
        assert isinstance(log, dict) and {"value", "n_iter", "err"} <= set(log), name
        assert log["value"] is res.value and log["n_iter"] == res.n_iter and log["err"] is res.error, name


def test_the_attributes_read_what_each_solver_documents():
    res = _solve_all()
    sns = res["sinkhorn_newton_sparse"]
    assert sns.n_iter == sns.log["iterations"] == sns.log["sinkhorn_iters"] + sns.log["newton_iters"]
    assert sns.converged == bool(sns.log["converged"].all()) and bool((sns.error <= sns.log["tol"]).all())
    sparse = res["sparsity_constrained_ot"]
    assert sparse.error.max().item() == sparse.log["max_grad"]
    assert torch.equal(sparse.log["converged"], sparse.error <= sparse.log["tol"])
    sk = res["sinkhorn"]
    assert sk.log["eps"] == sk.eps == 0.1
    # a batch entry that has not reached tol makes converged False
    C, a, b, _, _ = _problem()
    capped = sinkhorn_newton_sparse(C, a, b, 1e-3, sinkhorn_iters=3, newton_iters=0)
    assert not capped.converged and not bool(capped.log["converged"].all())


def test_the_existing_shapes_of_the_results_are_kept():
    """Only additions: the NamedTuples unpack and index as before, the dataclass keeps its fields."""
    res = _solve_all()
    sns, sparse, sk = res["sinkhorn_newton_sparse"], res["sparsity_constrained_ot"], res["sinkhorn"]
    assert SNSResult._fields == ("f", "g", "plan", "log") and isinstance(sns, tuple)
    f, g, plan, log = sns
    assert f is sns.f is sns[0] and g is sns[1] and plan is None and log is sns[-1]
    assert SparseOTResult._fields == ("plan", "alpha", "beta", "log") and len(sparse) == 4
    plan, alpha, beta, log = sparse
    assert plan is sparse.plan and alpha is sparse[1] and beta is None and log is sparse.log
    assert sns._replace(plan=None).log is sns.log and type(sns._replace(plan=None)) is SNSResult
    assert not hasattr(sns, "__dict__")  # still a plain tuple underneath
    assert [fld.name for fld in dataclasses.fields(SinkhornResult)] == \
        ["value", "f", "g", "n_iter", "error", "converged", "eps", "_problem", "_sol"]
    assert sk.plan().shape == (2, 7, 5)


# -- one set of argument checks ------------------------------------------------------------------------
def _calls(**override):
    """Every OT entry point on valid inputs, with ``override`` applied to the weight ``a`` / point ``x``."""
    C, a, b, x, y = _problem(B=1)
    C, a, b, x, y = C[0], a[0], b[0], x[0], y[0]
    a = override.get("a", a)
    x = override.get("x", x)
    return {
        "sinkhorn": lambda: sinkhorn(x, y, a, b, eps=0.1),
        "sinkhorn_newton_sparse": lambda: sinkhorn_newton_sparse(C, a, b, 0.1),
        "sparsity_constrained_ot": lambda: sparsity_constrained_ot(C, a, b, k=3),
        "sliced_wasserstein": lambda: sliced_wasserstein(x, y, a, b, n_projections=3, seed=0),
        "max_sliced_wasserstein": lambda: max_sliced_wasserstein(x, y, a, b, n_iter=1, seed=0),
    }


@pytest.mark.parametrize("case,weights,message", [
    ("negative", torch.tensor([0.3, -0.1, 0.3, 0.3, 0.1, 0.05, 0.05], dtype=torch.float64),
     "a has negative weights"),
    ("nan", torch.tensor([0.3, float("nan"), 0.3, 0.3, 0.1, 0.05, 0.05], dtype=torch.float64),
     "a has non-finite weights"),
])
def test_one_message_per_bad_weight_naming_the_function(case, weights, message):
    for fn, call in _calls(a=weights).items():
        expected = "a has weights <= 0" if fn == "sparsity_constrained_ot" and case == "negative" else message
        with pytest.raises(ValueError, match=rf"^{fn}: {expected}"):
            call()


def test_wrong_types_are_type_and_value_errors_everywhere():
    for bad, key in (([0.5] * 7, "a"), (torch.ones(7, dtype=torch.int64), "a"), ("points", "x")):
        for fn, call in _calls(**{key: bad}).items():
            if key == "x" and fn in ("sinkhorn_newton_sparse", "sparsity_constrained_ot"):
                continue  # (they take a cost, not points)
            with pytest.raises(TypeError, match=rf"^{fn}: {key} must be") as info:
                call()
            assert isinstance(info.value, ValueError)


def test_numbers_of_the_wrong_type_are_type_and_value_errors():
    C, a, b, x, y = _problem(B=1)
    for call, fn, name in ((lambda: sinkhorn(x, y, eps="0.1"), "sinkhorn", "eps"),
                           (lambda: sinkhorn_newton_sparse(C, eps=0.1, sinkhorn_iters=2.0), "sinkhorn_newton_sparse",
                            "sinkhorn_iters"),
                           (lambda: sparsity_constrained_ot(C, k=None), "sparsity_constrained_ot", "k"),
                           (lambda: sliced_wasserstein(x, y, seed=1.5), "sliced_wasserstein", "seed")):
        with pytest.raises(TypeError, match=rf"^{fn}: {name}") as info:
            call()
        assert isinstance(info.value, ValueError)
    with pytest.raises(ValueError, match="^sinkhorn: eps must be") as info:  # a bad value is not a TypeError
        sinkhorn(x, y, eps=0.0)
    assert not isinstance(info.value, TypeError)


def test_weights_on_another_device_name_the_function():
    for fn, call in _calls(a=torch.ones(7, dtype=torch.float64, device="meta") / 7).items():
        with pytest.raises(ValueError, match=rf"^{fn}: a is on meta but"):
            call()


def test_shared_number_checks():
    C, a, b, x, y = _problem(B=1)
    for call, fn, name in ((lambda: sinkhorn(x, y, eps=-1.0), "sinkhorn", "eps"),
                           (lambda: sinkhorn_newton_sparse(C, eps=float("nan")), "sinkhorn_newton_sparse", "eps"),
                           (lambda: sparsity_constrained_ot(C, k=2, reg=0.0), "sparsity_constrained_ot", "reg"),
                           (lambda: sliced_wasserstein(x, y, p=0.5), "sliced_wasserstein", "p")):
        with pytest.raises(ValueError, match=rf"^{fn}: {name} must be a finite number"):
            call()
    for call, fn, name in ((lambda: sinkhorn(x, y, eps=1.0, n_iter=0), "sinkhorn", "n_iter"),
                           (lambda: sinkhorn_newton_sparse(C, eps=0.1, newton_iters=1.5), "sinkhorn_newton_sparse",
                            "newton_iters"),
                           (lambda: wasserstein_1d(x[0, :, 0], y[0, :, 0], p=1.0, dim=True), "wasserstein_1d", "dim")):
        with pytest.raises(ValueError, match=rf"^{fn}: {name} must be an integer"):
            call()


# -- one backend resolver: the Sinkhorn stage of SNS runs on the "ot" kernels -----------------------
def test_sns_backend_errors_come_from_the_resolver():
    C, a, b, _, _ = _problem()
    with pytest.raises(fastopt.BackendUnavailableError, match="sinkhorn_newton_sparse: no 'cuda' kernel"):
        sinkhorn_newton_sparse(C.float(), a.float(), b.float(), 0.1, backend="cuda")
    if HAS_CPU_KERNELS:  # float64 whose costs against eps float32 cannot take (stage 1 runs in float32)
        with pytest.raises(fastopt.BackendUnavailableError, match="sinkhorn_newton_sparse: .*float32"):
            sinkhorn_newton_sparse(C, a, b, 1e-7, backend="cpu")
    with pytest.raises(ValueError, match="unknown backend"):
        sinkhorn_newton_sparse(C, a, b, 0.1, backend="gpu")


@pytest.mark.skipif(not HAS_CPU_KERNELS, reason="needs fastopt._C")
def test_sns_sinkhorn_stage_runs_on_the_kernels_for_float32(monkeypatch):
    calls = []
    real = _ops.ot_softmin
    monkeypatch.setattr(_ops, "ot_softmin", lambda *args: (calls.append(args[-1]), real(*args))[1])
    C, a, b, _, _ = _problem(n=30, m=25)
    eps = 0.02
    r64 = sinkhorn_newton_sparse(C, a, b, eps, return_plan=True)
    assert set(calls) == {"cpu"} and r64.log["sinkhorn_backend"] == "cpu/float32"  # float64: stage 1 in float32
    calls.clear()
    r32 = sinkhorn_newton_sparse(C.float(), a.float(), b.float(), eps, return_plan=True)
    assert calls and set(calls) == {"cpu"} and r32.log["sinkhorn_iters"] > 0
    calls.clear()
    t32 = sinkhorn_newton_sparse(C.float(), a.float(), b.float(), eps, return_plan=True, backend="torch")
    assert calls == []
    for res in (r32, t32):
        assert res.converged and res.f.dtype == torch.float32
        assert float((res.plan.double() - r64.plan).abs().max()) < 1e-4
