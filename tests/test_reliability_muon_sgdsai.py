"""Reliability of Muon and the two-phase optimizers (SGD-SaI, LAMB, AdamP, SGDP): SGD-SaI's g-SNR after
a state reset, Muon's bit-exact resume with fp32 master weights, and bad input (overlapping parameters,
a one-element lr of any shape, integer parameters, states that do not fit their parameters) refused
before anything is written, in any group.

Comparisons are bit-exact (``torch.equal``): the same backend on the same inputs must give the same bits.
"""
import copy
import io

import pytest
import torch
from conftest import DEVICE_BACKENDS, KERNEL_DEVICE_BACKENDS

import fastopt
from fastopt import _backend
from fastopt.optim.muon import Muon

MUON_BACKENDS = ["torch", "auto"] + (["triton"] if "triton" in _backend.available_backends("cpu") else [])


def gen(seed):
    return torch.Generator().manual_seed(seed)


def randn(shape, seed, dtype=torch.float32):
    return torch.randn(shape, generator=gen(seed)).to(dtype)


def snapshot(params, opt):
    def clone(v):
        return v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)

    return ([p.detach().clone() for p in params],
            {id(p): {k: clone(v) for k, v in opt.state[p].items()} for p in params if opt.state.get(p)},
            [{k: clone(v) for k, v in g.items() if k != "params"} for g in opt.param_groups])


def assert_unchanged(params, opt, snap):
    values, states, groups = snap
    for p, v in zip(params, values):
        assert torch.equal(p.detach(), v)
    assert {id(p) for p in params if opt.state.get(p)} == set(states)
    for p in params:
        now = opt.state.get(p, {})
        assert set(now) == set(states.get(id(p), {}))
        for k, v in states.get(id(p), {}).items():
            if isinstance(v, torch.Tensor):
                assert now[k].dtype == v.dtype and torch.equal(now[k], v)
            else:
                assert now[k] == v
    for g, before in zip(opt.param_groups, groups):
        assert {k for k in g if k != "params"} == set(before)
        for k, v in before.items():
            assert torch.equal(g[k], v) if isinstance(v, torch.Tensor) else g[k] == v


# ---------------------------------------------------------------------------------------------
# SGD-SaI: the g-SNR of the first step after every kind of state reset.
# ---------------------------------------------------------------------------------------------

SAI_SHAPES = [(8, 16), (5, 7), (33,), (3, 4, 5), (1, 9)]


def _sai_params():
    return [torch.nn.Parameter(randn(s, seed=i)) for i, s in enumerate(SAI_SHAPES)]


def _sai_grads(params, seed):
    for i, p in enumerate(params):
        p.grad = randn(p.shape, seed=seed + i)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_sgdsai_gsnr_after_state_resets(device, backend):
    """Thirty restarts -- opt.state.clear(), loading a checkpoint of an empty state, loading a
    checkpoint of a state made by an AMP-skipped first step -- each followed by a step: every g-SNR, and
    the step itself, equal a fresh optimizer's on the same params and gradients (the state dicts of
    the new states may reuse the ids of freed ones)."""
    ps = _sai_params()
    opt = fastopt.SGDSaI(ps, lr=1e-2, backend=backend)
    empty = copy.deepcopy(opt.state_dict())
    _sai_grads(ps, seed=50)
    opt.found_inf = torch.ones(())
    opt.step()  # skipped: creates the states (step 0, g-SNR 0), moves nothing
    del opt.found_inf
    assert all(float(opt.state[p]["step"]) == 0.0 for p in ps)
    skipped_first = copy.deepcopy(opt.state_dict())
    opt.state.clear()
    for restart in range(30):
        seed = 100 + 10 * restart
        fresh_ps = [torch.nn.Parameter(p.detach().clone()) for p in ps]
        fresh = fastopt.SGDSaI(fresh_ps, lr=1e-2, backend=backend)
        for _ in range(2):  # the first step after the reset, and one more
            _sai_grads(ps, seed)
            _sai_grads(fresh_ps, seed)
            opt.step()
            fresh.step()
            seed += 1
            for p, q in zip(ps, fresh_ps):
                assert torch.equal(opt.state[p]["gsnr"], fresh.state[q]["gsnr"]), restart
                assert float(opt.state[p]["gsnr"]) > 0.0
                assert torch.equal(p.detach(), q.detach()), restart
        kind = restart % 3
        if kind == 0:
            opt.state.clear()
        else:
            opt.load_state_dict(copy.deepcopy(empty if kind == 1 else skipped_first))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_sgdsai_resume_keeps_the_checkpoint_gsnr(device, backend):
    """A checkpoint taken after the first step keeps its g-SNR when loaded (into the same optimizer
    after opt.state.clear(), or into a new one): the run goes on bit-exactly as if never interrupted."""
    ps, qs = _sai_params(), _sai_params()
    a = fastopt.SGDSaI(ps, lr=1e-2, backend=backend)
    b = fastopt.SGDSaI(qs, lr=1e-2, backend=backend)
    for k in range(3):
        _sai_grads(ps, 10 * k)
        _sai_grads(qs, 10 * k)
        a.step()
        b.step()
    buf = io.BytesIO()
    torch.save(b.state_dict(), buf)
    b.state.clear()
    buf.seek(0)
    b.load_state_dict(torch.load(buf))
    rs = [torch.nn.Parameter(q.detach().clone()) for q in qs]
    c = fastopt.SGDSaI(rs, lr=1e-2, backend=backend)
    buf.seek(0)
    c.load_state_dict(torch.load(buf))
    for k in range(3, 6):
        for params, opt in ((ps, a), (qs, b), (rs, c)):
            _sai_grads(params, 10 * k)
            opt.step()
    for p, q, r in zip(ps, qs, rs):
        assert torch.equal(p, q) and torch.equal(p, r)
        for key in ("gsnr", "momentum_buffer", "step"):
            assert torch.equal(a.state[p][key], b.state[q][key]) and torch.equal(a.state[p][key], c.state[r][key])


