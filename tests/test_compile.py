"""torch.compile of fastopt's optimizer steps and Sinkhorn.

Every compiled case is compared with the same steps run eagerly, and dynamo's counters are checked:
``unique_graphs`` (frames compiled: one for the first step, which creates the state, one for every
step after it), ``graph_break`` (none: fullgraph=True would raise anyway) and recompiles.  Most
cases use ``backend="aot_eager"`` (dynamo + AOTAutograd, no code generation: the CI machine compiles
inductor's C++ slowly); a few representative ones run the default inductor backend.
"""
import math

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import fastopt
import fastopt.lowbit
import fastopt.ot

from conftest import KERNEL_DEVICE_BACKENDS

CPU_KERNEL = [b for d, b in KERNEL_DEVICE_BACKENDS if d == "cpu" and b == "cpu"]
HAS_TRITON = ("cpu", "triton") in KERNEL_DEVICE_BACKENDS

pytestmark = pytest.mark.skipif(not CPU_KERNEL, reason="needs fastopt._C (the cpu backend)")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
    counters.clear()


def _params(seed=0, shapes=((64, 80), (33,), (8, 4, 3))):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).requires_grad_() for s in shapes]


def _grads(params, step):
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=g) for p in params]


def _run(make, *, steps=4, compiled=None, sched=None, shapes=((64, 80), (33,), (8, 4, 3))):
    """``steps`` steps of the optimizer ``make(params)`` on fixed gradients, eager (``compiled`` None) or
    through ``torch.compile(fullgraph=True, backend=compiled)``; returns (params, optimizer)."""
    params = _params(shapes=shapes)
    opt = make(params)
    scheduler = sched(opt) if sched is not None else None

    def step():
        opt.step()

    if compiled is not None:
        step = torch.compile(step, fullgraph=True, backend=compiled)
    for i in range(steps):
        for p, g in zip(params, _grads(params, i)):
            p.grad = g
        step()
        if scheduler is not None:
            scheduler.step()
    return [p.detach().clone() for p in params], opt


def _graphs():
    return counters["stats"]["unique_graphs"]


def _breaks():
    return sum(counters["graph_break"].values())


def _assert_same(eager, compiled, exact=True):
    for a, b in zip(eager, compiled):
        if exact:
            assert torch.equal(a, b), (a - b).abs().max()
        else:
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)


def _muon(params, **kw):
    return fastopt.Muon([dict(params=params[:1], use_muon=True), dict(params=params[1:], use_muon=False)],
                        **{"lr": 0.01, **kw})


LOWBIT = dict(min_quant_size=256)  # the 64 x 80 parameter gets quantized states, the others stay fp32
OPTIMIZERS = {
    "AdamW": lambda ps, b: fastopt.AdamW(ps, lr=1e-2, backend=b),
    "Adam": lambda ps, b: fastopt.Adam(ps, lr=1e-2, weight_decay=0.1, amsgrad=True, backend=b),
    "Lion": lambda ps, b: fastopt.Lion(ps, lr=1e-3, weight_decay=0.1, backend=b),
    "Adan": lambda ps, b: fastopt.Adan(ps, lr=1e-2, weight_decay=0.02, backend=b),
    "AdaBelief": lambda ps, b: fastopt.AdaBelief(ps, lr=1e-2, rectify=True, n_sma_threshold=4, backend=b),
    "DiffGrad": lambda ps, b: fastopt.DiffGrad(ps, lr=1e-2, backend=b),
    "EXAdam": lambda ps, b: fastopt.EXAdam(ps, lr=1e-2, backend=b),
    "Lamb": lambda ps, b: fastopt.Lamb(ps, lr=1e-2, weight_decay=0.01, pre_norm=True, backend=b),
    "AdamP": lambda ps, b: fastopt.AdamP(ps, lr=1e-2, weight_decay=0.01, backend=b),
    "SGDP": lambda ps, b: fastopt.SGDP(ps, lr=1e-2, momentum=0.9, nesterov=True, backend=b),
    "SGDSaI": lambda ps, b: fastopt.SGDSaI(ps, lr=1e-2, backend=b),
    "AdamW8bit": lambda ps, b: fastopt.lowbit.AdamW8bit(ps, lr=1e-2, backend=b, **LOWBIT),
    "Lion4bit": lambda ps, b: fastopt.lowbit.Lion4bit(ps, lr=1e-3, backend=b, **LOWBIT),
    "AdamFp8": lambda ps, b: fastopt.lowbit.AdamFp8(ps, lr=1e-2, backend=b, **LOWBIT),
    "AdaBelief4bit": lambda ps, b: fastopt.lowbit.AdaBelief4bit(ps, lr=1e-2, backend=b, **LOWBIT),
    "Adan8bit": lambda ps, b: fastopt.lowbit.Adan8bit(ps, lr=1e-2, backend=b, **LOWBIT),
    "Muon": lambda ps, b: _muon(ps),
}
# Muon's matrix update is torch ops on a tensor lr when compiled (upstream's foreach formula, in fp64:
# p += O * (-lr s)) where the eager step with a float lr uses p.add_(O, alpha=-lr s): ~1e-9 apart.
INEXACT = {"Muon"}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_step_compiles_fullgraph_and_matches_eager(name):
    make = OPTIMIZERS[name]
    eager, _ = _run(lambda ps: make(ps, "cpu"), steps=5)
    compiled, opt = _run(lambda ps: make(ps, "cpu"), steps=5, compiled="aot_eager")
    _assert_same(eager, compiled, exact=name not in INEXACT)
    assert _breaks() == 0
    # one graph for the first step (it creates the state), one for every step after it
    assert _graphs() == 2, dict(counters["stats"])
    if name.endswith(("8bit", "4bit", "Fp8")):
        assert "state_format" in opt.state[opt.param_groups[0]["params"][0]]


