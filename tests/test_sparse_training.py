"""N:M sparse training inside the optimizer step (fastopt.sparse.training): the schedule, the fused
epilogue of every kernel backend against the torch path, the recipes against their formulas, and
small models that keep their N:M pattern exactly."""
import io
import math

import pytest
import torch

import fastopt
from fastopt.lowbit import ElementwiseAdamW, Int8Linear
from fastopt.sparse import NMSparsity, is_nm_sparse, nm_mask, nm_param_groups, transposable_mask

from conftest import DEVICE_BACKENDS, KERNEL_DEVICE_BACKENDS

KERNELS = [b for d, b in KERNEL_DEVICE_BACKENDS if d == "cpu"]


# -- the schedule ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(n=4, m=4), "1 <= n < m"),
    (dict(n=0, m=4), "n must be"),
    (dict(m=1, n=1), "m must be"),
    (dict(recipe="srste"), "recipe"),
    (dict(decay="cosine"), "decay must"),
    (dict(srste_lambda=-1.0), "srste_lambda"),
    (dict(decay_coef=float("inf")), "decay_coef"),
    (dict(refresh_every=0), "refresh_every"),
    (dict(finetune_steps=5), "need total_steps"),
    (dict(structure_decay=True, total_steps=100, finetune_steps=10, n=3, m=8), "power of 2"),
    (dict(structure_decay=True, total_steps=100), "finetune_steps >= 1"),
    (dict(total_steps=10, dense_steps=6, finetune_steps=5), "exceed total_steps"),
    (dict(transposable=True, n=1, m=4), "transposable"),
    (dict(finetune_mask="frozen"), "finetune_mask"),
    (dict(dim=1.0), "dim must"),
])
def test_schedule_rejects_bad_fields(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NMSparsity(**kwargs)


def test_schedule_decay_values():
    lin = NMSparsity(2, 4, recipe="decay", decay="linear", decay_coef=0.1, dense_steps=3, total_steps=30,
                     finetune_steps=5)
    assert [lin.beta(t) for t in (0, 2)] == [1.0, 1.0]                      # dense
    assert [lin.beta(t) for t in (3, 4, 8)] == [1.0, pytest.approx(0.9), pytest.approx(0.5)]
    assert lin.beta(13) == 0.0 and lin.beta(20) == 0.0                        # max(1 - 0.1 s, 0)
    assert lin.beta(25) == 0.0                                                # fine-tuning: binary
    ex = NMSparsity(2, 4, recipe="decay", decay="exp", decay_coef=0.2, dense_steps=1)
    assert ex.beta(1) == 1.0 and ex.beta(6) == pytest.approx(math.exp(-1.0))
    assert NMSparsity(recipe="sr-ste").beta(5) == 0.0 and NMSparsity(recipe="ste").beta(0) == 0.0
    assert NMSparsity(recipe="sr-ste", srste_lambda=3e-4, dense_steps=2).srste(1) == 0.0
    assert NMSparsity(recipe="sr-ste", srste_lambda=3e-4, dense_steps=2).srste(2) == 3e-4
    assert NMSparsity(recipe="decay").srste(5) == 0.0 and NMSparsity(recipe="ste").srste(5) == 0.0


def test_schedule_structure_decay_frames():
    # 1:8 over 100 steps, 10 dense, 18 fine-tuning: log2(8) = 3 frames of 24 steps (7:8, 4:8, 2:8),
    # then 1:8 from the fine-tuning start (step 82), as the paper's repo schedules it.
    sp = NMSparsity(1, 8, recipe="ste", structure_decay=True, dense_steps=10, total_steps=100, finetune_steps=18)
    got = {t: sp.pattern(t) for t in (0, 9, 10, 33, 34, 57, 58, 81, 82, 99, 150)}
    assert got == {0: 8, 9: 8, 10: 7, 33: 7, 34: 4, 57: 4, 58: 2, 81: 2, 82: 1, 99: 1, 150: 1}
    # refresh_every=1: every sparse step until fine-tuning, whose (fixed) mask is made at its start
    assert [t for t in range(0, 100) if sp.refresh(t)] == list(range(10, 83))


def test_schedule_refresh_every():
    sp = NMSparsity(2, 4, refresh_every=3, dense_steps=2, total_steps=20, finetune_steps=4)
    assert [t for t in range(20) if sp.refresh(t)] == [2, 5, 8, 11, 14, 16]  # 16: fine-tuning starts
    sp = NMSparsity(2, 4, refresh_every=3, dense_steps=2, total_steps=20, finetune_steps=4, finetune_mask="refresh")
    assert [t for t in range(20) if sp.refresh(t)] == [2, 5, 8, 11, 14, 16, 17]


# -- helpers ------------------------------------------------------------------------------------

def _make(opt_cls, backend, sparsity, shapes=((8, 16), (4, 32)), dtype=torch.float32, **kw):
    params = [torch.nn.Parameter(torch.randn(s, dtype=dtype)) for s in shapes]
    extra = torch.nn.Parameter(torch.randn(5, dtype=dtype))
    opt = opt_cls([{"params": params, "sparsity": sparsity}, {"params": [extra]}], backend=backend, **kw)
    return params, extra, opt


def _grads(params, extra, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in params + [extra]:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


def _run(opt_cls, backend, sparsity, steps, dtype=torch.float32, seed=0, sparsify=True, **kw):
    torch.manual_seed(seed)
    params, extra, opt = _make(opt_cls, backend, sparsity, dtype=dtype, **kw)
    if sparsify:
        opt.sparsify()
    for i in range(steps):
        _grads(params, extra, 1000 * seed + i)
        opt.step()
    return params, extra, opt


OPTIMIZERS = [
    (fastopt.Lion, dict(lr=1e-2, weight_decay=0.1)),
    (ElementwiseAdamW, dict(lr=1e-2)),
    (fastopt.Adan, dict(lr=1e-2)),
    (fastopt.AdaBelief, dict(lr=1e-2)),
    (fastopt.Lamb, dict(lr=1e-2)),   # a reduce pass: the unfused path on every backend
]
RECIPES = [
    NMSparsity(2, 4, recipe="sr-ste", srste_lambda=0.05, refresh_every=2),
    NMSparsity(1, 4, recipe="decay", decay="linear", decay_coef=0.2, dim=0),
    NMSparsity(2, 8, recipe="decay", decay="exp", decay_coef=0.3, total_steps=6, finetune_steps=2),
]


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("opt", OPTIMIZERS, ids=lambda o: o[0].__name__)
@pytest.mark.parametrize("sparsity", RECIPES, ids=["srste", "linear-dim0", "exp-finetune"])
def test_kernel_backends_match_torch(backend, opt, sparsity):
    """The fused epilogue (cpu, triton) equals the torch path: dense weights, masks, forward weights."""
    cls, kw = opt
    ref = _run(cls, "torch", sparsity, 6, **kw)
    got = _run(cls, backend, sparsity, 6, **kw)
    for p_ref, p in zip(ref[0], got[0]):
        s_ref, s = ref[2].state[p_ref], got[2].state[p]
        torch.testing.assert_close(s["dense_param"], s_ref["dense_param"], rtol=1e-5, atol=1e-6)
        assert torch.equal(s["nm_mask"], s_ref["nm_mask"])
        torch.testing.assert_close(p, p_ref, rtol=1e-5, atol=1e-6)
        assert s["nm_step"] == s_ref["nm_step"] == 6
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("sr", [False, True])
def test_kernel_backends_match_torch_bf16(backend, sr):
    sp = NMSparsity(2, 4, recipe="sr-ste", srste_lambda=0.05)
    kw = dict(lr=1e-2, stochastic_rounding=sr, seed=3)
    ref = _run(fastopt.Lion, "torch", sp, 4, dtype=torch.bfloat16, **kw)
    got = _run(fastopt.Lion, backend, sp, 4, dtype=torch.bfloat16, **kw)
    for p_ref, p in zip(ref[0], got[0]):
        assert torch.equal(got[2].state[p]["dense_param"], ref[2].state[p_ref]["dense_param"])
        assert torch.equal(p, p_ref) and is_nm_sparse(p, 2, 4)


@pytest.mark.parametrize("backend", KERNELS)
def test_fused_epilogue_direct_call(backend):
    """One kernel call with the epilogue against its formula, for every element kind (kept, pruned
    with lambda, beta) and with the forward weights switched off."""
    from fastopt.optim.functional import elementwise_unchecked
    n = 3000
    w = torch.randn(n)
    g = torch.randn(n)
    mask = torch.rand(n) < 0.5
    out = torch.full((n,), 7.0)
    for lam, beta, write in [(0.3, 0.0, True), (0.0, 0.25, True), (0.1, 0.5, False)]:
        p_ref = w.clone()
        step = torch.zeros((), dtype=torch.float32)
        g_eff = g + torch.where(mask, 0.0, lam * w)
        opt_ref = ElementwiseAdamW([p_ref], lr=0.1, backend="torch")
        p_ref.grad = g_eff
        opt_ref.step()
        p = w.clone()
        o = out.clone()
        ea, eas = torch.zeros(n), torch.zeros(n)
        hyper, flags = opt_ref._native_hyper(opt_ref.param_groups[0])
        elementwise_unchecked("adamw", [p], [g], [ea, eas], [step], hyper, flags, lr=0.1, maximize=False,
                              grad_scale=None, found_inf=None, backend=backend, device=p.device,
                              sparse_mask=[mask], sparse_out=[o] if write else [], sparse_lambda=lam,
                              sparse_beta=beta)
        torch.testing.assert_close(p, p_ref, rtol=1e-6, atol=1e-7)
        if write:
            expect = torch.where(mask, p, p * beta if beta else torch.zeros(()))
            assert torch.equal(o, expect)
        else:
            assert torch.equal(o, out)
        assert float(step) == 1.0


def test_fused_epilogue_rejects_reduce_ops_and_bad_lists():
    from fastopt.optim.functional import elementwise_unchecked
    p, g = torch.randn(8), torch.randn(8)
    with pytest.raises(ValueError, match="sparse_mask has 2 tensors, expected 1"):
        elementwise_unchecked("lion", [p], [g], [torch.zeros(8)], [torch.zeros(())], [0.9, 0.99, 0.0], 1, lr=0.1,
                              maximize=False, grad_scale=None, found_inf=None, backend="cpu", device=p.device,
                              sparse_mask=[torch.ones(8, dtype=torch.bool)] * 2, sparse_out=[])


# -- the recipes against their formulas --------------------------------------------------------

@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
def test_srste_step_is_the_upstream_gradient(device, backend):
    """SR-STE: W is stepped with g + lambda * (1 - mask) * W (the backward of SparseSRSTE in the paper's
    repo), and the parameter becomes W * nm_mask(W)."""
    lam = 0.2
    w0 = torch.randn(6, 16)
    p = torch.nn.Parameter(w0.clone())
    opt = ElementwiseAdamW([{"params": [p], "sparsity": NMSparsity(2, 4, srste_lambda=lam)}], lr=0.05,
                           backend=backend)
    opt.sparsify()
    mask0 = nm_mask(w0, 2, 4)
    assert torch.equal(p.detach(), torch.where(mask0, w0, 0.0))
    twin = torch.nn.Parameter(w0.clone())          # a dense optimizer on a copy of W
    opt_twin = ElementwiseAdamW([twin], lr=0.05, backend="torch")
    for i in range(3):
        g = torch.randn(6, 16)
        mask = opt.state[p]["nm_mask"].clone()
        p.grad = g
        twin.grad = g + lam * (~mask) * twin.detach()
        opt.step()
        opt_twin.step()
        w = opt.state[p]["dense_param"]
        torch.testing.assert_close(w, twin.detach(), rtol=1e-6, atol=1e-7)
        assert torch.equal(opt.state[p]["nm_mask"], nm_mask(w, 2, 4))
        assert torch.equal(p.detach(), torch.where(opt.state[p]["nm_mask"], w, 0.0))


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("decay", ["linear", "exp"])
def test_mask_decay_forward_and_straight_through(device, backend, decay):
    """MDGF: the forward weights are W * (mask + (1 - mask) * beta(t)) and W gets the plain gradient."""
    sp = NMSparsity(2, 4, recipe="decay", decay=decay, decay_coef=0.15, dense_steps=2, total_steps=10,
                    finetune_steps=3)
    w0 = torch.randn(4, 8)
    p = torch.nn.Parameter(w0.clone())
    opt = fastopt.Lion([{"params": [p], "sparsity": sp}], lr=0.01, backend=backend)
    twin = torch.nn.Parameter(w0.clone())
    opt_twin = fastopt.Lion([twin], lr=0.01, backend="torch")
    for t in range(10):
        g = torch.randn(4, 8)
        p.grad, twin.grad = g, g.clone()
        opt.step()
        opt_twin.step()
        state = opt.state[p]
        if sp.is_dense(t + 1):
            assert "nm_mask" not in state and torch.equal(p.detach(), twin.detach())
            continue
        w = state["dense_param"]
        torch.testing.assert_close(w, twin.detach(), rtol=0, atol=1e-6)
        beta = sp.beta(t + 1)
        expect = torch.where(state["nm_mask"], w, w * beta if beta else torch.zeros(()))
        torch.testing.assert_close(p.detach(), expect, rtol=1e-6, atol=1e-7)
        if t + 1 >= 7:  # fine-tuning: binary, frozen mask
            assert beta == 0.0 and is_nm_sparse(p, 2, 4)
            if t + 1 > 7:
                assert torch.equal(state["nm_mask"], frozen)
            frozen = state["nm_mask"].clone()


@pytest.mark.parametrize("backend", ["torch"] + KERNELS)
def test_structure_decay_patterns(backend):
    sp = NMSparsity(1, 8, recipe="ste", structure_decay=True, dense_steps=2, total_steps=14, finetune_steps=3)
    p = torch.nn.Parameter(torch.randn(4, 16))
    opt = fastopt.Lion([{"params": [p], "sparsity": sp}], lr=0.01, backend=backend)
    seen = []
    for t in range(14):
        p.grad = torch.randn(4, 16)
        opt.step()
        n = sp.pattern(t + 1)
        nz = (p.detach() != 0).view(-1, 8).sum(1)
        assert int(nz.max()) <= n
        if n < 8:
            assert torch.equal(opt.state[p]["nm_mask"].view(-1, 8).sum(1), torch.full((8,), n))
        seen.append(n)
    assert seen == [8, 7, 7, 7, 4, 4, 4, 2, 2, 2, 1, 1, 1, 1]


# -- a small model keeps its pattern exactly ----------------------------------------------------

def _mlp():
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8),
                               torch.nn.ReLU(), torch.nn.Linear(8, 1))


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("transposable", [False, True])
def test_small_model_trains_and_keeps_2_4(device, backend, transposable):
    torch.manual_seed(0)
    model = _mlp()
    x = torch.randn(256, 16)
    y = torch.sin(x[:, :1] * 2) + x[:, 1:2] * x[:, 2:3]
    sp = NMSparsity(2, 4, recipe="sr-ste", refresh_every=5, transposable=transposable)
    groups = nm_param_groups(model, sp, weight_decay=0.0)
    sparse_ws = groups[0]["params"]
    # every layer has a multiple of 4 inputs; the transposable mask also needs 4 | outputs (not the last)
    assert [tuple(w.shape) for w in sparse_ws] == [(32, 16), (8, 32)] + ([] if transposable else [(1, 8)])
    opt = ElementwiseAdamW(groups, lr=3e-3, backend=backend)
    opt.sparsify()
    with torch.no_grad():
        first = float(torch.nn.functional.mse_loss(model(x), y))
    masks_before = None
    for t in range(120):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        masks = [opt.state[w]["nm_mask"].clone() for w in sparse_ws]
        for w, m in zip(sparse_ws, masks):
            assert is_nm_sparse(w, 2, 4)
            assert torch.equal(w.detach() != 0, m & (opt.state[w]["dense_param"] != 0))
            if transposable:
                assert is_nm_sparse(w.t(), 2, 4)
        if masks_before is not None and (t + 1) % 5 != 0:
            assert all(torch.equal(a, b) for a, b in zip(masks, masks_before))  # no refresh in between
        masks_before = masks
    with torch.no_grad():
        last = float(torch.nn.functional.mse_loss(model(x), y))
    assert last < 0.5 * first, (first, last)


