"""The optimizer-zoo benchmark suites: one suite per optimizer (``zoo-<name>``), each timing one
``opt.step()`` of every fastopt backend usable on the device beside ``pytorch_optimizer``'s
implementation (the baseline) and torch's where torch has the algorithm, in the same run.

A ``clip_grad_norm`` suite times ``fastopt.clip_grad_norm_`` beside ``torch.nn.utils.clip_grad_norm_``
(foreach and for-loop; 3 * itemsize bytes per parameter: two reads and a write; max_norm large, so
every method does the full work: torch's foreach path also multiplies by the clamped coefficient 1).

Bytes moved per parameter (the ideal kernel's traffic): read p, g and every state, write p and every
state, i.e. ``(3 + 2 * states) * itemsize``, plus one extra read of p, g and the states for LAMB's
reduce pass (AdamP and SGDP reduce only over tensors of 2+ dimensions; the configs are 1-D).  Bars: on CPU every ``fastopt-cpu`` >= 4x
``pytorch_optimizer`` on 20x1M fp32; on CUDA every elementwise optimizer, on ``fastopt-cuda`` and on
``fastopt-triton``, >= 90% of the measured bandwidth on 256M-mixed, fp32 and bf16 (issue 18's target).
"""
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .adamw import GPU_CONFIGS, GPU_METHODS, C_20X1M, C_MIXED, C_MIXED_SMALL, C_SMALL, make_params, state_nbytes
from .harness import Bar, Case, Suite, Unsupported, Workload, fastopt_backend, register

BASELINE = "pytorch_optimizer"


@dataclass(frozen=True)
class Spec:
    """One optimizer: fastopt's class name, its arguments, the upstream factory (params -> optimizer),
    the state tensors per parameter and whether the step has a reduce pass."""

    name: str
    fastopt_cls: str
    kwargs: dict
    upstream: Callable
    states: int
    reduce: bool = False
    torch_factory: Optional[Callable] = None


def _po(cls_name, **kwargs):
    def make(params):
        import pytorch_optimizer

        return getattr(pytorch_optimizer, cls_name)(params, **kwargs)
    return make


def _spec(name, cls_name, kwargs, upstream_kwargs=None, torch_factory=None, flat=False):
    """The suite of fastopt.<cls_name>: its states and reduce pass come from the op declaration
    (fastopt/_opspec.py) of the op the class runs (``flat``: the one-pass variant that AdamP and SGDP
    run on tensors of fewer than two dimensions)."""
    import fastopt
    from fastopt._opspec import OPS

    op = OPS[getattr(fastopt, cls_name).OP + ("_flat" if flat else "")]
    return Spec(name, cls_name, kwargs, _po(cls_name, **(upstream_kwargs or kwargs)), len(op.states), op.reduce > 0,
                torch_factory)


SPECS = [
    _spec("lion", "Lion", dict(lr=1e-4, weight_decay=1e-2)),
    _spec("adan", "Adan", dict(lr=1e-3, weight_decay=1e-2)),
    _spec("adabelief", "AdaBelief", dict(lr=1e-3, weight_decay=1e-2)),
    _spec("diffgrad", "DiffGrad", dict(lr=1e-3, weight_decay=1e-2)),
    _spec("exadam", "EXAdam", dict(lr=1e-3, weight_decay=1e-2)),
    _spec("lamb", "Lamb", dict(lr=1e-3, weight_decay=1e-2)),
    _spec("sgdsai", "SGDSaI", dict(lr=1e-2, weight_decay=1e-2)),
    # AdamP / SGDP: the configs hold 1-D tensors, which are never projected and step in one pass.
    _spec("adamp", "AdamP", dict(lr=1e-3, weight_decay=1e-2), flat=True),
    _spec("sgdp", "SGDP", dict(lr=1e-3, momentum=0.9, weight_decay=1e-2), flat=True),
]


