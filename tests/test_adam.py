"""fastopt.Adam / fastopt.AdamW: reference vs torch.optim, every backend vs the reference, state dicts,
AMP, odd shapes, dtypes, and errors that leave everything untouched."""
import copy

import pytest
import torch

import fastopt
from conftest import DEVICE_BACKENDS, KERNEL_DEVICE_BACKENDS
from helpers import ODD_SHAPES, assert_states_close, clone_params, make_params, run_side_by_side, set_grads

FP32 = dict(rtol=1e-5, atol=1e-6)
# Kernels and reference both compute in fp32 and round to the storage dtype once per step; the
# tolerance covers an occasional one-ulp difference of the stored value.
LOWP = {torch.bfloat16: dict(rtol=1.6e-2, atol=1e-3), torch.float16: dict(rtol=2e-3, atol=1e-4)}

CONFIGS = [
    dict(cls="AdamW", lr=1e-2, weight_decay=1e-2),
    dict(cls="AdamW", lr=3e-3, weight_decay=0.1, amsgrad=True),
    dict(cls="AdamW", lr=1e-2, betas=(0.8, 0.95), eps=1e-6, maximize=True),
    dict(cls="Adam", lr=1e-2, weight_decay=0.0),
    dict(cls="Adam", lr=1e-2, weight_decay=0.05, amsgrad=True),
    dict(cls="Adam", lr=1e-2, weight_decay=0.05, decoupled_weight_decay=True),
]


def _make(cls_name, module, params, cfg, **extra):
    kwargs = {k: v for k, v in cfg.items() if k != "cls"}
    return getattr(module, cls_name)(params, **kwargs, **extra)


def _ids(cfgs):
    return ["-".join(f"{k}={v}" for k, v in c.items()) for c in cfgs]


@pytest.mark.parametrize("cfg", CONFIGS, ids=_ids(CONFIGS))
def test_reference_matches_torch_optim(cfg):
    """The torch backend (the reference) follows torch.optim's for-loop, foreach and fused AdamW."""
    base = make_params(ODD_SHAPES)
    ours = clone_params(base)
    theirs = {impl: clone_params(base) for impl in ("for-loop", "foreach", "fused")}
    flags = {"for-loop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}
    opts = [_make(cfg["cls"], fastopt, ours, cfg, backend="torch")]
    opts += [_make(cfg["cls"], torch.optim, theirs[i], cfg, **flags[i]) for i in theirs]
    run_side_by_side(opts, [ours, *theirs.values()], steps=8)
    keys = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if cfg.get("amsgrad") else ())
    for (impl, params), opt in zip(theirs.items(), opts[1:]):
        assert_states_close(opts[0], ours, opt, params, rtol=2e-6, atol=1e-7, keys=keys)


@pytest.mark.parametrize("device,backend", KERNEL_DEVICE_BACKENDS)
@pytest.mark.parametrize("cfg", CONFIGS, ids=_ids(CONFIGS))
def test_backend_matches_reference_fp32(device, backend, cfg):
    base = make_params(ODD_SHAPES, device=device)
    ref_params, params = clone_params(base), clone_params(base)
    ref = _make(cfg["cls"], fastopt, ref_params, cfg, backend="torch")
    opt = _make(cfg["cls"], fastopt, params, cfg, backend=backend)
    run_side_by_side([ref, opt], [ref_params, params], steps=6)
    keys = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if cfg.get("amsgrad") else ())
    assert_states_close(ref, ref_params, opt, params, keys=keys, **FP32)
    # and the parameters really moved
    assert any((p - b).abs().max() > 1e-3 for p, b in zip(params, base) if p.numel())