def test_nm_param_groups_picks_linear_weights():
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Linear(8, 6), torch.nn.Linear(6, 2),
                                torch.nn.LayerNorm(2))
    groups = nm_param_groups(model, NMSparsity(2, 8), lr=0.1)
    assert groups[0]["params"] == [model[0].weight, model[1].weight] and groups[0]["lr"] == 0.1
    assert groups[0]["sparsity"] == NMSparsity(2, 8)
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.parameters()} - {id(model[0].weight),
                                                                                          id(model[1].weight)}
    only_first = nm_param_groups(model, NMSparsity(2, 8), filter=lambda name, m: name == "0")
    assert only_first[0]["params"] == [model[0].weight]
    with pytest.raises(TypeError, match="NMSparsity"):
        nm_param_groups(model, (2, 4))


# -- state, options, errors -----------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch"] + KERNELS)
def test_state_dict_round_trip_continues_identically(backend):
    sp = NMSparsity(2, 4, recipe="decay", decay_coef=0.1, refresh_every=3)
    params, extra, opt = _run(fastopt.Adan, backend, sp, 4, lr=1e-2)
    saved = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "params": [p.detach().clone() for p in params + [extra]]}, saved)
    twin_params = [torch.nn.Parameter(torch.zeros_like(p)) for p in params]
    twin_extra = torch.nn.Parameter(torch.zeros_like(extra))
    twin = fastopt.Adan([{"params": twin_params, "sparsity": NMSparsity(2, 4)}, {"params": [twin_extra]}],
                        lr=1.0, backend=backend)
    saved.seek(0)
    blob = torch.load(saved, weights_only=False)
    with torch.no_grad():
        for t, v in zip(twin_params + [twin_extra], blob["params"]):
            t.copy_(v)
    twin.load_state_dict(blob["opt"])
    assert twin.param_groups[0]["sparsity"] == sp
    for i in range(4, 9):
        _grads(params, extra, i)
        _grads(twin_params, twin_extra, i)
        opt.step()
        twin.step()
    for a, b in zip(params + [extra], twin_params + [twin_extra]):
        assert torch.equal(a, b)
    for a, b in zip(params, twin_params):
        assert torch.equal(opt.state[a]["dense_param"], twin.state[b]["dense_param"])
        assert twin.state[b]["nm_step"] == 9


