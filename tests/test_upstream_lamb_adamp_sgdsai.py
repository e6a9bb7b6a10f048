"""References vs upstream: LAMB, AdamP, SGDP, SGD-SaI (pytorch_optimizer, and the official ``adamp``
package for AdamP/SGDP) and the global-norm gradient clip (torch.nn.utils.clip_grad_norm_).

Each test runs upstream and the reference side by side for 10 steps on the same fp32 parameters and
gradients and compares parameters and state.  AdamP/SGDP gradients are built so that each projection
branch is taken (channel, layer, none), and the branch is asserted at every step.
"""
import math

import pytest
import torch

from fastopt.reference import adamp as ref_adamp
from fastopt.reference import clip as ref_clip
from fastopt.reference import lamb as ref_lamb
from fastopt.reference import sgdsai as ref_sgdsai

pytorch_optimizer = pytest.importorskip("pytorch_optimizer")

FP32 = dict(rtol=1e-5, atol=1e-6)
STEPS = 10


# -- harness ---------------------------------------------------------------------------------------
def make_base(shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for s in shapes:
        if s == "zeros":
            out.append(torch.zeros(6))
        else:
            out.append(torch.randn(s, generator=gen))
    return out


class Upstream:
    """One upstream optimizer over its own copy of the parameters; gets fresh gradient copies each step
    (upstream writes into p.grad)."""

    def __init__(self, base, ctor):
        self.params = [torch.nn.Parameter(t.clone()) for t in base]
        self.opt = ctor(self.params)

    def step(self, grads):
        for p, g in zip(self.params, grads):
            p.grad = g.clone()
        self.opt.step()

    def state(self, i):
        return self.opt.state[self.params[i]]


def run(base, ref_step, init_state, ref_kwargs, ctors, grad_fn, steps=STEPS, group=None):
    ref_params = [t.clone() for t in base]
    states = [{} for _ in base]
    for p, st in zip(ref_params, states):
        init_state(p, st, group)
    ups = [Upstream(base, c) for c in ctors]
    for k in range(steps):
        grads = grad_fn(k, ref_params)
        ref_step(ref_params, [g.clone() for g in grads], states, **ref_kwargs)
        for u in ups:
            u.step(grads)
    return ref_params, states, ups


def assert_match(ref_params, states, up, keys, steps=STEPS, tol=FP32):
    for i, p in enumerate(ref_params):
        torch.testing.assert_close(p, up.params[i].detach(), **tol, msg=lambda m, i=i: f"param {i}: {m}")
        ust = up.state(i)
        for key in keys:
            if key not in ust:
                assert key not in states[i], (i, key)
                continue
            torch.testing.assert_close(states[i][key].float(), torch.as_tensor(ust[key]).float(), **tol,
                                       msg=lambda m, i=i, key=key: f"param {i} state {key}: {m}")
        assert float(states[i]["step"]) == steps


def random_grads(scale=1.0):
    def fn(k, params):
        gen = torch.Generator().manual_seed(1000 + k)
        return [torch.randn(p.shape, generator=gen) * scale for p in params]
    return fn


def _ids(cfgs):
    return ["-".join(f"{k}={v}" for k, v in c.items()) or "default" for c in cfgs]


# -- LAMB ------------------------------------------------------------------------------------------
LAMB_SHAPES = [(7,), (1,), (13, 31), (8, 3, 3, 3), (5, 3, 11), "zeros"]
LAMB_CONFIGS = [
    dict(),
    dict(lr=1e-2, weight_decay=1e-2),
    dict(lr=1e-2, weight_decay=1e-2, weight_decouple=False),
    dict(lr=1e-2, weight_decay=1e-2, fixed_decay=True),
    dict(lr=1e-2, grad_averaging=False),
    dict(lr=1e-2, adam=True, weight_decay=1e-2),
    dict(lr=1e-2, pre_norm=True, max_grad_norm=1.0),      # global scale active (grad norm ~ 30)
    dict(lr=1e-2, pre_norm=True, max_grad_norm=1000.0),   # scale clamped to 1
    dict(lr=1e-2, pre_norm=True, max_grad_norm=0.0),      # pre_norm off via max_grad_norm=0
    dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-8, maximize=True),
    dict(lr=1e-2, adam_debias=True, weight_decay=0.1),
]
LAMB_KEYS = ("exp_avg", "exp_avg_sq", "weight_norm", "adam_norm", "trust_ratio")


