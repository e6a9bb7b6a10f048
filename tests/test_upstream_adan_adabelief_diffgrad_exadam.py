"""References for Adan, AdaBelief, diffGrad and EXAdam vs the upstream packages they claim to match
(pytorch_optimizer, adan_pytorch, adabelief_pytorch), plus the reference-only contract: maximize,
grad_scale / found_inf (AMP), tensor lr, fp32 math for bf16 storage, state layout and errors.

Every comparison runs the upstream optimizer and the reference side by side for several steps on the
same fp32 parameters and the same random gradients, and compares parameters and every state tensor.
"""
import pytest
import torch

from fastopt.reference import adabelief as ref_adabelief
from fastopt.reference import adan as ref_adan
from fastopt.reference import diffgrad as ref_diffgrad
from fastopt.reference import exadam as ref_exadam

FP32 = dict(rtol=1e-5, atol=1e-6)
SHAPES = [(1,), (7,), (97,), (13, 31), (5, 3, 11)]
STEPS = 10

MODULES = {
    "adan": (ref_adan, ref_adan.adan_init_state, ref_adan.adan_reference),
    "adabelief": (ref_adabelief, ref_adabelief.adabelief_init_state, ref_adabelief.adabelief_reference),
    "diffgrad": (ref_diffgrad, ref_diffgrad.diffgrad_init_state, ref_diffgrad.diffgrad_reference),
    "exadam": (ref_exadam, ref_exadam.exadam_init_state, ref_exadam.exadam_reference),
}


def _params(shapes=SHAPES, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(dtype) for s in shapes]


def _grads(shapes, seed, scale=1.0):
    gen = torch.Generator().manual_seed(1000 + seed)
    return [torch.randn(s, generator=gen) * scale for s in shapes]


def _init(name, params, group):
    _, init, _ = MODULES[name]
    states = [{} for _ in params]
    for p, st in zip(params, states):
        init(p, st, group)
    return states


def _run_ref(name, params, states, kwargs, steps, seed0=0, grad_fn=None):
    _, _, ref = MODULES[name]
    for k in range(steps):
        gs = _grads([p.shape for p in params], seed0 + k)
        if grad_fn is not None:
            gs = grad_fn(gs)
        ref(params, gs, states, **kwargs)


def _side_by_side(name, upstream_cls, up_kwargs, ref_kwargs, steps=STEPS):
    """Run ``upstream_cls`` and the reference on the same params/grads; return both sides."""
    base = _params()
    up = [torch.nn.Parameter(t.clone()) for t in base]
    ours = [t.clone() for t in base]
    opt = upstream_cls(up, **up_kwargs)
    states = _init(name, ours, ref_kwargs)
    _, _, ref = MODULES[name]
    for k in range(steps):
        gs = _grads(SHAPES, k)
        for p, g in zip(up, gs):
            p.grad = g.clone()  # upstream writes into p.grad (L2 term, maximize, Adan's negation)
        opt.step()
        ref(ours, gs, states, **ref_kwargs)
    return opt, up, ours, states


def _assert_match(opt, up, ours, states, steps=STEPS, key_map=None, tol=FP32):
    """Params and states equal; ``key_map`` maps our state names to (upstream name, transform)."""
    module_names = None
    for pu, po_, st in zip(up, ours, states):
        torch.testing.assert_close(po_, pu.detach(), **tol, msg=lambda m: f"param: {m}")
        assert float(st["step"]) == steps
        ustate = opt.state[pu]
        names = [n for n in st if n != "step"]
        if key_map is None:
            # Same names as upstream, and the same set of per-element state tensors.
            assert set(names) == {k for k in ustate if k != "step"}
            pairs = [(n, n, lambda x: x) for n in names]
        else:
            pairs = [(n, *key_map[n]) for n in names]
        for ours_name, up_name, fn in pairs:
            torch.testing.assert_close(st[ours_name], fn(ustate[up_name]).to(st[ours_name].dtype), **tol,
                                       msg=lambda m, n=ours_name: f"state {n}: {m}")
        module_names = names
    assert module_names  # at least one state tensor compared


def _ids(cfgs):
    return ["-".join(f"{k}={v}" for k, v in c.items()) for c in cfgs]


# --------------------------------------------------------------------------------------------------
# pytorch_optimizer
# --------------------------------------------------------------------------------------------------

