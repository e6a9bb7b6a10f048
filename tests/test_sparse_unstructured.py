"""Unstructured sparsity in the optimizer step (fastopt.sparse.unstructured): RandomSparsity's hash mask
(reference vs the cpu / triton / CUDA-on-CPU kernels, whole vs contiguous pieces), the masked step vs
torch.optim.AdamW followed by zeroing, MagnitudeSparsity vs torch.nn.utils.prune, refresh, checkpoints,
layer-wise groups and the errors."""
import io
import os
import sys

import pytest
import torch

import fastopt
from fastopt import _ops
from fastopt.lowbit import ElementwiseAdamW
from fastopt.reference.unstructured import prune_key, prune_threshold, random_keep_mask
from fastopt.sparse import MagnitudeSparsity, NMSparsity, RandomSparsity, unstructured_param_groups

from conftest import TRITON_DEVICE

BACKENDS = ["torch", "cpu"] + (["triton"] if TRITON_DEVICE == "cpu" else [])
HYPER = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)


def _shapes():
    return [(37, 19), (130,), (8, 3, 5)]


def _run(sp, backend, steps=3, dtype=torch.float32, seed=0, opt_cls=ElementwiseAdamW, **kw):
    """(params, optimizer, torch AdamW reference params and optimizer, each step zeroed by the masks)."""
    gen = torch.Generator().manual_seed(seed)
    ws = [torch.randn(s, generator=gen).to(dtype) for s in _shapes()]
    ps = [torch.nn.Parameter(w.clone()) for w in ws]
    ref = [torch.nn.Parameter(w.clone().float()) for w in ws]
    opt = opt_cls([dict(params=ps, sparsity=sp)], backend=backend, **HYPER, **kw)
    ropt = torch.optim.AdamW(ref, **HYPER, foreach=False)
    for _ in range(steps):
        gs = [torch.randn(s, generator=gen).to(dtype) for s in _shapes()]
        for p, q, g in zip(ps, ref, gs):
            p.grad, q.grad = g.clone(), g.float()
        masks_before = _masks(sp, opt, ps)
        if masks_before is not None and ropt.state == {}:  # the first step masks the weights first
            with torch.no_grad():
                for q, m in zip(ref, masks_before):
                    q.mul_(m)
        opt.step()
        ropt.step()
        with torch.no_grad():
            for q, m in zip(ref, _masks(sp, opt, ps)):
                q.mul_(m)
                ropt.state[q]["exp_avg"].mul_(m)
                ropt.state[q]["exp_avg_sq"].mul_(m)
    return ps, opt, ref, ropt


def _masks(sp, opt, ps):
    if isinstance(sp, RandomSparsity):
        return [sp.mask(p.shape, i) for i, p in enumerate(ps)]
    if "sparse_mask" in opt.state.get(ps[0], {}):
        return [opt.state[p]["sparse_mask"] for p in ps]
    return None


