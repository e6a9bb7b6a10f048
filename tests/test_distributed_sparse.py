"""N:M sparse training and Int8Linear under torch.distributed (gloo on 127.0.0.1, spawned processes).

N:M under FSDP2 (``fully_shard``, parameters sharded along dim 0, unevenly, one rank's shard empty on 3
ranks): the masks are computed on each rank's shard and the states ``dense_param``/``nm_mask`` are
DTensors with the parameter's placements; the result equals single-process N:M training bit for bit in
fp32 on the torch backend and the cpu kernels.  A schedule whose mask groups would straddle a shard
boundary is refused before anything is written.  DDP (plain tensors): the single-process result.

Int8Linear: its ``float_grad`` is not a ``.grad``, so DDP and FSDP2 do not reduce it;
``fastopt.lowbit.reduce_float_grads`` averages it (one all-reduce) and the optimizers refuse an
unreduced one.  Under FSDP2 the int8 weights stay whole (``ignored_params``); ``fully_shard`` on them
is refused.

The losses are ``sum_i (layer_i(x_i) * c_i)`` with small integers in ``x_i`` and ``3 * c_i``: every
gradient is an integer multiple of 3, so the ranks' averages (FSDP2's and DDP's, whatever their order
of division and summation) are exact and the single-process run sees the same gradients.
"""
import datetime
import re
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fastopt
from fastopt.lowbit.int8 import int8_weights, reduce_float_grads
from fastopt.sparse import NMSparsity

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

BACKENDS = ("torch", "cpu") if fastopt._backend.has_cpu() else ("torch",)
STEPS = 4
# (in, out) of the layers: weights 16x8, 12x12, 7x8, 4x6
SHAPES = ((8, 16), (12, 12), (8, 7), (6, 4))
# world size -> [(layer, schedule)]: every shard holds whole mask groups
SCHEDULES = {
    2: [(0, NMSparsity(2, 4, transposable=True)),                                 # rows 8 | 8
        (2, NMSparsity(2, 4, recipe="decay", dense_steps=1, decay_coef=0.3, refresh_every=2)),  # rows 4 | 3
        (1, NMSparsity(1, 2, dim=0, recipe="ste")),                                # rows 6 | 6, groups of 2 rows
        (3, NMSparsity(2, 3))],                                                    # rows 2 | 2
    3: [(1, NMSparsity(2, 4, transposable=True)),                                 # rows 4 | 4 | 4
        (2, NMSparsity(2, 4, recipe="decay", dense_steps=1, decay_coef=0.3)),     # rows 3 | 3 | 1
        (3, NMSparsity(1, 2, dim=0)),                                             # rows 2 | 2 | 0 (empty)
        (0, NMSparsity(2, 4, refresh_every=2))],                                  # rows 6 | 6 | 4
}
OPTIMIZERS = {"Lion": dict(lr=1e-2, weight_decay=0.1), "Adan": dict(lr=1e-2, weight_decay=0.02)}
NM_OPTIMIZERS = {2: ("Lion", "Adan"), 3: ("Lion",)}  # (3 ranks: the slowest spawn, one optimizer)
# world size -> [(layer, schedule, what the message names)]: a mask group would straddle a shard boundary
STRADDLING = {2: [(1, NMSparsity(2, 4, dim=0), "indices 0..5")],                 # rows 6 | 6, groups of 4
              3: [(0, NMSparsity(2, 4, transposable=True), "indices 0..5")]}     # rows 6 | 6 | 4, tiles of 4


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank, world, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))


def _spawn(worker, world, tmp_path):
    mp.start_processes(worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True,
                       start_method="spawn")
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


class Layers(nn.Module):
    """Independent linear layers: ``forward(xs) = sum_i layer_i(xs[i]) * cs[i]`` summed."""

    def __init__(self, shapes=SHAPES):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in shapes)

    def forward(self, xs, cs):
        return sum((layer(x) * c).sum() for layer, x, c in zip(self.layers, xs, cs))


def _batch(step, shapes=SHAPES, rank=0):
    g = torch.Generator().manual_seed(100 * step + 10 * rank)
    xs = [torch.randint(-2, 3, (3, i), generator=g).float() for i, _ in shapes]
    cs = [3 * torch.randint(-2, 3, (3, o), generator=g).float() for _, o in shapes]
    return xs, cs


