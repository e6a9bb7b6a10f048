"""Distributed Muon (gloo on 127.0.0.1, 3 processes spawned once by the test; ranks 0-1 also form a
2-rank group): each matrix is orthogonalized exactly once per step, on whole matrices, and the result
is the single-process result bit for bit.

* FSDP2 (``fully_shard``, DTensors sharded on dim 0): on 3 ranks and on 2, with uneven shards (7 rows:
  4+3 and 3+3+1) and empty ones (2 rows on 3 ranks: 1+1+0); the shards of a matrix go to its owner rank
  (an all_to_all), which runs Newton-Schulz, and come back.  A stack of expert matrices with
  ``flatten=False`` is sharded along its experts: every rank orthogonalizes its own experts, in one batch.
* DTensors made by ``distribute_tensor`` with Shard(0), Shard(1), Replicate() and HSDP's (Replicate,
  Shard(0)) (the idea of pytorch_optimizer's ``test_sharded_updates``: a step on the DTensors equals the
  step on the tensors), also with the Triton Newton-Schulz kernels where they run (the interpreter).
* DDP with ``process_group``: each matrix orthogonalized by one rank, all-gathered.
* The AdamW groups step the local shards (torch reference and cpu kernels).
* What is refused raises before anything is written, on every rank.

Newton-Schulz calls are counted by wrapping :func:`fastopt.reference.muon.newton_schulz` (matrices per
call: its batch).  Bit for bit holds because the same matrix goes through the same Newton-Schulz code
(a batch of matrices gives each the bits it gets alone: checked in ``test_batching_keeps_bits``) and
everything else in a Muon step is elementwise.
"""
import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fastopt
from fastopt.reference import muon as R

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
# the Triton Newton-Schulz kernels, here only under the interpreter (conftest sets TRITON_INTERPRET=1
# without CUDA; the spawned ranks inherit it)
TRITON = fastopt._backend.has_triton() and not torch.cuda.is_available() and fastopt._backend.triton_interpret()

WORLD = 3
STEPS = 3
# (optimizer keywords, flatten of the experts group, parameter dtype); "master": bf16 parameters with
# fp32 master weights, the AdamW groups through the fused kernels (the cpu ones where fastopt._C is built)
CONFIGS = {
    "plain": (dict(lr=0.02, weight_decay=0.1, adamw_wd=0.01, backend="torch"), True, torch.float32),
    "experts": (dict(lr=0.03, weight_decay=0.05, weight_decouple=False, nesterov=False, cautious=True,
                     use_adjusted_lr=True, maximize=True, backend="torch"), False, torch.float32),
    "loop": (dict(lr=torch.tensor(0.02), momentum=0.9, foreach=False, cautious=True, backend="torch"), False,
             torch.float32),
    "master": (dict(lr=0.02, weight_decay=0.1, adamw_wd=0.01, master_weights=True, backend="auto"), False,
               torch.bfloat16),
}


