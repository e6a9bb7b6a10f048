"""N:M mask benchmark suites.

``nm-mask``: the 2:4 mask of one fp32 matrix along its rows, every fastopt backend usable on the device
beside two torch masks in the same run:

* ``torch-topk`` (the baseline): ``|w|`` viewed as groups of 4, ``topk(2)``, ``scatter`` into a bool
  mask (what most sparse-training code does);
* ``torch-compile-rank``: the rank formulation of the spec (an element is kept when fewer than n of its
  group rank before it), ``torch.compile``d (compiled in the setup, outside the timing).

Bytes per call: read the matrix, write one byte per element (the bool mask).  Bars (issue 5): on CPU
``fastopt-cpu`` >= 10x ``torch-topk``; on CUDA ``fastopt-cuda`` >= 80% of the copy bandwidth.

``transposable-24``: the transposable 2:4 mask (exact and greedy) beside the torch reference.
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
        return [Bar(C_CUDA.name, "fastopt-cuda", "frac_copy_bw", 0.8)]
    return [Bar(C_CPU.name, "fastopt-cpu", NM_SUITE.speedup_key, 10.0)]


NM_SUITE = register(Suite(name="nm-mask", cases=nm_cases, unit="elements", baseline=BASELINE, bars=nm_bars))


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
                            baseline="fastopt-torch-exact", other_baselines=("fastopt-torch-greedy",)))
