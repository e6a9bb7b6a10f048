"""The SAM benchmark suites (``sam``, ``asam``): one call = SAM's two optimizer steps,
``first_step()`` then ``second_step()`` (the base optimizer's step included; no forward or backward),
with gradients present (random, filled once; the base step changes the weights but not the cost).

Methods, in the same run: ``fastopt.SAM`` around ``fastopt.AdamW`` on every fastopt kernel backend
usable on the device (``fastopt-<backend>``: the SAM passes and the AdamW step both on that backend)
and ``pytorch_optimizer.SAM`` (4.1.0) around ``torch.optim.AdamW(fused=True)``, torch's fastest CPU
AdamW (the baseline, ``pytorch_optimizer``; its own ``foreach`` left at the default, which on a CPU
runs its per-tensor loop).

Bytes moved per parameter (the ideal fastopt kernels' traffic, fp32): the norm pass reads g (ASAM
also w), the ascent reads w, g and writes w, old_p, the restore reads old_p and writes w, AdamW reads
w, g, m, v and writes w, m, v: ``(1 + 4 + 2 + 7) * 4 = 56`` bytes (ASAM 60).  That is twice
AdamW's 28: SAM's first step and restore cost as much memory traffic as the base step itself.

Bars: on CPU ``fastopt-cpu`` >= 3x ``pytorch_optimizer`` on 20x1M fp32 (issue 20), SAM and ASAM.
"""
import torch

from .adamw import C_20X1M, C_MIXED, C_MIXED_SMALL, C_SMALL, make_params
from .harness import Bar, Case, Suite, Unsupported, Workload, register

BASELINE = "pytorch_optimizer"
HYPER = dict(lr=1e-3, weight_decay=1e-2)
RHO = {False: 0.05, True: 0.5}   # (ASAM's rho about 10x SAM's, as davda54 recommends)


def _methods(device):
    from fastopt._backend import available_backends

    return [f"fastopt-{b}" for b in available_backends(device) if b != "torch"] + [BASELINE]


def make_sam(method, params, device, adaptive):
    """The optimizer of one case: ``fastopt.SAM(fastopt.AdamW)`` on a backend, or the baseline."""
    if method == BASELINE:
        try:
            from pytorch_optimizer import SAM as UpstreamSAM
        except ImportError as e:
            raise Unsupported(f"pytorch_optimizer is not installed: {e}") from e
        return UpstreamSAM(params, torch.optim.AdamW, rho=RHO[adaptive], adaptive=adaptive, fused=True, **HYPER)
    import fastopt
    from fastopt._backend import available_backends

    backend = method.removeprefix("fastopt-")
    if backend not in available_backends(device):
        raise Unsupported(f"backend {backend!r} is not available on {device.type}")
    if backend == "triton" and device.type == "cpu":
        raise Unsupported("triton on CPU runs only in the TRITON_INTERPRET interpreter; not benchmarked")
    return fastopt.SAM(params, fastopt.AdamW, rho=RHO[adaptive], adaptive=adaptive, backend=backend, **HYPER)


def setup(config, method, device, adaptive):
    opt = make_sam(method, make_params(config, device), device, adaptive)

    def two_steps():
        opt.first_step()
        opt.second_step()

    def state_bytes():
        own = sum(t.nbytes for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
        return own + sum(t.nbytes for t in getattr(opt, "old_params", {}).values())

    return Workload(fn=two_steps, state_bytes=state_bytes)


def bytes_per_step(config, adaptive):
    itemsize = torch.empty((), dtype=config.dtype).element_size()
    return ((2 if adaptive else 1) + 4 + 2 + 7) * itemsize * config.numel


def configs(device, quick):
    if quick:
        return [C_SMALL, C_MIXED_SMALL]
    return [C_20X1M, C_MIXED]


def _suite(adaptive):
    name = "asam" if adaptive else "sam"

    def cases(ctx):
        return [Case(config=c.name, method=m, items=c.numel, bytes_moved=bytes_per_step(c, adaptive),
                     setup=lambda c=c, m=m: setup(c, m, ctx.device, adaptive),
                     info={"dtype": str(c.dtype).removeprefix("torch."), "tensors": len(c.sizes)})
                for c in configs(ctx.device, ctx.quick) for m in _methods(ctx.device)]

    def bars(ctx):
        if ctx.device.type == "cuda":
            return []
        return [Bar(C_20X1M.name, "fastopt-cpu", suite.speedup_key, 3.0)]

    suite = Suite(name=name, cases=cases, unit="params", baseline=BASELINE, bars=bars,
                  what="first_step() + second_step() around AdamW")
    return register(suite)


SUITES = {adaptive: _suite(adaptive) for adaptive in (False, True)}