@pytest.mark.parametrize("cfg", LAMB_CONFIGS, ids=_ids(LAMB_CONFIGS))
def test_lamb_matches_pytorch_optimizer(cfg):
    base = make_base(LAMB_SHAPES)
    assert float(base[3].norm()) > 10.0  # the trust-ratio clamp (10) is exercised
    ctor_kwargs = {k: v for k, v in cfg.items() if k != "adam_debias"}
    extra = dict(adam_debias=True) if cfg.get("adam_debias") else {}

    def ctor(foreach):
        def make(params):
            opt = pytorch_optimizer.Lamb(params, foreach=foreach, **ctor_kwargs)
            for g in opt.param_groups:
                g.update(extra)
            return opt
        return make

    kwargs = {"lr": 1e-3, **cfg}
    ref_params, states, ups = run(base, ref_lamb.lamb_reference, ref_lamb.lamb_init_state, kwargs,
                                  [ctor(False), ctor(True)], random_grads())
    for up in ups:
        assert_match(ref_params, states, up, LAMB_KEYS)
    # the run moved every parameter, the zero one included (trust ratio 1 on its first step)
    assert all(not torch.equal(a, b) for a, b in zip(ref_params, base))


def test_lamb_trust_ratio_clamp_and_zero_weight():
    """Pin the between-phase formulas: wn = min(||p||, 10), trust = 1 for a zero tensor."""
    p = [torch.full((100,), 2.0), torch.zeros(5)]  # ||p|| = 20 -> clamped to 10
    states = [{}, {}]
    for t, st in zip(p, states):
        ref_lamb.lamb_init_state(t, st)
    g = [torch.ones(100), torch.ones(5)]
    ref_lamb.lamb_reference(p, g, states, lr=1e-3)
    assert float(states[0]["weight_norm"]) == 10.0
    # u = m / (sqrt(v) + eps) with m = 0.1, v = 0.001 -> ||u|| = 10 * 0.1 / (sqrt(1e-3) + 1e-6)
    un = 10 * 0.1 / (math.sqrt(1e-3) + 1e-6)
    assert float(states[0]["adam_norm"]) == pytest.approx(un, rel=1e-6)
    assert float(states[0]["trust_ratio"]) == pytest.approx(10.0 / (un + 1e-6), rel=1e-6)
    assert float(states[1]["trust_ratio"]) == 1.0 and float(states[1]["weight_norm"]) == 0.0


@pytest.mark.parametrize("opt", [dict(rectify=True), dict(adanorm=True)], ids=_ids([dict(rectify=True),
                                                                                     dict(adanorm=True)]))
def test_lamb_unsupported(opt):
    p, st = torch.ones(3), {}
    ref_lamb.lamb_init_state(p, st)
    with pytest.raises(ValueError):
        ref_lamb.lamb_reference([p], [torch.ones(3)], [st], lr=1e-3, **opt)
    assert torch.equal(p, torch.ones(3)) and float(st["step"]) == 0


# -- AdamP / SGDP ----------------------------------------------------------------------------------
# (shape, projection branch the gradients force): rows are p.shape[0]
PROJ_PARAMS = [((7,), None), ((13, 31), "channel"), ((8, 3, 3, 3), "channel"), ((5, 3, 11), "layer"),
               ((1, 17), "channel"), ((6, 10), "none"), ((4, 9, 2), "none")]


