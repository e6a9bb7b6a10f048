"""fastopt.lowrank's optimizers: galore-torch 1.0's GaLoreAdamW step for step, q-galore-torch's adaptive
refresh and quantized projector, the DCT projector against ista-daslab-optimizers' DCTAdamW, the variants
around Lion / Adan / AdaBelief against their composition by hand, resume from a weights_only checkpoint,
AMP, INT8 weights, low-bit moments, and bad input."""
import copy
import io
import warnings

import pytest
import torch

import fastopt
from fastopt.lowbit import Int8Linear
from fastopt.lowrank import GaLoreAdaBelief, GaLoreAdamW, GaLoreAdan, GaLoreLion
from fastopt.lowrank import projectors as P
from fastopt.lowrank import quant as Q

from _upstream_lowrank import ista_dct_adamw, q_galore_projector
from conftest import DEVICE_BACKENDS

PROJ_TYPES = ["std", "reverse_std", "left", "right", "full"]
SHAPES = [(48, 20), (20, 48), (32, 32)]


def _problem(seed=0):
    """Three matrices (tall, wide, square) pulled towards targets whose singular values halve one after
    the other (2^-k): the gradient's spectrum is well separated, so its SVD at a refresh is stable under
    the fp32 rounding in which two implementations differ (with near-equal singular values the subspace
    would turn by a rounding-sized perturbation), plus a bias vector (not projected)."""
    g = torch.Generator().manual_seed(seed)
    weights, targets = [], []
    for m, n in SHAPES:
        k = min(m, n)
        U = torch.linalg.qr(torch.randn(m, k, generator=g))[0]
        V = torch.linalg.qr(torch.randn(n, k, generator=g))[0]
        targets.append(U @ torch.diag(2.0 ** -torch.arange(k, dtype=torch.float32)) @ V.T)
        weights.append(torch.randn(m, n, generator=g) * 1e-3)
    return weights, targets, torch.randn(48, generator=g)


def _loss(params, targets, step):
    mats, bias = params[:3], params[3]
    return sum(0.5 * ((w - t) ** 2).sum() * (1 + 0.1 * step) for w, t in zip(mats, targets)) + ((bias - 1) ** 2).sum()


def _groups(params, **keys):
    return [{"params": params[3:]}, {"params": params[:3], "rank": 5, "update_proj_gap": 7, "scale": 0.25, **keys}]


def _run(opt, params, targets, steps, start=0):
    for step in range(start, start + steps):
        opt.zero_grad()
        _loss(params, targets, step).backward()
        opt.step()


def _galore_torch(params, **kw):
    galore_torch = pytest.importorskip("galore_torch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return galore_torch.GaLoreAdamW(params, no_deprecation_warning=True, **kw)


@pytest.mark.parametrize("correct_bias", [True, False])
@pytest.mark.parametrize("proj_type", PROJ_TYPES)
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_matches_galore_torch(device, backend, proj_type, correct_bias):
    """20 steps with refreshes at steps 0, 7 and 14: parameters and moments within rtol 1e-5 of
    galore-torch 1.0's GaLoreAdamW (the same fp32 SVD).  proj_type="full" uses eps=1e-2: its projected
    gradient at a refresh is diagonal up to rounding noise, which Adam with eps=1e-6 would normalize
    into updates of its own (chaotic in both implementations, whatever the formula)."""
    weights, targets, bias = _problem()
    ours = [torch.nn.Parameter(w.clone().to(device)) for w in weights] + [torch.nn.Parameter(bias.clone().to(device))]
    theirs = [torch.nn.Parameter(w.clone().to(device)) for w in weights] + [torch.nn.Parameter(bias.clone().to(device))]
    targets = [t.to(device) for t in targets]
    kw = dict(lr=1e-2, weight_decay=0.1, eps=1e-2 if proj_type == "full" else 1e-6, correct_bias=correct_bias)
    a = GaLoreAdamW(_groups(ours, proj_type=proj_type), backend=backend, **kw)
    b = _galore_torch(_groups(theirs, proj_type=proj_type), **kw)
    for step in range(20):
        for params, opt in ((ours, a), (theirs, b)):
            opt.zero_grad()
            _loss(params, targets, step).backward()
            opt.step()
    for pa, pb in zip(ours, theirs):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)  # (entries up to ~1: atol 1e-6 of the scale)
        for key in ("exp_avg", "exp_avg_sq"):
            sb = b.state[pb][key]
            torch.testing.assert_close(a.state[pa][key], sb, rtol=1e-5, atol=1e-5 * sb.abs().max().item())
    assert a.state[ours[0]]["host_step"] == 20 and float(a.state[ours[0]]["step"]) == 20
    assert a.state[ours[0]]["proj_refreshes"] == 3


