"""fastopt.SAM (SAM / ASAM around a base optimizer) against pytorch_optimizer.SAM (4.1.0), step for step.

Every backend of the first step (torch reference, cpu kernels, Triton under the interpreter) around
fastopt's AdamW / SGD and around torch.optim's, SAM and ASAM, rho per group, the two-call and the
closure forms, use_gc; the exact restore; the state_dict (round trip, and pytorch_optimizer's SAM
checkpoint loaded and continued); GradScaler (scaled first gradients, scaler.step driving the second
step, an overflow in either pass); odd shapes and layouts; bad input; DDP with two gloo ranks (where
``no_sync`` goes, both ranks identical, the single-process equivalents).
"""
import copy
import datetime
import os
import pickle
import socket

import pytest
import torch

import fastopt
from fastopt import _backend
from fastopt.reference.sam import sam_first_step_reference
from conftest import DEVICE_BACKENDS  # noqa: E402

po = pytest.importorskip("pytorch_optimizer")

# on CPU tensors: the reference, the cpu kernels, Triton under the interpreter, and the CUDA kernels through
# the CUDA-on-CPU layer (PYTHONPATH=tests python -m pytest -p _cuda_on_cpu tests/test_sam.py -k cuda)
BACKENDS = [b for b in ("torch", "cpu", "triton", "cuda") if b in _backend.available_backends("cpu")]
IN, HID, OUT = 7, 13, 3


def _model(seed=1, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(IN, HID), torch.nn.Tanh(), torch.nn.Linear(HID, OUT)).to(dtype)


def _batch(i, n=16):
    gen = torch.Generator().manual_seed(100 + i)
    return torch.randn(n, IN, generator=gen), torch.randn(n, OUT, generator=gen)


def _loss(model, i):
    x, y = _batch(i)
    return torch.nn.functional.mse_loss(model(x), y)


def _train(model, opt, steps=4, closure=False, start=0):
    """SAM steps on batches start.. (davda54's two calls, or step(closure)); the weights after each."""
    trace = []
    for i in range(start, start + steps):
        _loss(model, i).backward()
        if closure:
            def c(i=i):
                loss = _loss(model, i)
                loss.backward()
                return loss
            opt.step(c)
            opt.zero_grad()
        else:
            opt.first_step(zero_grad=True)
            _loss(model, i).backward()
            opt.second_step(zero_grad=True)
        trace.append([p.detach().clone() for p in model.parameters()])
    return trace


def _assert_traces(got, want, rtol=2e-6, atol=2e-7):
    for step, (a, b) in enumerate(zip(got, want)):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=lambda m: f"step {step}: {m}")


def _groups(model, rhos, adaptive):
    ps = list(model.parameters())
    return [{"params": ps[:2], "rho": rhos[0], "adaptive": adaptive[0]},
            {"params": ps[2:], "rho": rhos[1], "adaptive": adaptive[1]}]


# -- step for step against pytorch_optimizer ------------------------------------------------------------