def projection_grads(modes, delta, check=True):
    """Random gradients made orthogonal to p per row ("channel"), over the whole tensor ("layer"), or
    given a large radial component ("none"); asserts the reference sees the intended branch."""
    def fn(k, params):
        gen = torch.Generator().manual_seed(2000 + k)
        out = []
        for p, mode in zip(params, modes):
            g = torch.randn(p.shape, generator=gen).double()
            if mode is not None and p.dim() > 1:
                pd = p.double()
                rows = p.shape[0] if mode == "channel" else 1
                P, G = pd.reshape(rows, -1), g.reshape(rows, -1)
                if mode == "none":
                    g = g + 0.5 * (g.norm() / pd.norm()) * pd
                else:
                    g = (G - (G * P).sum(1, keepdim=True) / (P * P).sum(1, keepdim=True) * P).reshape(p.shape)
            g = g.float()
            if check and p.dim() > 1:
                sums = ref_adamp.projection_row_sums(p.float(), g, g)
                _, _, projected, channel = ref_adamp.projection_coefficients(sums, p.numel(), delta=delta,
                                                                             eps=1e-8)
                expect = {"channel": (True, True), "layer": (True, False), "none": (False, False)}[mode]
                assert (bool(projected), bool(channel)) == expect, (p.shape, mode)
            out.append(g)
        return out
    return fn


ADAMP_CONFIGS = [
    dict(),
    dict(nesterov=True),
    dict(weight_decay=1e-2, lr=1e-2),
    dict(weight_decay=5e-2, lr=1e-2, wd_ratio=0.5, delta=0.2, nesterov=True),
    dict(weight_decay=1e-2, lr=1e-2, fixed_decay=True),
    dict(betas=(0.8, 0.99), eps=1e-6, lr=1e-2, maximize=True),
    dict(betas=(0.3, 0.9), lr=1e-2, nesterov=True),  # lerp weight 0.7: torch.lerp's second formula
    dict(adam_debias=True, lr=1e-2, weight_decay=1e-2),
]


def _adamp_ctor(cls, cfg, foreach):
    ctor_kwargs = {k: v for k, v in cfg.items() if k != "adam_debias"}

    def make(params):
        opt = cls(params, foreach=foreach, **ctor_kwargs)
        for g in opt.param_groups:
            if cfg.get("adam_debias"):
                g["adam_debias"] = True
        return opt
    return make


@pytest.mark.parametrize("cfg", ADAMP_CONFIGS, ids=_ids(ADAMP_CONFIGS))
def test_adamp_matches_pytorch_optimizer(cfg):
    base = make_base([s for s, _ in PROJ_PARAMS])
    modes = [m for _, m in PROJ_PARAMS]
    kwargs = {"lr": 1e-3, **cfg}
    ref_params, states, ups = run(
        base, ref_adamp.adamp_reference, ref_adamp.adamp_init_state, kwargs,
        [_adamp_ctor(pytorch_optimizer.AdamP, cfg, False), _adamp_ctor(pytorch_optimizer.AdamP, cfg, True)],
        projection_grads(modes, cfg.get("delta", 0.1)))
    for up in ups:
        assert_match(ref_params, states, up, ref_adamp.ADAMP_STATE_NAMES)


SGDP_CONFIGS = [
    dict(lr=0.05, momentum=0.9),
    dict(lr=0.05, momentum=0.9, nesterov=True),
    dict(lr=0.05),
    dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-3),
    dict(lr=0.05, momentum=0.5, weight_decay=1e-2, wd_ratio=0.3, delta=0.2, nesterov=True),
    dict(lr=0.05, momentum=0.9, weight_decay=1e-3, fixed_decay=True),
    dict(lr=0.05, momentum=0.9, maximize=True, weight_decay=1e-3),
]


