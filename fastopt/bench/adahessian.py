"""The AdaHessian benchmark suites.

``adahessian``: one call = the update of one step with the Hessian estimate already computed (the
double backward excluded), ``step(hessian=...)`` on both sides: ``fastopt.AdaHessian`` on every fastopt
kernel backend usable on the device (``fastopt-<backend>``; the estimates passed are the state's own
``hessian`` tensors, so nothing is copied: one fused kernel call) and ``pytorch_optimizer.AdaHessian``
(4.1.0, its default foreach path; ``step(hessian=...)`` stores the given tensors by reference), the
baseline.  Both update ``exp_hessian_diag_sq`` from the estimate at every call (update_period 1).

Bytes moved per parameter by the fused kernel (fp32): it reads p, g, m, v, D and writes p, m, v and D
(the shared launcher writes every state slot back): ``9 * 4 = 36`` bytes.

``adahessian-step``: one call = a whole training step of a small MLP (forward, ``backward(create_graph=
True)``, the Hutchinson estimate: probes, the double backward, the estimate; the update), fastopt vs
pytorch_optimizer with one probe, beside torch's autograd alone (``torch-fwd-bwd``: forward and
``backward(create_graph=True)``; ``torch-fwd-bwd-hvp``: the same plus one double backward): the
difference of those two is the Hessian-vector product's time, reported separately from the update (no
bar: the double backward is torch's autograd on both sides).

Bars: on CPU ``fastopt-cpu`` >= 4x ``pytorch_optimizer`` on the update, 20x1M fp32 (issue 20).
"""
import torch

from .adamw import C_20X1M, C_MIXED, C_MIXED_SMALL, C_SMALL, make_params
from .harness import Bar, Case, Suite, Unsupported, Workload, fastopt_backend, register

BASELINE = "pytorch_optimizer"
HYPER = dict(lr=1e-3, weight_decay=1e-2)


def _methods(device):
    from fastopt._backend import available_backends

    return [f"fastopt-{b}" for b in available_backends(device) if b != "torch"] + [BASELINE]


def _make(method, params, device):
    if method == BASELINE:
        try:
            from pytorch_optimizer import AdaHessian as Upstream
        except ImportError as e:
            raise Unsupported(f"pytorch_optimizer is not installed: {e}") from e
        return Upstream(params, **HYPER)
    import fastopt

    return fastopt.AdaHessian(params, backend=fastopt_backend(method, device), **HYPER)


def setup_update(config, method, device):
    """The update with given estimates (|g| / 2 + 0.1, the same for every method)."""
    params = make_params(config, device)
    opt = _make(method, params, device)
    given = [p.grad.abs() * 0.5 + 0.1 for p in params]
    if method == BASELINE:
        def update():
            opt.step(hessian=given)
    else:
        opt.step(hessian=given)  # the states exist; from now on the estimates are the state's own tensors
        own = [opt.state[p]["hessian"] for p in params]

        def update():
            opt.step(hessian=own)

    def state_bytes():
        return sum(t.nbytes for s in opt.state.values() for t in s.values() if torch.is_tensor(t))

    return Workload(fn=update, state_bytes=state_bytes)


def update_configs(device, quick):
    return [C_SMALL, C_MIXED_SMALL] if quick else [C_20X1M, C_MIXED]


def _update_suite():
    def cases(ctx):
        return [Case(config=c.name, method=m, items=c.numel, bytes_moved=9 * 4 * c.numel,
                     setup=lambda c=c, m=m: setup_update(c, m, ctx.device),
                     info={"dtype": "float32", "tensors": len(c.sizes)})
                for c in update_configs(ctx.device, ctx.quick) for m in _methods(ctx.device)]

    def bars(ctx):
        if ctx.device.type == "cuda":
            return []
        return [Bar(C_20X1M.name, "fastopt-cpu", suite.speedup_key, 4.0)]

    suite = Suite(name="adahessian", cases=cases, unit="params", baseline=BASELINE, bars=bars,
                  what="one step(hessian=...): the update, the estimate given")
    return register(suite)


# -- the whole step, with the double backward ----------------------------------------------------------

MLP = {"mlp-1M": (512, 4, 64), "mlp-small": (128, 2, 16)}   # name: (width, layers, batch)


def _mlp(width, layers, device):
    torch.manual_seed(0)
    mods = []
    for _ in range(layers):
        mods += [torch.nn.Linear(width, width), torch.nn.Tanh()]
    return torch.nn.Sequential(*mods).to(device)


# Methods of the step suite that time torch's autograd alone (no optimizer): the forward and
# backward(create_graph=True), then the same plus one double backward with +-1 probes (the
# Hessian-vector product): their difference is the HVP's cost, which both AdaHessians pay.
AUTOGRAD = ("torch-fwd-bwd", "torch-fwd-bwd-hvp")


def setup_step(name, method, device):
    width, layers, batch = MLP[name]
    model = _mlp(width, layers, device)
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(batch, width, generator=gen, device=device)
    y = torch.randn(batch, width, generator=gen, device=device)
    if method in AUTOGRAD:
        params = list(model.parameters())
        zs = [torch.randint(0, 2, p.shape, generator=gen, device=device).float() * 2 - 1 for p in params]

        def autograd_only():
            for p in params:
                p.grad = None
            loss = ((model(x) - y) ** 2).mean()
            loss.backward(create_graph=True)
            if method == "torch-fwd-bwd-hvp":
                torch.autograd.grad([p.grad for p in params], params, grad_outputs=zs)

        return Workload(fn=autograd_only)
    opt = _make(method, list(model.parameters()), device)

    def step():
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward(create_graph=True)
        opt.step()

    return Workload(fn=step)


def _step_suite():
    def cases(ctx):
        names = ["mlp-small"] if ctx.quick else ["mlp-1M"]
        out = []
        for name in names:
            width, layers, _ = MLP[name]
            n = layers * (width * width + width)
            out += [Case(config=name, method=m, items=n, bytes_moved=0,
                         setup=lambda name=name, m=m: setup_step(name, m, ctx.device), info={"params": n})
                    for m in _methods(ctx.device) + list(AUTOGRAD)]
        return out

    return register(Suite(name="adahessian-step", cases=cases, unit="params", baseline=BASELINE,
                          memory_bound=False,
                          what="a training step: forward, backward(create_graph), estimate (double backward), update"))


SUITES = (_update_suite(), _step_suite())
