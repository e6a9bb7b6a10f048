"""fastopt.SGD / Adagrad / RMSprop against torch.optim (for-loop, foreach and fused paths, torch 2.13) on
every backend: many steps, odd shapes, option combinations, tensor lr, AMP, state_dict interchange both
ways, bf16, an N:M sparse group, 8-bit states (bitsandbytes' test protocol and bounds, and
bitsandbytes' own SGD8bit / RMSprop8bit on the CPU), torch's errors and signatures.
(tests/test_zoo.py and tests/test_cuda_on_cpu.py run the zoo cases of tests/zoo_cases.py too.)"""
import copy
import inspect
import io

import pytest
import torch

import fastopt
from conftest import DEVICE_BACKENDS

BACKENDS = [b for d, b in DEVICE_BACKENDS if d == "cpu"]  # torch, cpu, triton (interpreted) where present
CLASSES = {"SGD": (fastopt.SGD, torch.optim.SGD), "Adagrad": (fastopt.Adagrad, torch.optim.Adagrad),
           "RMSprop": (fastopt.RMSprop, torch.optim.RMSprop)}
STATES = {"SGD": ("momentum_buffer",), "Adagrad": ("sum",), "RMSprop": ("square_avg", "momentum_buffer", "grad_avg")}
# torch 2.13 has fused CPU kernels for SGD and Adagrad (torch._fused_sgd_, torch._fused_adagrad_), not RMSprop
PATHS = {"SGD": ("for-loop", "foreach", "fused"), "Adagrad": ("for-loop", "foreach", "fused"),
         "RMSprop": ("for-loop", "foreach")}
PATH_KW = {"for-loop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}

CONFIGS = [
    ("SGD", dict(lr=0.05)),
    ("SGD", dict(lr=0.05, weight_decay=0.1, maximize=True)),
    ("SGD", dict(lr=0.05, momentum=0.9)),
    ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.05)),
    ("SGD", dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.01, maximize=True)),
    ("Adagrad", dict(lr=0.05)),
    ("Adagrad", dict(lr=0.05, lr_decay=0.03, initial_accumulator_value=0.2, weight_decay=0.05)),
    ("Adagrad", dict(lr=0.05, eps=1e-6, maximize=True, initial_accumulator_value=1.0)),
    ("RMSprop", dict(lr=0.01)),
    ("RMSprop", dict(lr=0.01, alpha=0.9, weight_decay=0.05, maximize=True)),
    ("RMSprop", dict(lr=0.01, momentum=0.9)),
    ("RMSprop", dict(lr=0.01, centered=True)),
    ("RMSprop", dict(lr=0.01, centered=True, momentum=0.5, alpha=0.8, weight_decay=0.01, eps=1e-6)),
]
CONFIG_IDS = [f"{n}-{i}" for i, (n, _) in enumerate(CONFIGS)]

# numel 0, 1, primes, 3-d, a block-crossing size, many small tensors beside few large ones
SHAPES = [(0,), (1,), (7,), (97,), (13, 31), (5, 3, 11), (4099,)] + [(2 + i % 13,) for i in range(24)]
SMALL_SHAPES = [(0,), (1,), (7,), (13, 5), (33,)]  # the Triton interpreter is slow


def make(shapes, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(dtype) for s in shapes]


def params_like(base):
    return [torch.nn.Parameter(b.clone()) for b in base]


def grads(param_sets, step, scale=1.0, inf_at=None):
    gen = torch.Generator().manual_seed(1000 + step)
    for ps in zip(*param_sets):
        g = torch.randn(ps[0].shape, generator=gen) * scale
        if inf_at is not None and g.numel():
            g.view(-1)[0] = float(inf_at)
        for p in ps:
            p.grad = g.to(p.dtype).clone()


