"""Magnitude selection benchmark suite (``fastopt.sparse.magnitude_masks`` / ``magnitude_thresholds``).

``magnitude-select``: the keep-masks of magnitude pruning at density 0.1 over a model-like list of weight
matrices and biases (~25M elements on the CPU), global scope (one threshold for all tensors) and layer
scope (one per tensor), every fastopt backend usable on the device beside what torch code does:

* ``torch-prune`` (the baseline): ``torch.nn.utils.prune``'s mask computation --
  ``L1Unstructured.compute_mask`` on ``parameters_to_vector`` of the tensors (what
  ``prune.global_unstructured`` runs; global) or on each tensor (``l1_unstructured``; layer): a
  ``torch.topk`` of the pruned count on ``|w|`` and a scatter into a ones mask;
* ``torch-kthvalue``: the threshold only, ``torch.kthvalue`` of ``|w|`` (concatenated, or per tensor);
* ``fastopt-<b>``: the masks; ``fastopt-<b>-thresholds``: the thresholds only.

Bytes per call: the ideal single pass (read every weight once, write one byte of mask per element; the
radix select reads the weights 4 times: 3 histogram passes and the mask pass).  Bar (CPU): the fused
global masks ``fastopt-cpu`` >= 5x ``torch-prune``.
"""
from dataclasses import dataclass

import torch

from .harness import Bar, Case, Suite, Unsupported, Workload, register

BASELINE = "torch-prune"
DENSITY = 0.1


@dataclass(frozen=True)
class Config:
    layers: int
    rows: int
    cols: int
    scope: str = "global"

    @property
    def name(self):
        return f"{self.layers}x({self.rows}x{self.cols}+{self.rows})-{self.scope}"

    @property
    def numel(self):
        return self.layers * (self.rows * self.cols + self.rows)

    @property
    def bytes_moved(self):
        return self.numel * (4 + 1)


C_CPU = [Config(12, 1024, 2048, "global"), Config(12, 1024, 2048, "layer")]
C_CPU_QUICK = [Config(4, 256, 512, "global"), Config(4, 256, 512, "layer")]
C_CUDA = [Config(48, 4096, 4096, "global"), Config(48, 4096, 4096, "layer")]
C_CUDA_QUICK = [Config(4, 1024, 1024, "global")]


def weights(config, device):
    gen = torch.Generator(device=device).manual_seed(0)
    out = []
    for _ in range(config.layers):
        out.append(torch.randn(config.rows, config.cols, device=device, generator=gen))
        out.append(torch.randn(config.rows, device=device, generator=gen))
    return out


def torch_prune_masks(ws, density, scope):
    """``torch.nn.utils.prune``'s computation of the masks (without the module reparametrization)."""
    from torch.nn.utils import parameters_to_vector, prune

    method = prune.L1Unstructured(amount=1 - density)
    if scope == "layer":
        return [method.compute_mask(w, torch.ones_like(w)) for w in ws]
    flat = parameters_to_vector(ws)
    mask = method.compute_mask(flat, torch.ones_like(flat))
    out, start = [], 0
    for w in ws:
        out.append(mask[start:start + w.numel()].view_as(w))
        start += w.numel()
    return out


def torch_kthvalue_thresholds(ws, density, scope):
    from fastopt.reference.select import prune_count

    if scope == "layer":
        return [torch.kthvalue(w.abs().view(-1), max(prune_count(density, w.numel()), 1)).values for w in ws]
    flat = torch.cat([w.abs().view(-1) for w in ws])
    return torch.kthvalue(flat, prune_count(density, flat.numel())).values


def _methods(device):
    from fastopt._backend import available_backends

    kernels = [b for b in available_backends(device) if b != "torch" and (b != "triton" or device.type == "cuda")]
    return ([f"fastopt-{b}" for b in kernels] + [f"fastopt-{b}-thresholds" for b in kernels]
            + ["fastopt-torch", BASELINE, "torch-kthvalue"])


def setup(config, method, device):
    from fastopt import sparse

    ws = weights(config, device)
    if method.startswith("fastopt-"):
        backend = method[len("fastopt-"):]
        if backend.endswith("-thresholds"):
            backend = backend[:-len("-thresholds")]
            return Workload(fn=lambda: sparse.magnitude_thresholds(ws, DENSITY, scope=config.scope, backend=backend))
        return Workload(fn=lambda: sparse.magnitude_masks(ws, DENSITY, scope=config.scope, backend=backend))
    if method == BASELINE:
        return Workload(fn=lambda: torch_prune_masks(ws, DENSITY, config.scope))
    if method == "torch-kthvalue":
        return Workload(fn=lambda: torch_kthvalue_thresholds(ws, DENSITY, config.scope))
    raise Unsupported(method)


def _configs(ctx):
    if ctx.device.type == "cuda":
        return C_CUDA_QUICK if ctx.quick else C_CUDA
    return C_CPU_QUICK if ctx.quick else C_CPU


def cases(ctx):
    return [Case(config=c.name, method=m, items=c.numel, bytes_moved=c.bytes_moved,
                 setup=lambda c=c, m=m: setup(c, m, ctx.device),
                 info={"density": DENSITY, "scope": c.scope, "tensors": 2 * c.layers})
            for c in _configs(ctx) for m in _methods(ctx.device)]


def bars(ctx):
    if ctx.quick or ctx.device.type != "cpu":
        return []
    return [Bar(C_CPU[0].name, "fastopt-cpu", SUITE.speedup_key, 5.0)]


SUITE = register(Suite(name="magnitude-select", cases=cases, unit="elements", baseline=BASELINE, bars=bars,
                       other_baselines=("torch-kthvalue",), what="the magnitude-pruning masks of a weight list"))
