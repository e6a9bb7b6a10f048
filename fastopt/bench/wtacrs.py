"""The WTA-CRS benchmark suite (``wtacrs``): one forward + backward of a transformer-sized linear layer
(4096 tokens, 1024 -> 4096) as ``nn.Linear`` and as :class:`fastopt.nn.WTACRSLinear` at the paper's
default budget (0.3 of the rows), per fused backend.

One call = ``layer(x).backward(g)`` (the input needs a gradient, as inside a network).

- ``nn.Linear`` (the baseline);
- ``wtacrs-fastopt-<backend>``: the same with WTA-CRS (the row pass on that backend; ``torch``: the
  reference row pass).

Columns beside the times (``info``): ``saved_MB`` (the bytes saved for the backward that are not
parameters, measured with ``torch.autograd.graph.saved_tensors_hooks``, at the second step, i.e. with the
first step's output-gradient norms), ``saved_frac`` (that over ``nn.Linear``'s), and on every row the
weight-gradient error on a small model (a 2-layer MLP's last layer, heavy-tailed activations, 256 rows):
``relvar_wtacrs`` / ``relvar_crs`` / ``relvar_uniform`` = ``E||G_est - G||^2 / ||G||^2`` of WTA-CRS,
plain column-row sampling (the same probabilities, no winners) and uniform row sampling, at the same
budget (300 draws each).

Bar: saved activations at most 0.3 x nn.Linear's (``linear_over_saved = 1 / saved_frac >= 1 / 0.3``).
"""
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .harness import Bar, Case, Suite, Unsupported, Workload, fastopt_backend, register

BASELINE = "nn.Linear"
SAVED_LIMIT = 0.3


@dataclass(frozen=True)
class Config:
    tokens: int
    d_in: int
    d_out: int

    @property
    def name(self):
        return f"t{self.tokens}-{self.d_in}x{self.d_out}"


CONFIGS = [Config(4096, 1024, 4096)]
QUICK = [Config(512, 256, 512)]


def _layer(cfg, method, device):
    from fastopt.nn import WTACRSLinear

    torch.manual_seed(0)
    lin = torch.nn.Linear(cfg.d_in, cfg.d_out, device=device)
    if method == BASELINE:
        return lin
    backend = method.removeprefix("wtacrs-")
    if backend != "fastopt-torch":
        backend = fastopt_backend(backend, device)
    else:
        backend = "torch"
    return WTACRSLinear.from_linear(lin, seed=0, backend=backend)


def _inputs(cfg, device):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(cfg.tokens, cfg.d_in, generator=g).to(device).requires_grad_()
    dy = torch.randn(cfg.tokens, cfg.d_out, generator=g).to(device)
    return x, dy


def saved_bytes(module, x, dy):
    """Bytes of the distinct storages saved for backward that are not parameters (one forward + backward)."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = module(x)
    y.backward(dy)
    return sum(seen.values())


@functools.lru_cache(maxsize=None)
def gradient_error(budget=SAVED_LIMIT, draws=300):
    """``{"relvar_wtacrs", "relvar_crs", "relvar_uniform"}``: the relative mean squared error of the three
    estimators of a small model's last-layer weight gradient (module doc)."""
    from fastopt.reference import wtacrs as ref

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 6))
    x = torch.randn(256, 16) * torch.exp(torch.randn(256, 1))
    y = torch.randint(0, 6, (256,))
    h = model[1](model[0](x)).detach()
    hh = h.clone().requires_grad_()
    out = model[2](hh)
    dy, = torch.autograd.grad(F.cross_entropy(out, y), out)
    exact = dy.t() @ h
    k = ref.num_rows(256, budget)
    p = ref.probabilities(ref.row_scores(h, dy.norm(dim=1)))
    gen = torch.Generator().manual_seed(1)

    def relvar(p, winners):
        err = 0.0
        for _ in range(draws):
            idx, w = ref.select_rows(p, k, gen, winners)
            est = dy[idx].t() @ (h[idx] * w.float()[:, None])
            err += float(((est - exact) ** 2).sum())
        return err / draws / float((exact ** 2).sum())

    return {"relvar_wtacrs": relvar(p, True), "relvar_crs": relvar(p, False),
            "relvar_uniform": relvar(torch.full((256,), 1 / 256, dtype=torch.float64), False)}


def setup(cfg, method, device):
    layer = _layer(cfg, method, device)
    x, dy = _inputs(cfg, device)

    def step():
        x.grad = None
        layer.zero_grad(set_to_none=True)
        layer(x).backward(dy)
    return Workload(fn=step)


@functools.lru_cache(maxsize=None)
def _saved(cfg, method, device_str):
    """(saved bytes of ``method`` at its second step, nn.Linear's)."""
    device = torch.device(device_str)
    try:
        layer = _layer(cfg, method, device)
    except Unsupported:
        return None
    x, dy = _inputs(cfg, device)
    saved_bytes(layer, x, dy)  # the first step: WTA-CRS then has the output-gradient norms
    ours = saved_bytes(layer, x, dy)
    base = saved_bytes(_layer(cfg, BASELINE, device), x, dy)
    return ours, base


def _methods(device):
    from fastopt._backend import CAPABILITIES, available_backends

    kernels = [b for b in available_backends(device) if b in CAPABILITIES["wtacrs"].kernels
               and not (b == "triton" and device.type == "cpu")]
    return [BASELINE] + [f"wtacrs-fastopt-{b}" for b in kernels] + ["wtacrs-fastopt-torch"]


def _info(cfg, method, ctx):
    info = {"tokens": cfg.tokens, "d_in": cfg.d_in, "d_out": cfg.d_out}
    s = _saved(cfg, method, str(ctx.device))
    if s is not None:
        ours, base = s
        info.update({"saved_MB": ours / 1e6, "saved_frac": ours / base,
                     "linear_over_saved": base / ours if ours else None})
    info.update(gradient_error())
    return info


def _cases(ctx):
    cfgs = QUICK if ctx.quick else CONFIGS
    # 3 GEMMs of tokens x d_in x d_out (forward, input gradient, weight gradient)
    return [Case(config=c.name, method=m, items=c.tokens, bytes_moved=0,
                 setup=lambda c=c, m=m: setup(c, m, ctx.device), info=_info(c, m, ctx))
            for c in cfgs for m in _methods(ctx.device)]


def _bars(ctx):
    cfgs = QUICK if ctx.quick else CONFIGS
    return [Bar(c.name, m, "linear_over_saved", 1.0 / SAVED_LIMIT) for c in cfgs for m in _methods(ctx.device)
            if m != BASELINE]


if __name__ != "__main__":
    SUITE = register(Suite(name="wtacrs", cases=_cases, unit="tokens", baseline=BASELINE, bars=_bars,
                           memory_bound=False, what="one forward + backward of the layer"))
