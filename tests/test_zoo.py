"""Every zoo optimizer (tests/zoo_cases.py) on every backend vs its torch reference, plus the bf16
options (stochastic rounding, master weights), AMP, state dicts and errors."""
import copy

import pytest
import torch

from conftest import DEVICE_BACKENDS, KERNEL_DEVICE_BACKENDS
from helpers import ODD_SHAPES, clone_params, make_params, run_side_by_side, set_grads
from zoo_cases import REDUCING, ZOO

CASES = [(name, i) for name, (_, cfgs) in ZOO.items() for i in range(len(cfgs))]


def build(name, cfg_index, params, backend, **extra):
    cls, cfgs = ZOO[name]
    return cls(params, backend=backend, **cfgs[cfg_index], **extra)


def keys(opt):
    return opt._state_names(opt.param_groups[0])


def assert_same(opt_a, pa, opt_b, pb, keys, rtol, atol):
    for a, b in zip(pa, pb):
        torch.testing.assert_close(a.detach().float().cpu(), b.detach().float().cpu(), rtol=rtol, atol=atol)
        for key in keys:
            torch.testing.assert_close(opt_a.state[a][key].float().cpu(), opt_b.state[b][key].float().cpu(),
                                       rtol=rtol, atol=atol, msg=lambda m, key=key: f"state {key}: {m}")
        assert float(opt_a.state[a]["step"]) == float(opt_b.state[b]["step"])