# pytorch_optimizer's weight decay modes (decoupled, fixed decoupled, L2), shared by AdaBelief, diffGrad
# and EXAdam.
WEIGHT_DECAY_CFGS = [
    dict(lr=1e-2),
    dict(lr=1e-2, weight_decay=0.1, weight_decouple=True),
    dict(lr=1e-2, weight_decay=0.1, weight_decouple=True, fixed_decay=True),
    dict(lr=1e-2, weight_decay=0.1, weight_decouple=False),
]

ADAN_CFGS = [
    dict(lr=1e-2),
    dict(lr=1e-2, weight_decay=0.1, weight_decouple=False),  # no_prox=False (proximal)
    dict(lr=1e-2, weight_decay=0.1, weight_decouple=True),   # no_prox=True
    dict(lr=3e-3, betas=(0.9, 0.8, 0.95), eps=1e-6, weight_decay=0.05),
    dict(lr=1e-2, eps=1e-3),  # a large eps makes its placement (after the bias correction) visible
]


def test_adan_maximize_matches_pytorch_optimizer_after_first_step():
    """Upstream quirk: pytorch_optimizer.Adan initialises previous_grad = -g from the *un-negated*
    gradient and then negates it for maximize, so its first gradient difference is -2g instead of 0.
    The reference treats maximize as "step with -g" on every step.  From step 2 on the two agree:
    run upstream's first step with maximize=False on -g (what maximize should do), then switch it on."""
    po = pytest.importorskip("pytorch_optimizer")
    cfg = dict(lr=1e-2, weight_decay=0.1, weight_decouple=True)
    base = _params()
    up = [torch.nn.Parameter(t.clone()) for t in base]
    ours = [t.clone() for t in base]
    opt = po.Adan(up, **cfg)
    states = _init("adan", ours, cfg)
    for k in range(STEPS):
        gs = _grads(SHAPES, k)
        opt.maximize = k > 0
        for p, g in zip(up, gs):
            p.grad = (g if k > 0 else -g).clone()
        opt.step()
        ref_adan.adan_reference(ours, gs, states, **cfg, maximize=True)
    _assert_match(opt, up, ours, states)

    # And the quirk itself: upstream with maximize from step 1 has a nonzero exp_avg_diff after one step.
    p = torch.nn.Parameter(base[2].clone())
    q = base[2].clone()
    o = po.Adan([p], **cfg, maximize=True)
    g = _grads([p.shape], 0)[0]
    p.grad = g.clone()
    o.step()
    st = {}
    ref_adan.adan_init_state(q, st)
    ref_adan.adan_reference([q], [g], [st], **cfg, maximize=True)
    torch.testing.assert_close(o.state[p]["exp_avg_diff"], (1 - 0.92) * -2 * g)
    assert torch.count_nonzero(st["exp_avg_diff"]) == 0


ADABELIEF_CFGS = WEIGHT_DECAY_CFGS + [
    dict(lr=1e-2, weight_decay=0.1, ams_bound=True),
    dict(lr=1e-2, eps=1e-8, rectify=True),
    dict(lr=1e-2, weight_decay=0.1, weight_decouple=False, rectify=True, ams_bound=True),
    dict(lr=1e-2, rectify=True, degenerated_to_sgd=False),
    dict(lr=1e-2, rectify=True, n_sma_threshold=7, betas=(0.8, 0.99)),
    dict(lr=1e-2, adam_debias=True, weight_decay=0.05),
    dict(lr=1e-2, adam_debias=True, rectify=True),
    # Large eps: its two uses (stored in exp_avg_var, and after the bias correction) both show.
    dict(lr=1e-2, eps=1e-3, weight_decay=0.1, weight_decouple=False),
    dict(lr=1e-2, eps=1e-3, rectify=True, ams_bound=True, betas=(0.9, 0.9)),
]


DIFFGRAD_CFGS = WEIGHT_DECAY_CFGS + [
    dict(lr=1e-2, ams_bound=True, weight_decay=0.05),
    dict(lr=1e-2, rectify=True),
    dict(lr=1e-2, rectify=True, ams_bound=True, weight_decay=0.1, weight_decouple=False),
    dict(lr=1e-2, rectify=True, degenerated_to_sgd=False),
    dict(lr=1e-2, rectify=True, n_sma_threshold=4, betas=(0.8, 0.99), eps=1e-6),
    dict(lr=1e-2, adam_debias=True),
    dict(lr=1e-2, eps=1e-3, ams_bound=True, betas=(0.9, 0.9)),  # eps placement (not bias-corrected)
]