def _groups(model, schedules):
    sparse = {i for i, _ in schedules}
    groups = [dict(params=[model.layers[i].weight], sparsity=sp) for i, sp in schedules]
    return groups + [dict(params=[p for i, layer in enumerate(model.layers) for p in layer.parameters()
                                  if i not in sparse or p is not layer.weight])]


def _train_sparse(model, opt, steps=STEPS):
    for s in range(steps):
        model(*_batch(s)).backward()
        opt.step()
        opt.zero_grad()


def _whole(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _snapshot(model, opt, schedules):
    """Every parameter, then (dense_param, nm_mask) of each sparse weight, whole."""
    out = [_whole(p).detach().clone() for p in model.parameters()]
    for i, _ in schedules:
        state = opt.state[model.layers[i].weight]
        out += [_whole(state["dense_param"]).clone(), _whole(state["nm_mask"]).clone()]
    return out


def _single_process(world, name, backend):
    model = Layers()
    schedules = SCHEDULES[world]
    opt = getattr(fastopt, name)(_groups(model, schedules), backend=backend, **OPTIMIZERS[name])
    _train_sparse(model, opt)
    return _snapshot(model, opt, schedules)


def _sharded(mesh, **kwargs):
    from torch.distributed.fsdp import fully_shard

    model = Layers()
    for layer in model.layers:
        fully_shard(layer, mesh=mesh, **kwargs)
    return fully_shard(model, mesh=mesh, **kwargs)


# -- the workers ---------------------------------------------------------------------------------------
def _nm_fsdp(world, results):
    """N:M training under FSDP2: results, state placements, the public mask functions on DTensors, and
    the refusals (when the group is added; while a step is planned, after a schedule was swapped in)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (world,))
    schedules = SCHEDULES[world]
    for backend in BACKENDS:
        for name in NM_OPTIMIZERS[world]:
            model = _sharded(mesh)
            opt = getattr(fastopt, name)(_groups(model, schedules), backend=backend, **OPTIMIZERS[name])
            _train_sparse(model, opt)
            results[("fsdp", backend, name)] = _snapshot(model, opt, schedules)
            placed = []
            for i, _ in schedules:
                p = model.layers[i].weight
                state = opt.state[p]
                placed += [isinstance(state[k], DTensor) and state[k].placements == p.placements
                           and state[k].device_mesh == p.device_mesh for k in ("dense_param", "nm_mask")]
            results[("placed", backend, name)] = placed
    # the public mask functions on a DTensor: the masks of the whole tensor, as DTensors like it
    w = _sharded(mesh).layers[2].weight.detach()
    masks = {"nm": fastopt.sparse.nm_mask(w, 2, 4), "nm-pad": fastopt.sparse.nm_mask(w, 1, 3, pad=True)}
    if world == 3:
        masks["tiles"] = fastopt.sparse.transposable_mask(_sharded(mesh).layers[1].weight.detach())
    results["masks"] = {k: (_whole(m), isinstance(m, DTensor) and m.placements == w.placements)
                        for k, m in masks.items()}
    results["mask_inputs"] = (_whole(w), _whole(_sharded(mesh).layers[1].weight.detach()))
    # nm_param_groups leaves dense the layers whose shards would split groups
    model = _sharded(mesh)
    chosen = fastopt.sparse.nm_param_groups(model, NMSparsity(2, 4, dim=0))[0]["params"]
    results["nm_param_groups"] = [i for i, layer in enumerate(model.layers) if any(p is layer.weight for p in chosen)]
    # refused when the group is added: nothing made
    for i, sp, _ in STRADDLING[world]:
        model = _sharded(mesh)
        try:
            fastopt.Lion([dict(params=[model.layers[i].weight], sparsity=sp)], lr=1e-2, backend=BACKENDS[-1])
            results[("refused-add", i)] = "accepted"
        except ValueError as e:
            results[("refused-add", i)] = str(e)
        try:
            fastopt.sparse.nm_mask(model.layers[i].weight.detach(), sp.n, sp.m, sp.dim) if not sp.transposable \
                else fastopt.sparse.transposable_mask(model.layers[i].weight.detach())
            results[("refused-mask", i)] = "computed"
        except ValueError as e:
            results[("refused-mask", i)] = str(e)
    # refused while the step is planned (a schedule swapped in after the group was added, as a loaded
    # checkpoint's would be): parameters and state untouched
    for backend in BACKENDS[1:]:
        i, sp, _ = STRADDLING[world][0]
        model = _sharded(mesh)
        opt = fastopt.Lion([dict(params=[model.layers[i].weight], sparsity=NMSparsity(2, 4, dim=-1))], lr=1e-2,
                           backend=backend)
        opt.param_groups[0]["sparsity"] = sp
        before = _whole(model.layers[i].weight).detach().clone()
        model(*_batch(0)).backward()
        try:
            opt.step()
            results[("refused-step", backend)] = "stepped"
        except ValueError as e:
            results[("refused-step", backend)] = (str(e), torch.equal(_whole(model.layers[i].weight), before),
                                                  len(opt.state))


def _nm_ddp(results):
    for name, kwargs in OPTIMIZERS.items():
        model = Layers()
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = getattr(fastopt, name)(_groups(model, SCHEDULES[2]), backend=BACKENDS[-1], **kwargs)
        for s in range(STEPS):
            ddp(*_batch(s)).backward()
            opt.step()
            opt.zero_grad()
        results[("ddp", name)] = _snapshot(model, opt, SCHEDULES[2])


INT8_SHAPES = ((32, 8), (8, 6))  # an Int8Linear 8x32 (groups of 16), then a Linear 6x8
# (a large eps: the step depends on the gradient's scale, so a sum is not taken for an average)
INT8_OPT = dict(lr=1e-2, eps=1.0, weight_decay=0.02)


def _int8_model():
    torch.manual_seed(1)
    model = Layers(INT8_SHAPES)
    model.layers[0] = fastopt.lowbit.Int8Linear.from_linear(model.layers[0], group_size=16)
    return model


def _int8_state(model):
    int8 = model.layers[0]
    return [int8.weight.detach().clone(), int8.weight_scale.clone(), int8.weight_zero.clone()] + \
        [_whole(p).detach().clone() for n, p in model.named_parameters() if n != "layers.0.weight"]


def _int8_train(model, opt, rank, steps=3, reduce=True):
    """Each rank its own batches (the average is what the step sees)."""
    for s in range(steps):
        model(*_batch(s, INT8_SHAPES, rank)).backward()
        if reduce:
            reduce_float_grads(model)
        opt.step()
        opt.zero_grad()


def _int8_ddp(rank, results):
    model = _int8_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = fastopt.Adan(model.parameters(), **INT8_OPT, backend=BACKENDS[-1])
    before = _int8_state(model)
    # refused: the float_grad was not reduced (nothing written)
    ddp(*_batch(0, INT8_SHAPES, rank)).backward()
    try:
        opt.step()
        results["int8-unreduced"] = "stepped"
    except RuntimeError as e:
        results["int8-unreduced"] = (str(e), all(torch.equal(a, b) for a, b in zip(_int8_state(model), before)),
                                     len(opt.state))
    # reduced, then accumulated into again by a backward: refused again
    reduce_float_grads(model)
    reduced_ok = fastopt.lowbit.int8.float_grad_reduced(model.layers[0].weight.float_grad)
    ddp(*_batch(1, INT8_SHAPES, rank)).backward()
    try:
        opt.step()
        results["int8-accumulated"] = "stepped"
    except RuntimeError as e:
        results["int8-accumulated"] = (str(e), reduced_ok, len(opt.state))
    # a one-rank group: marked without communication, each rank steps its own gradient
    opt.zero_grad()
    ddp(*_batch(2, INT8_SHAPES, rank)).backward()
    local = model.layers[0].weight.float_grad.clone()
    own, _ = dist.new_subgroups(group_size=1)
    reduce_float_grads(model, group=own)
    results["int8-own-group"] = torch.equal(model.layers[0].weight.float_grad, local)
    opt.step()
    # a layer only rank 0 used gets the average (its gradient / 2) on both; one no rank used keeps none
    used, unused = (fastopt.lowbit.Int8Linear(16, 4, group_size=16) for _ in range(2))
    if rank == 0:
        (used(torch.ones(2, 16)) * 3).sum().backward()
        results["int8-used-own"] = used.weight.float_grad.clone()
    reduce_float_grads([used, unused])
    results["int8-used"] = (getattr(used.weight, "float_grad", None), getattr(unused.weight, "float_grad", None))
    # training with reduce_float_grads: the single-process step on the averaged gradient
    model = _int8_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = fastopt.Adan(model.parameters(), **INT8_OPT, backend=BACKENDS[-1])
    _int8_train(ddp, opt, rank)
    results["int8-ddp"] = _int8_state(model)


def _int8_fsdp(rank, world, results):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    model = _int8_model()
    try:
        fully_shard(model, mesh=mesh)
        results["int8-fully-shard"] = "sharded"
    except NotImplementedError as e:
        results["int8-fully-shard"] = str(e)
    # the int8 weights kept whole (ignored by FSDP2), their gradients averaged by reduce_float_grads
    for backend in BACKENDS:
        model = _int8_model()
        ignored = set(int8_weights(model))
        fully_shard(model.layers[1], mesh=mesh)
        fully_shard(model, mesh=mesh, ignored_params=ignored)
        opt = fastopt.Adan(model.parameters(), **INT8_OPT, backend=backend)
        _int8_train(model, opt, rank)
        results[("int8-fsdp", backend)] = _int8_state(model)


def _worker(rank, world, port, out_dir):
    _init(rank, world, port)
    results = {}
    try:
        _nm_fsdp(world, results)
        if world == 2:
            _nm_ddp(results)
            _int8_ddp(rank, results)
            _int8_fsdp(rank, world, results)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """What each of 2 ranks measured (one spawn for every test of the module)."""
    return _spawn(_worker, 2, tmp_path_factory.mktemp("two_ranks"))


@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory):
    return _spawn(_worker, 3, tmp_path_factory.mktemp("three_ranks"))


@pytest.fixture(params=[2, 3], ids=["2ranks", "3ranks"])
def ranks(request):
    """(world size, what each rank measured)."""
    return request.param, request.getfixturevalue("two_ranks" if request.param == 2 else "three_ranks")


# -- N:M -----------------------------------------------------------------------------------------------
def _assert_equal_lists(got, want, what):
    assert len(got) == len(want), what
    for k, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype and torch.equal(a, b), f"{what}: tensor {k} differs"


def test_nm_fsdp2_equals_single_process(ranks):
    """Uneven shards (7 rows on 2 and 3 ranks, an empty shard on 3), groups along the sharded dim and
    across it, transposable tiles, a decay phase, SR-STE: bit for bit, states DTensors like the params."""
    world, got = ranks[0], ranks[1][0]
    for backend in BACKENDS:
        for name in NM_OPTIMIZERS[world]:
            _assert_equal_lists(got[("fsdp", backend, name)], _single_process(world, name, backend),
                                f"{world} ranks {backend} {name}")
            assert all(got[("placed", backend, name)]), (world, backend, name)


def test_nm_masks_of_dtensors(ranks):
    """fastopt.sparse.nm_mask / transposable_mask of a DTensor: the whole tensor's mask, as a DTensor."""
    world, got = ranks[0], ranks[1][0]
    w, w_tiles = got["mask_inputs"]
    want = {"nm": fastopt.sparse.nm_mask(w, 2, 4), "nm-pad": fastopt.sparse.nm_mask(w, 1, 3, pad=True),
            "tiles": fastopt.sparse.transposable_mask(w_tiles)}
    assert set(got["masks"]) == ({"nm", "nm-pad", "tiles"} if world == 3 else {"nm", "nm-pad"})
    for key, (mask, placed) in got["masks"].items():
        assert placed and torch.equal(mask, want[key]), key


def test_nm_fsdp2_straddling_groups_refused(ranks):
    """Refused with the shape, the shard and the fix: when the group is added, by the mask functions,
    and while a step is planned (a schedule swapped in later), with nothing written."""
    world, got = ranks[0], ranks[1][0]
    for i, sp, where in STRADDLING[world]:
        shape = tuple(reversed(SHAPES[i]))
        for key in (("refused-add", i), ("refused-mask", i)):
            message = got[key]
            assert isinstance(message, str) and f"shape {shape}" in message, (key, message)
            assert where in message and "straddle" in message and "Fix:" in message, message
    for backend in BACKENDS[1:]:
        message, unchanged, nstates = got[("refused-step", backend)]
        assert "straddle" in message and unchanged and nstates == 0, message


def test_nm_param_groups_skips_straddling_layers(ranks):
    """2:4 along dim 0 (rows 16, 12, 7, 4): 7 is no multiple of 4; the others' shards must be."""
    world, got = ranks[0], ranks[1][0]
    assert got["nm_param_groups"] == {2: [0], 3: [1]}[world]  # 2 ranks: 8|8 (not 6|6, 2|2); 3: 4|4|4


def test_nm_ddp_equals_single_process(two_ranks):
    """DDP: plain tensors, every rank the same averaged gradients and the whole tensors."""
    for rank in (0, 1):
        for name in OPTIMIZERS:
            _assert_equal_lists(two_ranks[rank][("ddp", name)], _single_process(2, name, BACKENDS[-1]),
                                f"rank {rank} {name}")


# -- Int8Linear ----------------------------------------------------------------------------------------
def _int8_reference(backend):
    """One process, two batches per step, their float_grad (and every .grad) averaged as the ranks do."""
    model = _int8_model()
    opt = fastopt.Adan(model.parameters(), **INT8_OPT, backend=backend)
    params = [p for n, p in model.named_parameters() if n != "layers.0.weight"]
    weight = model.layers[0].weight
    for s in range(3):
        grads = []
        for rank in (0, 1):
            opt.zero_grad()
            model(*_batch(s, INT8_SHAPES, rank)).backward()
            grads.append([weight.float_grad.clone()] + [p.grad.clone() for p in params])
        weight.float_grad = (grads[0][0] + grads[1][0]) / 2
        for p, a, b in zip(params, grads[0][1:], grads[1][1:]):
            p.grad = (a + b) / 2
        opt.step()
    return _int8_state(model)


def test_int8_unreduced_float_grad_refused(two_ranks):
    for rank in (0, 1):
        got = two_ranks[rank]
        message, unchanged, nstates = got["int8-unreduced"]
        assert "reduce_float_grads" in message and "not reduced across the 2 ranks" in message, message
        assert unchanged and nstates == 0
        message, reduced_ok, nstates = got["int8-accumulated"]
        assert reduced_ok and "reduce_float_grads" in message and nstates == 0, message
        assert got["int8-own-group"]


@pytest.mark.parametrize("where", ["ddp", "fsdp"])
def test_int8_reduced_equals_single_process(where, two_ranks):
    """DDP, and FSDP2 with the int8 weights ignored (kept whole): with reduce_float_grads every rank
    steps the averaged gradient -- the codes, scales and zeros of the one-process run, bit for bit."""
    for backend in (BACKENDS[-1],) if where == "ddp" else BACKENDS:
        want = _int8_reference(backend)
        for rank in (0, 1):
            got = two_ranks[rank][f"int8-{where}" if where == "ddp" else ("int8-fsdp", backend)]
            _assert_equal_lists(got, want, f"{where} {backend} rank {rank}")


def test_reduce_float_grads_missing_gradients(two_ranks):
    """A float_grad only some ranks have: averaged with zeros; none anywhere: stays None."""
    own = two_ranks[0]["int8-used-own"]
    assert own.abs().sum() > 0
    for rank in (0, 1):
        used, unused = two_ranks[rank]["int8-used"]
        assert torch.equal(used, own / 2) and unused is None, rank


def test_int8_fully_shard_refused(two_ranks):
    message = two_ranks[0]["int8-fully-shard"]
    assert "Int8Linear" in message and "ignored_params" in message and "reduce_float_grads" in message, message


def test_reduce_float_grads_needs_torch_distributed():
    layer = fastopt.lowbit.Int8Linear(16, 4, group_size=16)
    layer(torch.ones(2, 16)).sum().backward()
    with pytest.raises(RuntimeError, match="not initialized"):
        reduce_float_grads(layer)
    assert int8_weights([layer, layer.weight, torch.zeros(3)]) == [layer.weight]


# -- the shard rule, without processes: a stand-in for a DTensor's metadata -------------------------------
def _fake(shape, placements, mesh_shape):
    from types import SimpleNamespace

    return SimpleNamespace(shape=torch.Size(shape), placements=tuple(placements),
                           device_mesh=SimpleNamespace(shape=tuple(mesh_shape)))


def _shards(shape, placements, mesh_shape):
    """The index slices of every mesh coordinate's shard (torch's chunking rule)."""
    import itertools

    from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

    for coord in itertools.product(*(range(s) for s in mesh_shape)):
        sizes, offsets = _compute_local_shape_and_global_offset(shape, mesh_shape, list(coord), placements)
        yield tuple(slice(o, o + s) for o, s in zip(offsets, sizes))


def _placements():
    from torch.distributed.tensor.placement_types import Replicate, Shard, _StridedShard

    return Replicate, Shard, _StridedShard


ACCEPTED = [  # (shape, placements, mesh shape, m, dim, transposable, pad): every group whole in a shard
    ((8, 12), ("S1",), (3,), 4, -1, False, False),       # groups along the sharded dim, 4 | 4 | 4
    ((8, 12), ("S1",), (5,), 4, 0, False, False),        # groups across it (uneven, empty shards)
    ((16, 4), ("R", "S0"), (2, 2), 4, 0, False, False),  # HSDP
    ((16, 4), ("S0", "S0"), (2, 2), 4, 0, False, False),  # one dim sharded twice
    ((4, 6), ("S0",), (3,), 2, 0, False, False),          # 2 | 2 | 0
    ((3, 10), ("S1",), (3,), 4, 1, False, True),          # 4 | 4 | 2, the last group padded
    ((8, 4, 6), ("S1",), (2,), 4, 0, True, False),        # tiles: columns of 2 x 6, blocks of 2 along dim 1
    ((12, 8), ("S0",), (3,), 4, 0, True, False),          # tiles: rows 4 | 4 | 4
]
REFUSED = [  # (..., the error)
    ((8, 12), ("S1",), (2,), 4, -1, False, False, ValueError),         # 6 | 6
    ((12, 4), ("R", "S0"), (2, 2), 4, 0, False, False, ValueError),    # 6 | 6
    ((24, 4), ("S0", "S0"), (2, 2), 4, 0, False, False, ValueError),   # 6 | 6 | 6 | 6
    ((3, 10), ("S1",), (3,), 4, 1, False, False, ValueError),          # padded groups need pad=True
    ((8, 2, 6), ("S1",), (2,), 4, 0, True, False, ValueError),         # blocks of 2 along dim 1, shards of 1
    ((8, 2, 6), ("S2",), (2,), 4, 0, True, False, NotImplementedError),  # tiles span dim 1: no blocks of dim 2
    ((16, 4), ("SS0",), (2,), 4, 0, False, False, NotImplementedError),  # strided shards
]


def _build(spec):
    Replicate, Shard, StridedShard = _placements()
    return [Replicate() if s == "R" else StridedShard(int(s[2:]), split_factor=2) if s.startswith("SS")
            else Shard(int(s[1:])) for s in spec]


@pytest.mark.parametrize("case", ACCEPTED)
def test_shard_rule_accepts_whole_groups(case, monkeypatch):
    """Accepted layouts are exact: each shard's mask is the whole tensor's mask there."""
    from fastopt.sparse import masks

    shape, spec, mesh, m, dim, tiles, pad = case
    placements = _build(spec)
    monkeypatch.setattr(masks._sharded, "is_dtensor", lambda t: True)
    masks.check_shard_groups(_fake(shape, placements, mesh), m, dim, tiles, pad=pad)
    monkeypatch.undo()
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    mask = (lambda x: masks.transposable_mask(x, backend="torch")) if tiles else \
        (lambda x: masks.nm_mask(x, 2, m, dim, pad=pad, backend="torch"))
    whole = mask(w)
    for index in _shards(shape, placements, mesh):
        if w[index].numel():
            assert torch.equal(mask(w[index]), whole[index]), index


@pytest.mark.parametrize("case", REFUSED)
def test_shard_rule_refuses_straddling_groups(case, monkeypatch):
    from fastopt.sparse import masks

    shape, spec, mesh, m, dim, tiles, pad, error = case
    monkeypatch.setattr(masks._sharded, "is_dtensor", lambda t: True)
    with pytest.raises(error, match=rf"shape {re.escape(str(tuple(shape)))}"):
        masks.check_shard_groups(_fake(shape, _build(spec), mesh), m, dim, tiles, pad=pad)