def test_projector_refreshes_on_schedule():
    weights, targets, bias = _problem()
    params = [torch.nn.Parameter(w.clone()) for w in weights] + [torch.nn.Parameter(bias.clone())]
    opt = GaLoreAdamW(_groups(params), lr=1e-2)
    seen = []
    for step in range(16):
        opt.zero_grad()
        _loss(params, targets, step).backward()
        before = opt.state[params[0]].get("projector")
        opt.step()
        after = opt.state[params[0]]["projector"]
        seen.append(before is None or not torch.equal(before, after))
    assert [i for i, changed in enumerate(seen) if changed] == [0, 7, 14]


def _clone_params(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


CONFIGS = [
    dict(projector="svd"),
    dict(projector="randomized"),
    dict(projector="dct"),
    dict(projector="svd", proj_bits=4, proj_group_size=20),
    dict(projector="randomized", proj_bits=8, proj_group_size=20, proj_adaptive=True, update_proj_gap=2),
    dict(projector="svd", proj_type="full"),
]


@pytest.mark.parametrize("optimizer", [GaLoreAdamW, GaLoreLion, GaLoreAdan, GaLoreAdaBelief])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_resume_from_weights_only_checkpoint_is_bit_exact(optimizer, config):
    weights, targets, bias = _problem()
    params = [torch.nn.Parameter(w.clone()) for w in weights] + [torch.nn.Parameter(bias.clone())]
    kw = {"lr": 1e-3} if optimizer is not GaLoreLion else {"lr": 1e-4}
    opt = optimizer(_groups(params, **{"update_proj_gap": 3, **config}), **kw)
    _run(opt, params, targets, 5)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    resumed = _clone_params(params)
    opt2 = optimizer(_groups(resumed, **{"update_proj_gap": 3, **config}), **kw)
    opt2.load_state_dict(loaded)
    _run(opt, params, targets, 8, start=5)
    _run(opt2, resumed, targets, 8, start=5)
    for a, b in zip(params, resumed):
        assert torch.equal(a, b)
    state = opt2.state[resumed[0]]
    for key, value in opt.state[params[0]].items():
        other = state[key]
        if torch.is_tensor(value):
            assert other.dtype == value.dtype and torch.equal(other, value), key
        else:
            assert other == value, key


def test_resume_keeps_the_dtypes_of_a_bf16_parameter():
    """torch.optim casts loaded states to the parameter's dtype; the fp32 low-rank moments, the int64
    DCT indices and the float64 adaptive queue of a bf16 parameter come back as they were saved."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(24, 40, dtype=torch.bfloat16))
    opt = GaLoreAdamW([{"params": [w], "rank": 4, "projector": "dct", "proj_adaptive": True, "update_proj_gap": 1}])
    for _ in range(3):
        w.grad = torch.randn_like(w)
        opt.step()
    opt2 = GaLoreAdamW([{"params": [torch.nn.Parameter(w.detach().clone())], "rank": 4, "projector": "dct",
                         "proj_adaptive": True, "update_proj_gap": 1}])
    opt2.load_state_dict(opt.state_dict())
    s = next(iter(opt2.state.values()))
    assert s["exp_avg"].dtype == torch.float32 and s["projector_indices"].dtype == torch.int64
    assert s["proj_queue"].dtype == torch.float64
    assert torch.equal(s["exp_avg"], opt.state[w]["exp_avg"])


def _by_hand(base_cls, base_kw, w0, grads, rank, scale, lr, wd):
    """GaLore around ``base_cls`` composed by hand: the SVD projector of the first gradient (right side),
    the base optimizer stepping a zero tensor with the projected gradient (no weight decay; its states
    live in the low-rank space), then p <- (p + scale * U P) (1 - lr wd)."""
    p = w0.clone()
    proj = P.svd_projector(grads[0], rank, "right")
    low = torch.zeros(w0.shape[0], proj.shape[0])
    z = torch.nn.Parameter(low.clone())
    base = base_cls([z], lr=lr, weight_decay=0.0, backend="torch", **base_kw)
    for g in grads:
        with torch.no_grad():
            z.zero_()
        z.grad = g @ proj.T
        base.step()
        p = (p + scale * (z.detach() @ proj)) * (1 - lr * wd)
    return p


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("variant,base,base_kw", [
    (GaLoreLion, fastopt.Lion, {}),
    (GaLoreAdan, fastopt.Adan, {}),
    (GaLoreAdaBelief, fastopt.AdaBelief, {}),
])
def test_variants_equal_their_composition_by_hand(device, backend, variant, base, base_kw):
    torch.manual_seed(1)
    w0 = torch.randn(30, 12)
    grads = [torch.randn(30, 12) for _ in range(6)]
    expected = _by_hand(base, base_kw, w0, grads, rank=4, scale=0.5, lr=1e-3, wd=0.1)
    w = torch.nn.Parameter(w0.clone().to(device))
    opt = variant([{"params": [w], "rank": 4, "scale": 0.5, "update_proj_gap": 100}], lr=1e-3, weight_decay=0.1,
                  backend=backend)
    for g in grads:
        w.grad = g.to(device)
        opt.step()
    torch.testing.assert_close(w.detach().cpu(), expected, rtol=1e-5, atol=1e-6)


def test_q_galore_adaptive_gap_and_int4_projector_decisions():
    """A fixed gradient sequence (so that both see the same gradients) whose subspace settles: the gap
    q-galore-torch 1.0's projector reaches after every step, and its dequantized INT4 projector, equal
    ours (GaLoreAdamW with proj_bits=4, proj_adaptive=True) step by step."""
    QGP = q_galore_projector()
    torch.manual_seed(0)
    m, n, r = 64, 32, 4
    U = torch.linalg.qr(torch.randn(m, n))[0]
    V = torch.linalg.qr(torch.randn(n, n))[0]
    s = 2.0 ** -torch.arange(n, dtype=torch.float32)
    theirs = QGP(r, update_proj_gap=2, scale=1.0, proj_type="std", quant=True, group_size=32, n_bit=4,
                 cos_threshold=0.4, gamma_proj=2, queue_size=5)
    w = torch.nn.Parameter(torch.zeros(m, n))
    opt = GaLoreAdamW([{"params": [w], "rank": r, "update_proj_gap": 2, "proj_bits": 4, "proj_group_size": 32,
                        "proj_adaptive": True}], lr=1e-3)
    gaps = []
    for t in range(60):
        noise = torch.randn(m, n) * (0.3 if t < 10 else 1e-3)  # the subspace settles after step 10
        g = U @ torch.diag(s) @ V.T + noise
        theirs.project(g, t)
        w.grad = g
        opt.step()
        state = opt.state[w]
        gaps.append((state["proj_gap"], theirs.update_proj_gap))
        assert state["proj_gap"] == theirs.update_proj_gap, f"step {t}"
        assert state["proj_refreshes"] == theirs.svd_count, f"step {t}"
        deq = theirs.ortho_matrix_scales * (theirs.ortho_matrix.to(theirs.ortho_matrix_scales.dtype)
                                            - theirs.ortho_matrix_zeros)
        mine = Q.dequantize_projector({"codes": state["projector_codes"], "scales": state["projector_scales"],
                                       "zeros": state["projector_zeros"]}, (r, n))
        assert torch.equal(mine, deq.reshape(r, n)), f"step {t}"
        assert state["projector_codes"].numel() == r * n // 2  # two codes per byte
    assert gaps[-1][0] > 2, "the gap never grew: the test did not exercise the adaptive refresh"


def test_dct_matches_ista_dct_adamw():
    """ista-daslab-optimizers' DCTAdamW (sim_type "matmul", L1 scores, a refresh every step) and
    GaLoreAdamW(projector="dct", update_proj_gap=1, scale=1): the same selected columns and, with eps=0
    and no weight decay (where the two AdamW conventions coincide), the same parameters."""
    mod = ista_dct_adamw()
    torch.manual_seed(0)
    shapes = [(40, 24), (24, 40)]
    ws = [torch.randn(*s) for s in shapes]
    grads = [[torch.randn(*s) for s in shapes] for _ in range(8)]
    theirs = [torch.nn.Parameter(w.clone()) for w in ws]
    ours = [torch.nn.Parameter(w.clone()) for w in ws]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        ref = mod.DCTAdamW(theirs, lr=1e-2, weight_decay=0.0, rank=6, proj=mod.PROJ_DCT, update_proj_gap=1,
                           eps=0.0)
    opt = GaLoreAdamW([{"params": ours, "rank": 6, "projector": "dct", "update_proj_gap": 1}], lr=1e-2, eps=0.0)
    for step_grads in grads:
        for p, g in zip(theirs, step_grads):
            p.grad = g.clone()
        ref.step()
        for p, g in zip(ours, step_grads):
            p.grad = g.clone()
        opt.step()
        for pt, po in zip(theirs, ours):
            idx_t = ref.state[pt][mod.STATE_FFT_LRP].indices_crt.long()
            assert torch.equal(idx_t, opt.state[po]["projector_indices"])
    for pt, po in zip(theirs, ours):
        torch.testing.assert_close(po, pt, rtol=1e-5, atol=1e-6)


def test_amp_skipped_step_changes_nothing():
    weights, targets, bias = _problem()
    params = [torch.nn.Parameter(w.clone()) for w in weights] + [torch.nn.Parameter(bias.clone())]
    opt = GaLoreAdamW(_groups(params), lr=1e-2)
    _run(opt, params, targets, 2)
    before = [p.detach().clone() for p in params]
    state = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[params[0]].items()}
    _loss(params, targets, 2).backward()
    opt.grad_scale = torch.ones(())
    opt.found_inf = torch.ones(())
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, params))
    for k, v in state.items():
        assert (torch.equal(v, opt.state[params[0]][k]) if torch.is_tensor(v) else v == opt.state[params[0]][k]), k
    # a scaled gradient with found_inf=0: the same step as the unscaled one
    ref = _clone_params(params)
    opt_ref = GaLoreAdamW(_groups(ref), lr=1e-2)
    opt_ref.load_state_dict(copy.deepcopy(opt.state_dict()))  # (torch aliases same-device tensors on load)
    opt.zero_grad()
    (_loss(params, targets, 2) * 1024).backward()
    opt.grad_scale, opt.found_inf = torch.full((), 1024.0), torch.zeros(())
    opt.step()
    opt_ref.zero_grad()
    _loss(ref, targets, 2).backward()
    opt_ref.step()
    for a, b in zip(params, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_int8_linear_weights_are_projected():
    """Q-GaLore's INT8 weights: the int8 weight of an Int8Linear (nearest rounding) is dequantized,
    stepped by the projected update and requantized -- the same codes as stepping its dequantized fp32
    copy with GaLoreAdamW and quantizing that."""
    from fastopt.lowbit import int8 as lowbit_int8

    torch.manual_seed(0)
    layer = Int8Linear(64, 32, bias=False, group_size=64, stochastic_rounding=False)
    w32 = torch.nn.Parameter(layer.dequantized_weight(torch.float32).clone())
    opt = GaLoreAdamW([{"params": list(layer.parameters()), "rank": 4}], lr=1e-2)
    ref = GaLoreAdamW([{"params": [w32], "rank": 4}], lr=1e-2)
    x = torch.randn(16, 64)
    for _ in range(3):
        opt.zero_grad()
        layer(x).square().mean().backward()
        g = layer.weight.float_grad.clone()
        opt.step()
        w32.grad = g
        ref.step()
        codes, scales, zeros = lowbit_int8.quantize_int8(w32.detach(), 64, stochastic=False)
        assert torch.equal(layer.weight, codes)
        with torch.no_grad():
            w32.copy_(layer.dequantized_weight(torch.float32))
    assert opt.state[layer.weight]["exp_avg"].shape == (4, 64)  # (32 x 64: the left side)


def test_low_bit_moments_in_the_low_rank_space():
    """state_bits=8: the low-rank moments (512 x 32 here) are blockwise 8-bit; the run stays close to the
    fp32-moment run (within 10 % of how far the parameters moved)."""
    torch.manual_seed(0)
    w0 = torch.randn(512, 300)
    w, w8 = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    opt = GaLoreAdamW([{"params": [w], "rank": 32}], lr=1e-3)
    opt8 = GaLoreAdamW([{"params": [w8], "rank": 32}], lr=1e-3, state_bits=8, min_quant_size=4096)
    for _ in range(5):
        g = torch.randn(512, 300)
        w.grad, w8.grad = g, g.clone()
        opt.step()
        opt8.step()
    s = opt8.state[w8]
    assert s["state_format"] and s["exp_avg"].dtype == torch.uint8 and s["exp_avg"].numel() == 512 * 32
    moved = (w.detach() - w0).abs().max()
    assert moved > 0 and (w8 - w).abs().max() < 0.1 * moved


@pytest.mark.parametrize("bad,match", [
    (dict(rank=0), "rank must be a positive int"),
    (dict(rank=2.5), "rank must be a positive int"),
    (dict(update_proj_gap=0), "update_proj_gap"),
    (dict(proj_type="diagonal"), "proj_type must be one of"),
    (dict(projector="qr"), "projector must be one of"),
    (dict(projector="dct", proj_type="full"), "dct projector"),
    (dict(proj_bits=3), "proj_bits"),
    (dict(projector="dct", proj_bits=4), "dct projector is stored"),
    (dict(scale=float("nan")), "scale"),
    (dict(gamma_proj=0.5), "gamma_proj"),
    (dict(dct_norm=3), "dct_norm"),
    (dict(dct_method="dct2"), "dct_method"),
])
def test_bad_group_options_raise_before_anything_is_added(bad, match):
    w = torch.nn.Parameter(torch.randn(8, 6))
    opt = GaLoreAdamW([torch.nn.Parameter(torch.randn(3))])
    with pytest.raises(ValueError, match=match):
        opt.add_param_group({"params": [w], "rank": 2, **bad})
    assert len(opt.param_groups) == 1
    with pytest.raises(ValueError, match=match):
        GaLoreAdamW([{"params": [w], "rank": 2, **bad}])


def test_quantized_projector_group_size_must_divide_it_before_any_change():
    w = torch.nn.Parameter(torch.randn(30, 14))
    w.grad = torch.randn(30, 14)
    opt = GaLoreAdamW([{"params": [w], "rank": 3, "proj_bits": 4, "proj_group_size": 256}])
    before = w.detach().clone()
    with pytest.raises(ValueError, match="proj_group_size"):
        opt.step()
    assert torch.equal(w, before) and not opt.state


def test_checkpoint_of_another_rank_is_refused():
    weights, targets, bias = _problem()
    params = [torch.nn.Parameter(w.clone()) for w in weights] + [torch.nn.Parameter(bias.clone())]
    opt = GaLoreAdamW(_groups(params), lr=1e-2)
    _run(opt, params, targets, 1)
    sd = opt.state_dict()
    other = GaLoreAdamW([{"params": params[3:]}, {"params": params[:3], "rank": 6}], lr=1e-2)
    with pytest.raises(ValueError, match="rank 6"):
        other.load_state_dict(sd)
    assert not other.state


def test_loads_a_plain_adamw_checkpoint_for_unprojected_parameters():
    torch.manual_seed(0)
    b = torch.nn.Parameter(torch.randn(7))
    plain = fastopt.AdamW([b], lr=1e-2)
    b.grad = torch.randn(7)
    plain.step()
    opt = GaLoreAdamW([b], lr=1e-2)
    opt.load_state_dict(plain.state_dict())
    assert opt.state[b]["host_step"] == 1
    b.grad = torch.randn(7)
    opt.step()
    assert opt.state[b]["host_step"] == 2


def test_signatures_are_real():
    import inspect

    sig = inspect.signature(GaLoreLion.__init__)
    assert "rank" in sig.parameters and "betas" in sig.parameters
    with pytest.raises(TypeError):
        GaLoreLion([torch.nn.Parameter(torch.randn(3))], rnak=4)


@pytest.mark.skipif(("cpu", "triton") not in DEVICE_BACKENDS, reason="triton cannot run here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("config", [dict(), dict(proj_bits=4, proj_group_size=12), dict(projector="dct")],
                         ids=["dense", "int4", "dct"])
def test_triton_fused_step_equals_the_generic_path(config, dtype, monkeypatch):
    """backend="triton": GaLoreAdamW's projection + Adam update in one Triton GEMM and the back-projection
    in a second (an INT4 projector dequantized in their loads) -- the same steps as the cpu backend's
    matmul + fused elementwise pass + addmm_, on tall (right side) and wide (left side) matrices."""
    from fastopt.triton_kernels import lowrank as kernels

    calls = []
    real = kernels.project_adam
    monkeypatch.setattr(kernels, "project_adam", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    shapes = [(36, 24), (24, 60)]
    ws = [torch.randn(*s).to(dtype) for s in shapes]
    runs = {}
    for backend in ("cpu", "triton"):
        params = [torch.nn.Parameter(w.clone()) for w in ws]
        opt = GaLoreAdamW([{"params": params, "rank": 6, "update_proj_gap": 2, "scale": 0.5, **config}], lr=1e-2,
                          weight_decay=0.1, backend=backend)
        for step in range(4):
            for i, p in enumerate(params):
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(10 * step + i)).to(dtype)
            opt.step()
        runs[backend] = (params, opt)
    assert len(calls) == 8  # every step of both matrices ran the fused kernel
    (pc, oc), (pt, ot) = runs["cpu"], runs["triton"]
    # bf16: the cpu path projects in bf16 (galore-torch's projector has the parameter's dtype, so its
    # projected gradient is rounded to bf16); the Triton GEMM accumulates and keeps it in fp32
    tol, srel = (dict(rtol=1e-5, atol=1e-6), 1e-5) if dtype == torch.float32 else (dict(rtol=2e-2, atol=2e-2), 2e-2)
    for a, b in zip(pt, pc):
        torch.testing.assert_close(a.float(), b.float(), **tol)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(ot.state[a][key], oc.state[b][key], rtol=10 * srel,
                                       atol=srel * oc.state[b][key].abs().max().item())
        assert float(ot.state[a]["step"]) == 4 and ot.state[a]["host_step"] == 4


def test_a_compiled_step_runs_eagerly_with_the_same_numbers():
    """torch.compile(opt.step): GaLore's step is excluded from dynamo (host-side schedule and a refresh
    that is an SVD), so nothing is captured and the numbers are the eager ones."""
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(0)
    w, b = torch.nn.Parameter(torch.randn(32, 16)), torch.nn.Parameter(torch.randn(16))
    w2, b2 = torch.nn.Parameter(w.detach().clone()), torch.nn.Parameter(b.detach().clone())
    make = lambda w, b: GaLoreAdamW([{"params": [b]}, {"params": [w], "rank": 4, "update_proj_gap": 2}],  # noqa: E731
                                    lr=1e-2, weight_decay=0.1)
    opt, ref = make(w, b), make(w2, b2)
    compiled = torch.compile(opt.step)
    torch._dynamo.utils.counters.clear()
    for _ in range(5):
        g, gb = torch.randn(32, 16), torch.randn(16)
        w.grad, b.grad, w2.grad, b2.grad = g, gb, g.clone(), gb.clone()
        compiled()
        ref.step()
    assert torch.equal(w, w2) and torch.equal(b, b2)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0


def test_dct_fft_scoring_keeps_the_matmul_indices():
    """dct_method="fft" scores the same basis through one real FFT per row: on a gradient whose top
    scores are well separated it keeps the same columns as the matmul and takes the same steps."""
    torch.manual_seed(0)
    m, n, r = 96, 64, 6
    basis = P.dct_basis(n, "cpu")
    runs = []
    for method in ("matmul", "fft"):
        w = torch.nn.Parameter(torch.zeros(m, n))
        opt = GaLoreAdamW([{"params": [w], "rank": r, "projector": "dct", "dct_method": method, "update_proj_gap": 2}],
                          lr=1e-2)
        for step in range(4):
            g = torch.randn(m, r, generator=torch.Generator().manual_seed(step)) * 10
            noise = torch.randn(m, n, generator=torch.Generator().manual_seed(99 + step))
            w.grad = g @ basis[:, [3, 17, 5, 40, 22, 9]].T + 0.01 * noise
            opt.step()
        runs.append((w.detach().clone(), opt.state[w]["projector_indices"].sort().values))
    assert torch.equal(runs[0][1], torch.tensor([3, 5, 9, 17, 22, 40]))
    assert torch.equal(runs[0][1], runs[1][1])
    torch.testing.assert_close(runs[1][0], runs[0][0], rtol=1e-5, atol=1e-6)


def test_switching_the_projector_refreshes_at_the_next_step():
    """A group switched to another projector kind (or to a quantized projector) between steps gets the
    projector it now reads at its next step -- a refresh outside the schedule -- and keeps its moments."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(40, 24))
    opt = GaLoreAdamW([{"params": [w], "rank": 4, "update_proj_gap": 100, "proj_group_size": 8}], lr=1e-2)
    for config, key in ((dict(projector="dct"), "projector_indices"), (dict(projector="svd", proj_bits=4),
                                                                          "projector_codes")):
        w.grad = torch.randn(40, 24)
        opt.step()
        refreshes, moments = opt.state[w]["proj_refreshes"], opt.state[w]["exp_avg"].clone()
        opt.param_groups[0].update(config)
        w.grad = torch.randn(40, 24)
        opt.step()
        assert key in opt.state[w] and opt.state[w]["proj_refreshes"] == refreshes + 1
        assert not torch.equal(opt.state[w]["exp_avg"], moments)  # (stepped, not reset)