EXADAM_CFGS = WEIGHT_DECAY_CFGS + [
    # eps comparable to m^2 and v, so both cross-moment factors d1, d2 sit well inside (1, 1 + beta^t).
    dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-2),
]


# (reference, upstream class, configs, foreach values).  AdaBelief's rectify / ams_bound always take
# upstream's per-parameter path; its other configs take the foreach path when foreach is None.
PO_CASES = [(name, cls, cfg, foreach)
            for name, cls, cfgs, foreachs in [("adan", "Adan", ADAN_CFGS, (False, True)),
                                               ("adabelief", "AdaBelief", ADABELIEF_CFGS, (False, None)),
                                               ("diffgrad", "DiffGrad", DIFFGRAD_CFGS, (False, True)),
                                               ("exadam", "EXAdam", EXADAM_CFGS, (False, True))]
            for cfg in cfgs for foreach in foreachs]


@pytest.mark.parametrize("name,cls,cfg,foreach", PO_CASES,
                         ids=[f"{n}-{i}-foreach={f}" for n, _, c, f in PO_CASES for i in _ids([c])])
def test_matches_pytorch_optimizer(name, cls, cfg, foreach):
    po = pytest.importorskip("pytorch_optimizer")
    opt, up, ours, states = _side_by_side(name, getattr(po, cls), dict(cfg, foreach=foreach), cfg)
    _assert_match(opt, up, ours, states)


@pytest.mark.parametrize("name,cls,flag", [
    ("adabelief", "AdaBelief", dict(maximize=True)),
    ("diffgrad", "DiffGrad", dict(maximize=True, weight_decay=0.1, weight_decouple=False)),
    ("exadam", "EXAdam", dict(maximize=True, weight_decay=0.1)),
])
def test_maximize_matches_pytorch_optimizer(name, cls, flag):
    po = pytest.importorskip("pytorch_optimizer")
    cfg = dict(lr=1e-2, **flag)
    opt, up, ours, states = _side_by_side(name, getattr(po, cls), cfg, cfg)
    _assert_match(opt, up, ours, states)


def test_comparison_is_sensitive():
    """Negative control: a one-flag mismatch (proximal vs decoupled decay) is caught by the tolerance."""
    po = pytest.importorskip("pytorch_optimizer")
    cfg = dict(lr=1e-2, weight_decay=0.1, weight_decouple=False)
    opt, up, ours, states = _side_by_side("adan", po.Adan, cfg, dict(cfg, weight_decouple=True))
    with pytest.raises(AssertionError):
        _assert_match(opt, up, ours, states)