@pytest.mark.parametrize("name, sched", [("AdamW", None), ("Lion", None), ("Lamb", None), ("AdamW", "StepLR")])
def test_torch_backend_compiles(name, sched):
    """The torch backend's references are traced.  fastopt.Adam/AdamW's reference takes the lr mirror
    (no recompile under a scheduler); the zoo's references compute with the float lr in Python, so
    there a scheduler recompiles (README)."""
    make = OPTIMIZERS[name]
    kw = dict(steps=6, sched=SCHEDULERS[sched] if sched else None)
    eager, _ = _run(lambda ps: make(ps, "torch"), **kw)
    compiled, _ = _run(lambda ps: make(ps, "torch"), compiled="aot_eager", **kw)
    _assert_same(eager, compiled)
    assert _breaks() == 0 and _graphs() == 2


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton (TRITON_INTERPRET=1 on a CPU)")
@pytest.mark.parametrize("name", ["AdamW", "Lamb", "AdamW8bit"])
def test_triton_backend_compiles(name):
    """Triton kernels (run by the interpreter on a CPU) inside a compiled graph: the custom op calls the
    launcher when the graph runs."""
    make = OPTIMIZERS[name]
    shapes = ((16, 32), (7,))
    kw = dict(steps=3, shapes=shapes)
    if name == "AdamW8bit":
        make = lambda ps, b: fastopt.lowbit.AdamW8bit(ps, lr=1e-2, backend=b, min_quant_size=256)  # noqa: E731
    eager, _ = _run(lambda ps: make(ps, "triton"), **kw)
    compiled, _ = _run(lambda ps: make(ps, "triton"), compiled="aot_eager", **kw)
    _assert_same(eager, compiled)
    assert _breaks() == 0 and _graphs() == 2


@pytest.mark.parametrize("name", ["AdamW", "Lamb", "AdamW8bit"])
def test_inductor(name):
    """The default backend: the kernels stay custom ops; inductor compiles (and may fuse) the torch ops
    around them, such as LAMB's trust ratio between its two kernel calls (within fp32 rounding)."""
    make = OPTIMIZERS[name]
    eager, _ = _run(lambda ps: make(ps, "cpu"), steps=3)
    compiled, _ = _run(lambda ps: make(ps, "cpu"), steps=3, compiled="inductor")
    _assert_same(eager, compiled, exact=name != "Lamb")
    assert _breaks() == 0 and _graphs() == 2


SCHEDULERS = {
    "StepLR": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7),
    # cycle_momentum=False: betas/momentum are graph constants (changing them recompiles; README)
    "OneCycleLR": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=10,
                                                                  cycle_momentum=False),
    "LambdaLR": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s)),
}