@pytest.mark.parametrize("backend", ["torch"] + KERNELS)
@pytest.mark.parametrize("refresh_every", [4, 3], ids=["between-refreshes", "refresh-step"])
def test_amp_skip_keeps_everything(backend, refresh_every):
    sp = NMSparsity(2, 4, recipe="decay", decay_coef=0.2, refresh_every=refresh_every)
    params, extra, opt = _run(ElementwiseAdamW, backend, sp, 2, lr=0.1)
    before = [(p.detach().clone(), opt.state[p]["dense_param"].clone(), opt.state[p]["nm_mask"].clone())
              for p in params]
    if sp.refresh(3):  # the refresh would change the mask: the skip must keep the old one
        assert any(not torch.equal(nm_mask(w, 2, 4), m) for _, w, m in before)
    _grads(params, extra, 99)
    opt.grad_scale = torch.tensor(4.0)
    opt.found_inf = torch.tensor(1.0)
    opt.step()     # step 2 -> 3: beta changes, the mask is refreshed or not; the skip keeps all
    for p, (v, w, m) in zip(params, before):
        assert torch.equal(p.detach(), v) and torch.equal(opt.state[p]["dense_param"], w)
        assert torch.equal(opt.state[p]["nm_mask"], m)
    opt.found_inf = torch.tensor(0.0)
    opt.step()
    assert not torch.equal(params[0].detach(), before[0][0])


