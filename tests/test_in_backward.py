"""fastopt.optimizer_in_backward: each parameter stepped from its post-accumulate-grad hook, its gradient
freed, bit for bit the step of the same optimizer over all parameters after backward.

Single process: every per-parameter optimizer (and option) that the helper accepts, 3 steps of a small
MLP on the torch backend and on the cpu kernels; gradients freed during backward; the refusals
(NotImplementedError / TypeError / ValueError) leave no hook behind; state_dict round trips (and loads
into the normal optimizer both ways); LR schedulers; GradScaler refused; add_param_group; remove().
Two ranks (gloo, spawned): FSDP2 (with and without CPUOffloadPolicy) and DDP (applied before wrapping;
different data per rank, so un-averaged gradients would give other bits) against their normal steps.
"""
import copy
import datetime
import os
import socket
import warnings

import pytest
import torch

import fastopt
from fastopt.sparse import NMSparsity

BACKENDS = ("torch", "cpu") if fastopt._backend.has_cpu() else ("torch",)
STEPS = 3


def _mlp(dtype=torch.float32):
    torch.manual_seed(0)
    # 16x16 weights: 256 elements (one 8-bit block), two of the same shape (Muon batches them)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(),
                                torch.nn.Linear(16, 3))
    return model.to(dtype)


def _batch(step, dtype=torch.float32, rank=0):
    return torch.randn(4, 16, generator=torch.Generator().manual_seed(100 * rank + step)).to(dtype)


def _loss(model, step, rank=0):
    dtype = next(model.parameters()).dtype
    return model(_batch(step, dtype, rank)).float().square().sum()


def _sparse_groups(model):
    weights = [model[0].weight, model[2].weight]
    rest = [p for p in model.parameters() if all(p is not w for w in weights)]
    return [dict(params=weights, sparsity=NMSparsity(2, 4, recipe="sr-ste")), dict(params=rest)]


def _orthograd(backend):
    return lambda groups: fastopt.OrthoGrad(fastopt.AdamW(groups, lr=1e-2, backend=backend), backend=backend)


# name -> (optimizer class or factory(backend), kwargs, parameter dtype, param groups of the model)
CASES = {
    "AdamW": (fastopt.AdamW, dict(lr=1e-2, weight_decay=0.1), torch.float32, None),
    "Adam-amsgrad-L2": (fastopt.Adam, dict(lr=1e-2, amsgrad=True, weight_decay=0.01), torch.float32, None),
    "Lion": (fastopt.Lion, dict(lr=1e-3, weight_decay=0.1), torch.float32, None),
    "Lion-use_gc-cautious": (fastopt.Lion, dict(lr=1e-3, use_gc=True, cautious=True), torch.float32, None),
    "Adan": (fastopt.Adan, dict(lr=1e-2, weight_decay=0.02), torch.float32, None),
    "Adan-use_gc": (fastopt.Adan, dict(lr=1e-2, use_gc=True), torch.float32, None),
    "AdaBelief": (fastopt.AdaBelief, dict(lr=1e-2, weight_decay=0.01), torch.float32, None),
    "AdaBelief-ams_bound": (fastopt.AdaBelief, dict(lr=1e-2, ams_bound=True), torch.float32, None),
    "DiffGrad": (fastopt.DiffGrad, dict(lr=1e-2), torch.float32, None),
    "EXAdam": (fastopt.EXAdam, dict(lr=1e-2, weight_decay=0.01), torch.float32, None),
    "Lamb": (fastopt.Lamb, dict(lr=1e-2, weight_decay=0.01), torch.float32, None),
    "AdamP": (fastopt.AdamP, dict(lr=1e-2, weight_decay=0.01), torch.float32, None),
    "AdamP-cautious": (fastopt.AdamP, dict(lr=1e-2, cautious=True), torch.float32, None),
    "SGDP": (fastopt.SGDP, dict(lr=1e-2, momentum=0.9, weight_decay=0.01), torch.float32, None),
    "SGDSaI": (fastopt.SGDSaI, dict(lr=1e-2), torch.float32, None),
    "Muon": (fastopt.Muon, dict(lr=1e-2, weight_decay=0.01), torch.float32, None),
    "Muon-foreach=False": (fastopt.Muon, dict(lr=1e-2, foreach=False), torch.float32, None),
    "AdamW8bit": (fastopt.lowbit.AdamW8bit, dict(lr=1e-2, min_quant_size=256), torch.float32, None),
    "Lion-master_weights-bf16": (fastopt.Lion, dict(lr=1e-3, master_weights=True), torch.bfloat16, None),
    "AdamW-bf16": (fastopt.AdamW, dict(lr=1e-2), torch.bfloat16, None),
    "Lion-nm_sparse": (fastopt.Lion, dict(lr=1e-3), torch.float32, _sparse_groups),
    "OrthoGrad(AdamW)": (_orthograd, None, torch.float32, None),
}


