"""The SAF benchmark suite (``saf``): one training step of a small MLP on synthetic data with per-example
indices, plain and with the SAF trajectory term (:class:`fastopt.sharpness.SAFLoss`, Du et al.,
"Sharpness-Aware Training for Free"), beside SAM around the same base optimizer.

One call = one step on the next batch of the data set (the batches rotate, so the bank rows read and
written change every step): forward, cross-entropy, backward, ``torch.optim.SGD(momentum=0.9)``.

- ``plain``: that step (the baseline);
- ``saf-fastopt-<backend>``: plus ``SAFLoss`` in an epoch where the term is on (bank gather, KL and its
  gradient, bank scatter: one fused kernel, and one elementwise product in the backward);
- ``saf-torch``: the same term as plain torch ops (``backend="torch"``, the reference);
- ``sam-fastopt`` / ``sam-pytorch_optimizer``: SAM (rho 0.05) around the same SGD: two forward-backward
  passes per step (``first_step``, ``second_step``), with ``fastopt.SAM`` and ``pytorch_optimizer.SAM``.
- ``term-fastopt-<backend>`` / ``term-torch``: the SAF term alone (forward and backward on (batch,
  classes) logits, the next batch's indices): what SAF adds to a step, whatever the model.

Bars: the SAF step of every fused backend costs at most 1.10 x the plain step (``speedup_vs_plain >=
1 / 1.10``), the issue's "at the cost of the base optimizer".
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .harness import Bar, Case, Suite, Unsupported, Workload, register

BASELINE = "plain"
SAF_LIMIT = 1.10  # SAF step / plain step


@dataclass(frozen=True)
class Config:
    name: str
    examples: int
    features: int
    hidden: int
    classes: int
    batch: int


CONFIGS = [
    Config("mlp-512x1024x2-c100-b128", examples=20000, features=512, hidden=1024, classes=100, batch=128),
    Config("mlp-512x1024x2-c1000-b128", examples=10000, features=512, hidden=1024, classes=1000, batch=128),
]
QUICK = [Config("mlp-64x128x2-c10-b32", examples=512, features=64, hidden=128, classes=10, batch=32)]


def _data(cfg, device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(cfg.examples, cfg.features, generator=g)
    y = (x @ torch.randn(cfg.features, cfg.classes, generator=g)).argmax(1)
    return x.to(device), y.to(device)


def _model(cfg, device):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(cfg.features, cfg.hidden), torch.nn.ReLU(),
                               torch.nn.Linear(cfg.hidden, cfg.hidden), torch.nn.ReLU(),
                               torch.nn.Linear(cfg.hidden, cfg.classes)).to(device)


def _batches(cfg, device):
    """An endless rotation over a fixed random order of the examples: ``next()`` gives a batch's indices."""
    order = torch.randperm(cfg.examples, generator=torch.Generator().manual_seed(1)).to(device)
    nb = cfg.examples // cfg.batch
    batches = [order[k * cfg.batch:(k + 1) * cfg.batch] for k in range(nb)]
    state = [0]

    def nxt():
        b = batches[state[0] % nb]
        state[0] += 1
        return b
    return nxt