@pytest.mark.parametrize("backend", ["torch"] + KERNELS)
def test_amp_scale_and_maximize_match_unscaled(backend):
    sp = NMSparsity(2, 4, recipe="sr-ste", srste_lambda=0.1)
    ref = _run(ElementwiseAdamW, "torch", sp, 3, lr=1e-2, maximize=True)
    torch.manual_seed(0)
    params, extra, opt = _make(ElementwiseAdamW, backend, sp, lr=1e-2, maximize=True)
    opt.sparsify()
    opt.grad_scale = torch.tensor(8.0)
    opt.found_inf = torch.tensor(0.0)
    for i in range(3):
        _grads(params, extra, i)
        for p in params + [extra]:
            p.grad.mul_(8.0)
        opt.step()
    for a, b in zip(params, ref[0]):
        torch.testing.assert_close(opt.state[a]["dense_param"], ref[2].state[b]["dense_param"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch"] + KERNELS)
def test_master_weights_and_lowbit_states(backend):
    sp = NMSparsity(2, 4, recipe="sr-ste", srste_lambda=0.05)
    params, _, opt = _run(ElementwiseAdamW, backend, sp, 3, dtype=torch.bfloat16, lr=1e-2, master_weights=True)
    for p in params:
        state = opt.state[p]
        assert "dense_param" not in state and state["master_param"].dtype == torch.float32
        assert is_nm_sparse(p, 2, 4) and p.dtype == torch.bfloat16
        expect = torch.where(state["nm_mask"], state["master_param"].bfloat16(), torch.zeros((), dtype=torch.bfloat16))
        assert torch.equal(p.detach(), expect)
    params, _, opt = _run(ElementwiseAdamW, backend, sp, 3, shapes=((64, 128),), lr=1e-2, state_bits=8,
                          min_quant_size=256)
    state = opt.state[params[0]]
    assert state["exp_avg"].dtype == torch.uint8 and is_nm_sparse(params[0], 2, 4)
    assert torch.equal(params[0].detach(), torch.where(state["nm_mask"], state["dense_param"], 0.0))


@pytest.mark.parametrize("backend", ["torch"] + KERNELS)
def test_dense_phase_then_sparse(backend):
    sp = NMSparsity(2, 4, recipe="ste", dense_steps=3)
    params, extra, opt = _run(fastopt.Lion, backend, sp, 2, lr=1e-2)
    assert "nm_mask" not in opt.state[params[0]] and not is_nm_sparse(params[0], 2, 4)
    _grads(params, extra, 5)
    opt.step()      # after step 3 the forward is sparse
    state = opt.state[params[0]]
    assert state["nm_step"] == 3 and is_nm_sparse(params[0], 2, 4)
    assert torch.equal(state["nm_mask"], nm_mask(state["dense_param"], 2, 4))


def test_sparsify_without_step_and_transposable_conv_shapes():
    w = torch.nn.Parameter(torch.randn(8, 4, 3, 3))
    opt = fastopt.Lion([{"params": [w], "sparsity": NMSparsity(2, 4, dim=1)}], lr=0.1)
    opt.sparsify()
    assert is_nm_sparse(w, 2, 4, dim=1)
    assert torch.equal(opt.state[w]["nm_mask"], nm_mask(opt.state[w]["dense_param"], 2, 4, dim=1))
    before = w.detach().clone()
    opt.sparsify()   # already sparse: nothing changes
    assert torch.equal(w.detach(), before)
    t = torch.nn.Parameter(torch.randn(8, 12))
    opt = fastopt.Lion([{"params": [t], "sparsity": NMSparsity(2, 4, transposable=True)}], lr=0.1)
    opt.sparsify()
    assert torch.equal(opt.state[t]["nm_mask"], transposable_mask(opt.state[t]["dense_param"]))


def test_errors_before_any_change():
    w = torch.nn.Parameter(torch.randn(8, 6))
    ok = torch.nn.Parameter(torch.randn(8, 8))
    with pytest.raises(ValueError, match="cannot be 2:4 sparse"):
        fastopt.Lion([{"params": [ok, w], "sparsity": NMSparsity(2, 4)}], lr=0.1)
    opt = fastopt.Lion([ok], lr=0.1)
    with pytest.raises(ValueError, match="cannot be 2:4 sparse"):
        opt.add_param_group({"params": [w], "sparsity": NMSparsity(2, 4)})
    assert len(opt.param_groups) == 1
    with pytest.raises(TypeError, match="NMSparsity"):
        opt.add_param_group({"params": [w], "sparsity": (2, 4)})
    with pytest.raises(TypeError, match="does not support N:M sparse training"):
        fastopt.AdamW([{"params": [ok], "sparsity": NMSparsity(2, 4)}])
    with pytest.raises(TypeError, match="does not support N:M sparse training"):
        fastopt.Adam([{"params": [ok], "sparsity": NMSparsity(2, 4)}])
    layer = Int8Linear(32, 8)
    with pytest.raises(TypeError, match="int8"):
        fastopt.Lion([{"params": [layer.weight], "sparsity": NMSparsity(2, 4)}], lr=0.1)
    with pytest.raises(ValueError, match="cannot be"):
        fastopt.Lion([{"params": [ok], "sparsity": NMSparsity(2, 4, dim=3)}], lr=0.1)
    assert not opt.state and len(opt.param_groups) == 1
