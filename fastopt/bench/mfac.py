"""The dense M-FAC benchmark suite (issue 20): one ``fastopt.MFAC`` step beside a torch-ops implementation of
the same recursion, on a full window.

Methods, in the same run: ``fastopt-<backend>`` for the kernel backends usable on the device (``cpu`` on
CPUs, ``triton`` on GPUs; the Triton interpreter is not benchmarked), ``fastopt-torch`` (the reference:
the passes as chunked torch ops; d <= 1M only) and ``torch-ops`` (the baseline, :class:`TorchOpsMFAC`): the official
codes' structure in plain torch ops -- the flattened gradient, ``G[s] = g``, ``G g`` and ``c @ G`` as one
matrix-vector product each in the window's dtype, the momentum and the update as separate ops -- with
the same fp64 m x m algebra as fastopt (so only the passes over d differ).

Window: m = 256 rows (full: every step reads all of them) of d = 10M columns in bf16 (5.1 GB per
window); the fp32 comparison runs at d = 1M (a 10 GB fp32 window does not fit beside the other jobs of
a 24 GB machine).  The cases run one after the other and free their window in between.  Momentum 0.9,
L2 decay 1e-4.  ``--quick``: m = 32, d = 256K.

Bytes moved per step (an ideal implementation): both passes read the window (``2 m d s``, s = 2 or 4
bytes), pass 1 writes one row (``d s``) and reads g and p, pass 2 reads g, p, v and writes p, v:
``(2 m + 1) d s + 28 d``.  Bar: ``fastopt-cpu`` (CPU) / ``fastopt-triton`` (GPU) >= 3x ``torch-ops`` on
m256-d10M-bf16.
"""
from dataclasses import dataclass

import torch

from .harness import Bar, Case, Suite, Unsupported, Workload, register

HYPER = dict(lr=1e-3, momentum=0.9, weight_decay=1e-4, damp=1e-4)
BASELINE = "torch-ops"
FILL = 1e-3  # the window's prefilled value (see _prefill)


@dataclass(frozen=True)
class Config:
    name: str
    m: int
    d: int
    dtype: torch.dtype

    @property
    def bytes_per_step(self):
        s = torch.empty((), dtype=self.dtype).element_size()
        return (2 * self.m + 1) * self.d * s + 28 * self.d


C_BF16 = Config("m256-d10M-bf16", 256, 10_000_000, torch.bfloat16)
C_FP32 = Config("m256-d1M-fp32", 256, 1_000_000, torch.float32)
C_QUICK_BF16 = Config("m32-d256K-bf16", 32, 262_144, torch.bfloat16)
C_QUICK_FP32 = Config("m32-d256K-fp32", 32, 262_144, torch.float32)


def configs(device, quick):
    return [C_QUICK_BF16, C_QUICK_FP32] if quick else [C_BF16, C_FP32]


def methods(device):
    from fastopt._backend import available_backends

    kernels = [b for b in available_backends(device) if b in ("cpu", "triton")]
    return [f"fastopt-{b}" for b in kernels] + ["fastopt-torch", BASELINE]


def methods_for(config, device):
    """The reference (fastopt-torch: chunked torch ops, about 50x slower than the kernels on the 10M
    window) runs on the --quick sizes only."""
    return [m for m in methods(device) if m != "fastopt-torch" or config.d <= 1 << 20]