@pytest.mark.parametrize("sched", sorted(SCHEDULERS))
@pytest.mark.parametrize("name", ["AdamW", "Lion", "SGDSaI", "AdamW8bit", "Muon"])
def test_scheduler_does_not_recompile(name, sched):
    make = OPTIMIZERS[name]
    eager, opt_e = _run(lambda ps: make(ps, "cpu"), steps=8, sched=SCHEDULERS[sched])
    compiled, opt_c = _run(lambda ps: make(ps, "cpu"), steps=8, sched=SCHEDULERS[sched], compiled="aot_eager")
    _assert_same(eager, compiled, exact=name not in INEXACT)
    # 8 different learning rates, two graphs (the first step's and the steady one): no recompiles
    assert _graphs() == 2 and _breaks() == 0, dict(counters["stats"])
    for ge, gc in zip(opt_e.param_groups, opt_c.param_groups):
        assert type(gc["lr"]) is float and gc["lr"] == ge["lr"]


def test_lr_changed_by_hand_and_invalid_lr():
    params = _params()
    opt = fastopt.AdamW(params, lr=0.01, backend="cpu")
    ref = fastopt.AdamW(_params(), lr=0.01, backend="cpu")
    step = torch.compile(lambda: opt.step(), fullgraph=True, backend="aot_eager")
    for i, lr in enumerate([0.01, 0.02, 0.0, 0.5]):
        for group in (opt.param_groups[0], ref.param_groups[0]):
            group["lr"] = lr
        for p, q, g in zip(params, ref.param_groups[0]["params"], _grads(params, i)):
            p.grad, q.grad = g, g.clone()
        step()
        ref.step()
    _assert_same(ref.param_groups[0]["params"], params)
    assert _graphs() == 2
    opt.param_groups[0]["lr"] = -1.0
    before = [p.detach().clone() for p in params]
    with pytest.raises(Exception, match="Invalid learning rate: -1.0"):
        step()
    _assert_same(before, params)  # nothing written
    opt.param_groups[0].update(lr=math.nan)  # update() is mirrored too
    with pytest.raises(Exception, match="Invalid learning rate: nan"):
        step()


@pytest.mark.parametrize("name", ["AdamW", "Lamb", "Muon"])
def test_tensor_lr(name):
    """A tensor lr changed in place (what torch's schedulers do with one) neither recompiles nor
    diverges from eager."""
    def make(ps):
        opt = OPTIMIZERS[name](ps, "cpu")
        for group in opt.param_groups:
            group["lr"] = torch.tensor(0.01)
        return opt

    sched = lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)  # noqa: E731
    eager, _ = _run(make, steps=5, sched=sched)
    compiled, opt = _run(make, steps=5, sched=sched, compiled="aot_eager")
    _assert_same(eager, compiled, exact=name not in INEXACT)
    assert _graphs() == 2 and _breaks() == 0
    assert torch.is_tensor(opt.param_groups[0]["lr"])


@pytest.mark.parametrize("name", ["AdamW", "Lamb", "SGDSaI", "AdamW8bit", "Muon"])
def test_state_dict_round_trip_after_compiled_steps(name, tmp_path):
    """3 compiled steps (with a scheduler), save, load into a new optimizer, 3 more compiled steps:
    the same parameters as 6 eager steps; the saved groups hold plain floats (and Muon's step count)."""
    make = OPTIMIZERS[name]
    sched = SCHEDULERS["StepLR"]
    eager, _ = _run(lambda ps: make(ps, "cpu"), steps=6, sched=sched)

    params = _params()
    opt = make(params, "cpu")
    scheduler = sched(opt)
    step = torch.compile(lambda: opt.step(), fullgraph=True, backend="aot_eager")
    for i in range(3):
        for p, g in zip(params, _grads(params, i)):
            p.grad = g
        step()
        scheduler.step()
    sd = opt.state_dict()
    for group in sd["param_groups"]:
        assert type(group["lr"]) is float
        if name == "Muon":
            assert group["step"] == 3
    torch.save({"opt": sd, "sched": scheduler.state_dict()}, tmp_path / "ckpt.pt")
    loaded = torch.load(tmp_path / "ckpt.pt", weights_only=True)

    opt2 = make(params, "cpu")
    opt2.load_state_dict(loaded["opt"])
    scheduler2 = sched(opt2)
    scheduler2.load_state_dict(loaded["sched"])
    step2 = torch.compile(lambda: opt2.step(), fullgraph=True, backend="aot_eager")
    for i in range(3, 6):
        for p, g in zip(params, _grads(params, i)):
            p.grad = g
        step2()
        scheduler2.step()
    _assert_same(eager, [p.detach() for p in params], exact=name not in INEXACT)
    if name == "Muon":
        assert opt2.state_dict()["param_groups"][0]["step"] == 6