# -- the hash mask ------------------------------------------------------------------------------------------
def test_hash_mask_density_pieces_and_keys():
    m = random_keep_mask((600, 500), seed=3, index=2, density=0.1)
    assert abs(m.float().mean().item() - 0.1) < 0.003
    assert prune_threshold(0.1) == int(0.1 * 2 ** 32)
    whole = random_keep_mask((40, 50), 3, 2, 0.3).flatten()
    for start, stop in ((0, 700), (700, 1333), (1333, 2000)):  # contiguous pieces draw their part
        assert torch.equal(random_keep_mask((stop - start,), 3, 2, 0.3, offset=start), whole[start:stop])
    assert not torch.equal(random_keep_mask((2000,), 3, 1, 0.3), whole)  # another parameter, another mask
    assert not torch.equal(random_keep_mask((2000,), 4, 2, 0.3), whole)  # another seed
    assert prune_key(3, 2) != prune_key(2, 3)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kernel_hash_mask_matches_reference_and_pieces(backend, dtype):
    """The kernels' mode-2 epilogue prunes exactly the reference's mask, for a tensor stepped whole and
    as contiguous pieces (sr_offsets), with stochastic rounding of bf16 as well."""
    gen = torch.Generator().manual_seed(1)
    n = 5003
    p0, g0 = torch.randn(n, generator=gen).to(dtype), torch.randn(n, generator=gen).to(dtype)
    key, thr = prune_key(7, 4), prune_threshold(0.25)
    sr = dtype == torch.bfloat16

    def call(params, grads, offsets):
        states = [torch.ones_like(x) for x in params] + [torch.ones_like(x) for x in params]
        _ops._elementwise_kernel(
            op="adamw", params=params, grads=grads, states=states, state_steps=[torch.zeros(1) for _ in params],
            hyper=[0.9, 0.99, 1e-8, 0.1], flags=0, lr=1e-2, lr_tensor=None, maximize=False, grad_scale=None,
            found_inf=None, phase=0, rows=[], row_coef=None, reduce_out=None, seed=11, stochastic=sr,
            backend=backend, sparse_mask=[], sparse_out=[], sparse_lambda=0.0, sparse_beta=0.0, sr_offsets=offsets,
            sparse_prune=2, sparse_keys=[key] * len(params), sparse_threshold=thr)
        return states

    whole = [p0.clone()]
    st = call(whole, [g0.clone()], [])
    keep = random_keep_mask((n,), 7, 4, 0.25)
    assert torch.equal(whole[0] != 0, keep) and torch.equal(st[0] != 0, keep) and torch.equal(st[1] != 0, keep)
    cuts = [0, 1000, 1001, 4096, n]
    pieces = [p0[a:b].clone() for a, b in zip(cuts, cuts[1:])]
    if sr:  # the rounding stream is keyed on the tensor's place in its call: one piece per call (as FSDP2)
        for x, a, b in zip(pieces, cuts, cuts[1:]):
            call([x], [g0[a:b].clone()], [a])
    else:
        call(pieces, [g0[a:b].clone() for a, b in zip(cuts, cuts[1:])], cuts[:-1])
    assert torch.equal(torch.cat(pieces), whole[0])


def test_kernel_prune_arguments_checked():
    x = [torch.zeros(4)]
    base = dict(op="lion", params=x, grads=[torch.zeros(4)], states=[torch.zeros(4)], state_steps=[torch.zeros(1)],
                hyper=[0.9, 0.99, 0.0], flags=0, lr=1e-2, lr_tensor=None, maximize=False, grad_scale=None,
                found_inf=None, phase=0, rows=[], row_coef=None, reduce_out=None, seed=0, stochastic=False,
                backend="cpu", sparse_mask=[], sparse_out=[], sparse_lambda=0.0, sparse_beta=0.0)
    with pytest.raises(ValueError, match="sparse_prune 2 needs one uint32 key per param"):
        _ops._elementwise_kernel(**base, sparse_prune=2, sparse_keys=[], sparse_threshold=5)
    with pytest.raises(ValueError, match="sparse_prune 2 needs"):
        _ops._elementwise_kernel(**base, sparse_prune=2, sparse_keys=[2 ** 32], sparse_threshold=5)
    with pytest.raises(ValueError, match="sparse_prune 1 needs sparse_mask"):
        _ops._elementwise_kernel(**base, sparse_prune=1)
    assert torch.equal(x[0], torch.zeros(4))


# -- the masked step ------------------------------------------------------------------------------------------
SCHEDULES = [RandomSparsity(0.3, seed=5), MagnitudeSparsity(0.3), MagnitudeSparsity(0.4, scope="global")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("i", range(len(SCHEDULES)), ids=["random", "magnitude-layer", "magnitude-global"])
def test_masked_step_is_adamw_then_zeroing(backend, i):
    sp = SCHEDULES[i]
    ps, opt, ref, ropt = _run(sp, backend)
    for p, q in zip(ps, ref):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(opt.state[p]["exp_avg"], ropt.state[q]["exp_avg"], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], ropt.state[q]["exp_avg_sq"], rtol=1e-5, atol=1e-9)
    masks = _masks(sp, opt, ps)
    for p, m in zip(ps, masks):  # pruned entries of weights and states exactly 0
        assert not p[~m].any() and not opt.state[p]["exp_avg"][~m].any() and not opt.state[p]["exp_avg_sq"][~m].any()
    total = sum(p.numel() for p in ps)
    kept = sum(int(m.sum()) for m in masks)
    assert abs(kept / total - sp.density) < 0.05