@pytest.mark.parametrize("cfg", SGDP_CONFIGS, ids=_ids(SGDP_CONFIGS))
def test_sgdp_matches_pytorch_optimizer(cfg):
    base = make_base([s for s, _ in PROJ_PARAMS])
    modes = [m for _, m in PROJ_PARAMS]
    ref_params, states, ups = run(
        base, ref_adamp.sgdp_reference, ref_adamp.sgdp_init_state, dict(cfg),
        [_adamp_ctor(pytorch_optimizer.SGDP, cfg, False), _adamp_ctor(pytorch_optimizer.SGDP, cfg, True)],
        projection_grads(modes, cfg.get("delta", 0.1)))
    for up in ups:
        assert_match(ref_params, states, up, ref_adamp.SGDP_STATE_NAMES)


OFFICIAL_ADAMP = [
    dict(),
    dict(nesterov=True),
    dict(lr=1e-2, weight_decay=1e-2),
    dict(lr=1e-2, weight_decay=5e-2, wd_ratio=0.5, delta=0.2, nesterov=True, betas=(0.8, 0.99)),
]


@pytest.mark.parametrize("cfg", OFFICIAL_ADAMP, ids=_ids(OFFICIAL_ADAMP))
def test_adamp_matches_official_package(cfg):
    """With the default eps = 1e-8 the packages' different eps placement is far below the tolerance."""
    adamp = pytest.importorskip("adamp")
    base = make_base([s for s, _ in PROJ_PARAMS])
    modes = [m for _, m in PROJ_PARAMS]
    ref_params, states, ups = run(base, ref_adamp.adamp_reference, ref_adamp.adamp_init_state,
                                  {"lr": 1e-3, **cfg}, [lambda ps: adamp.AdamP(ps, **cfg)],
                                  projection_grads(modes, cfg.get("delta", 0.1)))
    assert_match(ref_params, states, ups[0], ref_adamp.ADAMP_STATE_NAMES)


def test_adamp_eps_placement_differs_between_packages():
    """Quirk pin: pytorch_optimizer divides (sqrt(v) + eps) by sqrt(1 - b2^t), the official package adds eps
    after the correction.  With a large eps the reference follows pytorch_optimizer, not adamp."""
    adamp = pytest.importorskip("adamp")
    base = make_base([(50,)])
    cfg = dict(lr=1e-2, eps=1e-2)
    ref_params, states, (po, off) = run(
        base, ref_adamp.adamp_reference, ref_adamp.adamp_init_state, cfg,
        [lambda ps: pytorch_optimizer.AdamP(ps, **cfg), lambda ps: adamp.AdamP(ps, **cfg)], random_grads(), steps=3)
    assert_match(ref_params, states, po, ref_adamp.ADAMP_STATE_NAMES, steps=3)
    assert (ref_params[0] - off.params[0].detach()).abs().max() > 1e-4


OFFICIAL_SGDP = [
    dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    dict(lr=0.05, weight_decay=1e-3),
    dict(lr=0.05, momentum=0.5, dampening=0.1, nesterov=True, delta=0.2, wd_ratio=0.3, weight_decay=1e-2),
]


@pytest.mark.parametrize("cfg", OFFICIAL_SGDP, ids=_ids(OFFICIAL_SGDP))
def test_sgdp_matches_official_package(cfg):
    adamp = pytest.importorskip("adamp")
    base = make_base([s for s, _ in PROJ_PARAMS])
    modes = [m for _, m in PROJ_PARAMS]
    ref_params, states, ups = run(base, ref_adamp.sgdp_reference, ref_adamp.sgdp_init_state, dict(cfg),
                                  [lambda ps: adamp.SGDP(ps, **cfg)], projection_grads(modes, cfg.get("delta", 0.1)))
    assert_match(ref_params, states, ups[0], ref_adamp.SGDP_STATE_NAMES)