def setup(cfg, method, device):
    x, y = _data(cfg, device)
    model = _model(cfg, device)
    nxt = _batches(cfg, device)
    sgd = dict(lr=0.01, momentum=0.9)
    if method == BASELINE:
        opt = torch.optim.SGD(model.parameters(), **sgd)

        def step():
            idx = nxt()
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return Workload(fn=step)
    if method.startswith("term-"):
        from fastopt._backend import available_backends
        from fastopt.sharpness import SAFLoss

        backend = method.removeprefix("term-").removeprefix("fastopt-")
        if backend not in available_backends(device) or (backend == "triton" and device.type == "cpu"):
            raise Unsupported(f"backend {backend!r} is not benchmarked on {device.type}")
        saf = SAFLoss(cfg.examples, cfg.classes, device=device, backend=backend)
        epoch = saf.start_epoch + saf.epochs_ago + 1
        logits = torch.randn(cfg.batch, cfg.classes, device=device, requires_grad=True)

        def term():
            saf(logits, nxt(), epoch).backward()
        return Workload(fn=term, state_bytes=lambda: saf.bank.nbytes)
    if method.startswith("saf-"):
        from fastopt._backend import available_backends
        from fastopt.sharpness import SAFLoss

        backend = method.removeprefix("saf-").removeprefix("fastopt-")
        if backend not in available_backends(device) or (backend == "triton" and device.type == "cpu"):
            raise Unsupported(f"backend {backend!r} is not benchmarked on {device.type}")
        saf = SAFLoss(cfg.examples, cfg.classes, device=device, backend=backend)
        epoch = saf.start_epoch + saf.epochs_ago + 1  # the term is on
        opt = torch.optim.SGD(model.parameters(), **sgd)

        def step():
            idx = nxt()
            logits = model(x[idx])
            loss = F.cross_entropy(logits, y[idx]) + saf(logits, idx, epoch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return Workload(fn=step, state_bytes=lambda: saf.bank.nbytes)
    if method.startswith("sam-"):
        if method == "sam-fastopt":
            import fastopt

            if not hasattr(fastopt, "SAM"):
                raise Unsupported("this fastopt has no SAM")
            opt = fastopt.SAM(model.parameters(), torch.optim.SGD, rho=0.05, **sgd)
        else:
            try:
                import pytorch_optimizer
            except ImportError as e:
                raise Unsupported(f"pytorch_optimizer is not installed: {e}") from e
            opt = pytorch_optimizer.SAM(model.parameters(), torch.optim.SGD, rho=0.05, **sgd)

        def step():
            idx = nxt()
            xb, yb = x[idx], y[idx]
            F.cross_entropy(model(xb), yb).backward()
            opt.first_step(zero_grad=True)
            F.cross_entropy(model(xb), yb).backward()
            opt.second_step(zero_grad=True)
        return Workload(fn=step)
    raise Unsupported(f"unknown method {method!r}")


def _methods(device):
    from fastopt._backend import available_backends
    from fastopt.sharpness.saf import _CAPS

    fused = [f"saf-fastopt-{b}" for b in available_backends(device) if b in _CAPS.kernels
             and not (b == "triton" and device.type == "cpu")]
    terms = ["term-" + m.removeprefix("saf-") for m in fused] + ["term-torch"]
    return [BASELINE] + fused + ["saf-torch", "sam-fastopt", "sam-pytorch_optimizer"] + terms


def _flops(cfg):
    """Multiply-adds x 2 of one forward + backward (x 3 the forward's)."""
    fwd = cfg.batch * (cfg.features * cfg.hidden + cfg.hidden * cfg.hidden + cfg.hidden * cfg.classes)
    return 6 * fwd


def _cases(ctx):
    cfgs = QUICK if ctx.quick else CONFIGS
    return [Case(config=c.name, method=m, items=c.batch, bytes_moved=0, setup=lambda c=c, m=m: setup(c, m, ctx.device),
                 info={"classes": c.classes, "batch": c.batch, "examples": c.examples,
                       "GFLOP_per_step": _flops(c) / 1e9})
            for c in cfgs for m in _methods(ctx.device)]


def _bars(ctx):  # (on the full-size configs only: a --quick run's tiny MLP is all Python overhead)
    return [Bar(c.name, m, "speedup_vs_plain", 1.0 / SAF_LIMIT) for c in CONFIGS for m in _methods(ctx.device)
            if m.startswith("saf-fastopt-")]


if __name__ != "__main__":  # (python -m fastopt.bench.saf runs the package's module, which registers it)
    SUITE = register(Suite(name="saf", cases=_cases, unit="examples", baseline=BASELINE, bars=_bars,
                           memory_bound=False, what="one training step (forward, loss, backward, SGD step)"))


def interleaved(rounds=30, configs=None, device="cpu", methods=None):
    """Times the suite's methods step by step in turn (round r runs one step of every method), so that a
    loaded machine's drift hits all of them alike; prints each method's median and minimum step time
    and their ratio to ``plain``'s, and returns ``{config: {method: sorted seconds}}``.
    ``python -m fastopt.bench.saf [ROUNDS]``."""
    import time

    device = torch.device(device)
    out = {}
    for cfg in configs or CONFIGS:
        names = methods or _methods(device)
        works = {}
        for m in names:
            try:
                works[m] = setup(cfg, m, device)
            except Unsupported:
                continue
        for w in works.values():
            w.fn()
            w.fn()
        times = {m: [] for m in works}
        for _ in range(rounds):
            for m, w in works.items():
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                w.fn()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times[m].append(time.perf_counter() - t0)
        base = sorted(times[BASELINE])
        print(f"{cfg.name}: {rounds} interleaved rounds, {torch.get_num_threads()} torch threads")
        for m, ts in times.items():
            ts.sort()
            med, lo = ts[len(ts) // 2], ts[0]
            print(f"  {m:24s} median {med * 1e3:9.3f} ms ({med / base[len(base) // 2]:.3f} x plain)   "
                  f"min {lo * 1e3:9.3f} ms ({lo / base[0]:.3f} x)")
        out[cfg.name] = times
    return out


if __name__ == "__main__":
    import sys

    from fastopt.bench.saf import interleaved as _interleaved

    _interleaved(int(sys.argv[1]) if len(sys.argv) > 1 else 30)
