"""Sinkhorn benchmark suite.

``sinkhorn``: a fixed number of log-domain Sinkhorn iterations (``tol=0``: every method runs the
same iterations) between two point clouds of n points in d = 3, uniform weights, eps = 0.5:

* ``fastopt-<backend>``: :func:`fastopt.ot.sinkhorn` on the points (the online kernels: the cost is
  computed tile by tile, never stored);
* ``fastopt-<backend>-dense``: the same on the precomputed cost matrix (``cost_matrix=``);
* ``pot-sinkhorn_log`` (the baseline): POT's ``ot.sinkhorn(method="sinkhorn_log")`` on the
  precomputed float64 numpy cost matrix (POT's default use);
* ``pot-sinkhorn_log-torch``: the same POT function on float32 torch tensors (POT's torch backend);
* ``geomloss-online`` (CUDA, needs pykeops): geomloss' own KeOps soft-C-transform
  (``softmin_online_lazytensor``, the kernel of its ``backend="online"``), two per iteration (f from
  g, then g from f: the passes of fastopt's iteration), on geomloss' cost ``|x - y|^2 / 2`` with
  ``eps / 2`` (the same Gibbs kernel).  geomloss' ``SamplesLoss`` itself anneals eps and
  extrapolates, so it has no fixed iteration count: this times its kernel in the same loop instead;
* ``geomloss-tensorized``: the same loop on geomloss' dense ``softmin_tensorized`` over the
  precomputed cost (its ``backend="tensorized"``).

Rows report ms per iteration (``items`` = iterations) and, for the online kernels, the pairs of points
per second.  Bars: on CPU ``fastopt-cpu`` >= 5x ``pot-sinkhorn_log`` at n = 4000; on CUDA
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
    if method.startswith("geomloss-"):
        return _geomloss_setup(config, method, x, y)
    raise Unsupported(method)


def _geomloss_setup(config, method, x, y):
    try:
        from geomloss._legacy import sinkhorn_samples as gs
    except ImportError as e:
        raise Unsupported(f"geomloss (0.3.x) is not installed ({e})") from e
    eps = EPS / 2  # geomloss' cost is |x - y|^2 / 2
    xb, yb = x[None].contiguous(), y[None].contiguous()
    log_w = torch.full((1, config.n), -float(torch.tensor(config.n).log()), device=x.device)
    if method == "geomloss-online":
        try:
            import pykeops  # noqa: F401
        except ImportError as e:
            raise Unsupported(f"geomloss' online backend needs pykeops ({e})") from e
        softmin, cxy, cyx = gs.softmin_online_lazytensor, (xb, yb), (yb, xb)
    elif method == "geomloss-tensorized":
        if config.n > 20_000:
            raise Unsupported("the dense cost matrix does not fit")
        cxy = ((xb[:, :, None, :] - yb[:, None, :, :]) ** 2).sum(-1) / 2
        softmin, cyx = gs.softmin_tensorized, cxy.transpose(1, 2).contiguous()
    else:
        raise Unsupported(method)

    def run():
        f = torch.zeros_like(log_w)
        g = torch.zeros_like(log_w)
        for _ in range(config.iters):
            f = softmin(eps, cxy, log_w + g / eps)
            g = softmin(eps, cyx, log_w + f / eps)
        return f, g
    return Workload(fn=run)


def _methods(device):
    from fastopt._backend import available_backends

    kernels = [b for b in available_backends(device) if b not in ("torch", "cuda")]
    methods = [f"fastopt-{b}" for b in kernels] + [f"fastopt-{b}-dense" for b in kernels]
    methods += ["fastopt-torch-dense", BASELINE, "pot-sinkhorn_log-torch", "geomloss-tensorized"]
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
                       other_baselines=("geomloss-online", "geomloss-tensorized"), memory_bound=False,
                       what="a fixed number of Sinkhorn iterations"))