# ---------------------------------------------------------------------------------------------
# Two-phase optimizers: a one-element lr of any shape.
# ---------------------------------------------------------------------------------------------

TWO_PHASE = [(name, d, b) for name in ("SGDSaI", "Lamb", "AdamP", "SGDP") for d, b in KERNEL_DEVICE_BACKENDS] + \
            [("SGDSaI", d, b) for d, b in DEVICE_BACKENDS if b == "torch"]


@pytest.mark.parametrize("name,device,backend", TWO_PHASE)
def test_two_phase_lr_of_any_shape(name, device, backend):
    """``lr=torch.tensor([[1e-2]])``: the step equals the 0-dim lr's bit for bit, or is refused before
    anything is written; never half done."""
    cls = getattr(fastopt, name)
    shapes = [(6, 4), (5,), (3, 2, 4), (7,)]
    make = lambda: [torch.nn.Parameter(randn(s, seed=i)) for i, s in enumerate(shapes)]  # noqa: E731
    ps, qs = make(), make()
    a = cls(ps, lr=torch.tensor(1e-2), weight_decay=1e-2, backend=backend)
    b = cls(qs, lr=torch.tensor([[1e-2]]), weight_decay=1e-2, backend=backend)
    for k in range(3):
        _sai_grads(ps, 10 * k)
        _sai_grads(qs, 10 * k)
        a.step()
        snap = snapshot(qs, b)
        try:
            b.step()
        except ValueError:
            assert_unchanged(qs, b, snap)
            return
        for p, q in zip(ps, qs):
            assert torch.equal(p, q)


# ---------------------------------------------------------------------------------------------
# Muon: bit-exact resume with master weights.
# ---------------------------------------------------------------------------------------------

MUON_SHAPES = [(16, 24), (24, 16), (3, 4, 5), (16, 24), (24,), (7,)]
N_MATRICES = 4
MUON_HYPER = dict(lr=0.02, weight_decay=0.01, adamw_lr=1e-3, adamw_wd=0.1)


def _muon_params(dtype=torch.float32):
    return [torch.nn.Parameter(randn(s, seed=i, dtype=dtype)) for i, s in enumerate(MUON_SHAPES)]


def _muon_groups(ps):
    return [dict(params=ps[:N_MATRICES], use_muon=True), dict(params=ps[N_MATRICES:], use_muon=False)]