@pytest.mark.parametrize("device,backend", KERNEL_DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_backend_matches_reference_low_precision(device, backend, dtype, amsgrad):
    base = make_params(ODD_SHAPES, dtype=dtype, device=device)
    ref_params, params = clone_params(base), clone_params(base)
    ref = fastopt.AdamW(ref_params, lr=1e-2, amsgrad=amsgrad, backend="torch")
    opt = fastopt.AdamW(params, lr=1e-2, amsgrad=amsgrad, backend=backend)
    run_side_by_side([ref, opt], [ref_params, params], steps=4)
    for p in params:
        assert p.dtype == dtype and opt.state[p]["exp_avg"].dtype == dtype
    assert_states_close(ref, ref_params, opt, params, **LOWP[dtype])


@pytest.mark.parametrize("device,backend", KERNEL_DEVICE_BACKENDS)
def test_many_small_and_few_large_tensors(device, backend):
    """Hundreds of tensors in one call: the launchers' metadata splitting and chunking."""
    gen = torch.Generator().manual_seed(3)
    shapes = [(int(n),) for n in torch.randint(1, 300, (257,), generator=gen)]
    shapes[::64] = [(70001,), (131072,), (3, 65536), (65536 + 513,), (1,)]
    base = make_params(shapes, device=device)
    ref_params, params = clone_params(base), clone_params(base)
    ref = fastopt.AdamW(ref_params, lr=1e-2, backend="torch")
    opt = fastopt.AdamW(params, lr=1e-2, backend=backend)
    run_side_by_side([ref, opt], [ref_params, params], steps=2)
    assert_states_close(ref, ref_params, opt, params, **FP32)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_mixed_dtypes_and_param_groups(device, backend):
    """One group mixing fp32/bf16/fp64 params (fp64 runs the torch path under auto) plus a second
    group with its own hyperparameters; compared with the reference run group by group."""
    def groups(ps):
        return [dict(params=ps[:3], lr=1e-2), dict(params=ps[3:], lr=5e-3, weight_decay=0.2, amsgrad=True)]
    base = [t.to(device) for t in (torch.randn(33), torch.randn(10, 3).bfloat16(), torch.randn(5).double(),
                                   torch.randn(65), torch.randn(4, 4).bfloat16())]
    ref_params, params = clone_params(base), clone_params(base)
    ref = fastopt.AdamW(groups(ref_params), backend="torch")
    kernel_backend = "auto" if backend == "torch" else backend
    opt = fastopt.AdamW(groups(params), backend=kernel_backend) if backend == "torch" else None
    if opt is None:
        # an explicit kernel backend has no fp64 kernel: put the fp64 param in a torch-backend group
        g = groups(params)
        g.insert(1, dict(params=[g[0]["params"].pop()], lr=1e-2, backend="torch"))
        opt = fastopt.AdamW(g, backend=backend)
    run_side_by_side([ref, opt], [ref_params, params], steps=3)
    for a, b in zip(ref_params, params):
        tol = LOWP[torch.bfloat16] if a.dtype == torch.bfloat16 else FP32
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_lr_as_tensor_and_capturable(device, backend):
    base = make_params(ODD_SHAPES[:5], device=device)
    ref_params, params = clone_params(base), clone_params(base)
    ref = fastopt.AdamW(ref_params, lr=2e-2, backend="torch")
    lr = torch.tensor(2e-2, device=device)
    opt = fastopt.AdamW(params, lr=lr, capturable=True, backend=backend)
    run_side_by_side([ref, opt], [ref_params, params], steps=2)
    lr.fill_(5e-3)  # changing the tensor changes the next step without touching the optimizer
    ref.param_groups[0]["lr"] = 5e-3
    run_side_by_side([ref, opt], [ref_params, params], steps=2, seed0=7)
    assert_states_close(ref, ref_params, opt, params, **FP32)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("amsgrad", [False, True])
def test_state_dict_round_trips_with_torch(device, backend, amsgrad):
    """Save mid-run from fastopt, load into torch.optim.AdamW (and back): the runs continue exactly
    as one uninterrupted run of either."""
    base = make_params(ODD_SHAPES, device=device)
    straight = clone_params(base)
    opt_straight = fastopt.AdamW(straight, lr=1e-2, amsgrad=amsgrad, backend=backend)
    run_side_by_side([opt_straight], [straight], steps=6)

    a = clone_params(base)
    opt_a = fastopt.AdamW(a, lr=1e-2, amsgrad=amsgrad, backend=backend)
    run_side_by_side([opt_a], [a], steps=3)
    b = clone_params(a)
    opt_b = torch.optim.AdamW(b, lr=1e-2, amsgrad=amsgrad)
    # deepcopy: like torch.optim, load_state_dict keeps the given tensors when device and dtype match
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    assert opt_b.param_groups[0]["decoupled_weight_decay"] is True
    c = clone_params(a)
    opt_c = fastopt.AdamW(c, lr=1e-2, amsgrad=amsgrad, backend=backend)
    opt_c.load_state_dict(copy.deepcopy(opt_b.state_dict()))  # torch -> fastopt
    for p in c:
        assert opt_c.state[p]["step"].device == p.device and opt_c.state[p]["step"].dtype == torch.float32
    assert opt_c.param_groups[0]["backend"] == backend
    # continue: the fastopt-loaded run with the same gradients as the straight run's last 3 steps
    for k in range(3):
        set_grads([c, b], 100 + 3 + k)
        opt_c.step()
        opt_b.step()
    keys = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ())
    assert_states_close(opt_straight, straight, opt_c, c, keys=keys, **FP32)
    assert_states_close(opt_straight, straight, opt_b, b, keys=keys, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_state_dict_save_load_files(tmp_path, device, backend):
    params = clone_params(make_params([(17,), (4, 5)], device=device))
    opt = fastopt.AdamW(params, lr=1e-2, backend=backend)
    run_side_by_side([opt], [params], steps=2)
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    params2 = clone_params(params)
    opt2 = fastopt.AdamW(params2, lr=1e-2, backend=backend)
    opt2.load_state_dict(torch.load(tmp_path / "opt.pt"))
    run_side_by_side([opt, opt2], [params, params2], steps=2)
    assert_states_close(opt, params, opt2, params2, rtol=0, atol=0)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_amp_grad_scaler(device, backend):
    """torch.amp.GradScaler drives fastopt like torch's fused AdamW: grads unscaled in the kernel,
    and a step with an inf gradient changes nothing (params, states, step counters)."""
    if device == "cpu" and not hasattr(torch, "_amp_foreach_non_finite_check_and_unscale_"):
        pytest.skip("this torch has no CPU GradScaler")
    base = make_params([(31,), (8, 9)], device=device)
    ours, theirs = clone_params(base), clone_params(base)
    opt = fastopt.AdamW(ours, lr=1e-2, backend=backend)
    ref = torch.optim.AdamW(theirs, lr=1e-2, fused=True) if device == "cuda" else torch.optim.AdamW(theirs, lr=1e-2)
    scalers = [torch.amp.GradScaler(device, init_scale=1024.0) for _ in range(2)]
    for scaler in scalers:  # what scaler.scale(loss) does first in a training loop: create the scale
        scaler.scale(torch.ones((), device=device))
    for k in range(4):
        set_grads([ours, theirs], 50 + k, scale=1024.0)
        if k == 2:
            for p in (ours[0], theirs[0]):
                p.grad[3] = float("inf")
        before = [(p.detach().clone(), {k2: v.clone() for k2, v in opt.state[p].items()}) for p in ours] if k == 2 else None
        for scaler, o in zip(scalers, (opt, ref)):
            scaler.step(o)
            scaler.update()
        if before is not None:
            for p, (p0, s0) in zip(ours, before):
                assert torch.equal(p.detach(), p0)
                for key, val in s0.items():
                    assert torch.equal(opt.state[p][key], val), key
    assert scalers[0].get_scale() == scalers[1].get_scale() == 512.0
    assert_states_close(ref, theirs, opt, ours, **FP32)


@pytest.mark.parametrize("device,backend", KERNEL_DEVICE_BACKENDS)
def test_non_contiguous_dense_params(device, backend):
    """Transposed (dense, permuted) parameters run in the kernels; strided ones fall back under auto
    and raise under an explicit kernel backend."""
    t = torch.randn(6, 9, device=device).t()  # dense, not contiguous
    base = [t, torch.randn(2, 3, 4, device=device).permute(2, 0, 1)]
    ref_params, params = clone_params(base), clone_params(base)
    for p in params:
        assert not p.is_contiguous()
    ref = fastopt.AdamW(ref_params, lr=1e-2, backend="torch")
    opt = fastopt.AdamW(params, lr=1e-2, backend=backend)
    run_side_by_side([ref, opt], [ref_params, params], steps=3)
    assert_states_close(ref, ref_params, opt, params, **FP32)

    strided = torch.nn.Parameter(torch.randn(4, 10, device=device)[:, ::2])
    strided.grad = torch.randn_like(strided)
    with pytest.raises(fastopt.BackendUnavailableError, match="non-dense"):
        fastopt.AdamW([strided], backend=backend).step()
    opt_auto = fastopt.AdamW([strided], lr=1e-2)
    before = strided.detach().clone()
    opt_auto.step()
    assert not torch.equal(before, strided.detach())


# ---------------------------------------------------------------------------------------------
# Errors: raised before anything is written.
# ---------------------------------------------------------------------------------------------

def _snapshot(params, opt):
    return [p.detach().clone() for p in params], {id(p): {k: v.clone() for k, v in opt.state[p].items()}
                                                  for p in params if p in opt.state}


def _assert_unchanged(params, opt, snap):
    values, states = snap
    for p, v in zip(params, values):
        assert torch.equal(p.detach(), v)
    assert {id(p) for p in params if opt.state.get(p)} == set(states)
    for p in params:
        for k, v in states.get(id(p), {}).items():
            assert torch.equal(opt.state[p][k], v)


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=-1.0), "Invalid learning rate"),
    (dict(eps=-1e-8), "Invalid epsilon"),
    (dict(betas=(1.0, 0.999)), "beta parameter at index 0"),
    (dict(betas=(0.9, -0.1)), "beta parameter at index 1"),
    (dict(weight_decay=-0.1), "Invalid weight_decay"),
    (dict(backend="gpu"), "unknown backend"),
])
def test_invalid_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastopt.AdamW([torch.nn.Parameter(torch.randn(3))], **kwargs)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_bad_input_touches_nothing(device, backend):
    good = clone_params(make_params([(5,), (7,)], device=device))
    opt = fastopt.AdamW(good, lr=1e-2, backend=backend)
    run_side_by_side([opt], [good], steps=1)
    # a new, bad parameter group after a good one: nothing of the good one may move either
    bad_cases = []
    sparse = torch.nn.Parameter(torch.randn(4, 3, device=device))
    sparse.grad = torch.randn(4, 3, device=device).to_sparse()
    bad_cases.append((sparse, RuntimeError, "sparse gradients"))
    cplx = torch.nn.Parameter(torch.randn(4, dtype=torch.complex64, device=device))
    cplx.grad = torch.randn_like(cplx)
    bad_cases.append((cplx, TypeError, "complex"))
    for bad, exc, match in bad_cases:
        opt.add_param_group(dict(params=[bad]))
        set_grads([good], 9)
        snap = _snapshot(good, opt)
        with pytest.raises(exc, match=match):
            opt.step()
        _assert_unchanged(good, opt, snap)
        assert bad not in opt.state
        opt.param_groups.pop()
    # an invalid hyperparameter set on a group after construction
    opt.param_groups[0]["lr"] = -1.0
    snap = _snapshot(good, opt)
    with pytest.raises(ValueError, match="Invalid learning rate"):
        opt.step()
    _assert_unchanged(good, opt, snap)