def test_sgdp_official_projects_its_momentum_buffer():
    """Quirk pin: official SGDP without nesterov aliases d_p = buf and projects the buffer in place.
    Unprojected tensors agree with the reference; projected ones do not (pytorch_optimizer agrees with
    the reference there, see test_sgdp_matches_pytorch_optimizer)."""
    adamp = pytest.importorskip("adamp")
    base = make_base([s for s, _ in PROJ_PARAMS])
    modes = [m for _, m in PROJ_PARAMS]
    cfg = dict(lr=0.05, momentum=0.9, weight_decay=1e-3)
    ref_params, states, (off,) = run(base, ref_adamp.sgdp_reference, ref_adamp.sgdp_init_state, cfg,
                                     [lambda ps: adamp.SGDP(ps, **cfg)], projection_grads(modes, 0.1))
    for i, mode in enumerate(modes):
        same = torch.allclose(ref_params[i], off.params[i].detach(), **FP32) and torch.allclose(
            states[i]["momentum"], off.state(i)["momentum"], **FP32)
        assert same == (mode in (None, "none")), (i, mode)


@pytest.mark.parametrize("cls,ref_step,init", [
    ("AdamP", ref_adamp.adamp_reference, ref_adamp.adamp_init_state),
    ("SGDP", ref_adamp.sgdp_reference, ref_adamp.sgdp_init_state)])
def test_adamp_sgdp_l2_decay_is_a_noop_upstream(cls, ref_step, init):
    """Quirk pin: upstream's weight_decouple=False adds wd*p to the gradient after it was used, so the
    run equals the run without weight decay; the reference refuses the option."""
    base = make_base([s for s, _ in PROJ_PARAMS])
    modes = [m for _, m in PROJ_PARAMS]
    Cls = getattr(pytorch_optimizer, cls)
    extra = dict(momentum=0.9) if cls == "SGDP" else {}
    _, _, (l2, none) = run(base, lambda *a, **k: None, lambda *a: None, {},
                           [lambda ps: Cls(ps, lr=1e-2, weight_decay=0.5, weight_decouple=False, **extra),
                            lambda ps: Cls(ps, lr=1e-2, weight_decay=0.0, **extra)],
                           projection_grads(modes, 0.1, check=False), steps=3)
    for a, b in zip(l2.params, none.params):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    p, st = torch.ones(3), {}
    init(p, st)
    with pytest.raises(ValueError, match="weight_decouple"):
        ref_step([p], [torch.ones(3)], [st], lr=1e-2, weight_decay=0.5, weight_decouple=False)
    assert torch.equal(p, torch.ones(3))


@pytest.mark.parametrize("opt", [dict(adanorm=True)], ids=["adanorm"])
def test_adamp_unsupported(opt):
    p, st = torch.ones(3, 2), {}
    ref_adamp.adamp_init_state(p, st)
    with pytest.raises(ValueError):
        ref_adamp.adamp_reference([p], [torch.ones(3, 2)], [st], lr=1e-3, **opt)
    with pytest.raises(ValueError):
        ref_adamp.sgdp_reference([p], [torch.ones(3, 2)], [{"step": torch.zeros(()), "momentum": p * 0}],
                                 lr=1e-3, momentum=1.0, weight_decay=1e-2)
    assert torch.equal(p, torch.ones(3, 2))


# -- SGD-SaI ---------------------------------------------------------------------------------------
SAI_SHAPES = [(7,), (1,), (13, 31), (8, 3, 3, 3), (1, 17), (5, 3, 11)]
SAI_CONFIGS = [
    dict(),
    dict(momentum=0.0, weight_decay=0.0),
    dict(momentum=0.0, weight_decay=1e-2, weight_decouple=False),
    dict(momentum=0.5, weight_decay=0.0),   # lerp weight 0.5: torch.lerp's second formula
    dict(momentum=0.3, weight_decay=1e-1, lr=1e-3),
    dict(maximize=True, eps=1e-4),
]