def assert_states_close(ref_opt, ref_ps, opt, ps, names, rtol=1e-5):
    """Params to fp32 rounding; states to rtol plus an atol of 1e-5 of the state's largest magnitude
    (RMSprop's momentum_buffer sums g / avg, of size 1 / sqrt(1 - alpha) where the sums cancel; torch's
    sqrt is not always correctly rounded)."""
    for a, b in zip(ref_ps, ps):
        torch.testing.assert_close(b.detach().float(), a.detach().float(), rtol=rtol, atol=1e-6)
        for name in names:
            if name not in ref_opt.state[a]:
                assert name not in opt.state[b] or name == "momentum_buffer" and opt.param_groups[0]["momentum"] == 0
                continue
            want = ref_opt.state[a][name].float()
            got = opt.state[b][name].float()
            atol = 1e-5 * max(1.0, float(want.abs().max())) if want.numel() else 0.0
            torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m, n=name: f"state {n}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,kw", CONFIGS, ids=CONFIG_IDS)
def test_matches_torch_optim_every_path(name, kw, backend):
    """20 steps (one with a zero gradient), odd shapes: fastopt on ``backend`` vs torch.optim's for-loop,
    foreach and fused paths, parameters and states."""
    ours_cls, torch_cls = CLASSES[name]
    shapes = SMALL_SHAPES if backend == "triton" else SHAPES
    steps = 8 if backend == "triton" else 20
    base = make(shapes)
    ours_p = params_like(base)
    refs = [(params_like(base), path) for path in PATHS[name]]
    ours = ours_cls(ours_p, backend=backend, **kw)
    torch_opts = [torch_cls(ps, **kw, **PATH_KW[path]) for ps, path in refs]
    for t in range(steps):
        grads([ours_p] + [ps for ps, _ in refs], t, scale=0.0 if t == 3 else 1.0)
        ours.step()
        for o in torch_opts:
            o.step()
    for (ps, path), o in zip(refs, torch_opts):
        assert_states_close(o, ps, ours, ours_p, STATES[name])
        for a, b in zip(ps, ours_p):
            if "step" in o.state[a]:
                assert float(o.state[a]["step"]) == float(ours.state[b]["step"]) == steps, path


@pytest.mark.parametrize("name,kw", [c for c in CONFIGS if c[0] != "SGD" or c[1].get("momentum")],
                         ids=[i for i, c in zip(CONFIG_IDS, CONFIGS) if c[0] != "SGD" or c[1].get("momentum")])
def test_tensor_lr_and_param_groups(name, kw):
    """A tensor lr and per-group options (two groups, the second with half the lr and other options)."""
    ours_cls, torch_cls = CLASSES[name]
    base = make(SHAPES[:8])
    pa, pb = params_like(base), params_like(base)
    other = {"SGD": dict(dampening=0.0, nesterov=False, momentum=0.5), "Adagrad": dict(lr_decay=0.1),
             "RMSprop": dict(centered=not kw.get("centered", False))}[name]

    def groups(ps, lr):
        return [{"params": ps[:4]}, {"params": ps[4:], "lr": lr * 0.5, **other}]

    lr = kw["lr"]
    ours = ours_cls(groups(pa, lr), **{**kw, "lr": torch.tensor(lr)}, backend="cpu")
    ref = torch_cls(groups(pb, lr), **{**kw, "lr": torch.tensor(lr)}, foreach=False)
    for t in range(12):
        grads([pa, pb], t)
        ours.step()
        ref.step()
    assert_states_close(ref, pb, ours, pa, STATES[name])


# -- state_dict interchange -----------------------------------------------------------------------
INTERCHANGE = [("SGD", dict(lr=0.05, momentum=0.9, dampening=0.2, weight_decay=0.01)),
               ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True)),
               ("SGD", dict(lr=0.05, weight_decay=0.1)),
               ("Adagrad", dict(lr=0.05, lr_decay=0.05, initial_accumulator_value=0.3)),
               ("RMSprop", dict(lr=0.01, momentum=0.9, centered=True, alpha=0.9))]