class TorchOpsMFAC:
    """The baseline: dense M-FAC (momentum, L2 decay) as plain torch ops over one flattened d-vector, the
    fp64 m x m algebra shared with fastopt (:mod:`fastopt.reference.mfac`).  Not a public optimizer."""

    def __init__(self, params, m, dtype, lr, momentum, weight_decay, damp):
        self.params = list(params)
        self.m, self.lr, self.mom, self.wd, self.damp = m, lr, momentum, weight_decay, damp
        d = sum(p.numel() for p in self.params)
        dev = self.params[0].device
        self.G = torch.zeros((m, d), dtype=dtype, device=dev)
        self.gram = torch.zeros((m, m), dtype=torch.float64, device=dev)
        self.inv = torch.eye(m, dtype=torch.float64, device=dev) / (m * damp)
        self.v = torch.zeros(d, dtype=torch.float32, device=dev)
        self.t = 0

    @torch.no_grad()
    def step(self):
        from ..reference import mfac as ref

        self.t += 1
        m, t = self.m, self.t
        slot, nrows = (t - 1) % m, min(t, m)
        g = torch.cat([p.grad.reshape(-1) for p in self.params])
        w = torch.cat([p.reshape(-1) for p in self.params])
        g.add_(w, alpha=self.wd)
        self.G[slot] = g
        rows = self.G[:nrows]
        dots = torch.zeros(m, dtype=torch.float64, device=g.device)
        dots[:nrows] = (rows @ g.to(rows.dtype)).double()
        self.gram[slot, :] = dots
        self.gram[:, slot] = dots
        if t % m == 0:
            self.inv.copy_(ref.mfac_refresh_inverse(self.gram, m, self.damp))
        else:
            ref.mfac_replace_inverse_(self.inv, self.gram, slot, m, self.damp)
        c = ref.mfac_coefficients(self.inv, dots, self.damp)[:nrows]
        u = g.div_(self.damp).sub_((c.to(rows.dtype) @ rows).float())
        self.v.mul_(self.mom).add_(u, alpha=1 - self.mom)
        w.sub_(self.v, alpha=self.lr)
        off = 0
        for p in self.params:
            n = p.numel()
            p.copy_(w[off:off + n].view_as(p))
            off += n


def _prefill(window, gram, inv, m, damp):
    """A full window whose every page is written (untouched zero pages would be read from one cached
    page): every entry FILL in the storage dtype, with its exact Gram matrix and inverse."""
    window.fill_(FILL)
    s = float(window[0, 0])
    gram.fill_(s * s * window.shape[1])
    from ..reference import mfac as ref

    inv.copy_(ref.mfac_refresh_inverse(gram, m, damp))


def make_params(config, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    p = torch.nn.Parameter(torch.randn(config.d, generator=gen, device=device))
    p.grad = torch.randn(config.d, generator=gen, device=device)
    return [p]


def setup(config, method, device):
    params = make_params(config, device)
    if method == BASELINE:
        opt = TorchOpsMFAC(params, config.m, config.dtype, **HYPER)
        opt.t = config.m  # full: the next step replaces row 0 and reads all m rows
        _prefill(opt.G, opt.gram, opt.inv, config.m, HYPER["damp"])
        return Workload(fn=opt.step, state_bytes=lambda: opt.G.nbytes + opt.v.nbytes)
    import fastopt
    from fastopt._backend import available_backends

    backend = method.removeprefix("fastopt-")
    if backend != "torch" and backend not in available_backends(device):
        raise Unsupported(f"backend {backend!r} is not available on {device}")
    if backend == "triton" and device.type == "cpu":
        raise Unsupported("triton on CPU runs only in the TRITON_INTERPRET interpreter; not benchmarked")
    opt = fastopt.MFAC(params, ngrads=config.m, grads_dtype=config.dtype, backend=backend, **HYPER)
    opt.step()  # allocates the state
    st = opt.state[params[0]]
    st["step"].fill_(config.m)
    _prefill(st["grads"], st["gram"], st["inv"], config.m, HYPER["damp"])
    return Workload(fn=opt.step, state_bytes=lambda: sum(t.nbytes for t in st.values()))


def cases(ctx):
    return [Case(config=c.name, method=m, items=c.d, bytes_moved=c.bytes_per_step,
                 setup=lambda c=c, m=m: setup(c, m, ctx.device),
                 info={"dtype": str(c.dtype).removeprefix("torch."), "m": c.m})
            for c in configs(ctx.device, ctx.quick) for m in methods_for(c, ctx.device)]


def bars(ctx):
    method = "fastopt-triton" if ctx.device.type == "cuda" else "fastopt-cpu"
    return [Bar(C_BF16.name, method, SUITE.speedup_key, 3.0)]


SUITE = register(Suite(name="mfac", cases=cases, unit="params", baseline=BASELINE, bars=bars,
                       what="one opt.step() on a full window"))