class _Net(nn.Module):
    """Four matrices (two of one shape: one batch), two stacks of expert matrices, two AdamW vectors."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)

        def param(*shape):
            return nn.Parameter(torch.randn(*shape, generator=gen) * 0.5)

        self.w1, self.w2, self.w3, self.w4 = param(7, 5), param(7, 5), param(3, 7), param(2, 3)
        self.experts, self.pair = param(3, 4, 6), param(2, 4, 6)  # 3 and 2 experts of (4, 6)
        self.bias, self.gain = param(7), param(2)

    def forward(self, x):
        h = torch.tanh(x @ self.w1.T + self.bias) + torch.tanh(x @ self.w2.T)
        y = (torch.tanh(h @ self.w3.T) @ self.w4.T) * self.gain
        e = torch.einsum("bi,eij->bej", x[:, :4], self.experts).tanh()
        f = torch.einsum("bi,eij->bej", x[:, 1:], self.pair).sin()
        return y.square().sum() + e.square().sum() + f.sum()


def _groups(model, flatten):
    return [dict(params=[model.w1, model.w2, model.w3, model.w4], use_muon=True),
            dict(params=[model.experts, model.pair], use_muon=True, flatten=flatten),
            dict(params=[model.bias, model.gain], use_muon=False)]


def _matrices_per_step(flatten):
    return 4 + (2 if flatten else 3 + 2)


class _CountNS:
    """Counts the matrices that go through Newton-Schulz (R.newton_schulz, looked up at each call)."""

    def __enter__(self):
        self.matrices, self.calls, self._orig = 0, 0, R.newton_schulz

        def counted(x, *args, **kwargs):
            self.calls += 1
            self.matrices += x[..., 0, 0].numel()
            return self._orig(x, *args, **kwargs)

        R.newton_schulz = counted
        return self

    def __exit__(self, *exc):
        R.newton_schulz = self._orig


def _train(model, opt, steps=STEPS, grads=None, forward=None):
    """``steps`` steps on fixed batches; ``grads`` (a list) receives each step's whole gradients."""
    for s in range(steps):
        x = torch.randn(4, 5, generator=torch.Generator().manual_seed(s)).to(model.w1.dtype)
        (forward or model)(x).backward()
        if grads is not None:
            grads.append({n: _full(p.grad) for n, p in model.named_parameters()})
        opt.step()
        opt.zero_grad()


def _full(t):
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _snapshot(model, opt):
    return dict(params={n: _full(p) for n, p in model.named_parameters()},
                states={n: {k: _full(v) for k, v in opt.state[p].items()} for n, p in model.named_parameters()})


_REPLAYS = {}


def _single_process(name, grads):
    """The single-process run of configuration ``name`` fed the gradients the ranks saw (FSDP2 averages
    the ranks' gradients: (g + g + g) / 3 need not be g, so the same batches are not the same data)."""
    key = (name, id(grads))
    if key in _REPLAYS:
        return _REPLAYS[key]
    kwargs, flatten, dtype = CONFIGS[name]
    model = _Net().to(dtype)
    opt = fastopt.Muon(_groups(model, flatten), **kwargs)
    with _CountNS() as count:
        for step in grads:
            for n, p in model.named_parameters():
                p.grad = step[n].clone()
            opt.step()
    _REPLAYS[key] = _snapshot(model, opt), count.matrices
    return _REPLAYS[key]


# -- the ranks ------------------------------------------------------------------------------------
def _fsdp_runs(mesh, out):
    from torch.distributed.fsdp import fully_shard

    n = mesh.size()
    for name, (kwargs, flatten, dtype) in CONFIGS.items():
        model = fully_shard(_Net().to(dtype), mesh=mesh)
        opt = fastopt.Muon(_groups(model, flatten), **kwargs)
        grads = []
        with _CountNS() as count:
            _train(model, opt, grads=grads)
        out[("fsdp", n, name)] = dict(
            **_snapshot(model, opt), grads=grads, matrices=count.matrices, calls=count.calls,
            state_placements=sorted({str(v.placements) for s in opt.state.values() for v in s.values()
                                     if hasattr(v, "placements")}),
            local_rows={k: tuple(p.to_local().shape) for k, p in model.named_parameters()})