def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("first", ["torch", "fastopt"])
@pytest.mark.parametrize("before", [0, 4])
@pytest.mark.parametrize("name,kw", INTERCHANGE, ids=[f"{n}-{i}" for i, (n, _) in enumerate(INTERCHANGE)])
def test_state_dict_interchange(name, kw, before, first):
    """A checkpoint written by one (after ``before`` steps, 0: a fresh optimizer) loads into the other
    (through torch.save / torch.load(weights_only=True)); both then step alike.  SGD: torch keeps no
    step (NOTE: [SGD's step] in fastopt/optim/sgd.py); Adagrad: torch makes its state in __init__."""
    ours_cls, torch_cls = CLASSES[name]
    base = make(SHAPES[:7])
    ps_first = params_like(base)
    make_torch = lambda ps: torch_cls(ps, **kw)  # noqa: E731
    make_ours = lambda ps: ours_cls(ps, backend="cpu", **kw)  # noqa: E731
    make_first, make_second = (make_torch, make_ours) if first == "torch" else (make_ours, make_torch)
    a = make_first(ps_first)
    for t in range(before):
        grads([ps_first], t)
        a.step()
    ps_second = params_like([p.detach() for p in ps_first])
    b = make_second(ps_second)
    b.load_state_dict(_roundtrip(a.state_dict()))
    for t in range(before, before + 6):
        grads([ps_first, ps_second], t)
        a.step()
        b.step()
    ref, ref_ps, got, got_ps = (a, ps_first, b, ps_second) if first == "torch" else (b, ps_second, a, ps_first)
    assert_states_close(ref, ref_ps, got, got_ps, STATES[name])


def test_sgd_torch_checkpoint_continues_the_buffer_and_fresh_buffers_start_with_g():
    """NOTE: [SGD's step]: a loaded torch buffer is continued (not replaced by g); momentum switched on
    after steps without it starts the buffer with g, as torch does."""
    base = make([(6,), (3, 4)])
    pa, pb = params_like(base), params_like(base)
    ours = fastopt.SGD(pa, lr=0.1, backend="cpu")
    ref = torch.optim.SGD(pb, lr=0.1)
    for t in range(3):
        grads([pa, pb], t)
        ours.step()
        ref.step()
    for o in (ours, ref):
        o.param_groups[0]["momentum"] = 0.9
        o.param_groups[0]["dampening"] = 0.5
    for t in range(3, 7):
        grads([pa, pb], t)
        ours.step()
        ref.step()
    assert_states_close(ref, pb, ours, pa, ("momentum_buffer",))
    loaded = fastopt.SGD(params_like([p.detach() for p in pb]), lr=0.1, momentum=0.9, dampening=0.5, backend="cpu")
    sd = copy.deepcopy(ref.state_dict())  # (a loaded state dict shares its tensors)
    assert all("step" not in s for s in sd["state"].values())
    loaded.load_state_dict(sd)
    grads([loaded.param_groups[0]["params"], pb], 7)
    loaded.step()
    ref.step()
    assert_states_close(ref, pb, loaded, loaded.param_groups[0]["params"], ("momentum_buffer",))


# -- AMP, bf16, sparse groups -------------------------------------------------------------------------
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
@pytest.mark.parametrize("name,kw", [CONFIGS[3], CONFIGS[6], CONFIGS[12]], ids=["SGD", "Adagrad", "RMSprop"])
def test_grad_scaler(name, kw, backend):
    """torch.amp.GradScaler: the unscale is fused (grad_scale / found_inf given to the kernels) and an
    inf step is skipped, against torch's for-loop path stepped by its own scaler."""
    ours_cls, torch_cls = CLASSES[name]
    base = make(SHAPES[:7])
    pa, pb = params_like(base), params_like(base)
    ours = ours_cls(pa, backend=backend, **kw)
    ref = torch_cls(pb, foreach=False, **kw)
    sa, sb = torch.amp.GradScaler("cpu", init_scale=1024.0), torch.amp.GradScaler("cpu", init_scale=1024.0)
    for t in range(6):
        gen = torch.Generator().manual_seed(t)
        weights = [torch.randn(p.shape, generator=gen) for p in pa]
        if t == 2:
            weights[1].view(-1)[0] = float("inf")
        for ps, o, scaler in ((pa, ours, sa), (pb, ref, sb)):
            o.zero_grad()
            scaler.scale(sum((p * w).sum() for p, w in zip(ps, weights))).backward()
            scaler.step(o)
            scaler.update()
    assert sa.get_scale() == sb.get_scale() == 512.0  # one skipped step halved it
    assert_states_close(ref, pb, ours, pa, STATES[name])
    assert all(float(ours.state[p]["step"]) == 5 for p in pa if ours.state[p])


