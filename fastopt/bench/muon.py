"""The Muon benchmark suites: Newton–Schulz kernels, and full ``fastopt.optim.muon.Muon`` steps beside
``pytorch_optimizer.Muon`` on the same device.

``newton_schulz`` (CUDA only): five bf16 quintic Newton–Schulz iterations (Keller Jordan's
coefficients) on one G of 1024x4096 and 4096x4096 (``--quick``: 256x1024), by

* ``fastopt-triton``: :func:`fastopt.triton_kernels.newton_schulz.newton_schulz_triton` (symmetric
  lower-triangle kernels for X X^T and b A + c A A, fused epilogues);
* ``torch-matmul``: the plain iteration ``A = X @ X.mT; B = b * A + c * (A @ A); X = a * X + B @ X``
  (the baseline of the speedup column);
* ``pytorch_optimizer``: ``zero_power_via_newton_schulz_5`` (cuBLAS with ``addmm`` epilogues).

On a CPU every case is reported unsupported: there the Triton kernels only run in the interpreter,
which is a test vehicle, not a benchmark.  ``items`` counts the nominal FLOPs of the plain iteration,
``steps * (4 m^2 n + 2 m^3)`` for m = min(rows, cols), n = max, the same for every method (so
``flop_per_s`` is an effective rate: the symmetric kernels do fewer FLOPs); ``bytes_per_call``
is the ideal traffic, read G and write the result (bf16), which a compute-bound kernel ignores.

Bar: on CUDA, ``fastopt-triton`` >= 1.5x ``torch-matmul`` on both shapes.

``muon`` (CPU and CUDA): one ``opt.step()`` on four 1024x1024 (CPU: 128x128) fp32 weight matrices (a ``use_muon=True``
group) and four 1024 fp32 biases (a ``use_muon=False`` AdamW group), ``--quick``: two 128x128 and two
128; methods ``fastopt-torch``, ``fastopt-triton`` (CUDA only) and ``pytorch_optimizer`` (its default
foreach path, which batches same-shape matrices as fastopt does), with the same hyperparameters and
gradients.  ``bytes_per_call`` counts the elementwise traffic only (Muon: read p, g, m, write p, m;
AdamW: read p, g, m, v, write p, m, v) -- the Newton–Schulz matmuls dominate and are compute-bound.
No bar.  Cost warning: every Newton–Schulz runs in bf16 as upstream does, and on CPUs without native
bf16 matmul (no AVX512-BF16 / AMX) torch's bf16 GEMM is far slower than fp32, so one full-size step
can take minutes there.
"""
from dataclasses import dataclass

import torch

from .harness import Bar, Case, Suite, Unsupported, Workload, register

COEFFS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
NS_BASELINE = "torch-matmul"
NS_METHODS = ("fastopt-triton", NS_BASELINE, "pytorch_optimizer")
STEP_BASELINE = "pytorch_optimizer"
STEP_METHODS = ("fastopt-torch", "fastopt-triton", STEP_BASELINE)
HYPER = dict(lr=0.02, momentum=0.95, weight_decay=0.01, adamw_lr=3e-4, adamw_wd=0.01)


# -- Newton–Schulz --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NSConfig:
    rows: int
    cols: int

    @property
    def name(self):
        return f"{self.rows}x{self.cols}"

    @property
    def flops(self):
        m, n = min(self.rows, self.cols), max(self.rows, self.cols)
        return NS_STEPS * (4 * m * m * n + 2 * m ** 3)

    @property
    def bytes_moved(self):
        return 2 * 2 * self.rows * self.cols


NS_FULL = [NSConfig(1024, 4096), NSConfig(4096, 4096)]
NS_QUICK = [NSConfig(256, 1024)]


def plain_torch_newton_schulz(G, steps=NS_STEPS, eps=1e-7, coeffs=COEFFS):
    """The textbook iteration in plain torch matmuls (Keller Jordan's reference code)."""
    a, b, c = coeffs
    X = G.bfloat16()
    transpose = G.size(-2) > G.size(-1)
    if transpose:
        X = X.mT
    X = X / (X.norm() + eps)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X.mT if transpose else X