def test_unavailable_backend_touches_nothing():
    params = clone_params(make_params([(5,)]))
    params[0].grad = torch.randn(5)
    opt = fastopt.AdamW(params, backend="cuda")
    with pytest.raises(fastopt.BackendUnavailableError, match="backend 'cuda'"):
        opt.step()
    assert not opt.state
    double = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    double.grad = torch.randn(3, dtype=torch.float64)
    with pytest.raises(fastopt.BackendUnavailableError, match="float64"):
        fastopt.AdamW([double], backend="cpu").step()


def test_differentiable_rejected():
    with pytest.raises(NotImplementedError, match="differentiable"):
        fastopt.AdamW([torch.nn.Parameter(torch.randn(2))], differentiable=True)


def test_functional_list_errors():
    F = fastopt.functional
    p, g, m, v = (torch.randn(4) for _ in range(4))
    step = torch.zeros(())
    hyper = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    with pytest.raises(ValueError, match="one device"):
        F.adam([p], [torch.randn(4, device="meta")], [m], [v], [], [step], **hyper)
    with pytest.raises(ValueError, match="one dtype"):
        F.adam([p, torch.randn(3, dtype=torch.float16)], [g, g[:3].half()], [m, m[:3]], [v, v[:3]], [],
               [step, step.clone()], **hyper)
    with pytest.raises(ValueError, match="shape"):
        F.adam([p], [torch.randn(5)], [m], [v], [], [step], **hyper)
    with pytest.raises(ValueError, match="exp_avgs has 0 tensors"):
        F.adam([p], [g], [], [v], [], [step], **hyper)
    with pytest.raises(ValueError, match="state_steps"):
        F.adam([p], [g], [m], [v], [], [torch.zeros((), dtype=torch.int64)], **hyper)
    with pytest.raises(RuntimeError, match="sparse"):
        F.adam([p], [g.to_sparse()], [m], [v], [], [step], **hyper)
    before = [t.clone() for t in (p, g, m, v, step)]
    for t, b in zip((p, g, m, v, step), before):
        assert torch.equal(t, b)


