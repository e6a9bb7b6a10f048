"""Sliced Wasserstein benchmark suite (``sliced-wasserstein``).

One timed call is one Monte-Carlo ``SW_2`` between two point clouds with the same fixed projection
matrix for every method (drawn once in the setup, POT's ``(d, L)`` layout, fp32):

* ``fastopt`` — :func:`fastopt.ot.sliced.sliced_wasserstein` with ``backend="auto"``: on CUDA the Triton
  kernels for every config (one program per direction up to 8192 points with uniform weights; sorted
  blocks + merge passes above; the quantile merge for weights / n != m); on CPU the torch path (GEMM +
  sort, the sorts through NumPy's SIMD sort);
* ``fastopt-triton`` — the same with ``backend="triton"`` (Unsupported on CPU, where Triton is only the
  interpreter): the kernels by name, so the report shows them even if ``auto`` changed its choice;
* ``fastopt-torch`` — the same with ``backend="torch"`` (CUDA only: on CPU it is ``fastopt``), to
  measure the kernel against the torch path;
* ``pot-torch`` (the baseline) — ``ot.sliced_wasserstein_distance`` on the same torch tensors (POT's
  torch backend, same device);
* ``pot-numpy`` — ``ot.sliced_wasserstein_distance`` on NumPy copies (CPU only).

Configs: ``<n>x<m>-d<d>-L<L>`` with uniform weights (``n == m``: the sort-and-subtract path), ``-w`` with
random weights on both sides (the quantile-merge path), ``-grad`` for a forward plus backward with
respect to both point clouds (NumPy has no autograd: ``pot-numpy`` is unsupported there).

Work per call: ``items`` = (n + m) L projected points; ``bytes`` = the projected values written once and
read once (8 bytes per fp32 value), the traffic of any method that materializes the projections (the
sorts make it compute-bound, so GB/s is only indicative).

Bar: on CUDA, ``fastopt`` >= 5x POT (``pot-torch``) at 100k points and 1000 projections.
"""
from dataclasses import dataclass

import torch

from .harness import Bar, Case, Suite, Unsupported, Workload, fastopt_backend, register

BASELINE = "pot-torch"
METHODS = ("fastopt", "fastopt-triton", "fastopt-torch", BASELINE, "pot-numpy")


@dataclass(frozen=True)
class Config:
    n: int
    m: int
    d: int
    L: int
    weighted: bool = False
    grad: bool = False

    @property
    def name(self):
        return (f"{self.n}x{self.m}-d{self.d}-L{self.L}" + ("-w" if self.weighted else "")
                + ("-grad" if self.grad else ""))

    @property
    def items(self):
        return (self.n + self.m) * self.L

    @property
    def bytes_moved(self):
        return 8 * self.items


C_CPU = Config(20_000, 20_000, 3, 200)
C_CPU_W = Config(20_000, 15_000, 3, 200, weighted=True)
C_CPU_GRAD = Config(20_000, 20_000, 3, 200, grad=True)
C_CPU_QUICK = Config(2_000, 2_000, 3, 20)
C_CUDA = Config(100_000, 100_000, 3, 1000)
C_CUDA_W = Config(100_000, 80_000, 3, 1000, weighted=True)
C_CUDA_GRAD = Config(100_000, 100_000, 3, 1000, grad=True)
C_CUDA_FUSED = Config(8192, 8192, 3, 1000)  # the largest one program per direction sorts
C_CUDA_FUSED_GRAD = Config(8192, 8192, 3, 1000, grad=True)
C_CUDA_QUICK = Config(4096, 4096, 3, 100)


def _configs(ctx):
    if ctx.device.type == "cuda":
        return [C_CUDA_QUICK] if ctx.quick else [C_CUDA, C_CUDA_W, C_CUDA_GRAD, C_CUDA_FUSED, C_CUDA_FUSED_GRAD]
    return [C_CPU_QUICK] if ctx.quick else [C_CPU, C_CPU_W, C_CPU_GRAD]


def sw_setup(config, method, device):
    from fastopt.ot.sliced import random_projections, sliced_wasserstein

    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(config.n, config.d, device=device, generator=gen)
    y = torch.randn(config.m, config.d, device=device, generator=gen) * 1.5 + 0.5
    a = torch.rand(config.n, device=device, generator=gen) + 0.1 if config.weighted else None
    b = torch.rand(config.m, device=device, generator=gen) + 0.1 if config.weighted else None
    if a is not None:
        a, b = a / a.sum(), b / b.sum()
    proj = random_projections(config.d, config.L, device=device, generator=gen)
    if config.grad:
        x.requires_grad_(True)
        y.requires_grad_(True)

    def run(fn):
        if not config.grad:
            with torch.no_grad():
                return fn()

        def step():
            value = fn()
            x.grad = y.grad = None
            value.backward()
            return value
        return step()

    if method == "fastopt":
        return Workload(fn=lambda: run(lambda: sliced_wasserstein(x, y, a, b, projections=proj)))
    if method == "fastopt-triton":
        backend = fastopt_backend(method, device)
        return Workload(fn=lambda: run(lambda: sliced_wasserstein(x, y, a, b, projections=proj, backend=backend)))
    if method == "fastopt-torch":
        if device.type != "cuda":
            raise Unsupported("on CPU backend='auto' is the torch path: see the fastopt row")
        return Workload(fn=lambda: run(lambda: sliced_wasserstein(x, y, a, b, projections=proj, backend="torch")))
    try:
        import ot
    except ImportError as e:
        raise Unsupported(f"POT is not installed ({e})") from e
    if method == BASELINE:
        return Workload(fn=lambda: run(lambda: ot.sliced_wasserstein_distance(x, y, a, b, projections=proj)))
    if method == "pot-numpy":
        if device.type != "cpu":
            raise Unsupported("NumPy runs on the CPU only")
        if config.grad:
            raise Unsupported("NumPy has no autograd")
        xn, yn, pn = x.detach().numpy(), y.numpy(), proj.numpy()
        an, bn = (a.numpy(), b.numpy()) if a is not None else (None, None)
        return Workload(fn=lambda: ot.sliced_wasserstein_distance(xn, yn, an, bn, projections=pn))
    raise Unsupported(method)


def sw_cases(ctx):
    return [Case(config=c.name, method=meth, items=c.items, bytes_moved=c.bytes_moved,
                 setup=lambda c=c, meth=meth: sw_setup(c, meth, ctx.device),
                 info={"dtype": "float32", "weights": "random" if c.weighted else "uniform",
                       "pass": "forward+backward" if c.grad else "forward"})
            for c in _configs(ctx) for meth in METHODS]


def sw_bars(ctx):
    if ctx.quick or ctx.device.type != "cuda":
        return []
    return [Bar(C_CUDA.name, "fastopt", SW_SUITE.speedup_key, 5.0)]


SW_SUITE = register(Suite(name="sliced-wasserstein", cases=sw_cases, unit="point_projections", baseline=BASELINE,
                          bars=sw_bars, other_baselines=("pot-numpy",), memory_bound=False,
                          what="one sliced Wasserstein distance"))