@pytest.mark.parametrize("cfg", SAI_CONFIGS, ids=_ids(SAI_CONFIGS))
def test_sgdsai_matches_pytorch_optimizer(cfg):
    base = make_base(SAI_SHAPES)
    kwargs = {"lr": 1e-2, **cfg}
    group = dict(momentum=cfg.get("momentum", 0.9))
    ref_params, states, ups = run(
        base, ref_sgdsai.sgdsai_reference, ref_sgdsai.sgdsai_init_state, kwargs,
        [lambda ps, f=f: pytorch_optimizer.SGDSaI(ps, foreach=f, **kwargs) for f in (False, True)],
        random_grads(), group=group)
    for up in ups:
        assert_match(ref_params, states, up, ("momentum_buffer", "gsnr"))
        for i in range(len(base)):
            assert ("momentum_buffer" in states[i]) == ("momentum_buffer" in up.state(i))
    # gsnr: plain norm for 1-D and (1, n) tensors, norm / (std + eps) otherwise (first step's gradient)
    g0 = random_grads()(0, base)
    eps = cfg.get("eps", 1e-8)
    assert float(states[0]["gsnr"]) == pytest.approx(float(g0[0].norm()), rel=1e-6)
    assert float(states[4]["gsnr"]) == pytest.approx(float(g0[4].norm()), rel=1e-6)
    assert float(states[2]["gsnr"]) == pytest.approx(float(g0[2].norm() / (g0[2].std() + eps)), rel=1e-6)


def test_sgdsai_gsnr_two_pass_variance():
    """A gradient with |mean| >> std: the two-pass variance keeps gsnr right (torch.std agrees)."""
    g = (1000.0 + 0.01 * torch.randn(64, 33)).float()
    expect = float(g.norm() / (g.std() + 1e-8))
    assert float(ref_sgdsai.gsnr_of(g, 1e-8)) == pytest.approx(expect, rel=1e-4)


def test_sgdsai_l2_decay_upstream_quirk():
    """Quirk pin: with momentum > 0 upstream's L2 decay has no effect (the reference refuses it); with
    momentum == 0 it does (compared in test_sgdsai_matches_pytorch_optimizer)."""
    base = make_base(SAI_SHAPES)
    _, _, (l2, none) = run(base, lambda *a, **k: None, lambda *a: None, {},
                           [lambda ps: pytorch_optimizer.SGDSaI(ps, lr=1e-2, weight_decay=0.5, weight_decouple=False),
                            lambda ps: pytorch_optimizer.SGDSaI(ps, lr=1e-2, weight_decay=0.0)],
                           random_grads(), steps=3)
    for a, b in zip(l2.params, none.params):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    p, st = torch.ones(3), {}
    ref_sgdsai.sgdsai_init_state(p, st)
    with pytest.raises(ValueError, match="weight_decouple"):
        ref_sgdsai.sgdsai_reference([p], [torch.ones(3)], [st], lr=1e-2, weight_decay=0.5, weight_decouple=False)
    assert torch.equal(p, torch.ones(3)) and float(st["gsnr"]) == 0.0


# -- AMP (grad_scale / found_inf), tensor lr: all four references -----------------------------------
REFS = {
    "lamb": (ref_lamb.lamb_reference, ref_lamb.lamb_init_state, dict(lr=1e-2, weight_decay=1e-2, pre_norm=True)),
    "adamp": (ref_adamp.adamp_reference, ref_adamp.adamp_init_state, dict(lr=1e-2, weight_decay=1e-2,
                                                                          nesterov=True)),
    "sgdp": (ref_adamp.sgdp_reference, ref_adamp.sgdp_init_state, dict(lr=0.05, momentum=0.9, weight_decay=1e-3)),
    "sgdsai": (ref_sgdsai.sgdsai_reference, ref_sgdsai.sgdsai_init_state, dict(lr=1e-2)),
}


