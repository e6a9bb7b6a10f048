"""The ``fsdp`` suite: one ``optimizer.step()`` of a model sharded with FSDP2 (``fully_shard``) over 2
ranks, for each fastopt optimizer beside ``torch.optim.AdamW(fused=True)`` (the baseline) in the same
run, without and with ``CPUOffloadPolicy``.

The model: ``layers`` square ``nn.Linear(width, width)`` (weights and biases), ``fully_shard`` on each
layer and on the root; 12 x 2048 = 50.4M parameters (``--quick``: 4 x 256 = 263K).  Each rank builds it
on its device, runs one forward and backward (the gradients stay: a step does not clear them, so every
timed step reads the same sharded gradients), builds the optimizer and takes one untimed step (its
states are made there; an optimizer that refuses FSDP2 parameters raises there).  The model is kept
for the next method of the same config; each optimizer is new.

Ranks: processes spawned at the suite's first case and kept until its last (a free port on
127.0.0.1; gloo and the CPU, or NCCL with rank r on ``cuda:r`` when the report runs on CUDA: as many
ranks as GPUs, at most 2 -- the ``ranks`` column says how many ran).  Each rank uses
``os.cpu_count() // ranks`` threads (1 each on a 2-core machine), for fastopt and torch alike.

Timing: one call is one step on every rank, driven from the report's process: it sends "step" to each
rank through a pipe; each rank waits at a barrier, steps (and synchronizes its GPU), waits at a second
barrier and answers.  The report's timer (the median over its repeats after its warm-up) takes the wall
time of the call, so a row is the slowest rank's step plus a fixed overhead: the pipes and two barriers,
timed alone in the ``overhead-only`` row (the same call without the step) -- subtract it to compare
small steps.  On CUDA the report's timer records CUDA events on the report process's idle stream,
which measure that same wall time.

``CPUOffloadPolicy``: FSDP2 keeps the sharded parameters, their gradients and so the optimizer states
on the CPU (checked in the suite: a state tensor anywhere else fails the case), and fastopt's ``auto``
backend steps them with its ``cpu`` kernels, torch with its fused CPU AdamW.  On a machine without a GPU
the parameters live on the CPU anyway, so the two configs do the same work there: the comparison that
matters, offloaded CPU step vs GPU step, needs a GPU machine.

Methods: ``torch-fused`` (``torch.optim.AdamW(fused=True)``, the baseline; if this torch cannot run it
on the device the row says so), ``torch-foreach``, ``fastopt-<Class>`` for every fastopt optimizer
(backend ``auto``) and ``fastopt-AdamW8bit`` (``fastopt.lowbit``), and ``overhead-only``.  An optimizer
that refuses FSDP2 parameters (NotImplementedError / BackendUnavailableError at its first step) gets
the row ``unsupported: refused under FSDP2: <its message>``; any other failure is an ``error`` row.
On the CPU the full-size Muon row is not timed (its Newton-Schulz iterations are ~15 matmuls of
2048^3 per matrix, about 2 s each on one thread: the row says so); ``--quick`` and CUDA time it.
"""
import atexit
import datetime
import gc
import os
import socket
import statistics
import time
import weakref
from dataclasses import dataclass

import torch

from .harness import Case, Suite, Unsupported, Workload, progress, register

WORLD = 2
HYPER = dict(lr=1e-3, weight_decay=1e-2)
FASTOPT = ("AdamW", "Adam", "Lion", "Adan", "AdaBelief", "DiffGrad", "EXAdam", "Lamb", "AdamP", "SGDP", "SGDSaI",
           "Muon", "AdamW8bit", "SGD", "Adagrad", "RMSprop", "AdaHessian")
BASELINE = "torch-fused"
OVERHEAD = "overhead-only"
METHODS = (BASELINE, "torch-foreach") + tuple(f"fastopt-{name}" for name in FASTOPT) + (OVERHEAD,)
TIMEOUT_S = 600  # a reply from the ranks (building 50M parameters on a loaded machine takes a while)


@dataclass(frozen=True)
class Config:
    """The model (``layers`` x Linear(width, width)), the batch of its one backward, CPU offload or not."""

    name: str
    layers: int
    width: int
    batch: int
    offload: bool

    @property
    def numel(self):
        return self.layers * (self.width * self.width + self.width)


def configs(quick):
    layers, width, batch = (4, 256, 4) if quick else (12, 2048, 8)
    size = f"{layers}x{width}"
    return [Config(f"fsdp2-{size}", layers, width, batch, False),
            Config(f"fsdp2-offload-{size}", layers, width, batch, True)]