# --------------------------------------------------------------------------------------------------
# adan_pytorch (lucidrains) and adabelief_pytorch (the paper's authors)
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("adan_betas,weight_decay", [((0.02, 0.08, 0.01), 0.0), ((0.1, 0.2, 0.05), 0.1)])
def test_adan_matches_adan_pytorch(adan_betas, weight_decay):
    """adan_pytorch.Adan is the proximal variant (no_prox=False, i.e. weight_decouple=False) with the
    paper's betas (ours = 1 - theirs) and the same eps placement (lr / (sqrt(n / bc3) + eps)).

    Where it differs: its first step() only records prev_grad and applies the proximal decay
    p / (1 + lr wd) -- the moments stay zero -- while its step counter advances, so every later step
    k folds in k-1 gradients but bias-corrects with exponent k.  That is exactly the reference started
    from state {step=1, zero moments, previous_grad=-g_1}.  So: take one adan_pytorch step, copy its
    state into the reference state (prev_grad -> -previous_grad), then run both side by side."""
    adan_pytorch = pytest.importorskip("adan_pytorch")
    lr = 1e-2
    base = _params()
    up = [torch.nn.Parameter(t.clone()) for t in base]
    opt = adan_pytorch.Adan(up, lr=lr, betas=adan_betas, eps=1e-8, weight_decay=weight_decay)
    ref_kwargs = dict(lr=lr, betas=tuple(1.0 - b for b in adan_betas), eps=1e-8, weight_decay=weight_decay,
                      weight_decouple=False)

    g0 = _grads(SHAPES, 0)
    for p, g in zip(up, g0):
        p.grad = g.clone()
    opt.step()
    # The documented first-step difference: only the proximal decay, no moment update.
    for p, b in zip(up, base):
        torch.testing.assert_close(p.detach(), b / (1 + lr * weight_decay), rtol=1e-6, atol=0)
        assert torch.count_nonzero(opt.state[p]["m"]) == 0

    ours = [p.detach().clone() for p in up]
    states = _init("adan", ours, ref_kwargs)
    for p, st in zip(up, states):
        s = opt.state[p]
        st["step"].fill_(s["step"])
        st["exp_avg"].copy_(s["m"])
        st["exp_avg_diff"].copy_(s["v"])
        st["exp_avg_sq"].copy_(s["n"])
        st["previous_grad"].copy_(-s["prev_grad"])

    for k in range(1, STEPS):
        gs = _grads(SHAPES, k)
        for p, g in zip(up, gs):
            p.grad = g.clone()
        opt.step()
        ref_adan.adan_reference(ours, gs, states, **ref_kwargs)

    key_map = {"exp_avg": ("m", lambda x: x), "exp_avg_diff": ("v", lambda x: x),
               "exp_avg_sq": ("n", lambda x: x), "previous_grad": ("prev_grad", lambda x: -x)}
    # adan_pytorch computes the moments with mul/add instead of lerp and folds the bias corrections
    # differently (lr / sqrt(n * (1 / bc3)), m * (1 / bc1)): a few ulp per step, within FP32.
    _assert_match(opt, up, ours, states, key_map=key_map)
    for p in up:
        assert opt.state[p]["step"] == STEPS


ADABELIEF_PYTORCH_CFGS = [
    dict(rectify=False, weight_decouple=True, weight_decay=0.1),
    dict(rectify=False, weight_decouple=True, fixed_decay=True, weight_decay=0.1),
    dict(rectify=False, weight_decouple=False, weight_decay=0.1),
    dict(rectify=False, weight_decouple=False, weight_decay=0.1, amsgrad=True),
    dict(rectify=False, weight_decouple=True, amsgrad=True, eps=1e-8),
    dict(rectify=True, weight_decouple=True, weight_decay=0.1),
    dict(rectify=True, weight_decouple=False, weight_decay=0.1, eps=1e-8),
    dict(rectify=True, degenerated_to_sgd=False),
]


@pytest.mark.parametrize("cfg", ADABELIEF_PYTORCH_CFGS, ids=_ids(ADABELIEF_PYTORCH_CFGS))
def test_adabelief_matches_adabelief_pytorch(cfg):
    """adabelief_pytorch.AdaBelief: same algorithm, ``amsgrad`` is our ``ams_bound``, threshold fixed
    at 5.  Not compared: rectify=True with amsgrad=True, where its rectified branch divides by
    sqrt(exp_avg_var) and ignores max_exp_avg_var (see test_adabelief_pytorch_rectify_amsgrad_differs)."""
    adabelief_pytorch = pytest.importorskip("adabelief_pytorch")
    up_cfg = dict(lr=1e-2, print_change_log=False, **cfg)
    ref_cfg = {("ams_bound" if k == "amsgrad" else k): v for k, v in cfg.items()}
    ref_cfg.setdefault("eps", 1e-16)
    ref_cfg["lr"] = 1e-2
    opt, up, ours, states = _side_by_side("adabelief", adabelief_pytorch.AdaBelief, up_cfg, ref_cfg)
    _assert_match(opt, up, ours, states)


