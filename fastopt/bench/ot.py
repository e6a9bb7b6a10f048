"""Sinkhorn benchmark suite.

``sinkhorn``: a fixed number of log-domain Sinkhorn iterations (``tol=0``: every method runs the
same iterations) between two point clouds of n points in d = 3, uniform weights, eps = 0.5:

* ``fastopt-<backend>``: :func:`fastopt.ot.sinkhorn` on the points (the online kernels: the cost is
  computed tile by tile, never stored);
* ``fastopt-<backend>-dense``: the same on the precomputed cost matrix (``cost_matrix=``);
* ``pot-sinkhorn_log`` (the baseline): POT's ``ot.sinkhorn(method="sinkhorn_log")`` on the
  precomputed float64 numpy cost matrix (POT's default use);
* ``pot-sinkhorn_log-torch``: the same POT function on float32 torch tensors (POT's torch backend);
* ``geomloss-online`` (CUDA): geomloss' KeOps ``online`` Sinkhorn loop (needs pykeops).

Rows report ms per iteration (``items`` = iterations) and, for the online kernels, the pairs of points
per second.  Bars (issue 6): on CPU ``fastopt-cpu`` >= 5x ``pot-sinkhorn_log`` at n = 4000; on CUDA
``fastopt-triton`` >= 2x geomloss/KeOps per iteration at n = m = 100k.
"""
from dataclasses import dataclass

import torch

from .harness import Bar, Case, Suite, Unsupported, Workload, register, speedup_key

BASELINE = "pot-sinkhorn_log"
EPS = 0.5


@dataclass(frozen=True)
class Config:
    n: int
    iters: int
    d: int = 3

    @property
    def name(self):
        return f"n{self.n}-d{self.d}-{self.iters}it"


C_CPU = Config(4000, 20)
C_CPU_QUICK = Config(300, 5)
C_CUDA = Config(100_000, 20)
C_CUDA_QUICK = Config(4096, 10)


def _points(config, device):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(config.n, config.d, generator=gen)
    y = torch.randn(config.n, config.d, generator=gen) + 0.5
    return x.to(device), y.to(device)


def setup(config, method, device):
    from fastopt.ot import sinkhorn

    x, y = _points(config, device)
    if method.startswith("fastopt-"):
        rest = method[len("fastopt-"):]
        backend, dense = (rest[:-len("-dense")], True) if rest.endswith("-dense") else (rest, False)
        if dense:
            if config.n > 20_000:
                raise Unsupported("the dense cost matrix does not fit")
            C = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
            return Workload(fn=lambda: sinkhorn(cost_matrix=C, eps=EPS, n_iter=config.iters, tol=0.0, backend=backend),
                            state_bytes=lambda: C.numel() * C.element_size())
        return Workload(fn=lambda: sinkhorn(x, y, eps=EPS, n_iter=config.iters, tol=0.0, backend=backend))
    if method.startswith("pot-"):
        try:
            import ot
        except ImportError as e:
            raise Unsupported("POT is not installed") from e
        if config.n > 20_000:
            raise Unsupported("POT needs the dense cost matrix, which does not fit")
        if method == BASELINE:
            if device.type != "cpu":
                raise Unsupported("POT's numpy backend runs on the CPU")
            import numpy as np
            M = ot.dist(x.double().cpu().numpy(), y.double().cpu().numpy())
            a = np.full(config.n, 1.0 / config.n)
            return Workload(fn=lambda: ot.sinkhorn(a, a, M, EPS, method="sinkhorn_log", numItermax=config.iters,
                                                   stopThr=0.0, warn=False))
        M = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
        a = torch.full((config.n,), 1.0 / config.n, device=device)
        return Workload(fn=lambda: ot.sinkhorn(a, a, M, EPS, method="sinkhorn_log", numItermax=config.iters,
                                               stopThr=0.0, warn=False))
    if method == "geomloss-online":
        try:
            import geomloss  # noqa: F401
            import pykeops  # noqa: F401
        except ImportError as e:
            raise Unsupported(f"geomloss' online backend needs pykeops ({e})") from e
        raise Unsupported("geomloss' online loop is not wired to a fixed iteration count yet")
    raise Unsupported(method)


def _methods(device):
    from fastopt._backend import available_backends

    kernels = [b for b in available_backends(device) if b not in ("torch", "cuda")]
    methods = [f"fastopt-{b}" for b in kernels] + [f"fastopt-{b}-dense" for b in kernels]
    methods += ["fastopt-torch-dense", BASELINE, "pot-sinkhorn_log-torch"]
    if device.type == "cuda":
        methods.append("geomloss-online")
    return methods


def cases(ctx):
    if ctx.device.type == "cuda":
        configs = [C_CUDA_QUICK] if ctx.quick else [C_CUDA_QUICK, C_CUDA]
    else:
        configs = [C_CPU_QUICK] if ctx.quick else [C_CPU]
    return [Case(config=c.name, method=m, items=c.iters, bytes_moved=2 * c.iters * 2 * c.n * (c.d * 4 + 4),
                 setup=lambda c=c, m=m: setup(c, m, ctx.device), info={"n": c.n, "d": c.d, "eps": EPS})
            for c in configs for m in _methods(ctx.device)]


def bars(ctx):
    if ctx.quick:
        return []
    if ctx.device.type == "cuda":
        return [Bar(C_CUDA.name, "fastopt-triton", speedup_key("geomloss-online"), 2.0)]
    return [Bar(C_CPU.name, "fastopt-cpu", SUITE.speedup_key, 5.0)]


SUITE = register(Suite(name="sinkhorn", cases=cases, unit="iterations", baseline=BASELINE, bars=bars,
                       other_baselines=("geomloss-online",)))