def ns_setup(config, method, device):
    if device.type != "cuda":
        raise Unsupported("Newton-Schulz is benchmarked on CUDA only (on a CPU the Triton kernels run in the "
                          "interpreter, which is not a benchmark)")
    G = torch.randn(config.rows, config.cols, device=device, generator=torch.Generator(device).manual_seed(0))
    if method == "fastopt-triton":
        from .. import _backend

        if "triton" not in _backend.available_backends(device):
            raise Unsupported("triton is not available for CUDA tensors here")
        from ..triton_kernels.newton_schulz import newton_schulz_triton

        return Workload(fn=lambda: newton_schulz_triton(G, steps=NS_STEPS, coeffs=[COEFFS]))
    if method == NS_BASELINE:
        return Workload(fn=lambda: plain_torch_newton_schulz(G))
    if method == "pytorch_optimizer":
        try:
            from pytorch_optimizer.optimizer.utils.matrix import zero_power_via_newton_schulz_5
        except ImportError as e:
            raise Unsupported(f"pytorch_optimizer is not installed ({e})") from e
        return Workload(fn=lambda: zero_power_via_newton_schulz_5(G, num_steps=NS_STEPS, weights=COEFFS))
    raise ValueError(f"unknown Newton-Schulz method {method!r}")


def ns_cases(ctx):
    return [Case(config=c.name, method=m, items=c.flops, bytes_moved=c.bytes_moved,
                 setup=lambda c=c, m=m: ns_setup(c, m, ctx.device), info={"dtype": "bfloat16", "ns_steps": NS_STEPS})
            for c in (NS_QUICK if ctx.quick else NS_FULL) for m in NS_METHODS]


def ns_bars(ctx):
    if ctx.device.type != "cuda":
        return []
    return [Bar(c.name, "fastopt-triton", NS_SUITE.speedup_key, 1.5) for c in (NS_QUICK if ctx.quick else NS_FULL)]


NS_SUITE = register(Suite(name="newton_schulz", cases=ns_cases, unit="flop", baseline=NS_BASELINE, bars=ns_bars,
                          memory_bound=False, what="5 Newton-Schulz iterations"))


# -- full Muon optimizer steps ------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepConfig:
    """``n_matrices`` (size x size) weights in a Muon group and as many (size,) biases in an AdamW group."""

    n_matrices: int
    size: int
    dtype: torch.dtype = torch.float32

    @property
    def name(self):
        return f"{self.n_matrices}x{self.size}x{self.size}"

    @property
    def numel(self):
        return self.n_matrices * (self.size * self.size + self.size)

    @property
    def bytes_per_step(self):
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return itemsize * self.n_matrices * (5 * self.size * self.size + 7 * self.size)


STEP_FULL = StepConfig(4, 1024)
# bf16 matmuls are far slower than fp32 on CPUs without bf16 instructions, so the CPU report times
# 128x128 matrices.
STEP_CPU = StepConfig(4, 128)
STEP_QUICK = StepConfig(2, 64)


def make_params(config, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    weights, biases = [], []
    for _ in range(config.n_matrices):
        for shape, out in (((config.size, config.size), weights), ((config.size,), biases)):
            p = torch.nn.Parameter(torch.randn(shape, generator=gen, device=device, dtype=config.dtype))
            p.grad = torch.randn(shape, generator=gen, device=device, dtype=config.dtype)
            out.append(p)
    return [dict(params=weights, use_muon=True), dict(params=biases, use_muon=False)]


def make_optimizer(method, groups, device):
    if method.startswith("fastopt-"):
        from .. import _backend
        from ..optim.muon import Muon

        backend = method.removeprefix("fastopt-")
        if backend == "triton" and (device.type != "cuda" or "triton" not in _backend.available_backends(device)):
            raise Unsupported("the Triton Newton-Schulz kernels are benchmarked on CUDA with triton only")
        return Muon(groups, **HYPER, backend=backend)
    if method == STEP_BASELINE:
        try:
            import pytorch_optimizer
        except ImportError as e:
            raise Unsupported(f"pytorch_optimizer is not installed ({e})") from e
        return pytorch_optimizer.Muon(groups, **HYPER)
    raise ValueError(f"unknown Muon method {method!r}")


def state_nbytes(opt):
    return sum(t.nbytes for s in opt.state.values() for t in s.values() if torch.is_tensor(t))


def step_setup(config, method, device):
    """Fresh parameters with gradients and one ``opt.step()`` per call.  pytorch_optimizer writes into
    ``p.grad`` (Nesterov mix); that changes the numbers, not the cost."""
    opt = make_optimizer(method, make_params(config, device), device)
    return Workload(fn=opt.step, state_bytes=lambda: state_nbytes(opt))


def step_cases(ctx):
    c = STEP_QUICK if ctx.quick else (STEP_FULL if ctx.device.type == "cuda" else STEP_CPU)
    return [Case(config=c.name, method=m, items=c.numel, bytes_moved=c.bytes_per_step,
                 setup=lambda m=m: step_setup(c, m, ctx.device),
                 info={"dtype": str(c.dtype).removeprefix("torch."), "tensors": 2 * c.n_matrices})
            for m in STEP_METHODS]


STEP_SUITE = register(Suite(name="muon", cases=step_cases, unit="params", baseline=STEP_BASELINE,
                            memory_bound=False, what="one opt.step()"))