def test_adabelief_pytorch_rectify_amsgrad_differs():
    """Documents the one mismatch: with rectify and amsgrad, adabelief_pytorch's rectified update uses
    exp_avg_var (not its max); the reference (= pytorch_optimizer) uses max_exp_avg_var.  Replacing the
    reference's max by the running value reproduces adabelief_pytorch, which pins the cause down."""
    adabelief_pytorch = pytest.importorskip("adabelief_pytorch")
    # beta2 = 0.9: the belief term often shrinks, so its running max differs from it (with 0.999 it
    # grows through the first steps and the max changes nothing); rectified from step 6 (n_sma >= 5).
    cfg = dict(lr=1e-2, rectify=True, eps=1e-8, betas=(0.9, 0.9))
    opt, up, ours, states = _side_by_side(
        "adabelief", adabelief_pytorch.AdaBelief, dict(cfg, amsgrad=True, print_change_log=False),
        dict(cfg, ams_bound=True))
    # The states agree (max_exp_avg_var included) ...
    for pu, st in zip(up, states):
        torch.testing.assert_close(st["max_exp_avg_var"], opt.state[pu]["max_exp_avg_var"], **FP32)
        torch.testing.assert_close(st["exp_avg_var"], opt.state[pu]["exp_avg_var"], **FP32)
    # ... the parameters do not.
    diff = max((pu.detach() - po_).abs().max().item() for pu, po_ in zip(up, ours))
    assert diff > 1e-4
    # Running the reference without ams_bound (rectified branch then divides by exp_avg_var) matches.
    opt2, up2, ours2, states2 = _side_by_side(
        "adabelief", adabelief_pytorch.AdaBelief, dict(cfg, amsgrad=True, print_change_log=False), cfg)
    for pu, po_ in zip(up2, ours2):
        torch.testing.assert_close(po_, pu.detach(), **FP32)


# --------------------------------------------------------------------------------------------------
# The reference contract: maximize, AMP, tensor lr, fp32 math, state layout, errors
# --------------------------------------------------------------------------------------------------

CONTRACT_CFGS = {
    "adan": dict(lr=1e-2, weight_decay=0.1, weight_decouple=False),
    "adabelief": dict(lr=1e-2, weight_decay=0.1, rectify=True, ams_bound=True, betas=(0.8, 0.99)),
    "diffgrad": dict(lr=1e-2, weight_decay=0.1, weight_decouple=False, ams_bound=True),
    "exadam": dict(lr=1e-2, weight_decay=0.1, eps=1e-3),
}
NAMES = list(CONTRACT_CFGS)


def _snapshot(params, states):
    return [p.clone() for p in params], [{k: v.clone() for k, v in st.items()} for st in states]


def _assert_same(a_params, a_states, b_params, b_states, exact=True):
    for pa, pb in zip(a_params, b_params):
        if exact:
            assert torch.equal(pa, pb)
        else:
            torch.testing.assert_close(pa, pb, **FP32)
    for sa, sb in zip(a_states, b_states):
        assert sa.keys() == sb.keys()
        for k in sa:
            if exact:
                assert torch.equal(sa[k], sb[k]), k
            else:
                torch.testing.assert_close(sa[k], sb[k], **FP32)


def _pair(name, dtype=torch.float32):
    cfg = CONTRACT_CFGS[name]
    a = _params(dtype=dtype)
    b = [t.clone() for t in a]
    return cfg, a, _init(name, a, cfg), b, _init(name, b, cfg)


@pytest.mark.parametrize("name", NAMES)
def test_maximize_is_step_with_negated_grad(name):
    cfg, a, sa, b, sb = _pair(name)
    _run_ref(name, a, sa, dict(cfg, maximize=True), 6)
    _run_ref(name, b, sb, cfg, 6, grad_fn=lambda gs: [-g for g in gs])
    _assert_same(a, sa, b, sb)
    assert not torch.equal(a[1], _params()[1])  # the parameters did move


@pytest.mark.parametrize("name", NAMES)
def test_grad_scale_unscales(name):
    # A power of two: dividing by it is exact, so the results are bitwise equal.
    cfg, a, sa, b, sb = _pair(name)
    s = torch.tensor(1024.0)
    _run_ref(name, a, sa, dict(cfg, grad_scale=s), 5, grad_fn=lambda gs: [g * s for g in gs])
    _run_ref(name, b, sb, cfg, 5)
    _assert_same(a, sa, b, sb)
    # Any other scale: equal up to rounding of g * s / s.
    cfg, a, sa, b, sb = _pair(name)
    s = torch.tensor(37.3)
    _run_ref(name, a, sa, dict(cfg, grad_scale=s), 5, grad_fn=lambda gs: [g * s for g in gs])
    _run_ref(name, b, sb, cfg, 5)
    _assert_same(a, sa, b, sb, exact=False)