def test_backends_agree_bitwise_bf16_and_other_ops():
    """cpu and triton (the fused epilogue) equal the torch backend's step-then-mask for Lion (bf16 with
    stochastic rounding: the same bits), and a reduce op (LAMB: step, then mask) runs."""
    sp = RandomSparsity(0.5, seed=1)
    got = {}
    for b in BACKENDS:
        ps, opt, _, _ = _run(sp, b, steps=2, dtype=torch.bfloat16, opt_cls=_LionLike, stochastic_rounding=True)
        got[b] = [p.detach().clone() for p in ps] + [opt.state[p]["exp_avg"].clone() for p in ps]
    for b in BACKENDS[1:]:
        for x, y in zip(got[b], got["torch"]):
            assert torch.equal(x, y), b
    ps = [torch.nn.Parameter(torch.randn(20, 10))]
    opt = fastopt.Lamb([dict(params=ps, sparsity=sp)], lr=1e-2, backend="cpu")
    ps[0].grad = torch.randn(20, 10)
    opt.step()
    assert torch.equal(ps[0] != 0, sp.mask((20, 10), 0) & (ps[0] != 0)) and not ps[0][~sp.mask((20, 10), 0)].any()


class _LionLike(fastopt.Lion):
    """Lion with AdamW's keyword names (so _run can build it)."""

    _listed = False

    def __init__(self, params, lr, betas, eps, weight_decay, **kw):
        super().__init__(params, lr=lr, betas=betas, weight_decay=weight_decay, **kw)


def test_master_weights_path():
    sp = RandomSparsity(0.4, seed=2)
    ps = [torch.nn.Parameter(torch.randn(30, 7).bfloat16())]
    opt = ElementwiseAdamW([dict(params=ps, sparsity=sp)], lr=1e-2, master_weights=True, backend="cpu")
    for _ in range(2):
        ps[0].grad = torch.randn(30, 7).bfloat16()
        opt.step()
    m = sp.mask((30, 7), 0)
    st = opt.state[ps[0]]
    assert not ps[0][~m].any() and not st["master_param"][~m].any() and not st["exp_avg"][~m].any()
    assert ps[0][m].ne(0).all()


# -- magnitude masks ----------------------------------------------------------------------------------------
def test_magnitude_masks_match_torch_prune():
    import torch.nn.utils.prune as prune

    torch.manual_seed(0)
    lin = [torch.nn.Linear(17, 13), torch.nn.Linear(13, 5)]
    for scope in ("layer", "global"):
        ws = [l.weight.detach().clone() for l in lin]
        ps = [torch.nn.Parameter(w.clone()) for w in ws]
        opt = ElementwiseAdamW([dict(params=ps, sparsity=MagnitudeSparsity(0.35, scope=scope))], lr=0.0,
                               backend="cpu")
        opt.sparsify()
        mods = [torch.nn.Linear(17, 13), torch.nn.Linear(13, 5)]
        for m, w in zip(mods, ws):
            m.weight.data.copy_(w)
        if scope == "layer":
            for m in mods:
                prune.l1_unstructured(m, "weight", amount=0.65)
        else:
            prune.global_unstructured([(m, "weight") for m in mods], prune.L1Unstructured, amount=0.65)
        for p, m in zip(ps, mods):
            assert torch.equal(opt.state[p]["sparse_mask"], m.weight_mask.bool()), scope
            assert torch.equal(p.detach(), m.weight.detach())