@pytest.mark.parametrize("device,backend", KERNEL_DEVICE_BACKENDS)
@pytest.mark.parametrize("name,cfg", CASES)
def test_backend_matches_reference_fp32(device, backend, name, cfg):
    base = make_params(ODD_SHAPES, device=device)
    ref_p, ker_p = clone_params(base), clone_params(base)
    ref = build(name, cfg, ref_p, "torch")
    ker = build(name, cfg, ker_p, backend)
    run_side_by_side([ref, ker], [ref_p, ker_p], steps=4)
    assert_same(ref, ref_p, ker, ker_p, keys(ref), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device,backend", KERNEL_DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(ZOO))
def test_backend_matches_reference_low_precision(device, backend, dtype, name):
    # Math is fp32 on every backend and storage rounds to nearest even, so results agree up to the
    # rare last-bit flip of an fp32 difference across the rounding boundary: one storage ulp.
    base = make_params([(97,), (13, 31)], dtype=dtype, device=device)
    ref_p, ker_p = clone_params(base), clone_params(base)
    ref = build(name, 0, ref_p, "torch")
    ker = build(name, 0, ker_p, backend)
    run_side_by_side([ref, ker], [ref_p, ker_p], steps=3)
    tol = dict(rtol=1.6e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=2e-3, atol=1e-3)
    assert_same(ref, ref_p, ker, ker_p, keys(ref), **tol)


@pytest.mark.parametrize("device,backend", KERNEL_DEVICE_BACKENDS)
@pytest.mark.parametrize("name", list(ZOO))
def test_many_tensors_mixed_dtypes_groups(device, backend, name):
    shapes = [(3 + i % 17, 1 + i % 5) for i in range(120)]
    base = make_params(shapes, device=device)
    ref_p, ker_p = clone_params(base), clone_params(base)
    cls, cfgs = ZOO[name]
    groups = lambda ps: [{"params": ps[:60]}, {"params": ps[60:], "lr": cfgs[0]["lr"] * 0.5}]  # noqa: E731
    ref = cls(groups(ref_p), backend="torch", **cfgs[0])
    ker = cls(groups(ker_p), backend=backend, **cfgs[0])
    run_side_by_side([ref, ker], [ref_p, ker_p], steps=3)
    assert_same(ref, ref_p, ker, ker_p, keys(ref), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("name", list(ZOO))
def test_stochastic_rounding_bit_exact_across_backends(device, backend, name):
    """bf16 params with stochastic_rounding=True: every backend produces the same bits as the
    reference's rounding (fastopt.reference.rounding), seeded and reproducible."""
    base = make_params([(1000,), (33, 7)], dtype=torch.bfloat16, device=device)
    ref_p, ker_p = clone_params(base), clone_params(base)
    ref = build(name, 0, ref_p, "torch", stochastic_rounding=True, seed=1234)
    ker = build(name, 0, ker_p, backend, stochastic_rounding=True, seed=1234)
    run_side_by_side([ref, ker], [ref_p, ker_p], steps=3)
    for a, b in zip(ref_p, ker_p):
        ia, ib = a.detach().cpu().view(torch.int16).int(), b.detach().cpu().view(torch.int16).int()
        if name in REDUCING:
            # The per-tensor sums (trust ratio, projection) are added in a different order by each
            # backend, so the fp32 values may differ in the last bit and then round to the other
            # neighbour: allow that, one bf16 ulp, for a few elements.
            assert (ia - ib).abs().max() <= 1 and (ia != ib).float().mean() < 0.02
        else:
            assert torch.equal(ia, ib)
    # and it is not round-to-nearest: some values differ from an RNE run
    rne_p = clone_params(base)
    rne = build(name, 0, rne_p, backend)
    set_grads([rne_p], 100)
    for k in range(3):
        set_grads([rne_p], 100 + k)
        rne.step()
    assert any(not torch.equal(a, b) for a, b in zip(rne_p, ker_p))


def test_stochastic_rounding_is_unbiased():
    from fastopt.reference.rounding import bf16_stochastic

    x = torch.full((200000,), 1.0 + 2.0 ** -10)  # 1/8 of the way between two bf16 values
    r = bf16_stochastic(x, seed=7, index=0, step=1).float()
    lo, hi = 1.0, 1.0 + 2.0 ** -7
    assert set(r.unique().tolist()) == {lo, hi}
    frac_hi = (r == hi).float().mean().item()
    assert abs(frac_hi - 0.125) < 0.005  # binomial sd ~ 0.0007
    assert abs(r.mean().item() - x[0].item()) < 5e-5
    inf = bf16_stochastic(torch.tensor([float("inf"), float("-inf"), float("nan")]), 1, 0, 1).float()
    assert inf[0] == float("inf") and inf[1] == float("-inf") and inf[2].isnan()


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("name", list(ZOO))
def test_master_weights_equal_fp32_run(device, backend, name):
    """master_weights=True on bf16 params steps an fp32 copy: it equals an fp32 optimizer fed the
    same (bf16) gradients, and the bf16 params are that copy rounded to nearest."""
    base = make_params([(97,), (13, 31)], dtype=torch.bfloat16, device=device)
    lo_p = clone_params(base)
    fp_p = clone_params([b.float() for b in base])
    lo = build(name, 0, lo_p, backend, master_weights=True)
    fp = build(name, 0, fp_p, backend)
    for k in range(3):
        set_grads([lo_p], 100 + k)
        for a, b in zip(lo_p, fp_p):
            b.grad = a.grad.float()
        lo.step()
        fp.step()
    for a, b in zip(lo_p, fp_p):
        torch.testing.assert_close(lo.state[a]["master_param"], b.detach(), rtol=1e-6, atol=1e-7)
        assert torch.equal(a.detach(), b.detach().bfloat16())
        for key in keys(lo):
            assert lo.state[a][key].dtype == torch.float32


@pytest.mark.parametrize("name", list(ZOO))
def test_master_weights_survive_state_dict_round_trip(name):
    """torch.optim casts floating states to the param dtype on load; the fp32 master copy and the fp32
    states that go with it must come back fp32 (else the extra precision is silently lost)."""
    base = make_params([(97,), (13, 31)], dtype=torch.bfloat16)
    a_p, b_p = clone_params(base), clone_params(base)
    a = build(name, 0, a_p, "cpu", master_weights=True)
    run_side_by_side([a], [a_p], steps=2)
    b = build(name, 0, b_p, "cpu", master_weights=True)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    for pa, pb in zip(a_p, b_p):
        for key, value in a.state[pa].items():
            assert b.state[pb][key].dtype == value.dtype, key
            assert torch.equal(b.state[pb][key], value), key
    for x, y in zip(a_p, b_p):
        y.data.copy_(x.data)
    run_side_by_side([a, b], [a_p, b_p], steps=2, seed0=300)
    assert_same(a, a_p, b, b_p, keys(a) + ("master_param",), rtol=0, atol=0)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("name", list(ZOO))
def test_amp_found_inf_and_grad_scale(device, backend, name):
    base = make_params([(97,), (13, 31)], device=device)
    a_p, b_p = clone_params(base), clone_params(base)
    a = build(name, 0, a_p, backend)
    b = build(name, 0, b_p, backend)
    set_grads([a_p, b_p], 5)
    for p in b_p:
        p.grad = p.grad * 1024.0
    a.step()
    b.grad_scale = torch.tensor(1024.0, device=device)
    b.found_inf = torch.tensor(0.0, device=device)
    b.step()
    for x, y in zip(a_p, b_p):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
    before = [p.detach().clone() for p in b_p]
    snapshot = copy.deepcopy(b.state_dict())
    b.found_inf = torch.tensor(1.0, device=device)
    b.step()
    for x, y in zip(before, b_p):
        assert torch.equal(x, y)
    after = b.state_dict()
    for k, st in snapshot["state"].items():
        for key, v in st.items():
            assert torch.equal(v, after["state"][k][key])


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("name", list(ZOO))
def test_state_dict_round_trip(device, backend, name):
    base = make_params([(97,), (13, 31)], device=device)
    a_p, b_p = clone_params(base), clone_params(base)
    a = build(name, 0, a_p, backend)
    run_side_by_side([a], [a_p], steps=2)
    for x, y in zip(a_p, b_p):
        y.data.copy_(x.data)
    b = build(name, 0, b_p, backend)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    run_side_by_side([a, b], [a_p, b_p], steps=2, seed0=300)
    assert_same(a, a_p, b, b_p, keys(a), rtol=0, atol=0)


@pytest.mark.parametrize("name", list(ZOO))
def test_invalid_hyperparameters_touch_nothing(name):
    cls, cfgs = ZOO[name]
    with pytest.raises(ValueError):
        cls([torch.nn.Parameter(torch.zeros(3))], **{**cfgs[0], "lr": -1.0})
    p = torch.nn.Parameter(torch.ones(4))
    opt = cls([p], **cfgs[0])
    before = copy.deepcopy(opt.state_dict()["state"])  # (empty, or Adagrad's constructor-made sum and step)
    opt.param_groups[0]["lr"] = -1.0
    p.grad = torch.ones(4)
    with pytest.raises(ValueError):
        opt.step()
    after = opt.state_dict()["state"]
    assert after.keys() == before.keys() and torch.equal(p.detach(), torch.ones(4))
    for k, v in before.items():
        assert v.keys() == after[k].keys() and all(torch.equal(v[n], after[k][n]) for n in v), k
    with pytest.raises(ValueError, match="stochastic_rounding or master_weights"):
        cls([p], **cfgs[0], stochastic_rounding=True, master_weights=True)


def test_native_elementwise_abi_checks():
    from fastopt import _backend

    native = _backend.native()
    p = torch.zeros(8)
    step = torch.zeros(())
    base = dict(op="lion", ptrs=[p.data_ptr()] * 3, numels=[8] * 3, steps=[step.data_ptr()], dtype=0,
                hyper=[0.9, 0.99, 0.0], flags=1, lr=1e-3, lr_ptr=0, grad_scale_ptr=0, found_inf_ptr=0,
                maximize=False, phase=0, rows=[], row_coef_ptr=0, reduce_out_ptr=0, seed=0, stochastic=False,
                sparse_mask=[], sparse_out=[], sparse_numels=[], sparse_lambda=0.0, sparse_beta=0.0)
    bad = [
        (dict(numels=[8]), "one numel per tensor"),
        (dict(numels=[8, 8, 7]), "list 2 has 7 elements, its param 8"),
        (dict(sparse_mask=[p.data_ptr()], sparse_numels=[4]), "sparse mask or output must have its param's numel"),
        (dict(op="nope"), "unknown elementwise op"),
        (dict(ptrs=[p.data_ptr()] * 2), "pointer table|tensor lists"),
        (dict(steps=[step.data_ptr()] * 2), "one step counter"),
        (dict(hyper=[0.0] * 17), "too many hyperparameters"),
        (dict(phase=1, reduce_out_ptr=p.data_ptr()), "no reduce phase"),
        (dict(rows=[3]), "row count"),
        (dict(stochastic=True), "bf16"),
        (dict(sparse_mask=[p.data_ptr()] * 2, sparse_numels=[8, 8]), "one sparse mask per tensor"),
        (dict(sparse_out=[p.data_ptr()]), "sparse_out needs sparse_mask"),
        (dict(sparse_mask=[p.data_ptr()], sparse_out=[p.data_ptr()] * 2, sparse_numels=[8] * 3),
         "one sparse output per tensor"),
        (dict(sparse_mask=[p.data_ptr()], sparse_numels=[8], sparse_lambda=-1.0), "lambda must be >= 0"),
        (dict(sparse_mask=[p.data_ptr()], sparse_numels=[8], sparse_beta=1.5), "beta in"),
        (dict(sparse_mask=[0], sparse_numels=[8]), "null sparse mask"),
    ]
    for change, match in bad:
        with pytest.raises(ValueError, match=match):
            native.elementwise_cpu(*{**base, **change}.values())
    assert float(step) == 0.0 and torch.equal(p, torch.zeros(8))