def _sharded_updates(mesh, out, backend="torch"):
    """pytorch_optimizer's test_sharded_updates, as an idea: DTensor params and grads (here along rows,
    along columns, replicated, and on a (1, world) mesh as (Replicate, Shard(0)), HSDP's placements)
    step as the tensors they hold."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    gen = torch.Generator().manual_seed(1)
    full = [torch.randn(5, 4, generator=gen), torch.randn(6, 3, generator=gen), torch.randn(4, 4, generator=gen),
            torch.randn(5, 3, generator=gen)]
    grads = [[torch.randn_like(w) for w in full] for _ in range(2 if backend == "torch" else 1)]
    meshes = [mesh] * 3 + [init_device_mesh("cpu", (1, mesh.size())) if mesh.size() == WORLD else mesh]
    placements = [[Shard(0)], [Shard(1)], [Replicate()], [Replicate(), Shard(0)] if mesh.size() == WORLD else
                  [Shard(0)]]
    params = [nn.Parameter(distribute_tensor(w.clone(), m, pl)) for w, m, pl in zip(full, meshes, placements)]
    opt = fastopt.Muon([dict(params=params, use_muon=True)], lr=0.05, weight_decay=0.1, backend=backend)
    with _CountNS() as count:
        for step in grads:
            for p, g, m, pl in zip(params, step, meshes, placements):
                p.grad = distribute_tensor(g, m, pl)
            opt.step()
    out[("sharded_updates", mesh.size(), backend)] = dict(full=full, grads=grads, got=[_full(p) for p in params],
                                                          matrices=count.matrices)


def _ddp_run(group, out):
    world = dist.get_world_size(group)
    kwargs, flatten, _ = CONFIGS["plain"]
    model = nn.parallel.DistributedDataParallel(_Net(), process_group=group)
    opt = fastopt.Muon(_groups(model.module, flatten), process_group=group, **kwargs)
    grads = []
    with _CountNS() as count:
        _train(model.module, opt, grads=grads, forward=model)
    out[("ddp", world)] = dict(**_snapshot(model.module, opt), grads=grads, matrices=count.matrices)


def _refusals(mesh, out):
    """Each case raises on every rank before anything is written."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    def attempt(key, model, opt, before_step=None):
        model(torch.ones(4, 5, dtype=model.w1.dtype)).backward()
        if before_step is not None:
            before_step(model, opt)
        before = _snapshot(model, opt)
        try:
            opt.step()
            out[("refused", key)] = "stepped"
        except (NotImplementedError, ValueError, RuntimeError) as e:
            after = _snapshot(model, opt)
            same = all(torch.equal(before["params"][k], after["params"][k]) for k in before["params"]) and all(
                torch.equal(before["states"][k][s], after["states"][k][s]) for k in before["states"]
                for s in before["states"][k]) and before["states"].keys() == after["states"].keys()
            out[("refused", key)] = (type(e).__name__, str(e), same, sum(len(s) for s in opt.state.values()))

    # stochastic rounding is keyed on the index in the whole tensor
    model = fully_shard(_Net().to(torch.bfloat16), mesh=mesh)
    attempt("stochastic_rounding", model, fastopt.Muon(_groups(model, True), stochastic_rounding=True, backend="torch"))
    # a rank without the gradient of a matrix the others exchange
    model = fully_shard(_Net(), mesh=mesh)

    def drop_on_rank0(model, opt):
        if dist.get_rank() == 0:
            model.w2.grad = None

    attempt("ranks_disagree", model, fastopt.Muon(_groups(model, True), backend="torch"), drop_on_rank0)
    # a momentum buffer that is not a DTensor (a checkpoint loaded without torch.distributed.checkpoint)
    model = fully_shard(_Net(), mesh=mesh)
    opt = fastopt.Muon(_groups(model, True), backend="torch")
    _train(model, opt, steps=1)

    def plain_state(model, opt):
        opt.state[model.w1]["momentum_buffer"] = opt.state[model.w1]["momentum_buffer"].full_tensor()

    attempt("plain_state", model, opt, plain_state)
    # two sharded mesh dimensions
    mesh2d = init_device_mesh("cpu", (mesh.size(), 1))
    w = nn.Parameter(distribute_tensor(torch.randn(6, 4), mesh2d, [Shard(0), Shard(1)]))
    w.grad = distribute_tensor(torch.randn(6, 4), mesh2d, [Shard(0), Shard(1)])
    opt = fastopt.Muon([dict(params=[w], use_muon=True)], backend="torch")
    try:
        opt.step()
        out[("refused", "2d")] = "stepped"
    except NotImplementedError as e:
        out[("refused", "2d")] = (type(e).__name__, str(e), True, len(opt.state))


