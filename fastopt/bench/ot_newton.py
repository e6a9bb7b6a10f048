"""Sinkhorn–Newton–Sparse benchmark suite.

``sinkhorn-newton``: the wall time of one entropic OT solve, run until the marginal error
``sqrt(|P1 - a|^2 + |P^T1 - b|^2)`` is at most ``1e-8`` (float64), on two random point clouds (uniform in
the unit square, squared Euclidean cost, uniform weights; n = m = 500, ``--quick``: 100), by

* ``fastopt-sns``: :func:`fastopt.ot.newton.sinkhorn_newton_sparse` (Sinkhorn warm start, then sparse
  Newton steps; default sparsity), ``tol=1e-8``, ``backend="auto"``: the Sinkhorn stage on the float32
  kernels (``info``'s ``stage1``), Newton in float64;
* ``fastopt-sns-torch``: the same with ``backend="torch"`` (the Sinkhorn stage on the float64 torch
  reference: what ``fastopt-sns`` ran before its stage moved to the kernels);
* ``fastopt-sns-points``: the same solve on the points (``x=``, ``y=``: the online problem, no n x m
  tensor except the returned plan; the Newton passes go by row blocks);
* ``fastopt-sinkhorn``: :func:`fastopt.ot.sinkhorn` on the cost matrix (``backend="auto"``: the fastest
  Sinkhorn kernel built for the device), ``tol=1e-8``;
* ``torch-sinkhorn-log`` (the baseline): :func:`fastopt.reference.ot.sinkhorn_reference`, the pure-PyTorch
  log-domain Sinkhorn, ``tol=1e-8`` (checked every 10 iterations);
* ``pot-sinkhorn-log``: POT's ``ot.sinkhorn(a, b, C, eps, method="sinkhorn_log", stopThr=1e-8)`` on the same
  torch tensors (POT's torch backend; its criterion ``|P^T1 - b|_2``, checked every 10 iterations, is the
  same marginal error since its rows are exact after each iteration).

Each row's info gives ``eps``, the iterations the method needed (``iters``; for SNS Sinkhorn + Newton
iterations, with ``newton`` and ``cg``, the conjugate-gradient products on the sparse Hessian, beside it, and
``stage1``, what ran the Sinkhorn stage) and the final marginal error (``err``), all from one solve done when
the cases are listed. One call is a whole solve, so ``items`` is 1 (unit "solves") and ``bytes_per_call`` is
the cost matrix read once: the GB/s column is not a bandwidth here. Two regularizations: ``eps = 0.01`` (a
plan spread over ~15 neighbours per point; Sinkhorn needs a few hundred iterations) and ``eps = 0.002``
(sharper plan, slower Sinkhorn: the regime SNS is designed for).
"""
from dataclasses import dataclass
from functools import lru_cache

import torch

from .harness import Case, Suite, Unsupported, Workload, register

TOL = 1e-8
MAX_ITER = 100_000
BASELINE = "torch-sinkhorn-log"
METHODS = ("fastopt-sns", "fastopt-sns-torch", "fastopt-sns-points", "fastopt-sinkhorn", BASELINE, "pot-sinkhorn-log")


@dataclass(frozen=True)
class Config:
    n: int
    eps: float
    seed: int = 0

    @property
    def name(self):
        return f"n{self.n}-eps{self.eps:g}-f64"


CONFIGS = (Config(500, 0.01), Config(500, 0.002))
CONFIGS_QUICK = (Config(100, 0.01),)


def make_points(config, device):
    """The two clouds (n, 2), float64, on ``device``."""
    g = torch.Generator().manual_seed(config.seed)
    x = torch.rand(config.n, 2, generator=g, dtype=torch.float64)
    y = torch.rand(config.n, 2, generator=g, dtype=torch.float64)
    return x.to(device), y.to(device)


def make_problem(config, device):
    """Cost (n, n) and uniform weights, float64, on ``device`` (the same for every method)."""
    from fastopt.reference.ot import sqeuclidean_cost

    x, y = make_points(config, "cpu")
    C = sqeuclidean_cost(x, y).to(device)
    a = torch.full((config.n,), 1.0 / config.n, dtype=torch.float64, device=device)
    return C, a, a.clone()


