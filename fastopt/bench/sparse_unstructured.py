"""``sparse-unstructured``: one AdamW step of unstructured sparse training (fastopt.sparse.unstructured)
over a list of fp32 weight matrices (~25M parameters on CPU), every fastopt kernel backend beside torch:

* ``fastopt-<b>-random``: ``ElementwiseAdamW`` with ``RandomSparsity(0.1)``: one fused pass, the mask
  drawn from the hash in the kernel (nothing stored);
* ``fastopt-<b>-magnitude``: ``MagnitudeSparsity(0.1)`` between refreshes: one fused pass reading the
  stored bool mask;
* ``fastopt-<b>-dense``: the same optimizer without sparsity (the floor the target is measured against);
* ``torch-prune-mask`` (the baseline): what a user writes without fastopt -- the masks of
  ``torch.nn.utils.prune.random_unstructured`` (made once, outside the timing), ``torch.optim.AdamW``
  (foreach) on the weights, then the mask re-applied to the weights and both states
  (``torch._foreach_mul_``) every step.

Bytes per step: the ideal single pass (read W, g, exp_avg, exp_avg_sq; write W and both states): 28
bytes per fp32 element.  Bars (CPU, the issue's targets): ``fastopt-cpu-random`` at most 1.3x the time
of ``fastopt-cpu-dense`` (speedup >= 1 / 1.3) and at least 5x faster than ``torch-prune-mask``.
"""
import torch

from .harness import Bar, Case, Suite, Workload, register, speedup_key
from .sparse import StepConfig, step_params

DENSITY = 0.1
BASELINE = "torch-prune-mask"
Config = StepConfig  # (the sparse-step suite's config: a list of equal fp32 matrices; same names)

C_CPU = Config(6, 2048, 2048)     # 25.2M parameters
C_CPU_QUICK = Config(2, 256, 256)
C_CUDA = Config(24, 4096, 4096)
C_CUDA_QUICK = Config(4, 1024, 1024)


def _kernels(device):
    from fastopt._backend import available_backends

    # (Triton on the CPU is the interpreter: far too slow for these sizes)
    return [b for b in available_backends(device) if b != "torch" and not (b == "triton" and device.type == "cpu")]


def _methods(device):
    return [f"fastopt-{b}-{mode}" for b in _kernels(device) for mode in ("random", "magnitude", "dense")] + [BASELINE]


def setup(config, method, device):
    from fastopt.lowbit import ElementwiseAdamW
    from fastopt.sparse import MagnitudeSparsity, RandomSparsity

    params = step_params(config, device)
    if method == BASELINE:
        import torch.nn.utils.prune as prune

        torch.manual_seed(0)
        masks = [prune.RandomUnstructured(amount=1 - DENSITY).compute_mask(p.detach(), torch.ones_like(p))
                 for p in params]
        with torch.no_grad():
            torch._foreach_mul_(params, masks)
        opt = torch.optim.AdamW(params, lr=1e-3, foreach=True)
        opt.step()  # states made outside the timing
        states = [opt.state[p][k] for k in ("exp_avg", "exp_avg_sq") for p in params]

        @torch.no_grad()
        def step():
            opt.step()
            torch._foreach_mul_(params, masks)
            torch._foreach_mul_(states, masks + masks)
            return params
        return Workload(fn=step)
    backend, mode = method[len("fastopt-"):].rsplit("-", 1)
    if mode == "dense":
        opt = ElementwiseAdamW(params, lr=1e-3, backend=backend)
    else:
        sp = RandomSparsity(DENSITY, seed=0) if mode == "random" else MagnitudeSparsity(DENSITY)
        opt = ElementwiseAdamW([{"params": params, "sparsity": sp}], lr=1e-3, backend=backend)
        opt.sparsify()
    opt.step()  # states made outside the timing

    def step():
        opt.step()
        return params
    return Workload(fn=step)


def _configs(ctx):
    if ctx.device.type == "cuda":
        return [C_CUDA_QUICK] if ctx.quick else [C_CUDA]
    return [C_CPU_QUICK] if ctx.quick else [C_CPU]


def cases(ctx):
    return [Case(config=c.name, method=m, items=c.numel, bytes_moved=28 * c.numel,
                 setup=lambda c=c, m=m: setup(c, m, ctx.device),
                 info={"density": DENSITY, "optimizer": "AdamW fp32"})
            for c in _configs(ctx) for m in _methods(ctx.device)]


def bars(ctx):
    if ctx.quick or ctx.device.type != "cpu":
        return []
    return [Bar(C_CPU.name, "fastopt-cpu-random", speedup_key("fastopt-cpu-dense"), 1 / 1.3),
            Bar(C_CPU.name, "fastopt-cpu-random", speedup_key(BASELINE), 5.0)]


SUITE = register(Suite(name="sparse-unstructured", cases=cases, unit="params", baseline=BASELINE,
                       other_baselines=("fastopt-cpu-dense",), bars=bars,
                       what="one unstructured-sparse AdamW step"))