@pytest.mark.parametrize("name", NAMES)
def test_found_inf_skips_everything(name):
    cfg, a, sa, b, sb = _pair(name)
    _run_ref(name, a, sa, cfg, 3)
    _run_ref(name, b, sb, cfg, 3)
    before_p, before_s = _snapshot(a, sa)
    _, _, ref = MODULES[name]
    gs = _grads(SHAPES, 50)
    ref(a, gs, sa, **cfg, found_inf=torch.tensor(1.0), grad_scale=torch.tensor(2.0))
    _assert_same(a, sa, before_p, before_s)
    assert float(sa[0]["step"]) == 3
    # found_inf == 0 is an ordinary step.
    ref(a, gs, sa, **cfg, found_inf=torch.tensor(0.0))
    ref(b, gs, sb, **cfg)
    _assert_same(a, sa, b, sb)
    assert float(sa[0]["step"]) == 4


@pytest.mark.parametrize("name", NAMES)
def test_tensor_lr_equals_float_lr(name):
    # An fp32 tensor holds fp32(lr), so compare with that float; and an fp64 tensor with lr itself.
    lr = CONTRACT_CFGS[name]["lr"]
    for lr_t in (torch.tensor(lr), torch.tensor(lr, dtype=torch.float64)):
        cfg, a, sa, b, sb = _pair(name)
        _run_ref(name, a, sa, dict(cfg, lr=lr_t), 4)
        _run_ref(name, b, sb, dict(cfg, lr=lr_t.item()), 4)
        _assert_same(a, sa, b, sb)
    cfg, a, sa, b, sb = _pair(name)
    _run_ref(name, a, sa, dict(cfg, lr=torch.tensor(cfg["lr"], dtype=torch.float64)), 4)
    _run_ref(name, b, sb, cfg, 4)
    _assert_same(a, sa, b, sb)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_storage_uses_fp32_math(name, dtype):
    """One step on bf16/fp16 storage equals the same step on fp32 copies of the same values, rounded
    once to the storage dtype: all element math runs in fp32."""
    cfg = CONTRACT_CFGS[name]
    _, _, ref = MODULES[name]
    lo = _params(dtype=dtype)
    lo_states = _init(name, lo, cfg)
    _run_ref(name, lo, lo_states, cfg, 3, grad_fn=lambda gs: [g.to(dtype) for g in gs])
    for st in lo_states:
        for k, v in st.items():
            assert v.dtype == (torch.float32 if k == "step" else dtype)
    hi = [p.float() for p in lo]
    hi_states = [{k: v.float().clone() for k, v in st.items()} for st in lo_states]  # step: own copy
    gs = [g.to(dtype) for g in _grads(SHAPES, 3)]
    ref(lo, gs, lo_states, **cfg)
    ref(hi, [g.float() for g in gs], hi_states, **cfg)
    for p_lo, p_hi in zip(lo, hi):
        assert torch.equal(p_lo, p_hi.to(dtype))
    for s_lo, s_hi in zip(lo_states, hi_states):
        for k in s_lo:
            assert torch.equal(s_lo[k], s_hi[k].to(s_lo[k].dtype)), k


@pytest.mark.parametrize("name", NAMES)
def test_init_state_layout(name):
    module, init, _ = MODULES[name]
    p = torch.randn(4, 6, dtype=torch.bfloat16).t()  # non-contiguous: preserve_format keeps the strides
    st = {}
    init(p, st, {"ams_bound": True})
    assert st["step"].dtype == torch.float32 and st["step"].shape == () and float(st["step"]) == 0
    assert tuple(k for k in st if k != "step") == module.STATE_NAMES
    for k in module.STATE_NAMES:
        assert st[k].dtype == p.dtype and st[k].shape == p.shape and st[k].stride() == p.stride()
        assert torch.count_nonzero(st[k]) == 0


@pytest.mark.parametrize("name,optional", [("adabelief", "max_exp_avg_var"), ("diffgrad", "max_exp_avg_sq")])
def test_ams_bound_state_only_when_enabled(name, optional):
    module, init, ref = MODULES[name]
    p = torch.randn(5)
    st = {}
    init(p, st, {"ams_bound": False})
    assert optional not in st and set(st) == {"step", *module.STATE_NAMES} - {optional}
    with pytest.raises(ValueError, match=optional):
        ref([p], [torch.randn(5)], [st], lr=1e-2, ams_bound=True)