def _muon_grads(params, seed):
    for i, p in enumerate(params):
        p.grad = randn(p.shape, seed=seed + i, dtype=p.dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", MUON_BACKENDS)
def test_muon_master_weights_resume_bit_exact(backend, dtype):
    """bf16/fp16 params with master_weights=True: N steps, a checkpoint through torch.save, a new
    optimizer loads it, M more steps -- bit-identical to N + M uninterrupted steps; the master copies
    and the states are fp32 after the load."""
    n, m = 3, 3
    full = _muon_params(dtype)
    opt_full = Muon(_muon_groups(full), master_weights=True, backend=backend, **MUON_HYPER)
    for k in range(n + m):
        _muon_grads(full, 100 * k)
        opt_full.step()

    first = _muon_params(dtype)
    opt_first = Muon(_muon_groups(first), master_weights=True, backend=backend, **MUON_HYPER)
    for k in range(n):
        _muon_grads(first, 100 * k)
        opt_first.step()
    buf = io.BytesIO()
    torch.save(opt_first.state_dict(), buf)
    buf.seek(0)
    checkpoint = torch.load(buf)
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in first]
    opt = Muon(_muon_groups(resumed), master_weights=True, backend=backend, **MUON_HYPER)
    opt.load_state_dict(checkpoint)
    for i, p in enumerate(resumed):
        state = opt.state[p]
        keys = ("master_param", "momentum_buffer") if i < N_MATRICES else ("master_param", "exp_avg", "exp_avg_sq")
        assert set(state) == set(keys)
        for key in keys:
            assert state[key].dtype == torch.float32
            assert torch.equal(state[key], opt_first.state[first[i]][key])
            assert state[key].data_ptr() != checkpoint["state"][i][key].data_ptr()  # not the checkpoint's
    assert [g["step"] for g in opt.param_groups] == [n, n]
    for k in range(n, n + m):
        _muon_grads(resumed, 100 * k)
        opt.step()
    for p, q in zip(full, resumed):
        assert q.dtype == dtype and torch.equal(p, q)
        for key, value in opt_full.state[p].items():
            assert torch.equal(opt.state[q][key], value)


def test_muon_low_precision_states_without_master_weights_load_as_upstream():
    """Without master_weights, the states of bf16 params are bf16 (as upstream's) before and after a
    load; the run resumes bit-exactly."""
    ps, qs = _muon_params(torch.bfloat16), _muon_params(torch.bfloat16)
    a = Muon(_muon_groups(ps), backend="torch", **MUON_HYPER)
    b = Muon(_muon_groups(qs), backend="torch", **MUON_HYPER)
    for k in range(2):
        _muon_grads(ps, 100 * k)
        _muon_grads(qs, 100 * k)
        a.step()
        b.step()
    rs = [torch.nn.Parameter(q.detach().clone()) for q in qs]
    c = Muon(_muon_groups(rs), backend="torch", **MUON_HYPER)
    c.load_state_dict(copy.deepcopy(b.state_dict()))
    assert all(v.dtype == torch.bfloat16 for r in rs for v in c.state[r].values())
    for k in range(2, 4):
        for params, opt in ((ps, a), (rs, c)):
            _muon_grads(params, 100 * k)
            opt.step()
    assert all(torch.equal(p, r) for p, r in zip(ps, rs))


# ---------------------------------------------------------------------------------------------
# Muon: bad input refused before anything is written, in any group.
# ---------------------------------------------------------------------------------------------

def _stepped_muon(backend, after_steps, **kw):
    ps = _muon_params()
    opt = Muon(_muon_groups(ps), backend=backend, **{**MUON_HYPER, **kw})
    for k in range(after_steps):
        _muon_grads(ps, 100 * k)
        opt.step()
    _muon_grads(ps, 999)
    return ps, opt


def _overlapping(shape):
    """An expand()-ed leaf that requires grad, with a gradient."""
    x = torch.zeros((1,) * len(shape)).expand(*shape).requires_grad_()
    x.grad = torch.ones(shape)
    return x


@pytest.mark.parametrize("after_steps", [0, 2])
@pytest.mark.parametrize("use_muon", [True, False])
@pytest.mark.parametrize("backend", MUON_BACKENDS)
def test_muon_overlapping_param_refused_first(backend, use_muon, after_steps):
    """An expand()-ed param after dense ones (in the Muon group or the AdamW group): ValueError before
    any group moves, any state is made or any step count changes."""
    ps, opt = _stepped_muon(backend, after_steps)
    bad = _overlapping((6, 4) if use_muon else (4,))
    opt.param_groups[0 if use_muon else 1]["params"].append(bad)
    snap = snapshot(ps, opt)
    with pytest.raises(ValueError, match=r"share memory.*expand"):
        opt.step()
    assert_unchanged(ps, opt, snap)
    assert bad not in opt.state and torch.equal(bad, torch.zeros(bad.shape))


