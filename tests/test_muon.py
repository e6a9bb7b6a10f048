"""Muon: the reference Newton–Schulz vs pytorch_optimizer's, the Triton Newton–Schulz kernels (the
interpreter on a CPU) vs plain matmuls and the reference, ``fastopt.optim.muon.Muon`` (torch and triton
backends) vs ``pytorch_optimizer.Muon``, state dicts both ways, and errors raised before anything is
written.

Tolerances, and why:
* reference Newton–Schulz vs upstream: bit-identical (``torch.equal``) -- the same torch calls on the
  same bf16 tensors in the same order;
* Triton kernels vs exact (fp64) products: within one bf16 rounding of the exact value (plus the fp32
  summation error bound for results near zero) -- both accumulate in fp32 and round once, only the
  summation order differs;
* Triton Newton–Schulz (5 steps) vs the reference: relative Frobenius error <= 1e-2 and max |diff| <=
  2^-6 (8 bf16 ulps of the largest entries, ~0.4), and no farther from the fp64 iteration than the
  reference itself (+25%): a one-ulp difference in A or B (summation order) spreads over whole rows in
  the next products, so entries differ by a few ulps, well inside the ~1.4e-2 error bf16 itself makes;
* fastopt Muon (torch backend) vs upstream, fp32 and bf16 params: Muon params and momentum buffers
  bit-identical; AdamW params fp32 rtol 1e-6 (fused kernel writes ``m + (1-b1)(g-m)`` where upstream
  calls ``lerp``), bf16 rtol 1.6e-2 (fastopt rounds once from fp32, upstream after every bf16 op);
* triton backend vs upstream: momentum buffers bit-identical (they do not depend on Newton–Schulz);
  parameter displacements within 2e-2 relative (Frobenius) and ``steps * lr * scale * 2^-6`` absolute,
  the Newton–Schulz bound above carried through ``p -= lr * scale * O``.
"""
import copy
import math

import pytest
import torch

from fastopt import _backend
from fastopt.optim.muon import Muon, newton_schulz_triton_, resolve_ns_backend
from fastopt.reference import muon as R

po = pytest.importorskip("pytorch_optimizer")
from pytorch_optimizer.optimizer.muon.base import get_adjusted_lr  # noqa: E402
from pytorch_optimizer.optimizer.utils.matrix import (  # noqa: E402
    NS_COEFFICIENTS,
    zero_power_via_gram_newton_schulz,
    zero_power_via_newton_schulz_5,
)

TRITON_DEVICES = [d for d in ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
                  if "triton" in _backend.available_backends(d)]
needs_triton = pytest.mark.skipif(not TRITON_DEVICES, reason="triton cannot run here (no CUDA, no TRITON_INTERPRET)")
A_, B_, C_ = R.DEFAULT_COEFFS


def kernels():
    from fastopt.triton_kernels import newton_schulz

    return newton_schulz