def test_magnitude_refresh_is_dense_step_then_new_mask():
    sp = MagnitudeSparsity(0.5, refresh_every=2)
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(40, 10, generator=gen) * 0.1
    p, q = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    # a large lr: regrown weights compete with the kept ones; a large eps: their first updates (from zero
    # states) are not all of one size (Adam's m / sqrt(v) would be, tying them at the mask's boundary)
    hyper = dict(HYPER, lr=0.7, eps=0.5)
    opt = ElementwiseAdamW([dict(params=[p], sparsity=sp)], **hyper, backend="cpu")
    ropt = torch.optim.AdamW([q], **hyper, foreach=False)
    import torch.nn.utils.prune as prune

    for t in range(2):
        g = torch.randn(40, 10, generator=gen)
        p.grad, q.grad = g.clone(), g.clone()
        if t == 0:
            with torch.no_grad():
                q.mul_(prune.L1Unstructured(0.5).compute_mask(q.detach(), torch.ones_like(q)).bool())
        before = opt.state[p].get("sparse_mask")
        before = before.clone() if before is not None else None
        opt.step()
        ropt.step()
        m = prune.L1Unstructured(0.5).compute_mask(q.detach(), torch.ones_like(q)).bool() if t == 1 else \
            opt.state[p]["sparse_mask"]
        with torch.no_grad():
            for x in (q, ropt.state[q]["exp_avg"], ropt.state[q]["exp_avg_sq"]):
                x.mul_(m)
        assert torch.equal(opt.state[p]["sparse_mask"], m)
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
        if t == 1:
            assert (m & ~before).any()  # the refresh regrew some pruned weights