def _ref_run(name, base, grad_lists, **over):
    step, init, kwargs = REFS[name]
    params = [t.clone() for t in base]
    states = [{} for _ in base]
    for p, st in zip(params, states):
        init(p, st)
    for grads in grad_lists:
        step(params, [g.clone() for g in grads], states, **{**kwargs, **over})
    return params, states


@pytest.mark.parametrize("name", list(REFS))
def test_reference_grad_scale_found_inf_tensor_lr(name):
    base = make_base([s for s, _ in PROJ_PARAMS])
    modes = [m for _, m in PROJ_PARAMS]
    gf = projection_grads(modes, 0.1, check=False)
    grad_lists = [gf(k, base) for k in range(4)]
    plain, plain_st = _ref_run(name, base, grad_lists)

    # grad_scale: gradients scaled by a power of two and unscaled by the reference: identical results
    s = torch.tensor(1024.0)
    scaled, scaled_st = _ref_run(name, base, [[g * s for g in gl] for gl in grad_lists], grad_scale=s)
    for a, b in zip(plain, scaled):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    # tensor lr == float lr
    lr = REFS[name][2]["lr"]
    tlr, _ = _ref_run(name, base, grad_lists, lr=torch.tensor(lr, dtype=torch.float64))
    for a, b in zip(plain, tlr):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    # found_inf = 0 steps normally; found_inf = 1 changes nothing (params, states, step)
    ok, _ = _ref_run(name, base, grad_lists, found_inf=torch.tensor(0.0))
    for a, b in zip(plain, ok):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    step, _, kwargs = REFS[name]
    params = [t.clone() for t in plain]
    states = [{k: v.clone() for k, v in st.items()} for st in plain_st]
    step(params, grad_lists[0], states, **kwargs, found_inf=torch.tensor(1.0))
    for a, b in zip(params, plain):
        assert torch.equal(a, b)
    for sa, sb in zip(states, plain_st):
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
    assert float(states[0]["step"]) == 4

    # maximize == stepping with the negated gradients
    mx, _ = _ref_run(name, base, grad_lists, maximize=True)
    neg, _ = _ref_run(name, base, [[-g for g in gl] for gl in grad_lists])
    for a, b in zip(mx, neg):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert any(not torch.equal(a, b) for a, b in zip(mx, plain))


# -- gradient clipping ------------------------------------------------------------------------------
CLIP_SHAPES = [(7,), (1,), (13, 31), (8, 3, 3, 3), (0,)]


@pytest.mark.parametrize("norm_type", [2.0, float("inf"), 1.0, 3.0, "inf"])
@pytest.mark.parametrize("max_norm", [0.5, 1e4])
@pytest.mark.parametrize("foreach", [False, True])
def test_clip_matches_torch(norm_type, max_norm, foreach):
    grads = make_base(CLIP_SHAPES, seed=3)
    if float(norm_type) == float("inf"):  # torch cannot take the inf-norm of an empty tensor
        grads = grads[:-1]
    theirs = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(theirs, grads):
        p.grad = g.clone()
    ours = [g.clone() for g in grads]
    expect = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type=norm_type, foreach=foreach)
    total = ref_clip.clip_grad_norm_reference(ours, max_norm, norm_type=norm_type)
    torch.testing.assert_close(total, expect, **FP32)
    for a, p in zip(ours, theirs):
        torch.testing.assert_close(a, p.grad, **FP32)
    clipped = float(expect) > max_norm
    assert clipped == (max_norm == 0.5)
    assert any(not torch.equal(a, g) for a, g in zip(ours, grads)) == clipped
    # the phase split gives the same numbers
    partials = ref_clip.grad_norm_partials(grads, norm_type)
    assert partials.shape == (len(grads),)
    tot = ref_clip.total_norm_from_partials(partials, norm_type)
    assert torch.equal(tot, total)
    assert float(ref_clip.clip_coefficient(tot, max_norm)) == pytest.approx(min(max_norm / (float(tot) + 1e-6), 1.0),
                                                                           rel=1e-6)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize("norm_type", [2.0, float("inf")])
