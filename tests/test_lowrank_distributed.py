"""fastopt.lowrank under torch.distributed on the CPU (gloo on 127.0.0.1, 2 spawned ranks).

DDP: every rank computes its projector from the same all-reduced gradient -- the randomized projector's
random stream is keyed on the group's seed, the parameter's index and the refresh count, not on the rank
-- so the ranks' parameters stay bit-identical through refreshes (checked after every step) for every
projector kind.

FSDP2 (``fully_shard``: DTensor parameters sharded by rows, unevenly): a refresh gathers the whole
gradient, the step runs on the local rows (NOTE: [projected DTensors] in fastopt/lowrank/optim.py).  With
the gradients set to the same values in every run, the result equals the single-process one within fp32
summation-order rounding (the left side sums the rows' partial products over the ranks).
"""
import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastopt
from fastopt.lowrank import GaLoreAdamW, GaLoreLion

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

WORLD = 2
BACKENDS = ("torch", "cpu") if fastopt._backend.has_cpu() else ("torch",)
CONFIGS = {
    "svd": dict(projector="svd"),
    "randomized": dict(projector="randomized"),
    "dct": dict(projector="dct"),
    "int4-adaptive": dict(projector="randomized", proj_bits=4, proj_group_size=4, proj_adaptive=True),
    # (full: eps 1e-2, as in tests/test_lowrank.py: its projected gradient at a refresh is diagonal up to
    # rounding noise, which a smaller eps normalizes into updates that depend on that noise)
    "full": dict(projector="svd", proj_type="full", eps=1e-2),
    "reverse_std": dict(projector="svd", proj_type="reverse_std"),
}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model():
    torch.manual_seed(0)
    # weights 24 x 40 (wide: left side), 64 x 24 (tall: right side), 7 x 64 (uneven shards: 4 + 3 rows)
    return torch.nn.Sequential(torch.nn.Linear(40, 24), torch.nn.Tanh(), torch.nn.Linear(24, 64), torch.nn.Tanh(),
                               torch.nn.Linear(64, 7))


def _optimizer(name, model, backend="cpu"):
    mats = [p for p in model.parameters() if p.dim() == 2]
    rest = [p for p in model.parameters() if p.dim() != 2]
    groups = [{"params": rest}, {"params": mats, "rank": 4, "update_proj_gap": 3, "scale": 0.5, **CONFIGS[name]}]
    cls = GaLoreLion if name == "reverse_std" else GaLoreAdamW
    return cls(groups, lr=1e-3 if cls is GaLoreLion else 1e-2, weight_decay=0.1, backend=backend)


def _grad(step, i, shape):
    return torch.randn(shape, generator=torch.Generator().manual_seed(1000 * step + i))


def _train_fixed(model, opt, steps=7):
    """``steps`` steps (refreshes at 0, 3, 6) after a forward and backward, with each gradient set to
    ``_grad`` (FSDP2 averages the ranks' gradients; the test is of the step)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for s in range(steps):
        model(torch.randn(4, 40, generator=torch.Generator().manual_seed(s))).square().sum().backward()
        for i, p in enumerate(model.parameters()):
            g = _grad(s, i, p.shape)
            p.grad = distribute_tensor(g, p.device_mesh, p.placements) if isinstance(p, DTensor) else g
        opt.step()
        opt.zero_grad()


def _worker(rank, world, port, out_file):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    results = {}
    try:
        # DDP: each rank its own data; after every step the ranks' parameters are compared bit for bit
        from torch.nn.parallel import DistributedDataParallel as DDP

        for name in CONFIGS:
            model = _model()
            ddp = DDP(model)
            opt = _optimizer(name, model)
            diverged = []
            for s in range(8):
                x = torch.randn(8, 40, generator=torch.Generator().manual_seed(100 * s + rank))
                ddp(x).square().mean().backward()
                opt.step()
                opt.zero_grad()
                flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
                every = [torch.empty_like(flat) for _ in range(world)]
                dist.all_gather(every, flat)
                if not all(torch.equal(every[0], f) for f in every[1:]):
                    diverged.append(s)
            state = opt.state[next(p for p in model.parameters() if p.dim() == 2)]
            results[("ddp", name)] = (diverged, state["proj_refreshes"], flat)
        # FSDP2
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for backend in BACKENDS:
            for name in CONFIGS:
                model = _model()
                for layer in (model[0], model[2], model[4]):
                    fully_shard(layer, mesh=mesh)
                fully_shard(model, mesh=mesh)
                opt = _optimizer(name, model, backend)
                _train_fixed(model, opt)
                results[("fsdp", backend, name)] = [p.full_tensor().detach() for p in model.parameters()]
        # a low-bit projected state under FSDP2 is refused before anything changes
        model = _model()
        fully_shard(model, mesh=mesh)
        opt = GaLoreAdamW([{"params": [model[2].weight], "rank": 4}], state_bits=8, min_quant_size=0)
        model(torch.ones(2, 40)).sum().backward()
        try:
            opt.step()
            results["lowbit"] = "stepped"
        except NotImplementedError as e:
            results["lowbit"] = (str(e), len(opt.state))
        if rank == 0:
            torch.save(results, out_file)
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_never_diverge_and_fsdp2_matches_single_process(tmp_path):
    out_file = str(tmp_path / "lowrank.pt")
    mp.start_processes(_worker, args=(WORLD, _free_port(), out_file), nprocs=WORLD, join=True, start_method="spawn")
    got = torch.load(out_file)
    for name in CONFIGS:
        diverged, refreshes, flat = got[("ddp", name)]
        assert diverged == [], f"{name}: ranks differ after steps {diverged}"
        assert refreshes == 3, name  # steps 0, 3, 6 (the gap grows only after a full queue)
        assert torch.isfinite(flat).all()
    for backend in BACKENDS:
        for name in CONFIGS:
            model = _model()
            _train_fixed(model, _optimizer(name, model, backend))
            for p, q in zip(model.parameters(), got[("fsdp", backend, name)]):
                torch.testing.assert_close(q, p.detach(), rtol=1e-5, atol=1e-6, msg=f"{backend} {name}")
    message, n_states = got["lowbit"]
    assert "state_bits" in message and n_states == 0
