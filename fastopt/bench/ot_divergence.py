"""Sinkhorn divergence benchmark suite.

``sinkhorn-divergence``: one debiased Sinkhorn divergence ``OT(x, y) - OT(x, x) / 2 - OT(y, y) / 2``
between two point clouds of n points in d = 3 (uniform weights, squared Euclidean cost), every solve run
to the same marginal error ``tol`` (``|P^T 1 - b|_2``, POT's stopping criterion; checked every
iteration), by

* ``fastopt-<backend>-symmetric``: :func:`fastopt.ot.sinkhorn_divergence` (``symmetric=True``: the
  debiasing terms by the relaxed symmetric update, one soft-minimum pass per iteration);
* ``fastopt-<backend>-plain``: the same with ``symmetric=False`` (three plain Sinkhorn solves).

(POT's three ``sinkhorn_log`` solves at n = 4000 take minutes: the per-iteration speed against POT is the
``sinkhorn`` suite's.)  The time columns compare the symmetric method with the plain one.

The target is the work, not the time: each row's info gives ``passes`` (soft-minimum passes over the
n x m costs, the unit of work of both solvers: a plain Sinkhorn iteration is two, a symmetric one one),
``iters`` (the passes in plain-iteration units, ``passes / 2``), the three solves' counts and
``iter_gain`` = the plain method's passes / this method's (bar: the symmetric divergence needs at most 0.6x
the passes of three plain solves, ``iter_gain >= 1 / 0.6``).  Counts come from one run done when the cases
are listed; the divergences of the methods are compared there too (``value``).
"""
from dataclasses import dataclass
from functools import lru_cache

import torch

from .harness import Bar, Case, Suite, Unsupported, Workload, register

BASELINE = "fastopt-cpu-plain"


@dataclass(frozen=True)
class Config:
    n: int
    eps: float
    tol: float
    d: int = 3

    @property
    def name(self):
        return f"n{self.n}-d{self.d}-eps{self.eps:g}-tol{self.tol:g}"


C_CPU = Config(4000, 0.05, 1e-8)
C_CPU_QUICK = Config(300, 0.1, 1e-6)
C_CUDA = Config(20_000, 0.05, 1e-8)


def _points(config, device):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(config.n, config.d, generator=gen)
    y = torch.rand(config.n, config.d, generator=gen) * 0.8 + 0.3
    return x.to(device), y.to(device)


def _fastopt(config, backend, symmetric, device):
    from fastopt.ot.sinkhorn import _divergence

    x, y = _points(config, device)
    kw = dict(tol=config.tol, n_iter=100_000, check_every=1, backend=backend)
    return lambda: _divergence(x, y, None, None, config.eps, "sqeuclidean", None, None, None, symmetric, kw)


@lru_cache(maxsize=None)
def _work(config, method, device_type):
    """One run's (divergence, counts): what the info columns show."""
    backend, kind = method[len("fastopt-"):].rsplit("-", 1)
    s, work = _fastopt(config, backend, kind == "symmetric", torch.device(device_type))()
    return float(s), work


def setup(config, method, device):
    if method.startswith("fastopt-"):
        backend, kind = method[len("fastopt-"):].rsplit("-", 1)
        return Workload(fn=_fastopt(config, backend, kind == "symmetric", device))
    raise Unsupported(method)


def _methods(device):
    from fastopt._backend import available_backends

    kernels = [b for b in available_backends(device) if b not in ("torch", "cuda")]
    if device.type == "cpu" and "triton" in kernels:
        kernels.remove("triton")  # (interpreted: not a measurement)
    return [f"fastopt-{b}-{k}" for b in kernels for k in ("symmetric", "plain")]


def _info(config, method, device, methods):
    info = {"n": config.n, "d": config.d, "eps": config.eps, "tol": config.tol}
    if not method.startswith("fastopt-"):
        return info
    try:
        value, work = _work(config, method, device.type)
        plain = method.rsplit("-", 1)[0] + "-plain"
        _, base = _work(config, plain, device.type) if plain in methods else (None, None)
    except Exception as e:  # (reported in the row by the timed run)
        return {**info, "count_error": f"{type(e).__name__}: {e}"}
    info.update({"value": value, "passes": work["passes"], "iters": work["passes"] / 2, "xy": work["xy"],
                 "xx": work["xx"], "yy": work["yy"],
                 "iter_gain": base["passes"] / work["passes"] if base else None})
    return info


def cases(ctx):
    if ctx.device.type == "cuda":
        configs = [C_CPU] if ctx.quick else [C_CPU, C_CUDA]
    else:
        configs = [C_CPU_QUICK] if ctx.quick else [C_CPU]
    out = []
    for c in configs:
        methods = _methods(ctx.device)
        for m in methods:
            out.append(Case(config=c.name, method=m, items=1, bytes_moved=0,
                            setup=lambda c=c, m=m: setup(c, m, ctx.device), info=_info(c, m, ctx.device, methods)))
    return out


def bars(ctx):
    if ctx.quick:
        return []
    kernel = "triton" if ctx.device.type == "cuda" else "cpu"
    return [Bar(C_CPU.name, f"fastopt-{kernel}-symmetric", "iter_gain", 1 / 0.6)]


SUITE = register(Suite(name="sinkhorn-divergence", cases=cases, unit="divergences", baseline=BASELINE, bars=bars,
                       other_baselines=("fastopt-triton-plain",),
                       memory_bound=False, what="one debiased Sinkhorn divergence, every solve to the same tol"))