def _make(case, backend):
    """(normal optimizer over params, in-backward helper over params) builders of ``case``."""
    cls, kwargs, _, _ = CASES[case]
    if kwargs is None:  # a factory of param groups
        factory = cls(backend)
        return factory, lambda params: fastopt.optimizer_in_backward(factory, params)
    # Muon's backends name the Newton-Schulz implementation ("auto" runs its AdamW groups on the kernels)
    kwargs = {**kwargs, "backend": "auto" if cls is fastopt.Muon and backend == "cpu" else backend}
    return (lambda params: cls(params, **kwargs),
            lambda params: fastopt.optimizer_in_backward(cls, params, **kwargs))


def _params(case, model):
    groups = CASES[case][3]
    return groups(model) if groups else model.parameters()


def _tensors(obj):
    """Every tensor in a (nested) state dict, in a deterministic order."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for k in sorted(obj, key=str) for t in _tensors(obj[k])]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def _train_normal(model, opt, steps=STEPS, first=0):
    for s in range(first, first + steps):
        _loss(model, s).backward()
        opt.step()
        opt.zero_grad()


def _train_in_backward(model, opt, steps=STEPS, first=0):
    for s in range(first, first + steps):
        _loss(model, s).backward()
        assert all(p.grad is None for p in model.parameters())  # stepped and freed in backward
        opt.step()
        opt.zero_grad()


def _hooked(model):
    return [p for p in model.parameters() if p._post_accumulate_grad_hooks or hasattr(p, "_in_backward_optimizers")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_bit_identical_to_a_normal_step(case, backend):
    dtype = CASES[case][2]
    normal, in_backward = _make(case, backend)
    a, b = _mlp(dtype), _mlp(dtype)
    opt_a = normal(_params(case, a))
    opt_b = in_backward(_params(case, b) if CASES[case][3] else b)
    _train_normal(a, opt_a)
    _train_in_backward(b, opt_b)
    assert opt_b.steps_in_backward == STEPS * len(list(b.parameters()))
    assert not any(torch.equal(p, q) for p, q in zip(a.parameters(), _mlp(dtype).parameters()))  # (they moved)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q), case
    sa, sb = opt_a.state_dict(), opt_b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sorted(sa["state"]) == sorted(sb["state"])
    ta, tb = _tensors(sa["state"]), _tensors(sb["state"])
    assert len(ta) == len(tb) > 0
    for x, y in zip(ta, tb):
        assert x.dtype == y.dtype and torch.equal(x, y), case


def test_gradients_are_freed_during_backward():
    model = _mlp()
    opt = fastopt.optimizer_in_backward(fastopt.AdamW, model, lr=1e-2)
    seen = {}
    first = model[0].weight  # the last gradient autograd accumulates

    def look(p):  # registered after the helper's hook: runs after its step
        seen["alive"] = [q.grad is not None for q in model.parameters()]
        seen["steps"] = opt.steps_in_backward

    first.register_post_accumulate_grad_hook(look)
    _loss(model, 0).backward()
    # when the first layer's weight is stepped, every later layer's gradient is gone already
    assert seen["alive"][2:] == [False] * 4
    assert seen["steps"] >= 5
    assert all(p.grad is None for p in model.parameters())
    assert len(opt.state) == 6 and all("exp_avg" in s for s in opt.state.values())


def test_frozen_parameters_of_a_module_are_left_alone():
    model = _mlp()
    model[0].weight.requires_grad_(False)
    before = model[0].weight.clone()
    opt = fastopt.optimizer_in_backward(fastopt.Lion, model, lr=1e-2)
    _train_in_backward(model, opt, steps=1)
    assert torch.equal(model[0].weight, before) and len(opt.optimizers) == 5


# -- refusals: a clear error at construction, nothing hooked -------------------------------------------
REFUSED = {
    "Lamb-pre_norm": (lambda m: fastopt.optimizer_in_backward(fastopt.Lamb, m, pre_norm=True, max_grad_norm=1.0),
                      NotImplementedError, "global gradient norm"),
    "stochastic_rounding-bf16": (
        lambda m: fastopt.optimizer_in_backward(
            fastopt.Lion, [dict(params=list(m[0].parameters())),
                           dict(params=list(m[2].parameters()) + list(m[4].parameters()), stochastic_rounding=True)]),
        NotImplementedError, "stochastic_rounding"),
    "torch.optim.AdamW": (lambda m: fastopt.optimizer_in_backward(torch.optim.AdamW, m),
                          TypeError, "per-parameter optimizers"),
    "not a fastopt factory": (lambda m: fastopt.optimizer_in_backward(lambda g: torch.optim.SGD(g, lr=0.1), m),
                              TypeError, "torch.optim.sgd.SGD"),
    "factory with kwargs": (lambda m: fastopt.optimizer_in_backward(lambda g: fastopt.AdamW(g), m, lr=1.0),
                            TypeError, "factory"),
    "non-leaf": (lambda m: fastopt.optimizer_in_backward(fastopt.AdamW, [m[0].weight, m[2].weight * 2]),
                 ValueError, "leaf"),
    "bad lr": (lambda m: fastopt.optimizer_in_backward(fastopt.AdamW, m, lr=-1.0), ValueError, "learning rate"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refusals_leave_nothing_hooked(case):
    build, error, match = REFUSED[case]
    model = _mlp(torch.bfloat16 if "bf16" in case else torch.float32)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(error, match=match):
        build(model)
    assert _hooked(model) == []
    _loss(model, 0).backward()  # a normal backward: nothing stepped, every gradient there
    assert all(p.grad is not None for p in model.parameters())
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_int8_weights_are_refused():
    model = torch.nn.Sequential(fastopt.lowbit.Int8Linear(16, 16), torch.nn.Linear(16, 3))
    with pytest.raises(NotImplementedError, match="Int8Linear"):
        fastopt.optimizer_in_backward(fastopt.AdamW, model)
    assert _hooked(model) == []


def test_a_parameter_is_hooked_once():
    model = _mlp()
    fastopt.optimizer_in_backward(fastopt.AdamW, model[0].parameters())
    with pytest.raises(ValueError, match="stepped in backward already"):
        fastopt.optimizer_in_backward(fastopt.AdamW, [model[2].weight, model[0].weight])
    assert not _hooked(model[2])


def test_grad_scaler_is_refused():
    model = _mlp()
    opt = fastopt.optimizer_in_backward(fastopt.AdamW, model)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    scaler.scale(_loss(model, 0)).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # (GradScaler passing itself as grad_scaler)
        with pytest.raises(RuntimeError, match="GradScaler"):
            scaler.step(opt)


# -- state_dict, schedulers, groups ------------------------------------------------------------------
@pytest.mark.parametrize("case", ["AdamW", "Muon", "AdamW8bit", "SGDSaI"])
def test_state_dict_round_trip(case):
    normal, in_backward = _make(case, BACKENDS[-1])
    ref = _mlp()
    ref_opt = normal(ref.parameters())
    _train_normal(ref, ref_opt, steps=4)

    model = _mlp()
    opt = in_backward(model)
    _train_in_backward(model, opt, steps=2)
    saved, weights = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    # into a fresh helper, into the normal optimizer, and the same helper continuing: all give the
    # uninterrupted normal run's bits
    resumed = _mlp()
    resumed.load_state_dict(weights)
    resumed_opt = in_backward(resumed)
    resumed_opt.load_state_dict(copy.deepcopy(saved))  # (a load keeps the given tensors: one copy each)
    plain = _mlp()
    plain.load_state_dict(weights)
    plain_opt = normal(plain.parameters())
    plain_opt.load_state_dict(copy.deepcopy(saved))
    _train_in_backward(model, opt, steps=2, first=2)
    _train_in_backward(resumed, resumed_opt, steps=2, first=2)
    _train_normal(plain, plain_opt, steps=2, first=2)
    for p, q, r, s in zip(ref.parameters(), model.parameters(), resumed.parameters(), plain.parameters()):
        assert torch.equal(p, q) and torch.equal(p, r) and torch.equal(p, s), case
    # and the normal optimizer's checkpoint loads into the helper
    back = _mlp()
    back.load_state_dict(plain.state_dict())
    back_opt = in_backward(back)
    back_opt.load_state_dict(copy.deepcopy(plain_opt.state_dict()))
    _train_in_backward(back, back_opt, steps=1, first=4)
    _train_normal(plain, plain_opt, steps=1, first=4)
    assert all(torch.equal(p, q) for p, q in zip(plain.parameters(), back.parameters()))


def test_lr_scheduler_drives_the_groups():
    a, b = _mlp(), _mlp()
    opt_a = fastopt.Adan(a.parameters(), lr=1e-2)
    opt_b = fastopt.optimizer_in_backward(fastopt.Adan, b, lr=1e-2)
    sched_a = torch.optim.lr_scheduler.LambdaLR(opt_a, lambda s: 1.0 / (1 + s))
    sched_b = torch.optim.lr_scheduler.LambdaLR(opt_b, lambda s: 1.0 / (1 + s))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "lr_scheduler.step() before optimizer.step()" warning
        for s in range(4):
            _loss(a, s).backward()
            opt_a.step()
            opt_a.zero_grad()
            sched_a.step()
            _loss(b, s).backward()  # (no opt_b.step(): the steps ran in backward)
            sched_b.step()
    assert opt_b.param_groups[0]["lr"] == opt_a.param_groups[0]["lr"] == 1e-2 / 5
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_add_param_group_and_remove():
    a, b = _mlp(), _mlp()
    first = list(a[0].parameters())
    rest = [p for p in a.parameters() if all(p is not q for q in first)]
    opt_a = fastopt.Lion([dict(params=first)], lr=1e-3)
    opt_a.add_param_group(dict(params=rest, lr=3e-3, weight_decay=0.1))
    opt_b = fastopt.optimizer_in_backward(fastopt.Lion, b[0].parameters(), lr=1e-3)
    with pytest.raises(ValueError):  # torch's check: a parameter in two groups; nothing added or hooked
        opt_b.add_param_group(dict(params=[b[0].weight, b[2].weight]))
    assert len(opt_b.param_groups) == 1 and _hooked(b[2]) == []
    opt_b.add_param_group(dict(params=[p for p in b.parameters() if all(p is not q for q in b[0].parameters())],
                               lr=3e-3, weight_decay=0.1))
    _train_normal(a, opt_a)
    _train_in_backward(b, opt_b)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    opt_b.remove()
    assert _hooked(b) == []
    before = [p.detach().clone() for p in b.parameters()]
    _loss(b, 0).backward()
    assert all(p.grad is not None for p in b.parameters())
    assert all(torch.equal(p, q) for p, q in zip(b.parameters(), before))


def test_step_runs_the_closure():
    a, b = _mlp(), _mlp()
    opt_a = fastopt.AdamW(a.parameters(), lr=1e-2)
    opt_b = fastopt.optimizer_in_backward(fastopt.AdamW, b, lr=1e-2)

    def closure():
        loss = _loss(b, 0)
        loss.backward()
        return loss

    _loss(a, 0).backward()
    opt_a.step()
    assert opt_b.step(closure) is not None
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


# -- two ranks: FSDP2 and DDP --------------------------------------------------------------------------
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


FSDP_RUNS = [(backend, "AdamW") for backend in BACKENDS] + [(BACKENDS[-1], "Lion")]


def _dist_worker(rank, world, port, out_file):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    results = {}
    try:
        mesh = init_device_mesh("cpu", (world,))

        def sharded(offload):
            model = _mlp()
            kw = dict(mesh=mesh, offload_policy=CPUOffloadPolicy(pin_memory=False)) if offload else dict(mesh=mesh)
            for layer in (model[0], model[2], model[4]):
                fully_shard(layer, **kw)
            return fully_shard(model, **kw)

        for backend, name in FSDP_RUNS:
            normal, in_backward = _make(name, backend)
            runs = {}
            for kind in ("normal", "in_backward", "in_backward-offload"):
                model = sharded(kind.endswith("offload"))
                opt = normal(model.parameters()) if kind == "normal" else in_backward(model)
                freed = True
                for s in range(STEPS):
                    _loss(model, s, rank).backward()
                    freed &= all(p.grad is None for p in model.parameters())
                    opt.step()
                    opt.zero_grad()
                states = [s for s in opt.state.values()]
                runs[kind] = ([p.to_local().detach().clone() for p in model.parameters()], freed,
                              all(t.device.type == "cpu" for st in states for t in st.values()
                                  if isinstance(t, torch.Tensor)))
            results[("fsdp2", backend, name)] = runs
        # DDP: the helper before the wrapper (DDP removes its hooks and steps its optimizers after the
        # all-reduce); each rank its own batches, so the averaged gradient differs from every rank's own.
        # torch 2.13's DDP hook for this ends each backward with torch.accelerator.current_stream(), which
        # raises on a machine without an accelerator -- after every parameter was stepped: on such a
        # machine only the first step is compared.
        runs = {}
        for kind in ("normal", "in_backward", "local"):
            model = _mlp()
            opt = fastopt.AdamW(model.parameters(), lr=1e-2) if kind != "in_backward" else \
                fastopt.optimizer_in_backward(fastopt.AdamW, model, lr=1e-2)
            ddp = DDP(model) if kind != "local" else model
            after, error = [], None
            for s in range(STEPS):
                try:
                    _loss(ddp, s, rank).backward()
                except RuntimeError as e:
                    error = str(e)
                if s == 0:  # (DDP takes the hooks off before its first forward)
                    unhooked = all(not p._post_accumulate_grad_hooks for p in model.parameters())
                opt.step()
                opt.zero_grad()
                after.append([p.detach().clone() for p in model.parameters()])
                if error is not None:
                    break
            runs[kind] = (after, error, unhooked)
        results["ddp"] = runs
        try:
            fastopt.optimizer_in_backward(fastopt.AdamW, DDP(_mlp()))
        except ValueError as e:
            results["ddp-wrapped"] = str(e)
        torch.save(results, out_file + f".{rank}")
    finally:
        dist.destroy_process_group()


def test_fsdp2_and_ddp(tmp_path):
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    out_file = str(tmp_path / "in_backward.pt")
    mp.start_processes(_dist_worker, args=(2, _free_port(), out_file), nprocs=2, join=True, start_method="spawn")
    for rank in range(2):
        got = torch.load(out_file + f".{rank}")
        for backend, name in FSDP_RUNS:
            runs = got[("fsdp2", backend, name)]
            normal, _, _ = runs["normal"]
            for kind in ("in_backward", "in_backward-offload"):
                shards, freed, on_cpu = runs[kind]
                assert freed and on_cpu, (kind, backend, name)
                assert all(torch.equal(p, q) for p, q in zip(normal, shards)), (rank, kind, backend, name)
        normal, _, _ = got["ddp"]["normal"]
        after, error, unhooked = got["ddp"]["in_backward"]
        assert unhooked  # DDP took the helper's hooks off: nothing steps before the all-reduce
        if error is not None:  # (no accelerator: torch's hook failed after the steps of the first backward)
            assert "accelerator" in error and len(after) == 1, error
        assert len(after) in (1, STEPS)
        for mine, theirs in zip(after, normal):
            assert all(torch.equal(p, q) for p, q in zip(theirs, mine)), rank
        local, _, _ = got["ddp"]["local"]
        assert not all(torch.equal(p, q) for p, q in zip(normal[0], local[0]))  # (the test can fail)
        assert "DistributedDataParallel" in got["ddp-wrapped"]