def test_forward_backward_step_in_one_graph():
    """With trace_autograd_ops, forward + backward + step compile into one fullgraph function."""
    def run(compiled):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
        opt = fastopt.AdamW(model.parameters(), lr=0.01, backend="cpu")
        x, y = torch.randn(32, 8), torch.randn(32, 2)

        def train_step():
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            return loss.detach()

        if compiled:
            train_step = torch.compile(train_step, fullgraph=True, backend="aot_eager")
        losses = []
        for _ in range(4):
            losses.append(train_step())
            opt.zero_grad()  # (torch's zero_grad is never traced: outside the compiled function)
        return torch.stack(losses), [p.detach().clone() for p in model.parameters()]

    with torch._dynamo.config.patch(trace_autograd_ops=True):
        eager_loss, eager = run(False)
        comp_loss, compiled = run(True)
    assert torch.equal(eager_loss, comp_loss)
    _assert_same(eager, compiled)
    assert _graphs() == 2 and _breaks() == 0


def test_checks_still_run_when_compiled():
    """The checks a compiled step keeps (README, 'what is checked when compiled')."""
    # state metadata (dtype/shape/device/strides), at trace time: a state replaced by one of another dtype
    params = _params()
    opt = fastopt.AdamW(params, lr=0.01, backend="cpu")
    step = torch.compile(lambda: opt.step(), fullgraph=True, backend="aot_eager")
    for p, g in zip(params, _grads(params, 0)):
        p.grad = g
    step()
    opt.state[params[0]]["exp_avg"] = torch.zeros(params[0].shape, dtype=torch.float64)
    before = [p.detach().clone() for p in params]
    with pytest.raises(Exception, match="state 'exp_avg'"):
        step()
    _assert_same(before, params)

    # hyperparameters other than lr, at trace time (they are constants of the graph)
    params = _params()
    opt = fastopt.Lion(params, lr=0.01, backend="cpu")
    step = torch.compile(lambda: opt.step(), fullgraph=True, backend="aot_eager")
    for p, g in zip(params, _grads(params, 0)):
        p.grad = g
    opt.param_groups[0]["betas"] = (1.5, 0.99)
    with pytest.raises(Exception, match="Invalid beta parameter at index 0"):
        step()
    assert not opt.state

    # the tensor boundary, when the graph runs: two parameters that share memory
    base = torch.zeros(100)
    a, b = base[:60].requires_grad_(), base[40:].requires_grad_()
    opt = fastopt.AdamW([a, b], lr=0.01, backend="cpu")
    a.grad, b.grad = torch.ones(60), torch.ones(60)
    with pytest.raises(ValueError, match="share memory"):
        opt.step()  # eager: the optimizer's check
    step = torch.compile(lambda: opt.step(), fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match="share memory"):
        step()  # compiled: the kernel boundary's


@pytest.mark.parametrize("backend", ["cpu", "torch"] + (["triton"] if HAS_TRITON else []))
@pytest.mark.parametrize("balanced", [True, False])
def test_sinkhorn_fixed_iterations_compiles(backend, balanced):
    """sinkhorn with a fixed iteration count: one graph, no breaks, the eager values, potentials, error
    and gradient; ``converged`` becomes a bool tensor (README)."""
    torch.manual_seed(0)
    x = torch.randn(2, 30, 3, requires_grad=True)
    y = torch.randn(2, 25, 3)
    kw = dict(eps=0.5, n_iter=15, tol=1e-3, backend=backend, rho=None if balanced else 2.0)

    def f(x, y):
        r = fastopt.ot.sinkhorn(x, y, **kw)
        return r.value, r.f, r.g, r.error, r.converged

    eager = f(x, y)
    (ge,) = torch.autograd.grad(eager[0].sum(), x)
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    comp = cf(x, y)
    (gc,) = torch.autograd.grad(comp[0].sum(), x)
    for a, b in zip(eager[:4], comp[:4]):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    torch.testing.assert_close(gc, ge, rtol=0, atol=0)
    assert torch.is_tensor(comp[4]) and bool(comp[4]) == eager[4]
    cf(x.detach().mul(2).requires_grad_(), y)  # other values, same shapes: no recompile
    assert _graphs() == 1 and _breaks() == 0