def test_clip_nonfinite(bad, norm_type):
    grads = make_base([(5,), (3, 4)], seed=4)
    grads[1][1, 2] = bad
    theirs = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(theirs, grads):
        p.grad = g.clone()
    ours = [g.clone() for g in grads]
    with pytest.raises(RuntimeError):
        torch.nn.utils.clip_grad_norm_(theirs, 1.0, norm_type=norm_type, error_if_nonfinite=True)
    with pytest.raises(RuntimeError):
        ref_clip.clip_grad_norm_reference(ours, 1.0, norm_type=norm_type, error_if_nonfinite=True)
    for a, g in zip(ours, grads):  # nothing scaled on error
        torch.testing.assert_close(a, g, equal_nan=True, rtol=0, atol=0)
    expect = torch.nn.utils.clip_grad_norm_(theirs, 1.0, norm_type=norm_type)
    total = ref_clip.clip_grad_norm_reference(ours, 1.0, norm_type=norm_type)
    torch.testing.assert_close(total, expect, equal_nan=True)
    for a, p in zip(ours, theirs):
        torch.testing.assert_close(a, p.grad, equal_nan=True)


def test_clip_empty_and_bad_norm_type():
    assert float(ref_clip.clip_grad_norm_reference([], 1.0)) == 0.0
    assert float(torch.nn.utils.clip_grad_norm_([], 1.0)) == 0.0
    with pytest.raises(ValueError):
        ref_clip.clip_grad_norm_reference([torch.ones(2)], 1.0, norm_type=0.0)


# -- AdamP's use_gc and cautious, fastopt.AdamP on every backend vs pytorch_optimizer -----------------
def _backends():
    from conftest import DEVICE_BACKENDS
    return [b for d, b in DEVICE_BACKENDS if d == "cpu"]


ADAMP_GC_CONFIGS = [
    dict(lr=1e-2, weight_decay=1e-2, use_gc=True),
    dict(lr=1e-2, weight_decay=1e-2, use_gc=True, nesterov=True, delta=0.5),
    dict(lr=1e-2, cautious=True),
    dict(lr=1e-2, weight_decay=1e-2, cautious=True, nesterov=True, delta=0.5, adam_debias=True),
    dict(lr=1e-2, weight_decay=1e-2, cautious=True, nesterov=True, use_gc=True, adam_debias=True),
]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("cfg", ADAMP_GC_CONFIGS, ids=_ids(ADAMP_GC_CONFIGS))
def test_adamp_gc_cautious_match_pytorch_optimizer(cfg, backend):
    import fastopt
    from helpers import assert_runs_close, run_pair
    if cfg.get("cautious") and cfg.get("use_gc") and backend != "torch":
        pytest.skip("AdamP's cautious with use_gc runs on backend='torch' only (test_adamp_cautious_gc_kernel_raise)")
    up, up_p, fo, fo_p = run_pair(lambda ps: pytorch_optimizer.AdamP(ps, **cfg),
                                  lambda ps: fastopt.AdamP(ps, backend=backend, **cfg),
                                  [(7,), (13, 31), (8, 3, 3, 3), (5, 3, 11), (1, 4)], steps=6)
    assert_runs_close(fo, fo_p, up, up_p, ("exp_avg", "exp_avg_sq"), rtol=1e-5, atol=2e-6, state_atol=1e-6)


@pytest.mark.parametrize("backend", [b for b in _backends() if b != "torch"])
def test_adamp_cautious_gc_kernel_raise(backend):
    import fastopt
    p = torch.nn.Parameter(torch.randn(4, 3))
    p.grad = torch.randn(4, 3)
    before = p.detach().clone()
    opt = fastopt.AdamP([p], cautious=True, use_gc=True, backend=backend)
    with pytest.raises(ValueError, match="backend='torch'"):
        opt.step()
    assert torch.equal(p.detach(), before) and not opt.state[p]