@pytest.mark.parametrize("name,kw", [CONFIGS[4], CONFIGS[6], CONFIGS[12]], ids=["SGD", "Adagrad", "RMSprop"])
def test_bf16_master_weights_and_stochastic_rounding(name, kw):
    """bf16 parameters: master weights track the fp32 torch run to fp32 rounding (bf16 storage of the
    result); stochastic rounding is the same bits on the cpu and torch backends (seeded) and stays
    within bf16 resolution of the fp32 run."""
    ours_cls, torch_cls = CLASSES[name]
    base = [b.bfloat16().float() for b in make([(300,), (17, 9)])]
    p32 = params_like(base)
    pm = params_like([b.bfloat16() for b in base])
    ps_cpu, ps_ref = params_like([b.bfloat16() for b in base]), params_like([b.bfloat16() for b in base])
    ref = torch_cls(p32, **kw)
    om = ours_cls(pm, backend="cpu", master_weights=True, **kw)
    oc = ours_cls(ps_cpu, backend="cpu", stochastic_rounding=True, seed=7, **kw)
    ot = ours_cls(ps_ref, backend="torch", stochastic_rounding=True, seed=7, **kw)
    for t in range(10):
        grads([p32, pm, ps_cpu, ps_ref], t)
        # the fp32 run sees the bf16 gradients the others see
        for p in p32:
            p.grad = p.grad.bfloat16().float()
        for o in (ref, om, oc, ot):
            o.step()
    for a, m, c, r in zip(p32, pm, ps_cpu, ps_ref):
        assert torch.equal(c, r)
        torch.testing.assert_close(om.state[m]["master_param"], a.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m.detach().float(), a.detach().bfloat16().float(), rtol=0, atol=0)
        torch.testing.assert_close(c.detach().float(), a.detach(), rtol=0, atol=0.05)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
@pytest.mark.parametrize("name,kw", [CONFIGS[3], CONFIGS[6], CONFIGS[12]], ids=["SGD", "Adagrad", "RMSprop"])
def test_nm_sparse_group(name, kw, backend):
    """An N:M sparse training group (fastopt.sparse.NMSparsity, SR-STE) beside a dense one: the fused
    epilogue of the kernel backends equals the torch backend, and the weights stay 2:4 sparse."""
    from fastopt.sparse import NMSparsity

    cls = CLASSES[name][0]
    sp = NMSparsity(2, 4, recipe="sr-ste", srste_lambda=0.05, refresh_every=2)
    out = []
    for be in ("torch", backend):
        base = make([(8, 16), (4, 32), (5,)])
        ps = params_like(base)
        opt = cls([{"params": ps[:2], "sparsity": sp}, {"params": ps[2:]}], backend=be, **kw)
        opt.sparsify()
        for t in range(5):
            grads([ps], t)
            opt.step()
        out.append((ps, opt))
    (pr, orf), (pk, ok) = out
    for a, b in zip(pr, pk):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-5, atol=1e-6)
    for a, b in zip(pr[:2], pk[:2]):
        assert torch.equal(orf.state[a]["nm_mask"], ok.state[b]["nm_mask"])
        torch.testing.assert_close(ok.state[b]["dense_param"], orf.state[a]["dense_param"], rtol=1e-5, atol=1e-6)
        nonzero = (b.detach().reshape(-1, 4) != 0).sum(dim=1)
        assert int(nonzero.max()) <= 2


# -- 8-bit states ---------------------------------------------------------------------------------------
def _dequantized(opt, p, name):
    from fastopt.lowbit import dequantize_blockwise
    from fastopt.lowbit.state import state_formats

    names = opt._state_names(opt.param_groups[0])
    fmt = state_formats(8, names, p.shape)[names.index(name)]
    s = opt.state[p]
    return dequantize_blockwise(s[name], s[name + "_absmax"], fmt, backend="torch").view_as(p)


