"""N:M mask benchmark suites.

``nm-mask``: the 2:4 mask of one fp32 matrix along its rows, every fastopt backend usable on the device
beside two torch masks in the same run:

* ``torch-topk`` (the baseline): ``|w|`` viewed as groups of 4, ``topk(2)``, ``scatter`` into a bool
  mask (what most sparse-training code does);
* ``torch-compile-rank``: the rank formulation of the spec (an element is kept when fewer than n of its
  group rank before it), ``torch.compile``d (compiled in the setup, outside the timing).

Bytes per call: read the matrix, write one byte per element (the bool mask).  Bars: on CPU
``fastopt-cpu`` >= 10x ``torch-topk``; on CUDA ``fastopt-cuda`` >= 80% of the copy bandwidth.

``transposable-24``: the transposable 2:4 mask (exact and greedy) beside the torch reference.

``sparse-step``: one SR-STE 2:4 AdamW step of sparse training (see the comment above the suite).
"""
from dataclasses import dataclass

import torch

from .harness import Bar, Case, Suite, Unsupported, Workload, register

BASELINE = "torch-topk"


@dataclass(frozen=True)
class Config:
    rows: int
    cols: int
    dtype: torch.dtype = torch.float32

    @property
    def name(self):
        return f"{self.rows}x{self.cols}-{str(self.dtype).replace('torch.', '')}"

    @property
    def numel(self):
        return self.rows * self.cols

    @property
    def bytes_moved(self):
        return self.numel * (torch.finfo(self.dtype).bits // 8 + 1)


C_CPU = Config(4096, 4096)
C_CPU_QUICK = Config(1024, 1024)
C_CUDA = Config(16384, 16384)
C_CUDA_BF16 = Config(16384, 16384, torch.bfloat16)
C_CUDA_QUICK = Config(4096, 4096)


def topk_mask(w, n=2, m=4):
    groups = w.abs().reshape(-1, m)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(1, groups.topk(n, dim=1).indices, True)
    return mask.view(w.shape)


def rank_mask(w, n=2, m=4):
    k = w.abs().reshape(-1, m)
    idx = torch.arange(m, device=w.device)
    before = (k[:, None, :] > k[:, :, None]) | ((k[:, None, :] == k[:, :, None]) & (idx[None, :] < idx[:, None]))
    return (before.sum(-1) < n).view(w.shape)


def _methods(device):
    from fastopt._backend import available_backends

    return [f"fastopt-{b}" for b in available_backends(device) if b != "torch"] + [BASELINE, "torch-compile-rank"]


def nm_setup(config, method, device):
    from fastopt import sparse

    w = torch.randn(config.rows, config.cols, device=device, dtype=config.dtype)
    if method.startswith("fastopt-"):
        backend = method[len("fastopt-"):]
        return Workload(fn=lambda: sparse.nm_mask(w, 2, 4, backend=backend))
    if method == BASELINE:
        return Workload(fn=lambda: topk_mask(w))
    if method == "torch-compile-rank":
        try:
            fn = torch.compile(rank_mask, dynamic=False)
            fn(w)
        except Exception as e:  # no compiler toolchain for inductor, etc.
            raise Unsupported(f"torch.compile failed: {type(e).__name__}: {e}") from e
        return Workload(fn=lambda: fn(w))
    raise Unsupported(method)


def _configs(ctx):
    if ctx.device.type == "cuda":
        return [C_CUDA_QUICK] if ctx.quick else [C_CUDA, C_CUDA_BF16]
    return [C_CPU_QUICK] if ctx.quick else [C_CPU]


def nm_cases(ctx):
    return [Case(config=c.name, method=m, items=c.numel, bytes_moved=c.bytes_moved,
                 setup=lambda c=c, m=m: nm_setup(c, m, ctx.device), info={"pattern": "2:4", "dtype": str(c.dtype)})
            for c in _configs(ctx) for m in _methods(ctx.device)]


def nm_bars(ctx):
    if ctx.quick:
        return []
    if ctx.device.type == "cuda":
        return [Bar(C_CUDA.name, "fastopt-cuda", "frac_bw", 0.8)]
    return [Bar(C_CPU.name, "fastopt-cpu", NM_SUITE.speedup_key, 10.0)]


NM_SUITE = register(Suite(name="nm-mask", cases=nm_cases, unit="elements", baseline=BASELINE, bars=nm_bars,
                           what="one N:M mask"))


def tile_setup(config, method, device):
    from fastopt import sparse

    w = torch.randn(config.rows, config.cols, device=device, dtype=config.dtype)
    backend, mode = method.rsplit("-", 1)
    backend = backend[len("fastopt-"):]
    return Workload(fn=lambda: sparse.transposable_mask(w, mode, backend=backend))


def tile_cases(ctx):
    from fastopt._backend import available_backends

    configs = [C_CPU_QUICK] if ctx.quick or ctx.device.type != "cuda" else [C_CUDA_QUICK]
    methods = [f"fastopt-{b}-{mode}" for b in available_backends(ctx.device) for mode in ("exact", "greedy")]
    return [Case(config=c.name, method=m, items=c.numel, bytes_moved=c.bytes_moved,
                 setup=lambda c=c, m=m: tile_setup(c, m, ctx.device), info={"pattern": "transposable 2:4"})
            for c in configs for m in methods]


TILE_SUITE = register(Suite(name="transposable-24", cases=tile_cases, unit="elements",
                            baseline="fastopt-torch-exact", other_baselines=("fastopt-torch-greedy",),
                            memory_bound=False,
                            what="one transposable mask"))


# -- sparse training: one SR-STE 2:4 optimizer step ------------------------------------------------
#
# ``sparse-step``: an AdamW step of N:M sparse training (SR-STE, lambda 2e-4) over a list of weight
# matrices, with fastopt (``fastopt.lowbit.ElementwiseAdamW`` with a ``sparsity`` group):
#
# * ``fastopt-<b>-k1``: the mask refreshed every step (the SR-STE paper's recipe): the fused step,
#   then the mask kernel and the masked write;
# * ``fastopt-<b>-steady``: steps between refreshes (``refresh_every`` beyond the run): one fused pass;
# * ``fastopt-<b>-dense``: the same optimizer without sparsity (the floor);
# * ``torch-srste`` (the baseline): the same math in torch, as sparse-training code writes it:
#   ``g + lambda * (~mask) * W``, ``torch.optim.AdamW`` (foreach) on W, a topk 2:4 mask, ``W * mask``.
#
# Bytes per step: the ideal single pass (read W, g, exp_avg, exp_avg_sq and the mask; write W, both
# states and the forward weights): 33 bytes per fp32 element.


@dataclass(frozen=True)
class StepConfig:
    tensors: int
    rows: int
    cols: int

    @property
    def name(self):
        return f"{self.tensors}x{self.rows}x{self.cols}"

    @property
    def numel(self):
        return self.tensors * self.rows * self.cols


S_CPU = StepConfig(8, 1024, 1024)
S_CPU_QUICK = StepConfig(2, 256, 256)
S_CUDA = StepConfig(24, 4096, 4096)
S_CUDA_QUICK = StepConfig(4, 1024, 1024)
STEP_BASELINE = "torch-srste"


def _step_methods(device):
    from fastopt._backend import available_backends

    kernels = [b for b in available_backends(device) if b != "torch"]
    return [f"fastopt-{b}-{mode}" for b in kernels for mode in ("k1", "steady", "dense")] + [STEP_BASELINE]


def step_params(config, device):
    """The step suites' parameters (``config.tensors`` fp32 matrices, seeded) with gradients set."""
    gen = torch.Generator(device=device).manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(config.rows, config.cols, device=device, generator=gen))
              for _ in range(config.tensors)]
    for p in params:
        p.grad = torch.randn(p.shape, device=device, generator=gen) * 1e-2
    return params