def _methods(device):
    """The fastopt kernel backends usable on ``device`` and the baseline.  The ``torch`` backend (the
    pure-PyTorch reference, written for clarity: one op per line, several seconds a step on 20x1M) is
    left out of the zoo suites."""
    from fastopt._backend import available_backends

    return [f"fastopt-{b}" for b in available_backends(device) if b != "torch"] + [BASELINE]


def _make(spec, method, params, device):
    if method == BASELINE:
        try:
            return spec.upstream(params)
        except ImportError as e:
            raise Unsupported(f"pytorch_optimizer is not installed: {e}") from e
    if method == "torch":
        return spec.torch_factory(params)
    import fastopt

    return getattr(fastopt, spec.fastopt_cls)(params, backend=fastopt_backend(method, device), **spec.kwargs)


def configs(device, quick):
    if quick:
        return [C_SMALL, C_MIXED_SMALL]
    return [C_20X1M, C_MIXED] + (list(GPU_CONFIGS) if device.type == "cuda" else [])


def setup(spec, config, method, device):
    opt = _make(spec, method, make_params(config, device), device)
    return Workload(fn=opt.step, state_bytes=lambda: state_nbytes(opt))


def bytes_per_step(spec, config):
    itemsize = torch.empty((), dtype=config.dtype).element_size()
    per = 3 + 2 * spec.states + ((2 + spec.states) if spec.reduce else 0)
    return per * itemsize * config.numel


def _suite(spec):
    def cases(ctx):
        methods = _methods(ctx.device) + (["torch"] if spec.torch_factory else [])
        return [Case(config=c.name, method=m, items=c.numel, bytes_moved=bytes_per_step(spec, c),
                     setup=lambda c=c, m=m: setup(spec, c, m, ctx.device),
                     info={"dtype": str(c.dtype).removeprefix("torch."), "tensors": len(c.sizes)})
                for c in configs(ctx.device, ctx.quick) for m in methods]

    def bars(ctx):
        if ctx.device.type == "cuda":
            return [] if spec.reduce else [Bar(c.name, m, "frac_bw", 0.9) for c in GPU_CONFIGS for m in GPU_METHODS]
        return [Bar(C_20X1M.name, "fastopt-cpu", suite.speedup_key, 4.0)]

    suite = Suite(name=f"zoo-{spec.name}", cases=cases, unit="params", baseline=BASELINE, bars=bars,
                  what="one opt.step()")
    return register(suite)


SUITES = {spec.name: _suite(spec) for spec in SPECS}


# -- the fused global-norm gradient clip ------------------------------------------------------------
CLIP_METHODS = ("torch-foreach", "torch-forloop")


def clip_setup(config, method, device):
    import fastopt

    params = make_params(config, device)
    if method.startswith("fastopt-"):
        from fastopt._backend import available_backends

        backend = method.removeprefix("fastopt-")
        if backend not in available_backends(device) or (backend == "triton" and device.type == "cpu"):
            raise Unsupported(f"backend {backend!r} is not benchmarked on {device.type}")
        return Workload(fn=lambda: fastopt.clip_grad_norm_(params, 1e9, backend=backend))
    foreach = method == "torch-foreach"
    return Workload(fn=lambda: torch.nn.utils.clip_grad_norm_(params, 1e9, foreach=foreach))


def _clip_cases(ctx):
    methods = [m for m in _methods(ctx.device) if m != BASELINE] + list(CLIP_METHODS)
    return [Case(config=c.name, method=m, items=c.numel,
                 bytes_moved=3 * torch.empty((), dtype=c.dtype).element_size() * c.numel,
                 setup=lambda c=c, m=m: clip_setup(c, m, ctx.device),
                 info={"dtype": str(c.dtype).removeprefix("torch."), "tensors": len(c.sizes)})
            for c in configs(ctx.device, ctx.quick) for m in methods]


CLIP_SUITE = register(Suite(name="clip_grad_norm", cases=_clip_cases, unit="params", baseline="torch-foreach",
                            what="one clip_grad_norm_"))