LOWBIT = [("SGD", "momentum_buffer", lambda ps: torch.optim.SGD(ps, 0.01, 0.9),
           lambda ps, be: fastopt.lowbit.SGD8bit(ps, 0.01, 0.9, backend=be)),
          ("RMSprop", "square_avg", lambda ps: torch.optim.RMSprop(ps, 0.01, 0.9),
           lambda ps, be: fastopt.lowbit.RMSprop8bit(ps, 0.01, 0.9, backend=be))]


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
@pytest.mark.parametrize("case", LOWBIT, ids=[c[0] for c in LOWBIT])
def test_8bit_states_within_bitsandbytes_bounds(case, backend):
    """bitsandbytes 0.50.2's tests/test_optim.py::test_optimizer8bit protocol and fp32 bounds (1024 x 32,
    p ~ 0.1 randn, g ~ 0.01 randn, 50 steps; after every step the torch optimizer is reset to the 8-bit
    one's parameters and dequantized state): dequantized state vs torch's, fewer than 20 elements out
    of (atol 3e-3, rtol 1e-3); mean |dp| < 6e-5 and mean |dp| / |p| < 6e-4 per step; every 10 steps all
    parameters within (atol 1e-5, rtol 1e-3).  And the errors are those of bitsandbytes' own
    SGD8bit / RMSprop8bit, run on the CPU beside it (mean error at most 1.25x bitsandbytes' + 1e-7)."""
    name, key, make_torch, make_ours = case
    bnb = pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnbf

    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(1024, 32, generator=gen) * 0.1
    p1, p2, p3 = (torch.nn.Parameter(p0.clone()) for _ in range(3))
    t_opt, ours = make_torch([p1]), make_ours([p2], backend)
    b_cls = bnb.optim.SGD8bit if name == "SGD" else bnb.optim.RMSprop8bit
    b_opt, t_for_b = b_cls([p3], 0.01, 0.9), make_torch([torch.nn.Parameter(p0.clone())])
    pb_ref = t_for_b.param_groups[0]["params"][0]
    ours_err, bnb_err = [], []
    for i in range(50):
        g = torch.randn(1024, 32, generator=gen) * 0.01
        for p in (p1, p2, p3, pb_ref):
            p.grad = g.clone()
        for o in (t_opt, ours, b_opt, t_for_b):
            o.step()
        s_ours = _dequantized(ours, p2, key)
        assert (~torch.isclose(t_opt.state[p1][key], s_ours, atol=3e-3, rtol=1e-3)).sum() < 20
        err = (p1 - p2).detach().abs()
        assert err.mean() < 6e-5 and (err / (p1.abs() + 1e-9)).mean() < 6e-4
        if i % 10 == 0 and i > 0:
            torch.testing.assert_close(p2.detach(), p1.detach(), atol=1e-5, rtol=1e-3)
        ours_err.append(float(err.mean()))
        bnb_err.append(float((pb_ref - p3).detach().abs().mean()))
        s_bnb = bnbf.dequantize_blockwise(code=b_opt.state[p3]["qmap1"], absmax=b_opt.state[p3]["absmax1"],
                                          A=b_opt.state[p3]["state1"], blocksize=256).view_as(p3)
        with torch.no_grad():  # bitsandbytes' resynchronization, for both
            p1.copy_(p2)
            t_opt.state[p1][key].copy_(s_ours)
            pb_ref.copy_(p3)
            t_for_b.state[pb_ref][key].copy_(s_bnb)
    assert sum(ours_err) <= 1.25 * sum(bnb_err) + 1e-7 * len(ours_err), (sum(ours_err), sum(bnb_err))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_8bit_kernels_match_the_reference(backend):
    """The fused dequantize-update-requantize of SGD8bit / RMSprop8bit (momentum) vs the torch backend."""
    shape = (4, 256) if backend == "triton" else (64, 256)
    for make_opt in (lambda ps, be: fastopt.lowbit.SGD8bit(ps, lr=0.01, momentum=0.9, nesterov=True, backend=be,
                                                           min_quant_size=256),
                     lambda ps, be: fastopt.lowbit.RMSprop8bit(ps, lr=0.01, momentum=0.9, backend=be,
                                                               min_quant_size=256)):
        base = make([shape, (7,)])
        pa, pb = params_like(base), params_like(base)
        ref, ker = make_opt(pa, "torch"), make_opt(pb, backend)
        for t in range(4):
            grads([pa, pb], t)
            ref.step()
            ker.step()
        for a, b in zip(pa, pb):
            torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-5, atol=1e-6)
        s_a, s_b = ref.state[pa[0]], ker.state[pb[0]]
        assert "state_format" in s_a
        for k in s_a:
            if torch.is_tensor(s_a[k]) and s_a[k].dtype == torch.uint8:
                # a code may differ by one where an fp32 rounding difference crosses a decision boundary
                assert (s_a[k].int() - s_b[k].int()).abs().max() <= 1
                assert (s_a[k] != s_b[k]).float().mean() < 1e-3