def _pot():
    try:
        import ot
    except ImportError as e:
        raise Unsupported("POT is not installed") from e
    return ot


def solver(method, C, a, b, eps, points=None):
    """A function that runs one solve of ``method`` and returns ``(plan, info)`` (``points``: the clouds
    ``(x, y)`` behind ``C``, for ``fastopt-sns-points``)."""
    if method.startswith("fastopt-sns"):
        from fastopt.ot.newton import sinkhorn_newton_sparse

        if method == "fastopt-sns-points" and points is None:
            raise Unsupported("fastopt-sns-points needs the points")
        problem = dict(x=points[0], y=points[1]) if method == "fastopt-sns-points" else dict(C=C)
        backend = "torch" if method == "fastopt-sns-torch" else "auto"

        def run():
            res = sinkhorn_newton_sparse(a=a, b=b, eps=eps, tol=TOL, return_plan=True, backend=backend, **problem)
            log = res.log
            return res.plan, {"iters": log["iterations"], "newton": log["newton_iters"], "cg": log["cg_iters_total"],
                              "stage1": log["sinkhorn_backend"]}
        return run
    if method == "fastopt-sinkhorn":
        from fastopt.ot import sinkhorn

        def run():
            res = sinkhorn(a=a, b=b, cost_matrix=C, eps=eps, tol=TOL, n_iter=MAX_ITER)
            f, g = res.f.reshape(-1), res.g.reshape(-1)
            plan = (a.log()[:, None] + b.log()[None, :] + (f[:, None] + g[None, :] - C) / eps).exp()
            return plan, {"iters": int(res.n_iter)}
        return run
    if method == BASELINE:
        from fastopt.reference.ot import sinkhorn_reference

        log_a, log_b = a.log(), b.log()

        def run():
            f, g, it, _ = sinkhorn_reference(C, log_a, log_b, eps, n_iter=MAX_ITER, tol=TOL, check_every=10)
            plan = (log_a[:, None] + log_b[None, :] + (f[:, None] + g[None, :] - C) / eps).exp()
            return plan, {"iters": it}
        return run
    if method == "pot-sinkhorn-log":
        ot = _pot()

        def run():
            plan, log = ot.sinkhorn(a, b, C, eps, method="sinkhorn_log", stopThr=TOL, numItermax=MAX_ITER, log=True)
            return plan, {"iters": int(log["niter"])}
        return run
    raise Unsupported(method)


def marginal_error(plan, a, b):
    return float(((plan.sum(1) - a).square().sum() + (plan.sum(0) - b).square().sum()).sqrt())


@lru_cache(maxsize=None)
def _info(config, method, device):
    """Iterations and final error of one solve (listed in the row)."""
    C, a, b = make_problem(config, device)
    try:
        plan, info = solver(method, C, a, b, config.eps, make_points(config, device))()
    except Unsupported:
        return {}
    return {**info, "err": f"{marginal_error(plan, a, b):.1e}"}


def sns_setup(config, method, device):
    C, a, b = make_problem(config, device)
    return Workload(fn=solver(method, C, a, b, config.eps, make_points(config, device)))


def sns_cases(ctx):
    configs = CONFIGS_QUICK if ctx.quick else CONFIGS
    device = str(ctx.device)
    cases = []
    for c in configs:
        for m in METHODS:
            info = {"eps": c.eps, "tol": TOL, "iters": "-", "newton": "-", "cg": "-", "stage1": "-", "err": "-"}
            info.update(_info(c, m, device))
            cases.append(Case(config=c.name, method=m, items=1, bytes_moved=c.n * c.n * 8,
                              setup=lambda c=c, m=m: sns_setup(c, m, ctx.device), info=info))
    return cases


SNS_SUITE = register(Suite(name="sinkhorn-newton", cases=sns_cases, unit="solves", baseline=BASELINE,
                           other_baselines=("pot-sinkhorn-log",), memory_bound=False,
                           what="one solve to the tolerance"))