@pytest.mark.parametrize("name,kwargs,match", [
    ("adan", dict(max_grad_norm=1.0), "max_grad_norm"),
    ("adan", dict(adanorm=True), "adanorm"),
    ("adan", dict(betas=(0.9, 0.99)), "three betas"),
    ("adabelief", dict(adanorm=True), "adanorm"),
    ("diffgrad", dict(adanorm=True), "adanorm"),
    ("exadam", dict(betas=(0.9, 0.99, 0.9)), "two betas"),
])
def test_unsupported_options_raise_and_change_nothing(name, kwargs, match):
    _, init, ref = MODULES[name]
    params = _params()
    states = _init(name, params, {})
    before_p, before_s = _snapshot(params, states)
    with pytest.raises(ValueError, match=match):
        ref(params, _grads(SHAPES, 0), states, **dict(dict(lr=1e-2), **kwargs))
    _assert_same(params, states, before_p, before_s)


@pytest.mark.parametrize("name", NAMES)
def test_complex_and_sparse_raise(name):
    _, init, ref = MODULES[name]
    pc = torch.randn(3, dtype=torch.complex64)
    st = {}
    init(pc, st, {})
    with pytest.raises(ValueError, match="complex"):
        ref([pc], [torch.randn(3, dtype=torch.complex64)], [st], lr=1e-2)
    p = torch.randn(3)
    st = {}
    init(p, st, {})
    with pytest.raises(ValueError, match="sparse"):
        ref([p], [torch.randn(3).to_sparse()], [st], lr=1e-2)
    assert float(st["step"]) == 0



@pytest.mark.parametrize("name,cls", [("adabelief", "AdaBelief"), ("diffgrad", "DiffGrad")])
def test_rectify_threshold_below_4(name, cls):
    """Upstream quirk: with n_sma_threshold < 4 the RAdam term sqrt(... (n_sma - 4) ...) is undefined
    once threshold <= n_sma < 4, and upstream dies with "math domain error" (betas (0.8, 0.99):
    n_sma ~ t - 0.03, so step 4).  The reference raises a ValueError naming the cause, before writing
    anything; the steps before agree."""
    po = pytest.importorskip("pytorch_optimizer")
    cfg = dict(lr=1e-2, rectify=True, n_sma_threshold=3, betas=(0.8, 0.99))
    opt, up, ours, states = _side_by_side(name, getattr(po, cls), cfg, cfg, steps=3)
    _assert_match(opt, up, ours, states, steps=3)
    for p in up:
        p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match="math domain error"):
        opt.step()
    before_p, before_s = _snapshot(ours, states)
    _, _, ref = MODULES[name]
    with pytest.raises(ValueError, match="n_sma_threshold"):
        ref(ours, _grads(SHAPES, 3), states, **cfg)
    _assert_same(ours, states, before_p, before_s)


# -- Adan's use_gc, fused, fastopt.Adan on every backend vs pytorch_optimizer ---------------------------
def _backends():
    from conftest import DEVICE_BACKENDS
    return [b for d, b in DEVICE_BACKENDS if d == "cpu"]


ADAN_GC_CFGS = [
    dict(lr=1e-2, weight_decay=0.02, use_gc=True),
    dict(lr=1e-2, weight_decay=0.02, weight_decouple=True, use_gc=True, betas=(0.9, 0.9, 0.95)),
]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("cfg", ADAN_GC_CFGS, ids=_ids(ADAN_GC_CFGS))
def test_adan_use_gc_matches_pytorch_optimizer(cfg, backend):
    """Including upstream's first step, whose difference is g_c - g (previous_grad starts at minus the
    raw gradient)."""
    import fastopt
    po = pytest.importorskip("pytorch_optimizer")
    from helpers import assert_runs_close, run_pair
    up, up_p, fo, fo_p = run_pair(lambda ps: po.Adan(ps, **cfg), lambda ps: fastopt.Adan(ps, backend=backend, **cfg),
                                  SHAPES + [(4, 2, 3)], steps=6)
    assert_runs_close(fo, fo_p, up, up_p, ("exp_avg", "exp_avg_sq", "exp_avg_diff", "previous_grad"),
                      rtol=1e-5, atol=1e-6)