@pytest.mark.skipif(not fastopt._backend.has_cpu(), reason="fastopt._C not built")
def test_native_abi_checks():
    """The C++ layer re-checks what reaches it and raises ValueError (std::invalid_argument)."""
    C = fastopt._backend.native()
    p = torch.zeros(4)
    step = torch.zeros(())
    good = ([p.data_ptr()] * 4, [4] * 4, [step.data_ptr()], 0, 1e-3, 0, 0.9, 0.999, 1e-8, 0.0, True, False, False, 0, 0)
    C.adam_cpu(*good)
    assert float(step) == 1.0
    with pytest.raises(ValueError, match="pointer table has the wrong length"):
        C.adam_cpu([p.data_ptr()] * 3, *good[1:])
    with pytest.raises(ValueError, match="dtype code"):
        C.adam_cpu(*good[:3], 7, *good[4:])
    with pytest.raises(ValueError, match="beta1"):
        C.adam_cpu(*good[:6], 1.5, *good[7:])
    with pytest.raises(ValueError, match="null"):
        C.adam_cpu([0] * 4, *good[1:])
    with pytest.raises(ValueError, match="pointer table"):  # amsgrad needs a fifth list
        C.adam_cpu(*good[:11], True, *good[12:])
    with pytest.raises(ValueError, match="one numel per tensor"):  # every tensor's numel travels
        C.adam_cpu(good[0], [4], *good[2:])
    with pytest.raises(ValueError, match="tensor 0 of list 3 has 2 elements, its param 4"):
        C.adam_cpu(good[0], [4, 4, 4, 2], *good[2:])
    assert float(step) == 1.0


@pytest.mark.parametrize("device,backend", KERNEL_DEVICE_BACKENDS)
def test_custom_op_opcheck(device, backend):
    """fastopt::adam_step_ is a well-formed custom op (schema, fake impl, autograd registration)."""
    params, grads, ms, vs = ([torch.randn(s, device=device) for s in [(5,), (3, 4)]] for _ in range(4))
    vs = [v.abs() for v in vs]
    steps = [torch.zeros((), device=device) for _ in params]
    args = (params, grads, ms, vs, [], steps, 1e-3, None, 0.9, 0.999, 1e-8, 0.01, True, False, False, None, None,
            backend)
    torch.library.opcheck(fastopt._ops.adam_step_, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