def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=90))
    out = {}
    try:
        from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

        pair = dist.new_group([0, 1])  # (every rank takes part in making it)
        mesh = init_device_mesh("cpu", (world,))
        _fsdp_runs(mesh, out)
        _sharded_updates(mesh, out)
        _ddp_run(dist.group.WORLD, out)
        _refusals(mesh, out)
        if rank < 2:
            mesh2 = DeviceMesh.from_group(pair, "cpu")
            _fsdp_runs(mesh2, out)
            _sharded_updates(mesh2, out)
            if TRITON:
                _sharded_updates(mesh2, out, backend="triton")
            _ddp_run(pair, out)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """The results of every rank (one spawn for the whole file)."""
    out_dir = str(tmp_path_factory.mktemp("muon_ranks"))
    mp.start_processes(_worker, args=(WORLD, _free_port(), out_dir), nprocs=WORLD, join=True, start_method="spawn")
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD)]


def _assert_equal(got, want, what):
    for name in want:
        assert torch.equal(got[name], want[name]), f"{what}: {name} differs by " \
            f"{(got[name].float() - want[name].float()).abs().max().item():.3g}"


# -- the tests ------------------------------------------------------------------------------------
@pytest.mark.parametrize("world", [3, 2])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_fsdp2_matches_single_process(ranks, world, name):
    want, _ = _single_process(name, ranks[0][("fsdp", world, name)]["grads"])
    for r in range(world):
        got = ranks[r][("fsdp", world, name)]
        _assert_equal(got["params"], want["params"], f"rank {r} of {world}, {name}: parameter")
        for p in want["states"]:
            _assert_equal(got["states"][p], want["states"][p], f"rank {r} of {world}, {name}: state of {p}")
        assert got["state_placements"] == ["(Shard(dim=0),)"]  # states are DTensors sharded as their params
    rows = {r: ranks[r][("fsdp", world, name)]["local_rows"] for r in range(world)}
    assert [rows[r]["w1"][0] for r in range(world)] == ([3, 3, 1] if world == 3 else [4, 3])  # uneven
    if world == 3:
        assert [rows[r]["w4"][0] for r in range(3)] == [1, 1, 0]  # an empty shard
        assert [rows[r]["pair"][0] for r in range(3)] == [1, 1, 0]


@pytest.mark.parametrize("world", [3, 2])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_each_matrix_orthogonalized_once_per_step(ranks, world, name):
    _, single = _single_process(name, ranks[0][("fsdp", world, name)]["grads"])
    flatten = CONFIGS[name][1]
    per_rank = [ranks[r][("fsdp", world, name)]["matrices"] for r in range(world)]
    assert single == sum(per_rank) == STEPS * _matrices_per_step(flatten), per_rank
    assert all(m > 0 for m in per_rank), per_rank  # shared out, not all on one rank
    if not flatten and CONFIGS[name][0].get("foreach", True) is not False:
        # batched: at most one Newton-Schulz call per matrix shape and step on each rank (the experts of a
        # rank in one call with its other (4, 6) matrices)
        for r in range(world):
            assert ranks[r][("fsdp", world, name)]["calls"] <= STEPS * 4, (r, ranks[r][("fsdp", world, name)])


@pytest.mark.parametrize("world, backend", [(3, "torch"), (2, "torch"), (2, "triton")])
def test_sharded_updates(ranks, world, backend):
    if backend == "triton" and not TRITON:
        pytest.skip("the Triton Newton-Schulz kernels cannot run here")
    got = ranks[0][("sharded_updates", world, backend)]
    params = [nn.Parameter(w.clone()) for w in got["full"]]
    opt = fastopt.Muon([dict(params=params, use_muon=True)], lr=0.05, weight_decay=0.1, backend=backend)
    for step in got["grads"]:
        for p, g in zip(params, step):
            p.grad = g
        opt.step()
    for r in range(world):
        res = ranks[r][("sharded_updates", world, backend)]
        for i, (p, q) in enumerate(zip(params, res["got"])):
            assert torch.equal(p.detach(), q), (r, i)
    if backend == "torch":  # (the count wraps the torch Newton-Schulz) the sharded matrices once in all,
        # the replicated one on every rank
        counts = [ranks[r][("sharded_updates", world, backend)]["matrices"] for r in range(world)]
        assert sum(counts) == len(got["grads"]) * (3 + world), counts