def step_setup(config, method, device):
    from fastopt.lowbit import ElementwiseAdamW
    from fastopt.sparse import NMSparsity

    params = step_params(config, device)
    if method == STEP_BASELINE:
        opt = torch.optim.AdamW(params, lr=1e-3, foreach=True)
        dense = [p.detach().clone() for p in params]
        masks = [topk_mask(w) for w in dense]
        grads = [p.grad for p in params]

        def step():
            for w, mk, g, p in zip(dense, masks, grads, params):
                w.grad = g + 2e-4 * (~mk) * w
            opt.param_groups[0]["params"] = dense
            opt.step()
            for i, (w, p) in enumerate(zip(dense, params)):
                masks[i] = topk_mask(w)
                p.data.copy_(w * masks[i])
            return params
        return Workload(fn=step)
    backend, mode = method[len("fastopt-"):].rsplit("-", 1)
    if mode == "dense":
        opt = ElementwiseAdamW(params, lr=1e-3, backend=backend)
    else:
        sp = NMSparsity(2, 4, recipe="sr-ste", refresh_every=1 if mode == "k1" else 10 ** 9)
        opt = ElementwiseAdamW([{"params": params, "sparsity": sp}], lr=1e-3, backend=backend)
        opt.sparsify()
    opt.step()  # states made outside the timing

    def step():
        opt.step()
        return params  # (for checks; returning costs nothing)
    return Workload(fn=step)


def step_cases(ctx):
    if ctx.device.type == "cuda":
        configs = [S_CUDA_QUICK] if ctx.quick else [S_CUDA]
    else:
        configs = [S_CPU_QUICK] if ctx.quick else [S_CPU]
    return [Case(config=c.name, method=m, items=c.numel, bytes_moved=33 * c.numel,
                 setup=lambda c=c, m=m: step_setup(c, m, ctx.device),
                 info={"recipe": "sr-ste 2:4", "optimizer": "AdamW fp32"})
            for c in configs for m in _step_methods(ctx.device)]


STEP_SUITE = register(Suite(name="sparse-step", cases=step_cases, unit="params", baseline=STEP_BASELINE,
                             what="one sparse training step"))