def randn(shape, seed=0, device="cpu", dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# (1) The reference against pytorch_optimizer's functions.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("coeffs", ["original", "quintic", "polar_express", "polar_express_safer"])
@pytest.mark.parametrize("shape", [(64, 96), (100, 37), (16, 16), (1, 1), (1, 9), (2, 45, 70), (3, 2, 17, 5)])
def test_reference_newton_schulz_matches_upstream(shape, coeffs):
    g = randn(shape, seed=sum(shape))
    ours = R.newton_schulz(g, steps=5, coeffs=coeffs)
    theirs = zero_power_via_newton_schulz_5(g, num_steps=5, weights=coeffs)
    assert ours.dtype == torch.bfloat16 and ours.shape == g.shape
    assert torch.equal(ours, theirs)
    if min(shape[-2:]) > 1:  # and it orthogonalizes: singular values pushed from (0, 1] into ~[0.68, 1.14]
        s = torch.linalg.svdvals(ours.double())
        assert 0.6 <= s.min() and s.max() <= 1.25


@pytest.mark.parametrize("reset_steps", [(2,), (1, 3), ()])
@pytest.mark.parametrize("shape", [(64, 96), (100, 37), (2, 45, 70)])
def test_reference_gram_newton_schulz_matches_upstream(shape, reset_steps):
    g = randn(shape, seed=3)
    ours = R.gram_newton_schulz(g, steps=5, reset_steps=reset_steps)
    theirs = zero_power_via_gram_newton_schulz(g, num_steps=5, reset_steps=reset_steps)
    assert ours.dtype == torch.float16 and ours.shape == g.shape
    assert torch.equal(ours, theirs)


def test_coefficients_and_lr_scales_match_upstream():
    assert R.NS_COEFFICIENTS == {k: [tuple(c) for c in v] for k, v in NS_COEFFICIENTS.items()}
    assert R.ns_coefficients((1, 2, 3)) == [(1.0, 2.0, 3.0)]
    assert R.coefficient_schedule("quintic", 7)[5:] == [NS_COEFFICIENTS["quintic"][-1]] * 2
    for shape in [(24, 40), (40, 24), (16, 4, 3, 3), (7, 1)]:
        for adjusted in (False, True):
            assert R.adjusted_lr(0.02, shape, adjusted) == get_adjusted_lr(0.02, shape, adjusted)
    assert R.adjusted_lr(0.02, (64, 16)) == pytest.approx(0.04)
    assert R.adjusted_lr(0.02, (16, 64), use_adjusted_lr=True) == pytest.approx(0.02 * 0.2 * 8)


# ---------------------------------------------------------------------------------------------
# (2) Triton kernels (TRITON_INTERPRET=1 on a CPU) against exact products and the reference.
# ---------------------------------------------------------------------------------------------

def _assert_one_rounding(out, exact, abs_terms):
    """``out`` (bf16) is within one bf16 ulp of ``exact`` (fp64), plus the fp32 summation error bound
    (``abs_terms`` = sum of |products|) that matters for results near zero."""
    e = exact.abs().clamp_min(1e-30)
    ulp = torch.exp2(torch.floor(torch.log2(e)) - 7)
    err = (out.double() - exact).abs()
    bound = ulp + 2.0 ** -20 * abs_terms
    assert bool((err <= bound).all()), f"max err/bound {(err / bound).max().item():.3f}"


@needs_triton
@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("shape", [(37, 100), (64, 96), (33, 33), (1, 5), (200, 9), (2, 45, 70)])
def test_symmetric_kernels_match_matmul(device, shape):
    """X X^T from lower-triangle tiles (odd sizes: partial tiles, 1 to 28 tile pairs, a batch), then the
    fused epilogues b A + c A A and a X + B X."""
    K = kernels()
    x = randn(shape, seed=1, device=device, dtype=torch.bfloat16)
    xd = x.double()
    a = K.syrk(x)
    assert a.dtype == torch.bfloat16 and a.shape == (*shape[:-1], shape[-2])
    assert torch.equal(a, a.mT)  # exactly symmetric
    _assert_one_rounding(a, xd @ xd.mT, xd.abs() @ xd.abs().mT)
    plain = x @ x.mT  # torch's bf16 matmul: fp32 accumulation too; at most a rare summation-order flip
    assert (a.double() - plain.double()).abs().max() <= 2 ** -7 * plain.abs().max()
    if device == "cpu":  # (cuBLAS may reduce in bf16: allow_bf16_reduced_precision_reduction)
        assert (a != plain).double().mean() <= 0.01

    ad = a.double()
    b = K.syrk(a, e=a, alpha=C_, beta=B_)
    assert torch.equal(b, b.mT)
    _assert_one_rounding(b, B_ * ad + C_ * (ad @ ad), abs(B_) * ad.abs() + abs(C_) * (ad.abs() @ ad.abs()))

    if shape[-2] <= shape[-1]:
        bd = b.double()
        xn = K.ns_update(b, x, A_)
        assert xn.shape == x.shape
        _assert_one_rounding(xn, A_ * xd + bd @ xd, abs(A_) * xd.abs() + bd.abs() @ xd.abs())


def _ns_fp64(g, steps=5, coeffs=R.DEFAULT_COEFFS):
    """The iteration from the same bf16 starting point, in fp64."""
    transpose = g.size(-2) > g.size(-1)
    x = (g.mT if transpose else g).to(torch.bfloat16, copy=True)
    x = x.div_(x.norm(2, dim=(-2, -1), keepdim=True).clamp_min_(1e-7)).double()
    for a, b, c in R.coefficient_schedule(coeffs, steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if transpose else x


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@needs_triton
@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("shape,coeffs,steps", [((64, 96), "original", 5), ((100, 37), "original", 5),
                                                ((2, 45, 70), "original", 5), ((40, 24), "quintic", 6)])
def test_triton_newton_schulz_matches_reference(device, shape, coeffs, steps):
    g = randn(shape, seed=7, device=device)
    sched = R.ns_coefficients(coeffs)
    tri = kernels().newton_schulz_triton(g, steps=steps, coeffs=sched)
    ref = R.newton_schulz(g, steps=steps, coeffs=sched)
    exact = _ns_fp64(g, steps, sched)
    assert tri.dtype == torch.bfloat16 and tri.shape == g.shape
    assert _rel(tri, ref) <= 1e-2
    assert (tri.double() - ref.double()).abs().max() <= 2 ** -6
    assert _rel(tri, exact) <= 1.25 * _rel(ref, exact) + 1e-3


@needs_triton
@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_newton_schulz_custom_op(device):
    """fastopt::newton_schulz_triton is a well-formed custom op, and computes what the eager path does."""
    g = randn((12, 20), seed=2, device=device)
    flat = [float(v) for v in R.DEFAULT_COEFFS]
    torch.library.opcheck(newton_schulz_triton_, (g, 2, 1e-7, flat),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    assert torch.equal(newton_schulz_triton_(g, 2, 1e-7, flat), kernels().newton_schulz_triton(g, steps=2))


def test_kernel_input_errors():
    if not _backend.has_triton():
        pytest.skip("triton is not installed")
    K = kernels()
    with pytest.raises(ValueError, match="at least 2 dimensions|matrix"):
        K.newton_schulz_triton(torch.randn(5, device="cuda" if torch.cuda.is_available() else "cpu"))
    with pytest.raises(ValueError, match="steps"):
        K.newton_schulz_triton(torch.randn(3, 4), steps=-1)
    with pytest.raises(ValueError, match="coeffs"):
        K.newton_schulz_triton(torch.randn(3, 4), coeffs=[(1.0, 2.0)])


# ---------------------------------------------------------------------------------------------
# (3) The optimizer against pytorch_optimizer.Muon.
# ---------------------------------------------------------------------------------------------

# A small model: two linears (one with more rows than columns), two conv weights of one shape (batched
# together), a bias and an "embedding" flagged for AdamW.
SHAPES = [(24, 40), (40, 24), (16, 4, 3, 3), (16, 4, 3, 3), (24,), (10, 7)]
N_MUON = 4
HYPER = dict(lr=0.02, weight_decay=0.01, adamw_lr=1e-3, adamw_wd=0.1)


def make_params(dtype=torch.float32, device="cpu", seed=0):
    return [torch.nn.Parameter(randn(s, seed=seed + i, device=device, dtype=dtype)) for i, s in enumerate(SHAPES)]


def groups(ps):
    return [dict(params=ps[:N_MUON], use_muon=True), dict(params=ps[N_MUON:], use_muon=False)]


def run(opts, param_sets, steps, seed0=100):
    for k in range(steps):
        for i, ps in enumerate(zip(*param_sets)):
            g = randn(ps[0].shape, seed=seed0 + 31 * k + i)
            for p in ps:
                p.grad = g.to(device=p.device, dtype=p.dtype)
        for opt in opts:
            opt.step()


CONFIGS = [
    dict(),
    dict(nesterov=False, weight_decouple=False, weight_decay=0.05, maximize=True),
    dict(use_adjusted_lr=True, momentum=0.9),
    dict(cautious=True),
    dict(ns_coeffs="quintic", ns_steps=6),
    dict(ns_coeffs=[(3.0, -3.2, 1.2), (2.0, -1.5, 0.5)], ns_steps=3),
    dict(ns_method="gram_newton_schulz", ns_reset_steps=(1, 3)),
    dict(lr=torch.tensor(0.03), adamw_betas=(0.8, 0.99), adamw_eps=1e-8),
]


def _ids(cfgs):
    return ["-".join(f"{k}={v}" for k, v in c.items()) or "defaults" for c in cfgs]


# foreach=None is upstream's default (batched) path; foreach=False, its per-tensor path, for a few configs.
RUNS = [(c, None) for c in CONFIGS] + [(CONFIGS[i], False) for i in (0, 1, 3, 7)]
RUN_IDS = [f"{i}-foreach={f}" for i, (_, f) in zip(_ids([c for c, _ in RUNS]), RUNS)]


@pytest.mark.parametrize("cfg,foreach", RUNS, ids=RUN_IDS)
def test_torch_backend_matches_upstream(cfg, foreach):
    ours, theirs = make_params(), make_params()
    kw = {**HYPER, **cfg}
    opt = Muon(groups(ours), foreach=foreach, backend="torch", **kw)
    ref = po.Muon(groups(theirs), foreach=foreach, **kw)
    run([opt, ref], [ours, theirs], steps=5)
    # A tensor lr: upstream's foreach=False path passes it as `alpha` (host read, another rounding of the
    # last fp32 bit); fastopt always applies it as the foreach path does.
    exact = not (isinstance(kw["lr"], torch.Tensor) and foreach is False)
    for p, q in zip(ours[:N_MUON], theirs[:N_MUON]):
        if exact:
            assert torch.equal(p, q)
        else:
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
        assert torch.equal(opt.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"])
    for p, q in zip(ours[N_MUON:], theirs[N_MUON:]):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt.state[p][key], ref.state[q][key], rtol=1e-6, atol=1e-7)
    assert opt.param_groups[0]["step"] == ref.param_groups[0]["step"] == 5
    base = make_params()
    assert all((p - b).abs().max() > 1e-3 for p, b in zip(ours, base))  # and everything moved


def test_torch_backend_bf16_params_match_upstream():
    ours, theirs = make_params(torch.bfloat16), make_params(torch.bfloat16)
    opt = Muon(groups(ours), backend="torch", **HYPER)
    ref = po.Muon(groups(theirs), **HYPER)
    run([opt, ref], [ours, theirs], steps=5)
    for p, q in zip(ours[:N_MUON], theirs[:N_MUON]):
        assert p.dtype == torch.bfloat16 and opt.state[p]["momentum_buffer"].dtype == torch.bfloat16
        assert torch.equal(p, q)
    for p, q in zip(ours[N_MUON:], theirs[N_MUON:]):
        assert opt.state[p]["exp_avg"].dtype == torch.bfloat16
        torch.testing.assert_close(p, q, rtol=1.6e-2, atol=4e-3)


@needs_triton
@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype,steps", [(torch.float32, 5), (torch.bfloat16, 3)])
def test_triton_backend_matches_upstream(device, dtype, steps):
    base = make_params(dtype, device)
    ours, theirs = make_params(dtype, device), make_params(dtype, device)
    opt = Muon(groups(ours), backend="triton", **HYPER)
    ref = po.Muon(groups(theirs), **HYPER)
    run([opt, ref], [ours, theirs], steps=steps)
    scale = max(R.adjusted_lr(HYPER["lr"], s) for s in SHAPES[:N_MUON])
    for p, q, b in zip(ours[:N_MUON], theirs[:N_MUON], base[:N_MUON]):
        assert torch.equal(opt.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"])
        d_ours, d_up = (p.double() - b.double()), (q.double() - b.double())
        bound = steps * scale * 2 ** -6
        if dtype == torch.float32:
            assert _rel(d_ours, d_up) <= 2e-2
        else:  # + one bf16 rounding of p per step (a flip at a rounding boundary), against ~1e-2 moves
            assert _rel(d_ours, d_up) <= 5e-2
            bound += steps * 2 ** -7 * b.abs().max().item()
        assert (d_ours - d_up).abs().max() <= bound
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=4e-3)
    for p, q in zip(ours[N_MUON:], theirs[N_MUON:]):
        torch.testing.assert_close(p, q, **tol)


def test_state_dict_round_trips_with_upstream():
    """Save mid-run from fastopt, load into pytorch_optimizer.Muon (and back): both continue exactly as
    one uninterrupted run."""
    straight = make_params()
    opt_straight = Muon(groups(straight), backend="torch", **HYPER)
    run([opt_straight], [straight], steps=5)

    a = make_params()
    opt_a = Muon(groups(a), backend="torch", **HYPER)
    run([opt_a], [a], steps=2)
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt_b = po.Muon(groups(b), **HYPER)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # fastopt -> upstream
    run([opt_b], [b], steps=1, seed0=100 + 31 * 2)
    c = [torch.nn.Parameter(p.detach().clone()) for p in b]
    opt_c = Muon(groups(c), backend="torch", **HYPER)
    opt_c.load_state_dict(copy.deepcopy(opt_b.state_dict()))  # upstream -> fastopt
    assert opt_c.param_groups[0]["backend"] == "torch" and opt_c.param_groups[1]["step"] == 3
    run([opt_c], [c], steps=2, seed0=100 + 31 * 3)
    for p, q in zip(straight, c):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    for p, q in zip(straight[:N_MUON], c[:N_MUON]):
        assert torch.equal(p, q)
        assert torch.equal(opt_straight.state[p]["momentum_buffer"], opt_c.state[q]["momentum_buffer"])


def test_grad_none_empty_and_plain_param_list():
    """Params without gradients stay untouched and get no state (the group step still counts, as
    upstream); empty matrices are fine; a plain list is split by dimension."""
    ps = make_params()
    empty = torch.nn.Parameter(torch.zeros(4, 0, 3, 3))
    before = [p.detach().clone() for p in ps]
    opt = Muon(list(ps) + [empty], backend="torch", **HYPER)
    assert [g["use_muon"] for g in opt.param_groups] == [True, False]
    assert [len(g["params"]) for g in opt.param_groups] == [N_MUON + 2, 1]  # the (10, 7) matrix goes to Muon
    assert opt.param_groups[1]["lr"] == HYPER["adamw_lr"] and opt.param_groups[0]["lr"] == HYPER["lr"]
    ps[1].grad = None
    for p in ps[2:] + [ps[0]]:
        p.grad = randn(p.shape, seed=5)
    empty.grad = torch.zeros_like(empty)
    opt.step()
    assert torch.equal(ps[1], before[1]) and ps[1] not in opt.state
    assert all(not torch.equal(p, b) for i, (p, b) in enumerate(zip(ps, before)) if i != 1)
    assert empty.shape == (4, 0, 3, 3) and opt.state[empty]["momentum_buffer"].shape == empty.shape
    assert opt.param_groups[0]["step"] == opt.param_groups[1]["step"] == 1


def test_backend_resolution():
    assert resolve_ns_backend("torch", "cpu") == "torch"
    assert resolve_ns_backend("auto", "cpu") == "torch"  # the interpreter is never chosen by auto
    if "triton" in _backend.available_backends("cpu"):
        assert resolve_ns_backend("triton", "cpu") == "triton"


# ---------------------------------------------------------------------------------------------
# (4) Errors: raised before anything is written.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=-1.0), "Invalid learning rate"),
    (dict(lr=torch.tensor([0.1, 0.2])), "Tensor lr must be 1-element"),
    (dict(momentum=1.0), "Invalid momentum"),
    (dict(momentum=-0.1), "Invalid momentum"),
    (dict(weight_decay=-1e-2), "Invalid weight_decay"),
    (dict(ns_steps=0), "Invalid ns_steps"),
    (dict(ns_steps=2.5), "Invalid ns_steps"),
    (dict(ns_coeffs="cubic"), "Invalid ns_coeffs"),
    (dict(ns_coeffs=[(1.0, 2.0)]), "Invalid ns_coeffs"),
    (dict(ns_coeffs=(math.nan, 1.0, 1.0)), "finite"),
    (dict(ns_coeffs=[]), "must not be empty"),
    (dict(ns_method="svd"), "Invalid ns_method"),
    (dict(ns_reset_steps=(-1,)), "Invalid ns_reset_steps"),
    (dict(adamw_lr=-1e-3), "Invalid adamw_lr"),
    (dict(adamw_betas=(1.0, 0.95)), "adamw_betas at index 0"),
    (dict(adamw_betas=(0.9,)), "Invalid adamw_betas"),
    (dict(adamw_eps=-1.0), "Invalid adamw_eps"),
    (dict(adamw_wd=-0.1), "Invalid adamw_wd"),
    (dict(backend="cuda"), "unknown Muon backend"),
])
def test_invalid_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Muon(groups(make_params()), **kwargs)


@pytest.mark.parametrize("group,match", [
    (dict(use_muon=True, lr=-1.0), "Invalid learning rate"),
    (dict(use_muon=True, ns_steps=-2), "Invalid ns_steps"),
    (dict(use_muon=False, betas=(0.9, 1.5)), r"betas \(use_muon=False group\) at index 1"),
    (dict(use_muon=False, eps=-1e-8), "Invalid epsilon value"),
    (dict(), "use_muon"),
])
def test_invalid_param_groups(group, match):
    ps = make_params()
    with pytest.raises(ValueError, match=match):
        Muon([dict(params=ps[:2], **group)])
    opt = Muon(groups(make_params()))
    with pytest.raises(ValueError, match=match):
        opt.add_param_group(dict(params=ps[:2], **group))
    assert len(opt.param_groups) == 2


def test_vector_in_muon_group_rejected():
    with pytest.raises(ValueError, match="1-D parameter .* use_muon=False"):
        Muon([dict(params=make_params(), use_muon=True)])


def _snapshot(params, opt):
    return ([p.detach().clone() for p in params],
            {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in params if p in opt.state},
            [g.get("step") for g in opt.param_groups])


def _assert_unchanged(params, opt, snap):
    values, states, steps = snap
    for p, v in zip(params, values):
        assert torch.equal(p.detach(), v)
    assert {id(p) for p in params if opt.state.get(p)} == set(states)
    for p in params:
        for k, v in states.get(id(p), {}).items():
            assert torch.equal(opt.state[p][k], v)
    assert [g.get("step") for g in opt.param_groups] == steps


def _set_grads(params, seed=9):
    for i, p in enumerate(params):
        p.grad = randn(p.shape, seed=seed + i, dtype=p.dtype)


@pytest.mark.parametrize("after_steps", [0, 2])
def test_bad_input_touches_nothing(after_steps):
    """A bad hyperparameter in the last group, or a bad gradient, fails the step before the first
    group moves or any state is created."""
    ps = make_params()
    opt = Muon(groups(ps), backend="torch", **HYPER)
    run([opt], [ps], steps=after_steps)

    opt.param_groups[1]["betas"] = (0.9, 1.0)
    _set_grads(ps)
    snap = _snapshot(ps, opt)
    with pytest.raises(ValueError, match="at index 1"):
        opt.step()
    _assert_unchanged(ps, opt, snap)
    opt.param_groups[1]["betas"] = HYPER.get("adamw_betas", (0.9, 0.95))
    opt.param_groups[0]["momentum"] = 1.5
    with pytest.raises(ValueError, match="Invalid momentum"):
        opt.step()
    _assert_unchanged(ps, opt, snap)
    opt.param_groups[0]["momentum"] = 0.95

    bad = [("sparse", RuntimeError, "sparse"), ("complex", TypeError, "complex"), ("vector", ValueError, "1-D")]
    for kind, exc, match in bad:
        _set_grads(ps)
        if kind == "sparse":
            ps[-1].grad = ps[-1].grad.to_sparse()
        elif kind == "vector":  # a Muon matrix flattened after construction
            ps[2].data = ps[2].data.flatten()
            ps[2].grad = ps[2].grad.flatten()
        else:
            z = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))
            z.grad = torch.randn_like(z)
            opt.add_param_group(dict(params=[z], use_muon=False))
        snap = _snapshot(ps, opt)
        with pytest.raises(exc, match=match):
            opt.step()
        _assert_unchanged(ps, opt, snap)
        if kind == "complex":
            assert z not in opt.state
            opt.param_groups.pop()
        if kind == "vector":
            ps[2].data = ps[2].data.view(SHAPES[2])
            ps[2].grad = None


