"""The LightSB benchmark suite (``lightsb``): the Light Schrödinger Bridge training loss
``mean log c(x) - mean log v(y)`` and its backward (:class:`fastopt.ot.LightSB`, Korotin et al., ICLR 2024).

One call = ``loss(x, y).backward()`` on fixed batches x, y of ``batch`` rows each (gradients reset to None
first): every parameter's gradient (and none for x, y).

- ``official-torch``: the official formulas (``backend="torch"``, :mod:`fastopt.reference.lightsb`: the
  broadcasts of github.com/ngushchin/LightSB ``src/light_sb.py``, autograd through them); the baseline;
- ``fastopt-<backend>``: the fused passes (one per side, the gradients in the same pass).

Bar: the fused CPU kernel is at least 3x the official formulas on the diagonal configuration (K = 64, d = 16,
batch 4096), the issue's target.
"""
from dataclasses import dataclass

import torch

from .harness import Bar, Case, Suite, Unsupported, Workload, fastopt_backend, register

BASELINE = "official-torch"
TARGET = 3.0


@dataclass(frozen=True)
class Config:
    name: str
    k: int
    d: int
    batch: int
    diagonal: bool


CONFIGS = [Config("diag-K64-d16-b4096", 64, 16, 4096, True), Config("full-K64-d16-b4096", 64, 16, 4096, False)]
QUICK = [Config("diag-K8-d4-b256", 8, 4, 256, True), Config("full-K8-d4-b256", 8, 4, 256, False)]


def setup(cfg, method, device):
    from fastopt.ot import LightSB

    if method == BASELINE:
        backend = "torch"
    elif method.startswith("fastopt-"):
        backend = fastopt_backend(method, device)
    else:
        raise Unsupported(f"unknown method {method!r}")
    torch.manual_seed(0)
    sb = LightSB(cfg.d, cfg.k, 0.1, is_diagonal=cfg.diagonal, backend=backend).to(device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(cfg.batch, cfg.d, generator=g).to(device)
    y = (torch.randn(cfg.batch, cfg.d, generator=g) * 0.5 + 1.0).to(device)
    sb.init_r_by_samples(y[:cfg.k].clone())
    params = list(sb.parameters())

    def step():
        for p in params:
            p.grad = None
        sb.loss(x, y).backward()
    return Workload(fn=step)


def _methods(device):
    from fastopt._backend import CAPABILITIES, available_backends

    kernels = CAPABILITIES["lightsb"].kernels
    return [BASELINE] + [f"fastopt-{b}" for b in available_backends(device) if b in kernels
                         and not (b == "triton" and device.type == "cpu")]


def _cases(ctx):
    cfgs = QUICK if ctx.quick else CONFIGS
    return [Case(config=c.name, method=m, items=2 * c.batch, bytes_moved=0,
                 setup=lambda c=c, m=m: setup(c, m, ctx.device),
                 info={"K": c.k, "d": c.d, "batch": c.batch, "diagonal": c.diagonal})
            for c in cfgs for m in _methods(ctx.device)]


def _bars(ctx):
    return [Bar(CONFIGS[0].name, "fastopt-cpu", SUITE.speedup_key, TARGET)] if ctx.device.type == "cpu" else []


SUITE = register(Suite(name="lightsb", cases=_cases, unit="rows", baseline=BASELINE, bars=_bars, memory_bound=False,
                       what="loss(x, y).backward() (rows: x and y together)"))
