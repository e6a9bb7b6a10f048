"""fastopt under torch.distributed on the CPU (gloo on 127.0.0.1, processes spawned by the test).

FSDP2 (``fully_shard``) on 1, 2 and 3 ranks: parameters, gradients and states are DTensors sharded along
dim 0, unevenly (7 and 3 rows).  Every optimizer steps them on the torch backend (the references on
DTensors) and on the cpu kernels (local shards, NOTE: [DTensors] in fastopt/_sharded.py), with the
gradients set to the same values in every run (FSDP2's average of 3 equal gradients is not bit-equal to
one).  Elementwise optimizers -- with low-bit states, stochastic rounding of bf16 weights, fp32 master
weights -- equal the single-process result bit for bit; reduce passes (LAMB, AdamP/SGDP, SGD-SaI,
use_gc, cautious, clip_grad_norm_, OrthoGrad) match it within fp32 summation-order rounding.  DDP: plain
tensors, the cpu kernels, the single-process result.
"""
import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastopt

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

WORLD = 2
BACKENDS = ("torch", "cpu") if fastopt._backend.has_cpu() else ("torch",)
KERNELS = ("cpu",) if fastopt._backend.has_cpu() else ()
# every element's update needs only that element: the torch backend (references on DTensors) and the
# kernels (local shards) both give the single-process result bit for bit
ELEMENTWISE = {"Lion": dict(lr=1e-2, weight_decay=0.1), "AdamW": dict(lr=1e-2), "Adam": dict(lr=1e-2, amsgrad=True),
               "Adan": dict(lr=1e-2), "AdaBelief": dict(lr=1e-2), "DiffGrad": dict(lr=1e-2),
               "EXAdam": dict(lr=1e-2),
               # low-bit states: blocks of whole rows (the 7x256 weight), the others full precision
               "lowbit.AdamW8bit": dict(lr=1e-2, min_quant_size=0), "lowbit.Lion4bit": dict(lr=1e-2, min_quant_size=0),
               "lowbit.AdamWFp8": dict(lr=1e-2, min_quant_size=0),
               # bf16 parameters: stochastic rounding keyed on the index in the whole tensor, master weights
               "Adan-sr-bf16": dict(lr=1e-2, stochastic_rounding=True),
               "lowbit.Adan8bit-sr-bf16": dict(lr=1e-2, stochastic_rounding=True, min_quant_size=0),
               "Lion-master-bf16": dict(lr=1e-2, master_weights=True)}
# reduce passes: the kernels sum each shard's part and all-reduce the sums (fastopt/_sharded.py), so the
# result is the single-process one up to the order of the fp32 sums
REDUCE = {"Lamb": dict(lr=1e-2, weight_decay=0.01), "Lamb-pre_norm": dict(lr=1e-2, pre_norm=True, max_grad_norm=0.5),
          "AdamP": dict(lr=1e-2, weight_decay=0.01), "AdamP-cautious": dict(lr=1e-2, cautious=True),
          "AdamP-use_gc": dict(lr=1e-2, use_gc=True), "SGDP": dict(lr=1e-2, momentum=0.9),
          "SGDSaI": dict(lr=1e-2), "Lion-use_gc": dict(lr=1e-2, use_gc=True),
          "Adan-use_gc": dict(lr=1e-2, use_gc=True), "Lion-cautious": dict(lr=1e-2, cautious=True),
          "Lamb-sr-bf16": dict(lr=1e-2, stochastic_rounding=True)}


DDP = ("AdamW", "Lion", "lowbit.AdamW8bit", "Lamb", "Adan-sr-bf16")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