BASES = {  # name: (fastopt's base, torch.optim's base, arguments)
    "adamw": (fastopt.AdamW, torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2)),
    "sgd": (getattr(fastopt, "SGD", None), torch.optim.SGD, dict(lr=5e-2, momentum=0.9)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("base", sorted(BASES))
def test_matches_pytorch_optimizer_step_for_step(backend, adaptive, base):
    ours_cls, torch_cls, kw = BASES[base]
    if ours_cls is None:
        pytest.skip("fastopt.SGD is not there")
    rho = 0.5 if adaptive else 0.1
    want = _train(m := _model(), po.SAM(m.parameters(), torch_cls, rho=rho, adaptive=adaptive, **kw))
    got = _train(m := _model(), fastopt.SAM(m.parameters(), ours_cls, rho=rho, adaptive=adaptive, backend=backend,
                                            **kw))
    _assert_traces(got, want)
    # around torch.optim's own class (the perturbation fused, the base step torch's)
    got = _train(m := _model(), fastopt.SAM(m.parameters(), torch_cls, rho=rho, adaptive=adaptive, backend=backend,
                                            **kw))
    _assert_traces(got, want)


GPU_BACKENDS = [(d, b) for d, b in DEVICE_BACKENDS if d == "cuda"]


@pytest.mark.skipif(not GPU_BACKENDS, reason="needs a GPU")
@pytest.mark.parametrize("device,backend", GPU_BACKENDS)
def test_on_the_gpu_matches_pytorch_optimizer_on_the_cpu(device, backend):
    """SAM and ASAM around fastopt.AdamW on CUDA tensors (the cuda kernels, real Triton) against
    pytorch_optimizer's SAM on the CPU."""
    for adaptive in (False, True):
        want = _train(m := _model(), po.SAM(m.parameters(), torch.optim.AdamW, rho=0.2, adaptive=adaptive, lr=1e-2))
        m = _model().to(device)
        opt = fastopt.SAM(m.parameters(), fastopt.AdamW, rho=0.2, adaptive=adaptive, lr=1e-2, backend=backend)
        for i in range(len(want)):
            x, y = (t.to(device) for t in _batch(i))
            torch.nn.functional.mse_loss(m(x), y).backward()
            opt.first_step(zero_grad=True)
            torch.nn.functional.mse_loss(m(x), y).backward()
            opt.second_step(zero_grad=True)
        for p, q in zip(m.parameters(), want[-1]):
            torch.testing.assert_close(p.detach().cpu(), q, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rho_and_adaptive_per_group_closure_form(backend):
    """Two groups with their own rho and adaptive (one global norm over both); the closure form; the
    closure's loss returned."""
    rhos, adaptive = (0.05, 0.7), (False, True)
    want = _train(m := _model(), po.SAM(_groups(m, rhos, adaptive), torch.optim.AdamW, lr=1e-2), closure=True)
    opt = fastopt.SAM(_groups(m := _model(), rhos, adaptive), fastopt.AdamW, lr=1e-2, backend=backend)
    got = _train(m, opt, closure=True)
    _assert_traces(got, want)
    assert [g["rho"] for g in opt.param_groups] == list(rhos)
    _loss(m, 0).backward()
    loss = opt.step(lambda: (lambda l_: (l_.backward(), l_)[1])(_loss(m, 0)))
    assert torch.is_tensor(loss) and loss.dim() == 0


def test_use_gc_and_perturb_eps_match_pytorch_optimizer():
    kw = dict(rho=0.2, use_gc=True, perturb_eps=1e-3, lr=1e-2)
    want = _train(m := _model(), po.SAM(m.parameters(), torch.optim.AdamW, **kw))
    for backend in ("torch", "cpu"):
        got = _train(m := _model(), fastopt.SAM(m.parameters(), fastopt.AdamW, backend=backend, **kw))
        _assert_traces(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_step_is_the_formula_and_the_restore_is_exact(backend):
    """w + rho g / (||g|| + eps) (ASAM: w^2 g / ||w g||) against the formula in fp64; after second_step
    with a base that does nothing (SGD, lr 0) the weights are the original bits."""
    shapes = [(0,), (1,), (7,), (31, 5), (2, 3, 4)]
    for adaptive in (False, True):
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
        for p in ps:
            p.grad = torch.randn(p.shape)
        orig = [p.detach().clone() for p in ps]
        opt = fastopt.SAM(ps, torch.optim.SGD, rho=0.3, adaptive=adaptive, lr=0.0, backend=backend)
        opt.first_step()
        w64 = [o.double() for o in orig]
        a = [w.abs() if adaptive else torch.ones_like(w) for w in w64]
        norm = sum(float((x * p.grad.double()).square().sum()) for x, p in zip(a, ps)) ** 0.5
        for p, w, x in zip(ps, w64, a):
            want = w + 0.3 * x * x * p.grad.double() / (norm + 1e-12)
            torch.testing.assert_close(p.detach().double(), want, rtol=1e-6, atol=1e-7)
        for p, o in zip(ps, orig):
            assert torch.equal(opt.old_params[p], o)
        opt.second_step()
        for p, o in zip(ps, orig):
            assert torch.equal(p.detach(), o)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_kernels_match_the_reference_on_odd_layouts_and_dtypes(backend):
    """Non-contiguous (transposed, dense) parameters, a gradient with other strides, bf16 and fp16:
    the kernels' first step equals the reference's (the same fp32 math; the norm's summation order)."""
    torch.manual_seed(3)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        base = [torch.randn(5, 9).t(), torch.randn(33), torch.randn(4, 6, 2).permute(2, 0, 1)]
        grads = [torch.randn(9, 5), torch.randn(33), torch.randn(2, 4, 6)]  # contiguous: other strides
        runs = []
        for b in ("torch", backend):
            ps = [torch.nn.Parameter(t.to(dtype)) for t in base]
            for p, g in zip(ps, grads):
                p.grad = g.to(dtype)
            opt = fastopt.SAM(ps, torch.optim.SGD, rho=0.5, adaptive=True, lr=0.0, backend=b)
            opt.first_step()
            runs.append([p.detach().float() for p in ps])
        tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
        for x, y in zip(*runs):
            torch.testing.assert_close(x, y, **tol)


def test_reference_equals_pytorch_optimizer_first_step():
    torch.manual_seed(4)
    ps = [torch.nn.Parameter(torch.randn(s)) for s in ((6, 5), (5,), (1,))]
    for p in ps:
        p.grad = torch.randn(p.shape)
    up = po.SAM([{"params": ps[:2], "adaptive": True}, {"params": ps[2:], "rho": 0.4}], torch.optim.SGD, lr=0.1)
    mine = [p.detach().clone() for p in ps]
    sam_first_step_reference(mine, [p.grad for p in ps], [torch.empty_like(p) for p in ps], [0.05, 0.05, 0.4],
                             [True, True, False])
    up.first_step()
    for p, q in zip(ps, mine):
        assert torch.equal(p.detach(), q)


# -- state_dict -------------------------------------------------------------------------------------------

def test_state_dict_round_trip_and_pytorch_optimizer_checkpoint():
    m = _model()
    opt = fastopt.SAM(m.parameters(), fastopt.AdamW, rho=0.1, lr=1e-2)
    _train(m, opt, steps=2)
    sd = copy.deepcopy(opt.state_dict())  # (as torch.save would: load_state_dict may share the tensors)
    assert "old_p" not in str(list(sd["state"].get(0, {}).keys()))
    assert sd["param_groups"][0]["rho"] == 0.1
    m2 = _model(seed=5)
    m2.load_state_dict(m.state_dict())
    opt2 = fastopt.SAM(m2.parameters(), fastopt.AdamW, rho=0.3, lr=1e-3)
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["rho"] == 0.1 and opt2.param_groups[0]["lr"] == 1e-2
    _assert_traces(_train(m2, opt2, steps=2, start=2), _train(m, opt, steps=2, start=2), rtol=0, atol=0)
    # pytorch_optimizer's SAM around torch AdamW -> fastopt.SAM around fastopt.AdamW, continued alike
    m = _model()
    up = po.SAM(m.parameters(), torch.optim.AdamW, rho=0.1, lr=1e-2)
    _train(m, up, steps=2)
    m3 = _model()
    m3.load_state_dict(m.state_dict())
    ours = fastopt.SAM(m3.parameters(), fastopt.AdamW, rho=0.1, lr=1e-2)
    ours.load_state_dict(copy.deepcopy(up.state_dict()))
    _assert_traces(_train(m3, ours, steps=2, start=2), _train(m, up, steps=2, start=2))
    # a plain base optimizer's checkpoint: its groups take SAM's rho
    plain = fastopt.AdamW(_model().parameters(), lr=1e-2)
    ours = fastopt.SAM(_model().parameters(), fastopt.AdamW, rho=0.2, lr=1e-2)
    ours.load_state_dict(plain.state_dict())
    assert ours.param_groups[0]["rho"] == 0.2 and ours.param_groups[0]["adaptive"] is False


def test_pickle_keeps_the_base_optimizer():
    """pickle / deepcopy keep the base optimizer (torch's Optimizer.__getstate__ alone would drop it): the
    copy steps its own (copied) parameters as the original steps its."""
    m = _model()
    opt = fastopt.SAM(m.parameters(), fastopt.AdamW, rho=0.1, adaptive=True, lr=1e-2)
    _train(m, opt, steps=1)
    twin = pickle.loads(pickle.dumps(opt))
    assert twin.param_groups is twin.base_optimizer.param_groups and twin.state is twin.base_optimizer.state
    assert twin.param_groups[0]["rho"] == 0.1 and twin.param_groups[0]["adaptive"] is True
    for ps, o in ((list(m.parameters()), opt), (twin.param_groups[0]["params"], twin)):
        for k, p in enumerate(ps):
            p.grad = torch.full_like(p, 0.01 * (k + 1))
        o.first_step(zero_grad=False)
        o.second_step()
    for p, q in zip(m.parameters(), twin.param_groups[0]["params"]):
        assert torch.equal(p.detach(), q.detach())


# -- bad input --------------------------------------------------------------------------------------------

def test_bad_input_raises_before_anything_changes():
    ps = list(_model().parameters())
    with pytest.raises(ValueError, match="rho"):
        fastopt.SAM(ps, fastopt.AdamW, rho=-0.1)
    with pytest.raises(ValueError, match="rho"):
        fastopt.SAM(ps, fastopt.AdamW, rho=float("nan"))
    with pytest.raises(ValueError, match="perturb_eps"):
        fastopt.SAM(ps, fastopt.AdamW, perturb_eps=-1.0)
    with pytest.raises(ValueError, match="rho"):
        fastopt.SAM([{"params": ps[:2], "rho": -1.0}, {"params": ps[2:]}], fastopt.AdamW)
    with pytest.raises(TypeError, match="base_optimizer"):
        fastopt.SAM(ps, fastopt.AdamW(ps))  # an instance, not a class
    with pytest.raises(TypeError, match="base_optimizer"):
        fastopt.SAM(ps, lambda params, **kw: torch.optim.SGD(params, lr=0.1))
    with pytest.raises(TypeError, match="base_optimizer"):
        fastopt.SAM(ps, torch.nn.Linear)
    with pytest.raises(TypeError, match="rho"):
        fastopt.SAM(ps, fastopt.AdamW, rho="big")
    with pytest.raises(ValueError, match="unsupported backend|backend"):
        fastopt.SAM(ps, fastopt.AdamW, backend="gpu")
    opt = fastopt.SAM(ps[:2], fastopt.AdamW, lr=1e-2)
    with pytest.raises(ValueError, match="rho"):
        opt.add_param_group({"params": ps[2:], "rho": -0.5})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": ps[2:], "adaptive": True})
    assert opt.param_groups[1]["rho"] == 0.05 and opt.param_groups[1]["adaptive"] is True
    with pytest.raises(ValueError, match="closure"):
        opt.step()
    # a group's rho set negative later: first_step raises before any weight moves
    for p in ps:
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in ps]
    opt.param_groups[1]["rho"] = -2.0
    with pytest.raises(ValueError, match="rho"):
        opt.first_step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(ps, before)) and not opt._pending


# -- AMP --------------------------------------------------------------------------------------------------

def _amp_train(model, opt, scaler, steps=3, inf_at=None):
    for i in range(steps):
        scaler.scale(_loss(model, i)).backward()
        if inf_at == (i, 1):
            next(model.parameters()).grad.view(-1)[0] = float("inf")
        opt.first_step(zero_grad=True)
        scaler.scale(_loss(model, i)).backward()
        if inf_at == (i, 2):
            next(model.parameters()).grad.view(-1)[0] = float("inf")
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()


@pytest.mark.parametrize("base", ["fastopt", "torch"])
def test_grad_scaler_drives_both_steps(base):
    """Scaled first gradients (the direction does not depend on the scale), scaler.step(opt) runs the
    second step with the scaler's grad_scale/found_inf: the run equals one without a scaler; an inf in
    the first or the second gradients skips that step (weights restored exactly, base state untouched)
    and the scaler backs off."""
    cls = fastopt.AdamW if base == "fastopt" else torch.optim.AdamW
    want = _train(m := _model(), fastopt.SAM(m.parameters(), cls, rho=0.1, lr=1e-2), steps=3)
    m = _model()
    opt = fastopt.SAM(m.parameters(), cls, rho=0.1, lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    _amp_train(m, opt, scaler)
    for p, q in zip(m.parameters(), want[-1]):
        torch.testing.assert_close(p.detach(), q, rtol=1e-5, atol=1e-6)
    for where in (1, 2):
        m = _model()
        opt = fastopt.SAM(m.parameters(), cls, rho=0.1, lr=1e-2)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
        _amp_train(m, opt, scaler, steps=1)
        before = [p.detach().clone() for p in m.parameters()]
        steps_before = [float(s["step"]) for s in opt.state.values()]
        _amp_train(m, opt, scaler, steps=1, inf_at=(0, where))
        assert all(torch.equal(p.detach(), b) for p, b in zip(m.parameters(), before)), where
        assert [float(s["step"]) for s in opt.state.values()] == steps_before
        if where == 2:  # (the scaler saw the inf)
            assert scaler.get_scale() == 2.0 ** 11
        assert all(torch.isfinite(p).all() for p in m.parameters())


def test_grad_scaler_closure_form():
    """scaler.step(opt, closure): the same run as the two calls; an inf in the closure's gradients (which
    the scaler has not checked) skips the step."""
    runs = []
    for form in ("two", "closure", "closure-inf"):
        m = _model()
        opt = fastopt.SAM(m.parameters(), fastopt.AdamW, rho=0.1, lr=1e-2)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
        for i in range(3):
            scaler.scale(_loss(m, i)).backward()
            if form == "two":
                opt.first_step(zero_grad=True)
                scaler.scale(_loss(m, i)).backward()
                scaler.step(opt)
            else:
                def c(i=i):
                    loss = _loss(m, i)
                    scaler.scale(loss).backward()
                    if form == "closure-inf" and i == 2:
                        next(m.parameters()).grad.view(-1)[0] = float("inf")
                    return loss
                before = [p.detach().clone() for p in m.parameters()]
                scaler.step(opt, c)
            scaler.update()
            opt.zero_grad()
        runs.append([p.detach().clone() for p in m.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
    assert all(torch.equal(a, b) for a, b in zip(runs[2], before))


def test_nonfinite_first_gradient_perturbs_nothing():
    m = _model()
    opt = fastopt.SAM(m.parameters(), fastopt.AdamW, rho=0.1, lr=1e-2)
    _loss(m, 0).backward()
    next(m.parameters()).grad.view(-1)[3] = float("nan")
    before = [p.detach().clone() for p in m.parameters()]
    opt.first_step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(m.parameters(), before))
    assert float(opt._first_inf) == 1.0


# -- DDP --------------------------------------------------------------------------------------------------

WORLD = 2


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shard(i, rank, world=WORLD):
    x, y = _batch(i, n=8 * world)
    return x[rank * 8:(rank + 1) * 8], y[rank * 8:(rank + 1) * 8]


def _ddp_worker(rank, world, port, out_file):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        results = {}
        for mode in ("no_sync", "sync", "no_sync_backward_only"):
            model = torch.nn.parallel.DistributedDataParallel(_model())
            opt = fastopt.SAM(model.parameters(), fastopt.AdamW, rho=0.1, lr=1e-2, backend="cpu")
            first_grads = []
            for i in range(3):
                x, y = _shard(i, rank, world)
                if mode == "no_sync":  # the forward too: DDP decides at forward time
                    with model.no_sync():
                        torch.nn.functional.mse_loss(model(x), y).backward()
                elif mode == "no_sync_backward_only":  # davda54's README: still all-reduces
                    loss = torch.nn.functional.mse_loss(model(x), y)
                    with model.no_sync():
                        loss.backward()
                else:
                    torch.nn.functional.mse_loss(model(x), y).backward()
                first_grads.append([p.grad.clone() for p in model.parameters()])
                opt.first_step(zero_grad=True)
                torch.nn.functional.mse_loss(model(x), y).backward()
                opt.second_step(zero_grad=True)
            results[mode] = ([p.detach().clone() for p in model.module.parameters()], first_grads)
            del model, opt
        gathered = [None] * world
        dist.all_gather_object(gathered, results)
        if rank == 0:
            torch.save(gathered, out_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not _backend.has_cpu(), reason="needs fastopt._C")
def test_ddp_no_sync_semantics(tmp_path):
    """Two gloo ranks.  First pass under no_sync (forward and backward): each rank perturbs with its own
    gradient; the ranks end identical and equal a single process that, per shard, perturbs with that
    shard's gradient, takes the gradient there, and steps with the average (the paper's m-sharpness).
    Without no_sync: SAM on the whole batch.  no_sync around the backward alone: the first gradients
    are still all-reduced (what the docstring warns about)."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    out_file = str(tmp_path / "sam_ddp.pt")
    mp.start_processes(_ddp_worker, args=(WORLD, _free_port(), out_file), nprocs=WORLD, join=True,
                       start_method="spawn")
    ranks = torch.load(out_file)
    for mode in ("no_sync", "sync", "no_sync_backward_only"):
        for a, b in zip(ranks[0][mode][0], ranks[1][mode][0]):
            assert torch.equal(a, b), mode
    # per-rank first gradients: different under no_sync, equal (all-reduced) otherwise
    assert not torch.equal(ranks[0]["no_sync"][1][0][0], ranks[1]["no_sync"][1][0][0])
    for mode in ("sync", "no_sync_backward_only"):
        assert torch.equal(ranks[0][mode][1][0][0], ranks[1][mode][1][0][0]), mode

    def mse(model, x, y):
        return torch.nn.functional.mse_loss(model(x), y)

    # single process, no_sync semantics: per-shard perturbation, averaged SAM gradient
    model = _model()
    opt = fastopt.SAM(model.parameters(), fastopt.AdamW, rho=0.1, lr=1e-2, backend="cpu")
    params = list(model.parameters())
    for i in range(3):
        avg = [torch.zeros_like(p) for p in params]
        for r in range(WORLD):
            x, y = _shard(i, r)
            mse(model, x, y).backward()
            opt.first_step(zero_grad=True)
            mse(model, x, y).backward()
            opt._restore()
            for a, p in zip(avg, params):
                a.add_(p.grad / WORLD)
            opt.zero_grad()
        for a, p in zip(avg, params):
            p.grad = a
        opt.base_optimizer.step()
        opt.zero_grad()
    for p, q in zip(params, ranks[0]["no_sync"][0]):
        torch.testing.assert_close(p.detach(), q, rtol=1e-5, atol=1e-6)
    # single process, whole batch (the mean over both shards = DDP's average of the shard means)
    model = _model()
    opt = fastopt.SAM(model.parameters(), fastopt.AdamW, rho=0.1, lr=1e-2, backend="cpu")
    for i in range(3):
        x, y = _batch(i, n=8 * WORLD)
        mse(model, x, y).backward()
        opt.first_step(zero_grad=True)
        mse(model, x, y).backward()
        opt.second_step(zero_grad=True)
    for p, q in zip(model.parameters(), ranks[0]["sync"][0]):
        torch.testing.assert_close(p.detach(), q, rtol=1e-5, atol=1e-6)
    for p, q in zip(ranks[0]["sync"][0], ranks[0]["no_sync_backward_only"][0]):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
