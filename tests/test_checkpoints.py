"""Checkpoints that real trainers can load: every fastopt optimizer's state_dict, with every option
that changes what it holds (low-bit states, N:M sparse groups, master weights, int8 weights, tensor lr, Muon),
goes through ``torch.save`` / ``torch.load(weights_only=True)`` -- what transformers' Trainer and Lightning do --
and resumes bit-exactly: a run interrupted by save / fresh model and optimizer / load ends exactly where the
uninterrupted run ends (parameters and every state tensor)."""
import io

import pytest
import torch
from torch import nn

import fastopt
from fastopt import lowbit
from fastopt.sparse import NMSparsity, nm_param_groups

STEPS_BEFORE, STEPS_AFTER = 3, 3


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64)).to(dtype)


def _int8_model():
    torch.manual_seed(0)
    return nn.Sequential(lowbit.Int8Linear.from_linear(nn.Linear(64, 128)), nn.ReLU(), nn.Linear(128, 64))


def _on_model(cls, **kw):
    """(the fp32 model, ``cls`` over all its parameters with ``kw``)."""
    return _model, lambda m, b: cls(m.parameters(), backend=b, **kw)


# name -> (model factory, optimizer factory(model, backend)); the low-bit ones quantize the 64x128 weights
# (8192 >= min_quant_size 4096).
CASES = {
    **{name: _on_model(getattr(fastopt, name), lr=1e-2)
       for name in ("AdamW", "Adan", "AdaBelief", "DiffGrad", "EXAdam", "Lamb", "AdamP", "SGDP", "SGDSaI")},
    "Adam-amsgrad": _on_model(fastopt.Adam, lr=1e-2, amsgrad=True),
    "AdamW-tensor-lr": (_model, lambda m, b: fastopt.AdamW(m.parameters(), lr=torch.tensor(1e-2), backend=b)),
    "Lion": _on_model(fastopt.Lion, lr=1e-3, weight_decay=0.1),
    **{name: _on_model(getattr(lowbit, name), lr=1e-2) for name in ("AdamW8bit", "AdamW4bit", "AdamWFp8")},
    "Lion8bit": _on_model(lowbit.Lion8bit, lr=1e-3),
    "AdamW-4-rank1": _on_model(lowbit.ElementwiseAdamW, lr=1e-2, state_bits="4-rank1"),
    "Lion-nm-sparse": (_model, lambda m, b: fastopt.Lion(nm_param_groups(m, NMSparsity(2, 4)), lr=1e-3, backend=b)),
    "AdamW8bit-nm-sparse-decay": (_model, lambda m, b: lowbit.AdamW8bit(
        nm_param_groups(m, NMSparsity(2, 4, recipe="decay", decay_coef=0.1)), lr=1e-2, backend=b)),
    "Lion-bf16-master": (lambda: _model(torch.bfloat16),
                         lambda m, b: fastopt.Lion(m.parameters(), lr=1e-3, master_weights=True, backend=b)),
    "AdamW-bf16-stochastic-rounding": (lambda: _model(torch.bfloat16), lambda m, b: lowbit.ElementwiseAdamW(
        m.parameters(), lr=1e-2, stochastic_rounding=True, seed=3, backend=b)),
    "Lion-int8-weights": (_int8_model, lambda m, b: fastopt.Lion(m.parameters(), lr=1e-3, backend=b)),
    "Muon": (_model, lambda m, b: fastopt.Muon(m.parameters(), lr=1e-2, backend="torch")),
}


def _train(model, opt, steps, seed):
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    for s in range(steps):
        g = torch.Generator().manual_seed(seed + s)
        x = torch.randn(16, 64, generator=g).to(dtype)
        y = torch.randn(16, 64, generator=g).to(dtype)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x).float(), y.float())
        loss.backward()
        opt.step()


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _assert_same(a, b, what):
    assert type(a) is type(b), what
    if torch.is_tensor(a):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), what
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), what
        for k in a:
            _assert_same(a[k], b[k], f"{what}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{what}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{what}: {a!r} != {b!r}"


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("name", list(CASES))
def test_weights_only_load_resumes_bit_exactly(name, backend):
    make_model, make_opt = CASES[name]
    model_a = make_model()
    opt_a = make_opt(model_a, backend)
    _train(model_a, opt_a, STEPS_BEFORE + STEPS_AFTER, seed=10)

    model_b = make_model()
    opt_b = make_opt(model_b, backend)
    _train(model_b, opt_b, STEPS_BEFORE, seed=10)
    saved = _roundtrip({"model": model_b.state_dict(), "optimizer": opt_b.state_dict()})
    del model_b, opt_b
    model_c = make_model()
    opt_c = make_opt(model_c, backend)
    model_c.load_state_dict(saved["model"])
    opt_c.load_state_dict(saved["optimizer"])
    _train(model_c, opt_c, STEPS_AFTER, seed=10 + STEPS_BEFORE)

    for (k, pa), pc in zip(model_a.state_dict().items(), model_c.state_dict().values()):
        assert torch.equal(pa, pc), f"{name}/{backend}: {k} differs after resume"
    sa, sc = opt_a.state_dict(), opt_c.state_dict()
    _assert_same(sa, sc, f"{name}/{backend} optimizer state_dict")
    # and the resumed optimizer's own state_dict is weights_only-loadable too
    _roundtrip(sc)


def test_sparsity_saved_as_plain_dict_and_rebuilt():
    model = _model()
    sp = NMSparsity(2, 4, recipe="decay", decay_coef=0.05, dense_steps=1)
    opt = fastopt.Lion(nm_param_groups(model, sp), lr=1e-3)
    sd = opt.state_dict()
    sparse = [g for g in sd["param_groups"] if g.get("sparsity") is not None]
    assert sparse and all(type(g["sparsity"]) is dict for g in sparse)
    assert opt.param_groups[0]["sparsity"] is sp            # the live group keeps the object
    fresh = fastopt.Lion(nm_param_groups(_model(), NMSparsity(2, 4)), lr=1e-3)
    fresh.load_state_dict(_roundtrip(sd))
    assert fresh.param_groups[0]["sparsity"] == sp           # the checkpoint's schedule, rebuilt
    assert type(sd["param_groups"][0]["sparsity"]) is dict   # the caller's state_dict is not changed by loading
    # an older checkpoint holding the object itself still loads (without weights_only)
    old = {**sd, "param_groups": [{**g, "sparsity": sp} if g.get("sparsity") is not None else g
                                  for g in sd["param_groups"]]}
    fresh.load_state_dict(old)
    assert fresh.param_groups[0]["sparsity"] == sp


def test_bad_saved_sparsity_is_refused_before_loading():
    model = _model()
    opt = fastopt.Lion(nm_param_groups(model, NMSparsity(2, 4)), lr=1e-3)
    sd = opt.state_dict()
    for bad in ({"fastopt.NMSparsity": {"n": 4, "m": 4}}, {"fastopt.NMSparsity": {"n": 2, "m": 4, "color": 1}},
                "2:4"):
        broken = {**sd, "param_groups": [{**g, "sparsity": bad} if g.get("sparsity") is not None else g
                                         for g in sd["param_groups"]]}
        fresh = fastopt.Lion(nm_param_groups(_model(), NMSparsity(2, 8)), lr=1e-3)
        with pytest.raises(ValueError):
            fresh.load_state_dict(broken)
        assert fresh.param_groups[0]["sparsity"] == NMSparsity(2, 8)