IN = 256  # the first weight (7 x 256): rows of whole low-bit blocks


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    # 7 and 3 rows: uneven shards on 2 ranks; 3 ranks give one rank a single row
    return torch.nn.Sequential(torch.nn.Linear(IN, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).to(dtype)


def _grad(step, i, shape):
    return torch.randn(shape, generator=torch.Generator().manual_seed(1000 * step + i))


def _train(model, opt, steps=3, clip=None):
    """``steps`` steps after a forward and backward, each with gradients set to ``_grad``: FSDP2 averages
    the ranks' gradients (with 3 ranks (g + g + g) / 3 is not g in fp32), and the test is of the step."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for s in range(steps):
        x = torch.randn(4, IN, generator=torch.Generator().manual_seed(s))
        model(x.to(next(model.parameters()).dtype)).float().square().sum().backward()
        for i, p in enumerate(model.parameters()):
            g = _grad(s, i, p.shape).to(p.dtype)
            p.grad = distribute_tensor(g, p.device_mesh, p.placements) if isinstance(p, DTensor) else g
        if clip is not None:
            clip(model.parameters())
        opt.step()
        opt.zero_grad()


def _make(name, params, backend):
    kwargs = {**ELEMENTWISE, **REDUCE}[name]
    cls = name.split("-")[0]
    module = fastopt.lowbit if cls.startswith("lowbit.") else fastopt
    return getattr(module, cls.split(".")[-1])(params, backend=backend, **kwargs)


def _dtype(name):
    return torch.bfloat16 if name.endswith("-bf16") else torch.float32


def _runs(world):
    """(key, optimizer name, backend, clip) of every run the FSDP2 worker makes on ``world`` ranks: every
    configuration on 3 ranks (the kernels) and 2 (the kernels and the torch backend), a few on 1."""
    names = list(ELEMENTWISE) + list(REDUCE) if world > 1 else ["AdamW", "lowbit.AdamW8bit", "Adan-sr-bf16", "Lamb"]
    backends = BACKENDS if world == 2 else KERNELS
    runs = [((backend, name), name, backend, None) for backend in backends for name in names]
    if KERNELS and world > 1:  # fastopt.clip_grad_norm_ (the global norm over shards) and OrthoGrad's dot products
        runs.append((("cpu", "clip"), "AdamW", "cpu", lambda ps: fastopt.clip_grad_norm_(ps, 0.1, backend="cpu")))
        runs.append((("cpu", "orthograd"), "AdamW", "cpu",
                     lambda ps: fastopt.optim.orthograd.orthogonalize_gradients_(ps, backend="cpu")))
    return runs


def _sharded_model(mesh, dtype=torch.float32, offload=None):
    from torch.distributed.fsdp import OffloadPolicy, fully_shard

    model = _model(dtype)
    policy = offload or OffloadPolicy()
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh, offload_policy=policy)
    return fully_shard(model, mesh=mesh, offload_policy=policy)


def _fsdp_worker(rank, world, port, out_file):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    results = {}
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world,))
        for key, name, backend, clip in _runs(world):
            model = _sharded_model(mesh, _dtype(name))
            _train(model, _make(name, model.parameters(), backend), clip=clip)
            results[key] = [p.full_tensor().detach() for p in model.parameters()]
        if world == 2 and KERNELS:  # CPU offload (FSDP2's CPUOffloadPolicy): the cpu kernels step the CPU shards
            from torch.distributed.fsdp import CPUOffloadPolicy

            model = _sharded_model(mesh, offload=CPUOffloadPolicy(pin_memory=False))
            opt = _make("AdamW", model.parameters(), "cpu")
            _train(model, opt)
            results["offload"] = [p.full_tensor().detach() for p in model.parameters()]
            results["offload-state"] = {v.device.type for s in opt.state.values() for v in s.values()}
        # FSDP2's parameters own their local shards: the disjointness check compares those (their
        # DTensors' own data_ptr() is 0, which made every step look like shared memory)
        from torch.distributed.tensor import DTensor

        from fastopt.optim.functional import check_disjoint

        params = list(_sharded_model(mesh).parameters())
        check_disjoint("t", params)
        twin = DTensor.from_local(params[0].to_local()[1:], mesh, params[0].placements, run_check=False)
        try:
            check_disjoint("t", [params[0], twin])
            results["disjoint"] = "passed"
        except ValueError as e:
            results["disjoint"] = str(e) if params[0].to_local().shape[0] > 1 else "share memory (empty shard)"
        # low-bit states: decided on the global size (the 7 x 256 weight's shards are smaller than
        # min_quant_size), and only for rows of whole blocks (a 4 x 320 weight keeps full precision)
        from torch.distributed.fsdp import fully_shard

        model = torch.nn.Sequential(torch.nn.Linear(IN, 7), torch.nn.Linear(7, 4), torch.nn.Linear(4, 320),
                                    torch.nn.Linear(320, 4))
        for layer in model:
            fully_shard(layer, mesh=mesh)
        opt = fastopt.lowbit.AdamW8bit(model.parameters(), min_quant_size=1000, backend="cpu")
        model(torch.ones(2, IN)).sum().backward()
        opt.step()
        results["quantized"] = [(tuple(p.shape), "state_format" in opt.state[p]) for p in model.parameters()]
        opt = fastopt.lowbit.AdamW4bit(model.parameters(), min_quant_size=0, backend="cpu")
        opt.param_groups[0]["state_bits"] = "4-rank1"
        try:
            opt.step()
            results["rank1"] = "stepped"
        except NotImplementedError as e:
            results["rank1"] = (str(e), len(opt.state))
        if rank == 0:
            torch.save(results, out_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [1, 2, 3])
def test_fsdp2_matches_single_process(tmp_path, world):
    out_file = str(tmp_path / "fsdp.pt")
    mp.start_processes(_fsdp_worker, args=(world, _free_port(), out_file), nprocs=world, join=True,
                       start_method="spawn")
    got = torch.load(out_file)
    for key, name, backend, clip in _runs(world):
        model = _model(_dtype(name))
        _train(model, _make(name, model.parameters(), backend), clip=clip)
        for p, q in zip(model.parameters(), got[key]):
            if name in ELEMENTWISE and clip is None:
                assert torch.equal(p.detach(), q), key
            else:  # sums over shards, then over ranks: another fp32 summation order
                torch.testing.assert_close(q, p.detach(), rtol=1e-5, atol=1e-6, msg=str(key))
    assert "share memory" in got["disjoint"]
    if world == 2 and KERNELS:
        model = _model()
        _train(model, _make("AdamW", model.parameters(), "cpu"))
        assert all(torch.equal(p.detach(), q) for p, q in zip(model.parameters(), got["offload"]))
        assert got["offload-state"] == {"cpu"}
    assert got["quantized"] == [((7, IN), True), ((7,), False), ((4, 7), False), ((4,), False), ((320, 4), False),
                                ((320,), False), ((4, 320), False), ((4,), False)]
    message, nstates = got["rank1"]
    assert "4-rank1" in message and nstates == 0


def _ddp_worker(rank, world, port, out_file):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        results = {}
        for name in DDP:
            model = torch.nn.parallel.DistributedDataParallel(_model(_dtype(name)))
            opt = _make(name, model.parameters(), "cpu")
            _train(model, opt)  # (the gradients DDP averaged are replaced by the same ones everywhere)
            results[name] = [p.detach().clone() for p in model.module.parameters()]
            del model, opt  # (a DDP module left to the interpreter's exit can hang in its destructor)
        # ZeroRedundancyOptimizer: each rank steps its share of the parameters with a fastopt optimizer
        from torch.distributed.optim import ZeroRedundancyOptimizer

        model = torch.nn.parallel.DistributedDataParallel(_model())
        opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=fastopt.AdamW, lr=1e-2, backend="cpu")
        _train(model, opt)
        results["zero"] = [p.detach().clone() for p in model.module.parameters()]
        del model, opt
        if rank == 0:
            torch.save(results, out_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not fastopt._backend.has_cpu(), reason="needs fastopt._C")
def test_ddp_cpu_kernels_match_single_process(tmp_path):
    out_file = str(tmp_path / "ddp.pt")
    mp.start_processes(_ddp_worker, args=(WORLD, _free_port(), out_file), nprocs=WORLD, join=True,
                       start_method="spawn")
    got = torch.load(out_file)
    for name in DDP + ("zero",):
        model = _model(_dtype(name))
        opt = _make("AdamW" if name == "zero" else name, model.parameters(), "cpu")
        _train(model, opt)
        for p, q in zip(model.parameters(), got[name]):
            assert torch.equal(q, p.detach()), name