# -- errors and signatures ------------------------------------------------------------------------------
BAD = [("SGD", dict(lr=-1.0)), ("SGD", dict(momentum=-0.1)), ("SGD", dict(weight_decay=-1.0)),
       ("SGD", dict(nesterov=True)), ("SGD", dict(nesterov=True, momentum=0.9, dampening=0.1)),
       ("SGD", dict(lr=torch.tensor([0.1, 0.2]))),
       ("Adagrad", dict(lr=-1.0)), ("Adagrad", dict(lr_decay=-1.0)), ("Adagrad", dict(weight_decay=-1.0)),
       ("Adagrad", dict(initial_accumulator_value=-1.0)), ("Adagrad", dict(eps=-1.0)),
       ("RMSprop", dict(lr=-1.0)), ("RMSprop", dict(eps=-1.0)), ("RMSprop", dict(momentum=-1.0)),
       ("RMSprop", dict(weight_decay=-1.0)), ("RMSprop", dict(alpha=-1.0))]


@pytest.mark.parametrize("name,kw", BAD, ids=[f"{n}-{'-'.join(k)}" for n, k in BAD])
def test_invalid_hyperparameters_raise_as_torch(name, kw):
    ours_cls, torch_cls = CLASSES[name]
    with pytest.raises(ValueError) as want:
        torch_cls([torch.nn.Parameter(torch.zeros(3))], **kw)
    with pytest.raises(ValueError, match=str(want.value).replace("[", r"\[").replace("(", r"\(")):
        ours_cls([torch.nn.Parameter(torch.zeros(3))], **kw)


@pytest.mark.parametrize("name", list(CLASSES))
def test_path_arguments(name):
    ours_cls, torch_cls = CLASSES[name]
    p = torch.nn.Parameter(torch.zeros(3))
    if name != "RMSprop":
        with pytest.raises(RuntimeError, match="cannot be `True` together"):
            torch_cls([p], fused=True, foreach=True)
        with pytest.raises(RuntimeError, match="cannot be `True` together"):
            ours_cls([p], fused=True, foreach=True)
    with pytest.raises(ValueError, match="differentiable=True"):
        ours_cls([p], differentiable=True)
    extra = dict(capturable=True) if name == "RMSprop" else dict(fused=True)
    opt = ours_cls([p], foreach=False, **extra)
    p.grad = torch.ones(3)
    opt.step()
    assert float(p.detach()[0]) < 0


def test_rmsprop_centered_low_bit_refused():
    with pytest.raises(ValueError, match="centered=True with low-bit"):
        fastopt.RMSprop([torch.nn.Parameter(torch.zeros(4096))], centered=True, state_bits=8)


@pytest.mark.parametrize("name,kw", [CONFIGS[3], CONFIGS[6], CONFIGS[12]], ids=["SGD", "Adagrad", "RMSprop"])
def test_bad_gradient_changes_nothing(name, kw):
    """A sparse gradient, then an invalid lr, in the second group: nothing is written (params, states)."""
    cls = CLASSES[name][0]
    base = make([(5,), (3, 4)])
    ps = params_like(base)
    opt = cls([{"params": ps[:1]}, {"params": ps[1:]}], backend="cpu", **kw)
    grads([ps], 0)
    opt.step()
    before = copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in ps]
    ps[0].grad = torch.ones(5)
    ps[1].grad = torch.ones(3, 4).to_sparse()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()
    ps[1].grad = torch.ones(3, 4)
    opt.param_groups[1]["lr"] = -1.0
    with pytest.raises(ValueError, match="learning rate"):
        opt.step()
    after = opt.state_dict()
    for a, b in zip(before[1], ps):
        assert torch.equal(a, b.detach())
    for k, s in before[0]["state"].items():
        for key, v in s.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(after["state"][k][key])), key