def test_sinkhorn_checks_in_eager_only():
    x, y = torch.randn(20, 2), torch.randn(20, 2)
    x[3, 1] = math.nan
    with pytest.raises(ValueError, match="non-finite"):
        fastopt.ot.sinkhorn(x, y, eps=0.5, n_iter=5)
    # compiled, the value checks are not run (NOTE: [sinkhorn under torch.compile]): NaN in, no finite value out
    r = torch.compile(lambda x, y: fastopt.ot.sinkhorn(x, y, eps=0.5, n_iter=5).value, fullgraph=True,
                      backend="aot_eager")(x, y)
    assert not torch.isfinite(r)
    # shape checks still run when compiled
    with pytest.raises(Exception, match="same batch and dimension"):
        torch.compile(lambda x, y: fastopt.ot.sinkhorn(x, y, eps=0.5, n_iter=5).value, fullgraph=True,
                      backend="aot_eager")(torch.randn(20, 2), torch.randn(20, 3))
    with pytest.raises(Exception, match="eps_scaling does not compile"):
        torch.compile(lambda x, y: fastopt.ot.sinkhorn(x, y, eps=0.5, n_iter=5, eps_scaling=0.5).value,
                      fullgraph=True, backend="aot_eager")(torch.randn(20, 2), torch.randn(20, 2))


@pytest.mark.parametrize("name", ["AdamW", "Lion", "AdamW8bit"])
def test_grad_scaler_with_compiled_step(name):
    """torch.amp.GradScaler calling a compiled step (opt.step = torch.compile(opt.step)): the scale and
    found_inf it sets on the optimizer are consumed by the kernels; a step with an inf gradient is
    skipped as in eager mode."""
    def run(compiled):
        torch.manual_seed(0)
        model = torch.nn.Linear(64, 64)
        opt = OPTIMIZERS[name](model.parameters(), "cpu")
        if compiled:
            opt.step = torch.compile(opt.step, fullgraph=True, backend="aot_eager")
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
        x = torch.randn(16, 64)
        for i in range(5):
            loss = model(x).pow(2).mean() * (math.inf if i == 2 else 1.0)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        return [p.detach().clone() for p in model.parameters()], scaler.get_scale()

    eager, scale_e = run(False)
    compiled, scale_c = run(True)
    _assert_same(eager, compiled)
    assert scale_e == scale_c == 2.0 ** 9
    assert _graphs() == 2 and _breaks() == 0


def test_limitations_int8_weights_and_nm_sparsity():
    """What the README lists as limitations: Int8Linear weights are refused with a clear error when
    compiled; N:M sparse training compiles but its per-state Python step counts recompile every step
    (the numbers are still eager's)."""
    layer = fastopt.lowbit.Int8Linear(64, 32, group_size=64)
    opt = fastopt.Lion(layer.parameters(), lr=1e-3, backend="cpu")
    layer(torch.randn(8, 64)).sum().backward()
    with pytest.raises(Exception, match="cannot step uint8 parameters"):
        torch.compile(lambda: opt.step(), fullgraph=True, backend="aot_eager")()

    torch._dynamo.reset()
    counters.clear()
    from fastopt.sparse.training import NMSparsity

    def make(ps):
        return fastopt.Lion([dict(params=ps[:1], sparsity=NMSparsity(2, 4))], lr=1e-3, backend="cpu")

    shapes = ((16, 32),)
    eager, _ = _run(make, steps=4, shapes=shapes)
    compiled, _ = _run(make, steps=4, shapes=shapes, compiled="aot_eager")
    _assert_same(eager, compiled)
    assert _graphs() == 4 and _breaks() == 0