def test_unavailable_triton_backend_touches_nothing(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ps = make_params()
    _set_grads(ps)
    opt = Muon(groups(ps), backend="triton", **HYPER)
    snap = _snapshot(ps, opt)
    with pytest.raises(_backend.BackendUnavailableError, match="backend 'triton' cannot run on device cpu"):
        opt.step()
    _assert_unchanged(ps, opt, snap)
    assert not opt.state


def test_bench_baseline_computes_newton_schulz():
    """The benchmark's plain-torch baseline does the same iteration (its bf16 roundings differ: b A,
    c A^2 and their sum are rounded separately, so it sits ~3% from the fp64 iteration where the fused
    reference sits ~1.4%), and its CPU cases are reported unsupported rather than timed."""
    from fastopt.bench import harness
    from fastopt.bench import muon as bench

    g = randn((64, 96), seed=4)
    plain = bench.plain_torch_newton_schulz(g)
    assert plain.shape == g.shape and _rel(plain, _ns_fp64(g)) <= 5e-2 and _rel(R.newton_schulz(g), _ns_fp64(g)) <= 2e-2
    s = torch.linalg.svdvals(plain.double())
    assert 0.6 <= s.min() and s.max() <= 1.25
    ctx = harness.Context(device=torch.device("cpu"), quick=True)
    for case in bench.ns_cases(ctx):
        with pytest.raises(harness.Unsupported, match="CUDA only"):
            case.setup()
    assert bench.ns_bars(ctx) == []


# ---------------------------------------------------------------------------------------------
# (5) bf16 / fp16 options: master weights and stochastic rounding.
# ---------------------------------------------------------------------------------------------

def _grads_like(param_sets, seed):
    """The same bf16-representable gradient for the params at one position of every set."""
    for i, ps in enumerate(zip(*param_sets)):
        g = randn(ps[0].shape, seed=seed + i, dtype=torch.bfloat16)
        for p in ps:
            p.grad = g.to(p.dtype)


MASTER_RUNS = [(CONFIGS[0], None), (CONFIGS[1], None), (CONFIGS[3], None), (CONFIGS[7], False)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cfg,foreach", MASTER_RUNS, ids=[RUN_IDS[i] for i in (0, 1, 3, len(CONFIGS) + 3)])
def test_master_weights_equal_fp32_run(cfg, foreach, dtype):
    """master_weights=True steps an fp32 copy of each low-precision param (Muon and AdamW groups): it
    equals this optimizer run on fp32 params fed the same gradients, bit for bit, and the params are
    that copy rounded to nearest."""
    base = make_params(dtype)
    lo = [torch.nn.Parameter(b.detach().clone()) for b in base]
    fp = [torch.nn.Parameter(b.detach().float()) for b in base]
    kw = {**HYPER, **cfg}
    opt_lo = Muon(groups(lo), foreach=foreach, backend="torch", master_weights=True, **kw)
    opt_fp = Muon(groups(fp), foreach=foreach, backend="torch", **kw)
    for k in range(3):
        _grads_like([lo, fp], seed=200 + 17 * k)
        opt_lo.step()
        opt_fp.step()
    for i, (a, b, b0) in enumerate(zip(lo, fp, base)):
        state = opt_lo.state[a]
        assert a.dtype == dtype and state["master_param"].dtype == torch.float32
        assert torch.equal(state["master_param"], b.detach())
        assert torch.equal(a.detach(), b.detach().to(dtype))
        keys = ("momentum_buffer",) if i < N_MUON else ("exp_avg", "exp_avg_sq")
        for key in keys:
            assert state[key].dtype == torch.float32 and torch.equal(state[key], opt_fp.state[b][key])
        assert (b.detach() - b0.float()).abs().max() > 1e-3  # everything moved
    assert opt_lo.param_groups[0]["step"] == opt_lo.param_groups[1]["step"] == 3


def test_bf16_options_leave_fp32_params_alone():
    """The options act on low-precision params only: fp32 params step as without them (and fp16
    params as without stochastic rounding), with no master copy."""
    runs = {}
    for name, (dtype, opts) in {"fp32": (torch.float32, {}), "fp32_master": (torch.float32, dict(master_weights=True)),
                                "fp32_sr": (torch.float32, dict(stochastic_rounding=True, seed=3)),
                                "fp16": (torch.float16, {}), "fp16_sr": (torch.float16, dict(stochastic_rounding=True))
                                }.items():
        ps = make_params(dtype)
        opt = Muon(groups(ps), backend="torch", **HYPER, **opts)
        run([opt], [ps], steps=2)
        assert all("master_param" not in opt.state[p] for p in ps)
        runs[name] = ps
    for name, ref in (("fp32_master", "fp32"), ("fp32_sr", "fp32"), ("fp16_sr", "fp16")):
        for p, q in zip(runs[name], runs[ref]):
            assert torch.equal(p, q)


def _bf16_neighbours(x):
    """The bf16 values just below and just above (in magnitude) the fp32 tensor ``x``, as int32 bit
    patterns of fp32 (int64 tensors), and whether ``x`` is itself a bf16 value."""
    bits = x.float().contiguous().view(torch.int32).to(torch.int64)
    low = bits & ~0xFFFF
    return low, low + 0x10000, (bits & 0xFFFF) == 0


def _fp32_step(opt, ps, states_before, params_before, grads):
    """What a stochastic-rounding step computes before it rounds: the Muon / AdamW math on fp32 copies
    of the bf16 params, from the same bf16 grads and (copies of the) bf16 states, with the bf16 L2 term.
    Returns the fp32 values and the states the step should leave."""
    out, states = [], []
    for gi, group in enumerate(opt.param_groups):
        idx = range(N_MUON) if gi == 0 else range(N_MUON, len(ps))
        xs = [params_before[i].float() for i in idx]
        st = [{k: v.clone() for k, v in states_before[i].items()} for i in idx]
        gs = [grads[i] for i in idx]
        if group["use_muon"]:
            bufs = [s.get("momentum_buffer", torch.zeros_like(params_before[i])) for s, i in zip(st, idx)]
            maximize, wd = group["maximize"], group["weight_decay"]
            if not group["weight_decouple"] and wd > 0:
                gs = [(-g if maximize else g).add(params_before[i], alpha=wd) for g, i in zip(gs, idx)]
                maximize, wd = False, 0.0
            R.muon_reference(xs, gs, bufs, lr=group["lr"], momentum=group["momentum"], nesterov=group["nesterov"],
                             weight_decay=wd, weight_decouple=group["weight_decouple"], ns_steps=group["ns_steps"],
                             ns_coeffs=group["ns_coeffs"], ns_method=group["ns_method"],
                             ns_reset_steps=group["ns_reset_steps"], use_adjusted_lr=group["use_adjusted_lr"],
                             maximize=maximize, cautious=group["cautious"])
            states += [dict(momentum_buffer=b) for b in bufs]
        else:
            from fastopt.reference.adam import adam_reference

            ms = [s.get("exp_avg", torch.zeros_like(params_before[i])) for s, i in zip(st, idx)]
            vs = [s.get("exp_avg_sq", torch.zeros_like(params_before[i])) for s, i in zip(st, idx)]
            steps = [torch.tensor(float(group.get("step", 0))) for _ in idx]  # the count before the step
            adam_reference(xs, gs, ms, vs, [], steps, lr=group["lr"], beta1=group["betas"][0],
                           beta2=group["betas"][1], eps=group["eps"], weight_decay=group["weight_decay"],
                           decoupled=group["weight_decouple"], amsgrad=False, maximize=group["maximize"])
            states += [dict(exp_avg=m, exp_avg_sq=v) for m, v in zip(ms, vs)]
        out += xs
    return out, states


SR_CONFIGS = [dict(), CONFIGS[1], dict(cautious=True, use_adjusted_lr=True, adamw_wd=0.0)]


@pytest.mark.parametrize("cfg", SR_CONFIGS, ids=_ids(SR_CONFIGS))
def test_stochastic_rounding_rounds_the_fp32_step(cfg):
    """stochastic_rounding=True: every bf16 result is one of the two bf16 neighbours of the fp32 value
    the step computes from the same inputs (exactly the value when that is a bf16 number), and
    is bf16_stochastic(value, seed, index in the bucket, step after the step); the states stay bf16,
    as the plain bf16 math leaves them; rounding differs from round-to-nearest for a sizeable share of
    the entries, and is unbiased on average."""
    from fastopt.reference.rounding import bf16_stochastic

    ps = make_params(torch.bfloat16)
    kw = {**HYPER, **cfg}
    opt = Muon(groups(ps), backend="torch", stochastic_rounding=True, seed=11, **kw)
    away, total, bias = 0, 0, []
    for k in range(3):
        _grads_like([ps], seed=300 + 17 * k)
        params_before = [p.detach().clone() for p in ps]
        states_before = [{key: v.clone() for key, v in opt.state[p].items()} for p in ps]
        xs, states = _fp32_step(opt, ps, states_before, params_before, [p.grad for p in ps])
        opt.step()
        step = opt.param_groups[0]["step"]
        assert step == k + 1
        for i, (p, x, st) in enumerate(zip(ps, xs, states)):
            assert p.dtype == torch.bfloat16
            got = p.detach().float().contiguous().view(torch.int32).to(torch.int64)
            low, high, exact = _bf16_neighbours(x)
            assert bool(((got == low) | ((got == high) & ~exact)).all())
            index = i if i < N_MUON else i - N_MUON
            assert torch.equal(p.detach(), bf16_stochastic(x, 11, index, step))
            for key, v in st.items():
                assert opt.state[p][key].dtype == torch.bfloat16 and torch.equal(opt.state[p][key], v)
            away += int((p.detach() != x.bfloat16()).sum())
            total += p.numel()
            bias.append(float((p.detach().float() - x).sum() / (x.bfloat16().float() - x).abs().sum()))
        assert all(not torch.equal(p, b) for p, b in zip(ps, params_before))  # everything moved
    assert 0.1 * total < away < 0.5 * total  # ~1/4 of the entries round away from the nearest value
    assert abs(sum(bias) / len(bias)) < 0.2  # unbiased: mean error << the round-to-nearest error


def test_stochastic_rounding_is_seeded():
    """Same seed: identical bits (params and states) after 3 steps; another seed: other bits -- after one
    step from the same inputs, every entry within one bf16 spacing of the other seed's (the two bf16
    neighbours of one fp32 value)."""
    def sr_run(seed, steps):
        ps = make_params(torch.bfloat16)
        opt = Muon(groups(ps), backend="torch", stochastic_rounding=True, seed=seed, **HYPER)
        run([opt], [ps], steps=steps)
        assert opt.param_groups[0]["seed"] == opt.param_groups[1]["seed"] == seed
        return ps, opt

    (a, opt_a), (b, opt_b), (c, _) = sr_run(5, 3), sr_run(5, 3), sr_run(6, 3)
    for p, q, r in zip(a, b, c):
        assert torch.equal(p.detach().view(torch.int16), q.detach().view(torch.int16))
        for key, v in opt_a.state[p].items():
            assert torch.equal(v, opt_b.state[q][key])
        assert not torch.equal(p, r)
    (a, _), (c, _) = sr_run(5, 1), sr_run(6, 1)
    differ = 0
    for p, r in zip(a, c):
        bits_p = p.detach().view(torch.int16).to(torch.int32)
        bits_r = r.detach().view(torch.int16).to(torch.int32)
        assert bool(((bits_p - bits_r).abs() <= 1).all())  # same sign (moves are << |p|), adjacent values
        differ += int((bits_p != bits_r).sum())
    assert differ > 0.1 * sum(p.numel() for p in a)


def test_bf16_option_errors():
    """Both options at once, per optimizer or per group, or a non-int seed: ValueError, raised before
    anything else and before anything is written."""
    ps = make_params(torch.bfloat16)
    for extra in ({}, dict(backend="cuda"), dict(lr=-1.0)):
        with pytest.raises(ValueError, match="choose stochastic_rounding or master_weights, not both"):
            Muon(groups(ps), stochastic_rounding=True, master_weights=True, **extra)
    for seed in (1.5, "0", True):
        with pytest.raises(ValueError, match="Invalid seed"):
            Muon(groups(ps), stochastic_rounding=True, seed=seed)
    opt = Muon(groups(ps), backend="torch", master_weights=True, **HYPER)
    with pytest.raises(ValueError, match="not both"):
        opt.add_param_group(dict(params=[torch.nn.Parameter(torch.zeros(3))], use_muon=False,
                                 stochastic_rounding=True))
    assert len(opt.param_groups) == 2
    run([opt], [ps], steps=1)
    opt.param_groups[1]["stochastic_rounding"] = True
    _set_grads(ps)
    snap = _snapshot(ps, opt)
    with pytest.raises(ValueError, match="not both"):
        opt.step()
    _assert_unchanged(ps, opt, snap)
    opt.param_groups[1]["stochastic_rounding"] = False
    opt.param_groups[0]["seed"] = 0.5
    with pytest.raises(ValueError, match="Invalid seed"):
        opt.step()
    _assert_unchanged(ps, opt, snap)