@pytest.mark.parametrize("name", list(CLASSES))
def test_signature_is_torchs(name):
    """Every torch.optim argument with its default, position (positional ones) and kind."""
    ours_cls, torch_cls = CLASSES[name]
    theirs = inspect.signature(torch_cls.__init__).parameters
    ours = inspect.signature(ours_cls.__init__).parameters
    positional = lambda ps: [(k, p.default) for k, p in ps.items() if p.kind is p.POSITIONAL_OR_KEYWORD]  # noqa: E731
    assert positional(ours) == positional(theirs)
    for k, p in theirs.items():
        if p.kind is p.KEYWORD_ONLY:
            assert k in ours and ours[k].kind is p.KEYWORD_ONLY and ours[k].default == p.default, k


def test_adagrad_state_made_in_init_and_share_memory():
    p = torch.nn.Parameter(torch.zeros(5))
    ours = fastopt.Adagrad([p], initial_accumulator_value=0.5)
    theirs = torch.optim.Adagrad([torch.nn.Parameter(torch.zeros(5))], initial_accumulator_value=0.5)
    assert set(ours.state[p]) == set(next(iter(theirs.state.values()))) == {"step", "sum"}
    assert torch.equal(ours.state[p]["sum"], torch.full((5,), 0.5))
    ours.share_memory()
    assert ours.state[p]["sum"].is_shared()


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_sgd_tensor_weight_decay(backend):
    """torch 2.13's SGD takes a one-element tensor weight_decay (read as a float here)."""
    base = make([(7,), (3, 5)])
    pa, pb = params_like(base), params_like(base)
    ours = fastopt.SGD(pa, lr=0.05, momentum=0.9, weight_decay=torch.tensor(0.1), backend=backend)
    ref = torch.optim.SGD(pb, lr=0.05, momentum=0.9, weight_decay=torch.tensor(0.1))
    for t in range(5):
        grads([pa, pb], t)
        ours.step()
        ref.step()
    assert_states_close(ref, pb, ours, pa, ("momentum_buffer",))
    with pytest.raises(ValueError, match="weight_decay"):
        fastopt.SGD(pa, weight_decay=torch.tensor([0.1, 0.2]))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
@pytest.mark.parametrize("name,kw", [CONFIGS[4], CONFIGS[7], CONFIGS[12]], ids=["SGD", "Adagrad", "RMSprop"])
def test_mixed_dtypes_in_one_group(name, kw, backend):
    """fp32, bf16 and fp16 parameters in one group (one kernel call per dtype): each equals the torch
    backend (fp32 math, storage rounded to nearest) to one storage ulp, and the fp32 ones torch.optim."""
    cls, torch_cls = CLASSES[name]
    base = make([(33,), (7, 5), (64,), (3, 3), (40,)])
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float32, torch.bfloat16]
    pk, pr = ([torch.nn.Parameter(b.to(d, copy=True)) for b, d in zip(base, dtypes)] for _ in range(2))
    p32 = params_like([base[0], base[3]])
    ker, ref = cls(pk, backend=backend, **kw), cls(pr, backend="torch", **kw)
    upstream = torch_cls(p32, **kw)
    for t in range(5):
        grads([pk, pr], t)
        for q, i in zip(p32, (0, 3)):
            q.grad = pk[i].grad.clone()
        for o in (ker, ref, upstream):
            o.step()
    for a, b, d in zip(pr, pk, dtypes):
        tol = dict(rtol=1e-5, atol=1e-6) if d == torch.float32 else dict(rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(b.detach().float(), a.detach().float(), **tol)
    assert_states_close(upstream, p32, ker, [pk[0], pk[3]], STATES[name])
