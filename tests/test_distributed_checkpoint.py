"""Distributed checkpoints of fastopt's optimizers: ``torch.distributed.checkpoint`` with
``get_state_dict`` / ``set_state_dict``, under FSDP2 (2 ranks -> 1 rank -> 2 ranks: the checkpoint is
resharded both ways) and DDP, on the CPU with gloo on 127.0.0.1 (processes spawned by the test).

Each run trains 2 steps, saves, and steps once more (the uninterrupted run); a fresh model and optimizer
then load the checkpoint -- on another number of ranks -- and step once: the parameters must equal the
uninterrupted run's bit for bit.  Low-bit states (codes and block scales: DTensors sharded as their
parameter's rows, NOTE: [low-bit states of DTensors] in fastopt/lowbit/state.py), fp32 master weights and
the per-tensor scalars of LAMB go through it.
"""
import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastopt

from test_distributed import _free_port, _grad

pytestmark = pytest.mark.skipif(not (dist.is_available() and fastopt._backend.has_cpu()),
                                reason="needs torch.distributed and fastopt._C")

IN = 256
# name -> (constructor, kwargs, dtype)
OPTIMIZERS = {
    "AdamW": (lambda ps, **kw: fastopt.AdamW(ps, **kw), dict(lr=1e-2, weight_decay=0.1), torch.float32),
    "Lamb": (lambda ps, **kw: fastopt.Lamb(ps, **kw), dict(lr=1e-2), torch.float32),
    "AdamW8bit": (lambda ps, **kw: fastopt.lowbit.AdamW8bit(ps, **kw), dict(lr=1e-2, min_quant_size=0), torch.float32),
    "Lion4bit": (lambda ps, **kw: fastopt.lowbit.Lion4bit(ps, **kw), dict(lr=1e-2, min_quant_size=0), torch.float32),
    "Adan-master-bf16": (lambda ps, **kw: fastopt.Adan(ps, **kw), dict(lr=1e-2, master_weights=True),
                         torch.bfloat16),
}


def _names(kind):
    """Every optimizer under FSDP2; under DDP (plain tensors, the single-process layouts) two."""
    return list(OPTIMIZERS) if kind == "fsdp" else ["AdamW8bit", "Adan-master-bf16"]


def _model(dtype):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(IN, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).to(dtype)


def _step(model, opt, s):
    from torch.distributed.tensor import DTensor, distribute_tensor

    x = torch.randn(4, IN, generator=torch.Generator().manual_seed(s)).to(next(model.parameters()).dtype)
    model(x).float().square().sum().backward()
    for i, p in enumerate(model.parameters()):
        g = _grad(s, i, p.shape).to(p.dtype)
        p.grad = distribute_tensor(g, p.device_mesh, p.placements) if isinstance(p, DTensor) else g
    opt.step()
    opt.zero_grad()


def _build(kind, name, world):
    make, kwargs, dtype = OPTIMIZERS[name]
    model = _model(dtype)
    if kind == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        fully_shard(model[0], mesh=mesh)
        fully_shard(model[2], mesh=mesh)
        fully_shard(model, mesh=mesh)
        module = model
    else:
        module = torch.nn.parallel.DistributedDataParallel(model)
    return module, make(module.parameters(), backend="cpu", **kwargs)


def _full(module):
    return [p.full_tensor().detach() if hasattr(p, "full_tensor") else p.detach().clone() for p in module.parameters()]


def _worker(rank, world, port, kind, phase, root, out_file):
    """phase "save": 2 steps, save, 1 step (the uninterrupted run); "load": load, 1 step, save again
    (for the next phase to load); "load-only": load, 1 step."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    results = {}
    try:
        for name in _names(kind):
            module, opt = _build(kind, name, world)
            path = os.path.join(root, f"{kind}-{name}-{phase.split('-')[0]}")
            if phase == "save":
                for s in range(2):
                    _step(module, opt, s)
                msd, osd = get_state_dict(module, opt)
                dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)
                if name == "AdamW8bit":  # the low-bit states went out as DTensors sharded as their parameter
                    state = opt.state[next(iter(module.parameters()))]
                    results["codes"] = (type(state["exp_avg"]).__name__, tuple(state["exp_avg"].shape),
                                        type(state["exp_avg_absmax"]).__name__)
            else:
                msd, osd = get_state_dict(module, opt)
                src = os.path.join(root, f"{kind}-{name}-{'save' if phase == 'load' else 'load'}")
                state = {"model": msd, "optim": osd}
                dcp.load(state, checkpoint_id=src)
                set_state_dict(module, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
                if phase == "load":  # resave what was loaded: the next phase loads it on another world size
                    dcp.save(state, checkpoint_id=path)
            _step(module, opt, 2)
            results[name] = _full(module)
            del module, opt  # (a DDP module left to the interpreter's exit can hang in its destructor)
        if rank == 0:
            torch.save(results, out_file)
    finally:
        dist.destroy_process_group()


def _spawn(world, kind, phase, root, out_file):
    mp.start_processes(_worker, args=(world, _free_port(), kind, phase, root, out_file), nprocs=world, join=True,
                       start_method="spawn")
    return torch.load(out_file)


def test_fsdp2_checkpoint_reshards_and_continues_bit_exactly(tmp_path):
    root = str(tmp_path)
    uninterrupted = _spawn(2, "fsdp", "save", root, str(tmp_path / "a.pt"))
    assert uninterrupted["codes"] == ("DTensor", (7, IN), "DTensor")
    on_one = _spawn(1, "fsdp", "load", root, str(tmp_path / "b.pt"))  # 2 ranks -> 1
    back_on_two = _spawn(2, "fsdp", "load-only", root, str(tmp_path / "c.pt"))  # 1 rank -> 2
    for name in OPTIMIZERS:
        for want, a, b in zip(uninterrupted[name], on_one[name], back_on_two[name]):
            assert torch.equal(a, want), name
            assert torch.equal(b, want), name


def test_ddp_checkpoint_continues_bit_exactly(tmp_path):
    root = str(tmp_path)
    uninterrupted = _spawn(2, "ddp", "save", root, str(tmp_path / "a.pt"))
    resumed = _spawn(2, "ddp", "load", root, str(tmp_path / "b.pt"))
    for name in _names("ddp"):
        for want, got in zip(uninterrupted[name], resumed[name]):
            assert torch.equal(got, want), name
