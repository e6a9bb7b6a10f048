"""Partial and semi-relaxed OT benchmark suite.

``ot-partial``: a fixed number of iterations (``tol=0``: every method runs the same iterations) between
two point clouds of n points in d = 3 (standard normal, the second shifted by 0.5), uniform weights:

* ``partial-...`` configs, entropic partial OT (mass 0.7, eps 0.5):

  * ``fastopt-<backend>``: :func:`fastopt.ot.partial_wasserstein` on the points (online kernels, fp32;
    the result includes the value, ``<P, C>`` and the gradient passes);
  * ``fastopt-<backend>-dense``: the same on the precomputed fp32 cost matrix;
  * ``pot-partial-sinkhorn_log`` (the baseline): POT's
    ``ot.partial.entropic_partial_wasserstein(a, b, M, reg, m, method="sinkhorn_log")`` on the
    float64 numpy cost (POT's log-domain solver; numpy has no fp32 path here, so POT runs in fp64 and
    fastopt in fp32: the plans agree to the fp32 rounding, see tests/test_ot_partial.py);
  * ``pot-partial-sinkhorn``: the same function with its default ``method="sinkhorn"``, whose
    projections are dense ``diag(.) @ K`` products (O(n^3) per iteration): only at n = 1000.

* ``semi-...`` configs, semi-relaxed OT (``a`` exact, ``rho_b = 1``, eps 0.5):

  * ``fastopt-<backend>`` / ``-dense``: :func:`fastopt.ot.sinkhorn` with ``rho=(inf, 1.0)``;
  * ``pot-unbalanced-sinkhorn`` (the baseline of these configs): POT's
    ``ot.unbalanced.sinkhorn_unbalanced(a, b, M, reg, reg_m=(inf, 1.0))`` (its default multiplicative
    Sinkhorn: two dense float64 matrix-vector products per iteration, exponent 1 for the infinite side).

Rows report ms per call (``items`` = iterations).  Bars (CPU): ``fastopt-cpu`` >= 5x the POT baseline
of its config at n = 4000.
"""
import math
from dataclasses import dataclass

import torch

from .harness import Bar, Case, Suite, Unsupported, Workload, fastopt_backend, register, speedup_key

BASELINE = "pot-partial-sinkhorn_log"
POT_DEFAULT = "pot-partial-sinkhorn"
SEMI_BASELINE = "pot-unbalanced-sinkhorn"
EPS = 0.5
MASS = 0.7
RHO_B = 1.0


@dataclass(frozen=True)
class Config:
    kind: str  # "partial" or "semi"
    n: int
    iters: int
    d: int = 3

    @property
    def name(self):
        return f"{self.kind}-n{self.n}-d{self.d}-{self.iters}it"


P_CPU = Config("partial", 4000, 5)
P_CPU_SMALL = Config("partial", 1000, 10)
S_CPU = Config("semi", 4000, 100)
QUICK = [Config("partial", 200, 3), Config("semi", 200, 5)]


def _points(config, device):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(config.n, config.d, generator=gen)
    y = torch.randn(config.n, config.d, generator=gen) + 0.5
    return x.to(device), y.to(device)


def _fastopt(config, method, x, y):
    from fastopt.ot import partial_wasserstein, sinkhorn

    rest = method[len("fastopt-"):]
    dense = rest.endswith("-dense")
    backend = rest[:-len("-dense")] if dense else rest
    if backend != "torch":
        backend = fastopt_backend("fastopt-" + backend, x.device)
    kw = dict(eps=EPS, n_iter=config.iters, tol=0.0, backend=backend)
    if config.kind == "partial":
        kw["mass"] = MASS
        solve = partial_wasserstein
    else:
        kw["rho"] = (math.inf, RHO_B)
        solve = sinkhorn
    if dense:
        C = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
        return Workload(fn=lambda: solve(cost_matrix=C, **kw), state_bytes=lambda: C.numel() * C.element_size())
    return Workload(fn=lambda: solve(x, y, **kw))


def setup(config, method, device):
    x, y = _points(config, device)
    if method.startswith("fastopt-"):
        return _fastopt(config, method, x, y)
    try:
        import numpy as np
        import ot
    except ImportError as e:
        raise Unsupported("POT is not installed") from e
    if device.type != "cpu":
        raise Unsupported("POT's numpy backend runs on the CPU")
    M = ot.dist(x.double().numpy(), y.double().numpy())
    a = np.full(config.n, 1.0 / config.n)
    if method == SEMI_BASELINE:
        return Workload(fn=lambda: ot.unbalanced.sinkhorn_unbalanced(a, a, M, EPS, (math.inf, RHO_B),
                                                                     numItermax=config.iters, stopThr=0.0))
    if method == POT_DEFAULT and config.n > 2000:
        raise Unsupported("POT's default method multiplies by dense n x n diagonal matrices (O(n^3) per "
                          "iteration: about 20 s per iteration at n = 4000 here)")
    how = "sinkhorn_log" if method == BASELINE else "sinkhorn"
    return Workload(fn=lambda: ot.partial.entropic_partial_wasserstein(a, a, M, EPS, m=MASS, method=how,
                                                                       numItermax=config.iters, stopThr=0.0))


def _methods(config, device):
    from fastopt._backend import available_backends

    kernels = [b for b in available_backends(device) if b not in ("torch", "cuda")]
    methods = [f"fastopt-{b}" for b in kernels] + [f"fastopt-{b}-dense" for b in kernels]
    if config.kind == "partial":
        return methods + [BASELINE, POT_DEFAULT]
    return methods + [SEMI_BASELINE]


def cases(ctx):
    configs = QUICK if ctx.quick else [P_CPU, P_CPU_SMALL, S_CPU]
    return [Case(config=c.name, method=m, items=c.iters, bytes_moved=2 * c.iters * 2 * c.n * (c.d * 4 + 4),
                 setup=lambda c=c, m=m: setup(c, m, ctx.device),
                 info={"n": c.n, "d": c.d, "eps": EPS, "mass": MASS if c.kind == "partial" else None,
                       "rho": f"(inf, {RHO_B})" if c.kind == "semi" else None})
            for c in configs for m in _methods(c, ctx.device)]


def bars(ctx):
    if ctx.quick or ctx.device.type == "cuda":
        return []
    return [Bar(P_CPU.name, "fastopt-cpu", SUITE.speedup_key, 5.0),
            Bar(S_CPU.name, "fastopt-cpu", speedup_key(SEMI_BASELINE), 5.0)]


SUITE = register(Suite(name="ot-partial", cases=cases, unit="iterations", baseline=BASELINE, bars=bars,
                       other_baselines=(POT_DEFAULT, SEMI_BASELINE), memory_bound=False,
                       what="a fixed number of partial / semi-relaxed OT iterations"))