@pytest.mark.parametrize("world", [3, 2])
def test_ddp_process_group_matches_single_process(ranks, world):
    want, single = _single_process("plain", ranks[0][("ddp", world)]["grads"])
    counts = []
    for r in range(world):
        got = ranks[r][("ddp", world)]
        _assert_equal(got["params"], want["params"], f"DDP rank {r} of {world}: parameter")
        for p in want["states"]:
            _assert_equal(got["states"][p], want["states"][p], f"DDP rank {r} of {world}: state of {p}")
        counts.append(got["matrices"])
    assert sum(counts) == single and all(0 < c < single for c in counts), counts


@pytest.mark.parametrize("key, error, words", [
    ("stochastic_rounding", "NotImplementedError", "stochastic rounding of DTensor"),
    ("ranks_disagree", "RuntimeError", "every rank of the group must step the same parameters"),
    ("plain_state", "ValueError", "must be a DTensor with the parameter's placements"),
    ("2d", "NotImplementedError", "several sharded mesh dimensions"),
])
def test_refused_before_anything_is_written(ranks, key, error, words):
    states_before = {"stochastic_rounding": 0, "ranks_disagree": 0, "2d": 0}
    for r in range(WORLD):
        got = ranks[r][("refused", key)]
        assert got != "stepped", (r, key)
        kind, message, unchanged, nstates = got
        assert kind == error and words in message, (r, message)
        assert unchanged, (r, key)
        if key in states_before:
            assert nstates == states_before[key], (r, key, nstates)


def test_batching_keeps_bits():
    """One matrix alone or in a batch with others (of its shape, or transposed): the same bits, so the
    owners' batches (other than single-process ones) do not change the result."""
    gen = torch.Generator().manual_seed(3)
    mats = [torch.randn(7, 5, generator=gen), torch.randn(7, 5, generator=gen), torch.randn(5, 7, generator=gen)]
    alone = [R.orthogonalize([m], use_adjusted_lr=True)[0] for m in mats]
    together = R.orthogonalize(mats, use_adjusted_lr=True)
    for a, b in zip(alone, together):
        assert torch.equal(a, b)
    stack = torch.stack(mats[:2])
    assert torch.equal(R.orthogonalize([stack], flatten=False)[0], torch.stack(alone[:2]))


@pytest.mark.parametrize("cautious", [False, True])
def test_flatten_false_orthogonalizes_each_expert(cautious):
    """flatten=False: a (experts, rows, cols) parameter is a stack of matrices, each orthogonalized,
    scaled and cautious-masked on its own -- the same as separate (rows, cols) parameters -- while the
    default flattens it to (experts, rows * cols) as upstream does."""
    gen = torch.Generator().manual_seed(4)
    stack = nn.Parameter(torch.randn(3, 4, 6, generator=gen))
    singles = [nn.Parameter(stack[e].detach().clone()) for e in range(3)]
    grads = torch.randn(2, 3, 4, 6, generator=gen)
    kw = dict(backend="torch", use_adjusted_lr=True, cautious=cautious)
    a = fastopt.Muon([dict(params=[stack], use_muon=True, flatten=False)], **kw)
    b = fastopt.Muon([dict(params=singles, use_muon=True)], **kw)
    flat = nn.Parameter(stack.detach().clone())
    c = fastopt.Muon([dict(params=[flat], use_muon=True)], **kw)
    for g in grads:
        stack.grad, flat.grad = g, g
        for e, p in enumerate(singles):
            p.grad = g[e]
        a.step(), b.step(), c.step()
    assert torch.equal(stack.detach(), torch.stack([p.detach() for p in singles]))
    assert not torch.allclose(flat.detach(), stack.detach(), atol=1e-3)  # (a different update)
    with pytest.raises(ValueError, match="flatten"):
        fastopt.Muon([dict(params=[stack], use_muon=True, flatten=1)])


def test_process_group_needs_torch_distributed():
    if dist.is_initialized():
        pytest.skip("a process group is initialized in this process")
    with pytest.raises(ValueError, match="not initialized"):
        fastopt.Muon([dict(params=[nn.Parameter(torch.randn(3, 3))], use_muon=True)], process_group=object())
