"""Benchmark suites of torch.optim's classic optimizers: ``classic-sgd`` (momentum 0.9), ``classic-adagrad``
and ``classic-rmsprop`` (torch's defaults), each timing one ``opt.step()`` of fastopt's kernel backends
usable on the device beside every path torch.optim has for it on that device: ``torch-fused`` (SGD and
Adagrad: torch 2.13 has fused CPU and CUDA kernels for both; none for RMSprop), ``torch-foreach`` and
``torch-forloop``.

Bytes moved per parameter (the ideal kernel's traffic): read p, g and the one state, write p and the
state, i.e. ``5 * itemsize``.  Bars (issue 20), on CPU, 20x1M fp32: ``fastopt-cpu`` >= 1.0x torch's fused
SGD; >= 1.0x each of torch's Adagrad and RMSprop paths (so >= the fastest of them).
"""
from dataclasses import dataclass

import torch

from .adamw import C_20X1M, C_MIXED, C_MIXED_SMALL, C_SMALL, make_params, state_nbytes
from .harness import Bar, Case, Suite, Workload, fastopt_backend, register, speedup_key


@dataclass(frozen=True)
class Spec:
    """One optimizer: its fastopt / torch.optim class name, arguments, and torch's paths (fastest first
    as a rule; the baseline is the first)."""

    name: str
    cls: str
    kwargs: dict
    torch_paths: tuple


SPECS = [
    Spec("sgd", "SGD", dict(lr=1e-3, momentum=0.9), ("torch-fused", "torch-foreach", "torch-forloop")),
    Spec("adagrad", "Adagrad", dict(lr=1e-2), ("torch-fused", "torch-foreach", "torch-forloop")),
    Spec("rmsprop", "RMSprop", dict(lr=1e-2), ("torch-foreach", "torch-forloop")),
]
PATH_KWARGS = {"torch-fused": dict(fused=True), "torch-foreach": dict(foreach=True),
               "torch-forloop": dict(foreach=False)}
STATES = 1  # momentum_buffer / sum / square_avg


def _methods(device):
    from fastopt._backend import available_backends

    return [f"fastopt-{b}" for b in available_backends(device) if b != "torch"]


def _make(spec, method, params, device):
    import fastopt

    if method in PATH_KWARGS:
        return getattr(torch.optim, spec.cls)(params, **spec.kwargs, **PATH_KWARGS[method])
    return getattr(fastopt, spec.cls)(params, backend=fastopt_backend(method, device), **spec.kwargs)


def configs(device, quick):
    return [C_SMALL, C_MIXED_SMALL] if quick else [C_20X1M, C_MIXED]


def setup(spec, config, method, device):
    opt = _make(spec, method, make_params(config, device), device)
    opt.step()  # (states made: torch's SGD makes its momentum buffer at the first step)
    return Workload(fn=opt.step, state_bytes=lambda: state_nbytes(opt))


def _suite(spec):
    def cases(ctx):
        methods = _methods(ctx.device) + list(spec.torch_paths)
        return [Case(config=c.name, method=m, items=c.numel,
                     bytes_moved=(3 + 2 * STATES) * torch.empty((), dtype=c.dtype).element_size() * c.numel,
                     setup=lambda c=c, m=m: setup(spec, c, m, ctx.device),
                     info={"dtype": str(c.dtype).removeprefix("torch."), "tensors": len(c.sizes)})
                for c in configs(ctx.device, ctx.quick) for m in methods]

    def bars(ctx):
        if ctx.device.type != "cpu":
            return []
        paths = spec.torch_paths[:1] if spec.name == "sgd" else spec.torch_paths
        return [Bar(C_20X1M.name, "fastopt-cpu", speedup_key(p), 1.0) for p in paths]

    return register(Suite(name=f"classic-{spec.name}", cases=cases, unit="params", baseline=spec.torch_paths[0],
                          other_baselines=tuple(spec.torch_paths[1:]), bars=bars, what="one opt.step()"))


SUITES = {spec.name: _suite(spec) for spec in SPECS}
