"""The AdamW benchmark suite: ``fastopt.AdamW`` beside ``torch.optim.AdamW`` on the same device.

Methods, all in the same run: every fastopt backend usable on the device (``fastopt-<backend>``,
from ``fastopt._backend.available_backends``; the Triton interpreter on CPU is not benchmarked) and
``torch.optim.AdamW`` with ``fused=True``, ``foreach=True`` and ``foreach=False`` (``torch-fused``,
``torch-foreach``, ``torch-forloop``).  One timed call is one ``opt.step()`` with gradients present
(random, filled once; each step mutates parameters and state, which does not change its cost).

Bytes moved per parameter (the ideal kernel's traffic): read p, g, m, v and write p, m, v, i.e.
``7 * itemsize`` (``9 * itemsize`` with amsgrad, which also reads and writes ``max_exp_avg_sq``).

Bars: on CPU, ``fastopt-cpu`` >= 1.0x ``torch-fused`` on 20x1M; on CUDA (issue 18's targets), both
``fastopt-cuda`` and ``fastopt-triton`` >= 90% of the measured bandwidth and >= 1.15x ``torch-fused`` on
256M-mixed (about 271M params over 1000 irregular small tensors and 15 of 16M) in fp32 and in bf16.
"""
from dataclasses import dataclass

import torch

from .harness import Bar, Case, Suite, Unsupported, Workload, fastopt_backend, register

HYPER = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
TORCH_METHODS = {"torch-fused": {"fused": True}, "torch-foreach": {"foreach": True},
                 "torch-forloop": {"foreach": False}}
BASELINE = "torch-fused"
GPU_METHODS = ("fastopt-cuda", "fastopt-triton")  # the GPU bars hold for both GPU backends


@dataclass(frozen=True)
class Config:
    """A parameter set: one tensor per entry of ``sizes`` (numel), all of ``dtype``."""

    name: str
    sizes: tuple
    dtype: torch.dtype = torch.float32
    amsgrad: bool = False

    @property
    def numel(self):
        return sum(self.sizes)

    @property
    def bytes_per_step(self):
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return (9 if self.amsgrad else 7) * itemsize * self.numel


def mixed_sizes(n_small, small_max, n_large, large):
    """``n_small`` tensors of odd, irregular sizes in [1, small_max] plus ``n_large`` of ``large``."""
    return tuple((i * 7919) % small_max + 1 for i in range(n_small)) + (large,) * n_large


C_20X1M = Config("20x1M", (1_000_000,) * 20)
C_MIXED = Config("mixed", mixed_sizes(300, 6007, 4, 1_048_573))
# >= 256M params over mixed sizes (the GPU bars): 1000 odd sizes up to 64K (about 31M) + 15 x 16M
C_256M = Config("256M-mixed", mixed_sizes(1000, 65_521, 15, 16 << 20))
C_256M_BF16 = Config("256M-mixed-bf16", C_256M.sizes, torch.bfloat16)
GPU_CONFIGS = (C_256M, C_256M_BF16)
C_SMALL = Config("4x64K", (65_536,) * 4)
C_MIXED_SMALL = Config("mixed-small", mixed_sizes(30, 601, 2, 65_537))
C_SMALL_BF16 = Config("4x64K-bf16", (65_536,) * 4, torch.bfloat16)


def configs(device, quick):
    if quick:
        return [C_SMALL, C_MIXED_SMALL] + ([C_SMALL_BF16] if device.type == "cuda" else [])
    return [C_20X1M, C_MIXED] + (list(GPU_CONFIGS) if device.type == "cuda" else [])


def methods(device):
    from fastopt._backend import available_backends

    return [f"fastopt-{b}" for b in available_backends(device)] + list(TORCH_METHODS)


def make_params(config, device, seed=0):
    """Parameters of ``config`` on ``device``, with random gradients (the same for every method)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    params = []
    for n in config.sizes:
        p = torch.nn.Parameter(torch.randn(n, generator=gen, device=device, dtype=config.dtype))
        p.grad = torch.randn(n, generator=gen, device=device, dtype=config.dtype)
        params.append(p)
    return params


def make_optimizer(method, params, device, amsgrad=False):
    """The optimizer ``method`` names; raises Unsupported when it cannot run on ``device``."""
    if method.startswith("fastopt-"):
        import fastopt

        return fastopt.AdamW(params, **HYPER, amsgrad=amsgrad, backend=fastopt_backend(method, device))
    if method not in TORCH_METHODS:
        raise ValueError(f"unknown AdamW method {method!r}")
    fused = TORCH_METHODS[method].get("fused", False)
    try:
        opt = torch.optim.AdamW(params, **HYPER, amsgrad=amsgrad, **TORCH_METHODS[method])
        if fused:
            opt.step()  # some devices and dtypes reject fused=True only at the first step
    except RuntimeError as e:
        if not fused:
            raise
        raise Unsupported(f"torch.optim.AdamW(fused=True): {e}") from e
    return opt


def state_nbytes(opt):
    return sum(t.nbytes for s in opt.state.values() for t in s.values() if torch.is_tensor(t))


def setup(config, method, device):
    """The workload of one case: fresh parameters and one ``opt.step`` per call."""
    opt = make_optimizer(method, make_params(config, device), device, amsgrad=config.amsgrad)
    return Workload(fn=opt.step, state_bytes=lambda: state_nbytes(opt))


def cases(ctx):
    return [Case(config=c.name, method=m, items=c.numel, bytes_moved=c.bytes_per_step,
                 setup=lambda c=c, m=m: setup(c, m, ctx.device),
                 info={"dtype": str(c.dtype).removeprefix("torch."), "tensors": len(c.sizes)})
            for c in configs(ctx.device, ctx.quick) for m in methods(ctx.device)]


def bars(ctx):
    speedup = SUITE.speedup_key
    if ctx.device.type == "cuda":
        return [Bar(c.name, m, metric, threshold) for c in GPU_CONFIGS for m in GPU_METHODS
                for metric, threshold in (("frac_bw", 0.9), (speedup, 1.15))]
    return [Bar(C_20X1M.name, "fastopt-cpu", speedup, 1.0)]


SUITE = register(Suite(name="adamw", cases=cases, unit="params", baseline=BASELINE, bars=bars,
                        what="one opt.step()"))