# -- on each rank ----------------------------------------------------------------------------------
def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def _make_optimizer(method, params):
    if method == BASELINE:
        return torch.optim.AdamW(params, **HYPER, fused=True)
    if method == "torch-foreach":
        return torch.optim.AdamW(params, **HYPER, foreach=True)
    import fastopt
    import fastopt.lowbit

    name = method.removeprefix("fastopt-")
    if name == "AdamW8bit":
        return fastopt.lowbit.AdamW8bit(params, **HYPER)
    if name in ("SGDP", "SGD"):
        return getattr(fastopt, name)(params, **HYPER, momentum=0.9)
    return getattr(fastopt, name)(params, **HYPER)


class _Rank:
    """One rank's model and optimizer, stepped on command."""

    def __init__(self, rank, world, device):
        from torch.distributed.device_mesh import init_device_mesh

        self.rank, self.world, self.device = rank, world, device
        self.mesh = init_device_mesh(device.type, (world,))
        self.config = self.model = self.opt = None

    def _model(self, config):
        from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

        if self.config == config:
            return
        self.model = self.opt = None
        gc.collect()
        torch.manual_seed(0)
        # built on the CPU with offload (FSDP2 keeps the shards there), else on the rank's device
        with torch.device("cpu" if config.offload else self.device):
            model = torch.nn.Sequential(*(torch.nn.Linear(config.width, config.width) for _ in range(config.layers)))
        policy = {"offload_policy": CPUOffloadPolicy(pin_memory=self.device.type == "cuda")} if config.offload else {}
        for layer in model:
            fully_shard(layer, mesh=self.mesh, **policy)
        fully_shard(model, mesh=self.mesh, **policy)
        x = torch.randn(config.batch, config.width, device=self.device,
                        generator=torch.Generator(self.device).manual_seed(self.rank))
        model(x).square().mean().backward()
        self.model, self.config = model, config

    def build(self, config, method):
        """The model of ``config`` (kept from the last call if the same), a new optimizer, one step.
        Returns ("ok", state bytes on this rank) or ("refused", message)."""
        import fastopt

        self._model(config)
        if self.opt is not None:
            self.opt = None
            if config.numel > 10_000_000:  # (the states of a 50M model: free them before the next ones)
                gc.collect()
        if method == OVERHEAD:
            return "ok", 0
        try:
            self.opt = _make_optimizer(method, list(self.model.parameters()))
            self.opt.step()
        except (NotImplementedError, fastopt.BackendUnavailableError) as e:
            self.opt = None
            return "refused", f"{type(e).__name__}: {e}"
        states = [t for s in self.opt.state.values() for t in s.values() if torch.is_tensor(t)]
        if config.offload:
            where = {str(_local(t).device) for t in states if _local(t).numel() > 1}
            if where - {"cpu"}:
                raise AssertionError(f"{method} with CPUOffloadPolicy keeps optimizer states on {sorted(where)}, "
                                     "not on the CPU")
        return "ok", sum(_local(t).nbytes for t in states)

    def step(self, method):
        """One step between two barriers; returns this rank's time in ms."""
        import torch.distributed as dist

        dist.barrier()
        t0 = time.perf_counter()
        if method != OVERHEAD:
            self.opt.step()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        ms = (time.perf_counter() - t0) * 1e3
        dist.barrier()
        return ms


def _rank_main(rank, world, port, device_type, threads, conn):
    """A rank's process: join the group, then serve the report's commands until "exit"."""
    import torch.distributed as dist

    torch.set_num_threads(threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if device_type == "cuda":
        torch.cuda.set_device(rank)
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S),
                            **({"device_id": device} if device_type == "cuda" else {}))
    try:
        state = _Rank(rank, world, device)
        conn.send(("ok", None))
        while True:
            command, args = conn.recv()
            if command == "exit":
                break
            try:
                conn.send(getattr(state, command)(*args))
            except Exception as e:  # reported by the report's process, which stops the ranks
                conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        dist.destroy_process_group()
        conn.close()


# -- in the report's process ----------------------------------------------------------------------
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _world(device):
    return WORLD if device.type == "cpu" else max(1, min(WORLD, torch.cuda.device_count()))