# -- checkpoints ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("i", range(len(SCHEDULES)))
def test_state_dict_round_trip_and_resume_exact(i):
    sp = SCHEDULES[i] if i else RandomSparsity(0.3, seed=5)
    sp = MagnitudeSparsity(0.3, refresh_every=2) if i == 1 else sp

    def make():
        gen = torch.Generator().manual_seed(9)
        ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in _shapes()]
        return ps, ElementwiseAdamW([dict(params=ps, sparsity=sp)], **HYPER, backend="cpu")

    grads = [[torch.randn(s, generator=torch.Generator().manual_seed(k)) for s in _shapes()] for k in range(5)]

    def steps(ps, opt, ks):
        for k in ks:
            for p, g in zip(ps, grads[k]):
                p.grad = g.clone()
            opt.step()

    ps, opt = make()
    steps(ps, opt, range(5))
    ps2, opt2 = make()
    steps(ps2, opt2, range(2))
    buf = io.BytesIO()
    torch.save({"opt": opt2.state_dict(), "params": [p.detach() for p in ps2]}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    assert saved["opt"]["param_groups"][0]["sparsity"] == sp.to_state()
    ps3, opt3 = make()
    with torch.no_grad():
        for p, v in zip(ps3, saved["params"]):
            p.copy_(v)
    opt3.load_state_dict(saved["opt"])
    assert opt3.param_groups[0]["sparsity"] == sp
    steps(ps3, opt3, range(2, 5))
    for a, b in zip(ps, ps3):
        assert torch.equal(a, b)
    for a, b in zip(ps, ps3):
        for k in opt.state[a]:
            if torch.is_tensor(opt.state[a][k]):
                assert torch.equal(opt.state[a][k], opt3.state[b][k]), k


# -- layer-wise groups ---------------------------------------------------------------------------------------
def test_unstructured_param_groups():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    groups = unstructured_param_groups(model, {"0.weight": 0.2, "2.weight": 0.5, "2.bias": 1.0}, seed=3,
                                       weight_decay=0.1)
    assert [g["sparsity"] for g in groups[:2]] == [RandomSparsity(0.2, seed=3), RandomSparsity(0.5, seed=3)]
    assert groups[0]["weight_decay"] == 0.1 and groups[0]["params"] == [model[0].weight]
    assert {id(p) for p in groups[2]["params"]} == {id(model[0].bias), id(model[2].bias)}
    groups = unstructured_param_groups(model, 0.3, "magnitude", scope="global", refresh_every=10)
    assert groups[0]["sparsity"] == MagnitudeSparsity(0.3, "global", 10)
    assert groups[0]["params"] == [model[0].weight, model[2].weight]
    opt = ElementwiseAdamW(groups, lr=1e-3)
    opt.sparsify()
    assert abs(float((model[0].weight != 0).float().mean()) - 0.3) < 0.15
    with pytest.raises(ValueError, match="unstructured_param_groups: densities name parameters"):
        unstructured_param_groups(model, {"nope": 0.5})
    with pytest.raises(ValueError, match=r"unstructured_param_groups: the density of '0.weight' must be in \(0, 1\]"):
        unstructured_param_groups(model, {"0.weight": 0.0})
    with pytest.raises(ValueError, match="unstructured_param_groups: kind"):
        unstructured_param_groups(model, 0.5, kind="nm")


# -- errors ----------------------------------------------------------------------------------------------------
def test_errors_before_any_state_change():
    with pytest.raises(ValueError, match=r"RandomSparsity: density must be in \(0, 1\)"):
        RandomSparsity(1.0)
    with pytest.raises(TypeError, match="RandomSparsity: density must be a float"):
        RandomSparsity("0.5")
    with pytest.raises(ValueError, match="RandomSparsity: seed"):
        RandomSparsity(0.5, seed=-1)
    with pytest.raises(ValueError, match="MagnitudeSparsity: scope"):
        MagnitudeSparsity(0.5, scope="row")
    with pytest.raises(ValueError, match="MagnitudeSparsity: refresh_every"):
        MagnitudeSparsity(0.5, refresh_every=0)
    p = torch.nn.Parameter(torch.randn(64, 64))
    with pytest.raises(TypeError, match="AdamW does not support .* unstructured sparsity.*ElementwiseAdamW"):
        fastopt.AdamW([dict(params=[p], sparsity=RandomSparsity(0.5))])
    with pytest.raises(ValueError, match="ElementwiseAdamW: RandomSparsity does not support low-bit states"):
        ElementwiseAdamW([dict(params=[p], sparsity=RandomSparsity(0.5), state_bits=8)])
    with pytest.raises(TypeError, match="cannot be combined"):
        ElementwiseAdamW([dict(params=[p], sparsity=(NMSparsity(2, 4), RandomSparsity(0.5)))])
    with pytest.raises(TypeError, match="needs real floating-point parameters"):
        ElementwiseAdamW([dict(params=[torch.zeros(4, dtype=torch.int64)], sparsity=RandomSparsity(0.5))])
    ok = ElementwiseAdamW([p], lr=1e-3)
    with pytest.raises(ValueError, match="low-bit states"):
        ok.add_param_group(dict(params=[torch.nn.Parameter(torch.randn(3))], sparsity=MagnitudeSparsity(0.5),
                                state_bits=4))
    assert len(ok.param_groups) == 1 and not ok.state


def test_dtensor_refusals(monkeypatch):
    """MagnitudeSparsity refuses DTensors (the threshold spans shards); RandomSparsity refuses shards that
    are not row ranges (the mask is keyed on the index in the whole tensor)."""
    from fastopt import _sharded

    p = torch.nn.Parameter(torch.randn(8, 8))
    monkeypatch.setattr(_sharded, "is_dtensor", lambda t: t is p)
    monkeypatch.setattr(_sharded, "describe_placement", lambda t: "(8, 8) with placements (Shard(1),)")
    monkeypatch.setattr(_sharded, "row_sharded", lambda t: False)
    with pytest.raises(NotImplementedError, match="MagnitudeSparsity of a DTensor"):
        MagnitudeSparsity(0.5).check_param(p, "X")
    with pytest.raises(NotImplementedError, match="RandomSparsity of a DTensor .* row ranges"):
        RandomSparsity(0.5).check_param(p, "X")


# -- the CUDA kernel, compiled for the CPU (tests/_cuda_on_cpu_build.py) ---------------------------------------
@pytest.mark.skipif(os.environ.get("FASTOPT_SKIP_CUDA_ON_CPU") == "1", reason="CUDA-on-CPU build disabled")
def test_cuda_kernel_on_cpu_matches_cpu():
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _cuda_on_cpu as coc
    import _cuda_on_cpu_build as coc_build

    built = coc_build.build()
    gen = torch.Generator().manual_seed(4)
    ws = [torch.randn(n, generator=gen) for n in (70001, 33, 4096 + 3, 5001)]
    gs = [[torch.randn(w.shape, generator=gen) for w in ws] for _ in range(2)]
    out = {}
    for mode in ("random", "magnitude"):
        for backend in ("cpu", "cuda"):
            ps = [torch.nn.Parameter(w.clone()) for w in ws[:3]]
            ps.append(torch.nn.Parameter(torch.cat([torch.zeros(1), ws[3]])[1:]))  # unaligned: the scalar path
            sp = RandomSparsity(0.2, seed=8) if mode == "random" else MagnitudeSparsity(0.2)
            opt = ElementwiseAdamW([dict(params=ps, sparsity=sp)], **HYPER, backend=backend)
            if backend == "cuda":
                coc.activate(coc_build.load(built))
            try:
                for g in gs:
                    for p, x in zip(ps, g):
                        p.grad = x.clone()
                    opt.step()
            finally:
                if backend == "cuda":
                    coc.deactivate()
            out[(mode, backend)] = [p.detach() for p in ps] + [opt.state[p]["exp_avg_sq"] for p in ps]
        for a, b in zip(out[(mode, "cpu")], out[(mode, "cuda")]):
            assert torch.equal(a, b), mode


# -- FSDP2: RandomSparsity on DTensor shards (2 gloo ranks) ------------------------------------------------------
def _random_groups(model):
    weights = [layer.weight for layer in model.layers]
    return [dict(params=weights, sparsity=RandomSparsity(0.3, seed=2)),
            dict(params=[layer.bias for layer in model.layers])]


def _random_train(model, backend):
    import test_distributed_sparse as tds

    opt = ElementwiseAdamW(_random_groups(model), backend=backend, **HYPER)
    for s in range(3):
        model(*tds._batch(s)).backward()
        opt.step()
        opt.zero_grad()
    return [tds._whole(p).detach().clone() for p in model.parameters()] + \
        [tds._whole(opt.state[layer.weight]["exp_avg"]).clone() for layer in model.layers]


def _random_fsdp_worker(rank, world, port, out_dir):
    import test_distributed_sparse as tds
    from torch.distributed.device_mesh import init_device_mesh

    tds._init(rank, world, port)
    try:
        mesh = init_device_mesh("cpu", (world,))
        results = {b: _random_train(tds._sharded(mesh), b) for b in ("torch", "cpu")}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        import torch.distributed as dist

        dist.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_random_sparsity_under_fsdp2_equals_single_process(tmp_path):
    """FSDP2 shards (rows 8|8, 6|6, 4|3, 2|2) draw their part of the whole tensor's hash mask (sr_offsets):
    the result equals single-process training bit for bit (identical batches on both ranks: exact averages)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import test_distributed_sparse as tds

    got = tds._spawn(_random_fsdp_worker, 2, tmp_path)
    for backend in ("torch", "cpu"):
        want = _random_train(tds.Layers(), backend)
        for r in range(2):
            for a, b in zip(got[r][backend], want):
                assert torch.equal(a, b), backend
    masks = [RandomSparsity(0.3, seed=2).mask(w.shape, i) for i, w in enumerate(want[:8:2])]
    for w, m in zip(want[:8:2], masks):  # (named_parameters order: weight, bias per layer)
        assert not w[~m].any()