def test_muon_overlap_detection():
    """Overlap is told exactly: strided and interleaved views whose elements are distinct are stepped
    (as a contiguous copy of them would be); those that share an element are refused."""
    base = torch.randn(64)
    cases = {
        "columns": (torch.randn(6, 8)[:, ::2], False),
        "transposed": (torch.randn(4, 6).t(), False),
        "interleaved": (base.as_strided((3, 2), (2, 3)), False),  # offsets 0 3 2 5 4 7
        "interleaved-overlap": (base.as_strided((3, 2), (2, 4)), True),  # offsets 0 4 2 6 4 8
        "zero-stride-dim": (base.as_strided((2, 3), (0, 1)), True),
        "size-1-zero-stride": (base.as_strided((1, 3), (0, 1)), False),
    }
    for name, (view, overlaps) in cases.items():
        p = view.detach().requires_grad_()
        p.grad = randn(p.shape, seed=3)
        q = torch.nn.Parameter(p.detach().contiguous())
        q.grad = p.grad.clone()
        opt_p = Muon([dict(params=[p], use_muon=True)], backend="torch", **MUON_HYPER)
        opt_q = Muon([dict(params=[q], use_muon=True)], backend="torch", **MUON_HYPER)
        if overlaps:
            with pytest.raises(ValueError, match="share memory"):
                opt_p.step()
            assert not opt_p.state, name
        else:
            opt_p.step()
            opt_q.step()
            assert torch.equal(p.detach(), q.detach()), name


@pytest.mark.parametrize("backend", MUON_BACKENDS)
def test_muon_lr_of_any_shape(backend):
    """A one-element lr of any shape (Muon group, AdamW group) is used as a scalar, as torch.optim
    does: the run equals the 0-dim lr's bit for bit."""
    ps, qs = _muon_params(), _muon_params()
    a = Muon(_muon_groups(ps), backend=backend, **MUON_HYPER)
    b = Muon(_muon_groups(qs), backend=backend, **MUON_HYPER)
    a.param_groups[0]["lr"], a.param_groups[1]["lr"] = torch.tensor(0.02), torch.tensor(1e-3)
    b.param_groups[0]["lr"], b.param_groups[1]["lr"] = torch.tensor([[[0.02]]]), torch.tensor([[1e-3]])
    for k in range(3):
        _muon_grads(ps, 100 * k)
        _muon_grads(qs, 100 * k)
        a.step()
        b.step()
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)
    assert b.param_groups[0]["lr"].shape == (1, 1, 1)  # the group's lr is left as given
    b.param_groups[1]["lr"] = torch.tensor([1e-3, 1e-3])
    _muon_grads(qs, 7)
    snap = snapshot(qs, b)
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        b.step()
    assert_unchanged(qs, b, snap)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
@pytest.mark.parametrize("use_muon", [True, False])
@pytest.mark.parametrize("after_steps", [0, 2])
def test_muon_integer_param_refused_first(after_steps, use_muon, dtype):
    """A non-floating-point param with a gradient set by hand, after dense ones: TypeError naming its
    dtype before anything is written."""
    ps, opt = _stepped_muon("auto", after_steps)
    x = torch.zeros((6, 4) if use_muon else (3,), dtype=dtype)
    x.grad = torch.ones_like(x)
    opt.param_groups[0 if use_muon else 1]["params"].append(x)
    snap = snapshot(ps, opt)
    with pytest.raises(TypeError, match=str(dtype)):
        opt.step()
    assert_unchanged(ps, opt, snap)
    assert x not in opt.state


def test_muon_states_that_do_not_fit_are_refused():
    """A checkpoint of the params in another order is refused at load (nothing loaded); a state tensor
    replaced by one of another shape fails the next step before anything is written."""
    ps, opt = _stepped_muon("torch", 2)
    swapped = copy.deepcopy(opt.state_dict())
    swapped["state"][0], swapped["state"][1] = swapped["state"][1], swapped["state"][0]  # (16, 24) <-> (24, 16)
    snap = snapshot(ps, opt)
    with pytest.raises(ValueError, match="momentum_buffer.*parameter 0"):
        opt.load_state_dict(swapped)
    assert_unchanged(ps, opt, snap)

    opt.state[ps[-1]]["exp_avg_sq"] = torch.zeros(8)
    snap = snapshot(ps, opt)
    with pytest.raises(ValueError, match="exp_avg_sq"):
        opt.step()
    assert_unchanged(ps, opt, snap)