class Ranks:
    """The suite's spawned ranks (see the module docstring); ``ask`` sends one command to each."""

    _live = weakref.WeakSet()

    def __init__(self, device):
        import torch.multiprocessing as mp

        self.world = _world(device)
        self.threads = max(1, (os.cpu_count() or 1) // self.world)
        ctx = mp.get_context("spawn")
        port = _free_port()
        self.conns, self.procs = [], []
        progress(f"[fsdp] starting {self.world} ranks ({'nccl' if device.type == 'cuda' else 'gloo'}, "
                 f"{self.threads} thread(s) each)")
        for rank in range(self.world):
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=_rank_main, args=(rank, self.world, port, device.type, self.threads, theirs),
                               daemon=True)
            proc.start()
            theirs.close()
            self.conns.append(mine)
            self.procs.append(proc)
        Ranks._live.add(self)
        self._collect("start")

    def _collect(self, what):
        replies = []
        for rank, conn in enumerate(self.conns):
            deadline = time.monotonic() + TIMEOUT_S
            while not conn.poll(1.0):
                if not self.procs[rank].is_alive() or time.monotonic() > deadline:
                    self.close()
                    raise RuntimeError(f"fsdp bench: rank {rank} died or hung during {what}")
            replies.append(conn.recv())
        errors = [r[1] for r in replies if isinstance(r, tuple) and r and r[0] == "error"]
        if errors:
            self.close()  # a rank may be stuck in a collective the other left: start afresh
            raise RuntimeError(f"fsdp bench: {what} failed on a rank: {errors[0]}")
        return replies

    def ask(self, command, *args):
        for conn in self.conns:
            conn.send((command, args))
        return self._collect(command)

    @property
    def alive(self):
        return bool(self.procs) and all(p.is_alive() for p in self.procs)

    def close(self):
        for conn in self.conns:
            try:
                conn.send(("exit", ()))
            except (OSError, BrokenPipeError):
                pass
        for proc in self.procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self.conns:
            conn.close()
        self.conns, self.procs = [], []


@atexit.register
def _close_all():
    for ranks in list(Ranks._live):
        ranks.close()


class _Run:
    """The ranks of one pass of the suite over its cases: started at the first case, closed after the
    last (when the harness drops its workload) or when a case fails."""

    def __init__(self, ctx, total):
        self.ctx, self.total, self.done, self.ranks = ctx, total, 0, None

    def _ensure(self):
        if self.ranks is None or not self.ranks.alive:
            self.ranks = Ranks(self.ctx.device)
        return self.ranks

    def _finish_case(self, workload=None):
        self.done += 1
        if self.done < self.total or self.ranks is None:
            return
        ranks, self.ranks = self.ranks, None
        if workload is None:
            ranks.close()
        else:
            weakref.finalize(workload, ranks.close)

    def setup(self, config, method):
        if method == "fastopt-Muon" and self.ctx.device.type == "cpu" and config.width > 1024:
            self._finish_case()
            raise Unsupported(f"not timed on the CPU at this size: Muon's Newton-Schulz takes ~15 bf16 matmuls of "
                              f"{config.width}^3 per matrix, {config.layers} matrices: seconds per step on one thread "
                              "(run --quick, or on CUDA)")
        try:
            ranks = self._ensure()
            replies = ranks.ask("build", config, method)
        except BaseException:
            self._finish_case()
            raise
        refused = [msg for status, msg in replies if status == "refused"]
        if refused or any(status != "ok" for status, _ in replies):
            self._finish_case()
            if refused:
                raise Unsupported(f"refused under FSDP2: {refused[0]}")
            raise RuntimeError(f"fsdp bench: unexpected replies {replies}")
        state = sum(nbytes for _, nbytes in replies)
        rank_ms = []

        def step():
            rank_ms.append(max(ranks.ask("step", method)))

        def report():
            if rank_ms:
                progress(f"[fsdp] {config.name} {method}: in-rank step median {statistics.median(rank_ms):.3f} ms "
                         f"(slowest rank, {len(rank_ms)} calls, between the barriers)")

        workload = Workload(fn=step, state_bytes=lambda: state)
        weakref.finalize(workload, report)
        self._finish_case(workload)
        return workload


def cases(ctx):
    cfgs = configs(ctx.quick)
    run = _Run(ctx, total=len(cfgs) * len(METHODS) * ctx.rounds)
    world = _world(ctx.device)
    return [Case(config=c.name, method=m, items=c.numel, bytes_moved=0,
                 setup=lambda c=c, m=m: run.setup(c, m),
                 info={"ranks": world, "dtype": "float32", "offload": c.offload})
            for c in cfgs for m in METHODS]


SUITE = register(Suite(name="fsdp", cases=cases, unit="params", baseline=BASELINE, memory_bound=False,
                       what="one optimizer.step() on every rank (FSDP2)"))
