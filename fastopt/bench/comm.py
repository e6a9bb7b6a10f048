"""The ``comm-hooks`` suite: the compute of fastopt.comm's gradient-compression DDP hooks (compress +
decompress of one step's gradient) against an uncompressed all-reduce of the same gradient on 2 gloo ranks.

The gradient: ``layers`` x ``nn.Linear(width, width)`` (weights and biases), 6 x 2048 = 25.2M fp32 elements
(``--quick``: 4 x 256 = 263K), standard normal, one DDP bucket.

Methods (``ms`` per call; the ``compression_ratio`` column is the hook state's own, uncompressed bytes / bytes
one rank sends):

* ``allreduce-fp32`` (the baseline): ``dist.all_reduce`` of the whole fp32 gradient (after DDP's division by
  the world size) between 2 gloo ranks on 127.0.0.1, processes spawned at the suite's first case and kept
  until its last (``os.cpu_count() // 2`` threads each).  One call: the report's process tells both ranks to
  run it between two barriers and waits for their answers (the slowest rank's wall time plus the pipes, about
  a ms).
* ``powersgd-r<r>``: :func:`fastopt.comm.powersgd_hook`'s computation at rank r (error-feedback add and copy,
  the gather of the bias vectors, Q orthogonalization, P = M Q, the scatter of the averaged biases, P
  orthogonalization, Q = M^T P, Q / world, M = P Q^T, the new error) without its three all-reduces;
* ``topk-<density>``: :func:`fastopt.comm.topk_hook`'s compress (error-feedback add, threshold, pack, residual)
  and decompress (the average of 2 ranks' messages -- this rank's, twice) without the all-gather;
* ``qsgd-<bits>bit``: :func:`fastopt.comm.qsgd_hook`'s compress (add + norms, quantize + pack + residual) and
  decompress (2 ranks' messages) without the all-gather.

Each call works on what the last one left in the gradient (the hooks overwrite it with the decompressed
average; the timings do not depend on the values).  The hook rows run in the report's process with a rank's
share of the threads (``os.cpu_count() // 2``, as the ranks of the baseline), on the ``cpu`` kernels
(fastopt._C).  PowerSGD's products and orthogonalization are torch's (``bmm``, ``norm``, ``linalg.qr``: the
bit-for-bit match with torch's hook needs the same operations) and dominate its row.

Bars: every hook's compress + decompress <= 0.1 x the all-reduce, i.e. ``speedup_vs_allreduce-fp32`` >= 10,
at the compression ratio it reports (the ``compression_ratio`` column, from :func:`fastopt.comm.bytes_for`;
the suite checks the hooks send exactly that).
"""
import datetime
import os
import socket
import time
import weakref
from dataclasses import dataclass

import torch

from .harness import Bar, Case, Suite, Unsupported, Workload, progress, register

WORLD = 2
BASELINE = "allreduce-fp32"
HOOKS = ("powersgd-r4", "topk-0.01", "qsgd-4bit", "qsgd-2bit")
METHODS = (BASELINE,) + HOOKS
TIMEOUT_S = 300


@dataclass(frozen=True)
class Config:
    layers: int
    width: int

    @property
    def name(self):
        return f"{self.layers}x{self.width}"

    @property
    def numel(self):
        return self.layers * (self.width * self.width + self.width)


def _config(quick):
    return Config(4, 256) if quick else Config(6, 2048)


# -- the ranks (the baseline) ---------------------------------------------------------------------------
def _rank_main(rank, world, port, conn):
    import torch.distributed as dist

    torch.set_num_threads(_threads())
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=TIMEOUT_S))
    buf = None
    try:
        conn.send("ok")
        while True:
            cmd, arg = conn.recv()
            if cmd == "exit":
                break
            try:
                if cmd == "alloc":
                    buf = torch.randn(arg, generator=torch.Generator().manual_seed(rank))
                    conn.send("ok")
                elif cmd == "allreduce":
                    dist.barrier()
                    t0 = time.perf_counter()
                    buf.div_(world)
                    dist.all_reduce(buf)
                    ms = (time.perf_counter() - t0) * 1e3
                    dist.barrier()
                    conn.send(ms)
                else:
                    conn.send(("error", f"unknown command {cmd!r}"))
            except Exception as e:  # reported by the report's process
                conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        dist.destroy_process_group()
        conn.close()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Ranks:
    _live = weakref.WeakSet()

    def __init__(self):
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        port = _free_port()
        self.conns, self.procs = [], []
        progress(f"[comm-hooks] starting {WORLD} gloo ranks ({_threads()} thread(s) each)")
        for rank in range(WORLD):
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=_rank_main, args=(rank, WORLD, port, theirs), daemon=True)
            proc.start()
            theirs.close()
            self.conns.append(mine)
            self.procs.append(proc)
        _Ranks._live.add(self)
        self._collect("start")

    def _collect(self, what):
        out = []
        for rank, conn in enumerate(self.conns):
            deadline = time.monotonic() + TIMEOUT_S
            while not conn.poll(1.0):
                if not self.procs[rank].is_alive() or time.monotonic() > deadline:
                    self.close()
                    raise RuntimeError(f"comm-hooks bench: rank {rank} died or hung during {what}")
            out.append(conn.recv())
        errors = [r[1] for r in out if isinstance(r, tuple) and r[0] == "error"]
        if errors:
            self.close()
            raise RuntimeError(f"comm-hooks bench: {what} failed on a rank: {errors[0]}")
        return out

    def ask(self, cmd, arg=None):
        for conn in self.conns:
            conn.send((cmd, arg))
        return self._collect(cmd)

    def close(self):
        for conn in self.conns:
            try:
                conn.send(("exit", None))
            except (OSError, BrokenPipeError):
                pass
        for proc in self.procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
        self.conns, self.procs = [], []


class _Run:
    """The ranks, started at the first baseline case and closed after the suite's last case."""

    def __init__(self, total):
        self.total, self.done, self.ranks = total, 0, None

    def finish_one(self):
        self.done += 1
        if self.done >= self.total and self.ranks is not None:
            self.ranks.close()
            self.ranks = None

    def allreduce(self, config):
        if self.ranks is None:
            self.ranks = _Ranks()
        self.ranks.ask("alloc", config.numel)
        ranks = self.ranks
        return Workload(fn=lambda: ranks.ask("allreduce"))


# -- the hooks' computation (in the report's process) -------------------------------------------------
def _grads(config):
    gen = torch.Generator().manual_seed(0)
    flat = torch.randn(config.numel, generator=gen)
    views, o = [], 0
    for _ in range(config.layers):
        w = config.width
        views.append(flat[o:o + w * w].view(w, w))
        o += w * w
        views.append(flat[o:o + w])
        o += w
    return flat, views


def _powersgd(config, rank):
    from fastopt.comm import _kernels as K
    from fastopt.comm.hooks import PowerSGDState, _orthogonalize, _offset

    state = PowerSGDState(None, matrix_approximation_rank=rank, start_powerSGD_iter=2, backend="cpu")
    flat, views = _grads(config)
    mats = [v for v in views if v.dim() == 2]
    segs = [(_offset(flat, v), v.numel()) for v in views if v.dim() == 1]
    e = torch.zeros_like(flat)
    ps = [torch.empty(1, m.shape[0], rank) for m in mats]
    qs = [torch.randn(1, m.shape[1], rank) for m in mats]
    n_sent = sum(n for _, n in segs) + sum(p.numel() + q.numel() for p, q in zip(ps, qs))
    ratio = flat.numel() / n_sent

    def step():
        mem = K.psgd_pre(flat, e, segs, True)
        for q in qs:
            _orthogonalize(q, 0)
        for m, q, p in zip(mats, qs, ps):
            torch.bmm(m.unsqueeze(0), q, out=p)
        K.psgd_scatter(flat, mem, segs, WORLD, True)  # (mem stands for the all-reduced biases)
        for p in ps:
            _orthogonalize(p, 0)
        for m, p, q in zip(mats, ps, qs):
            torch.bmm(m.unsqueeze(0).transpose(1, 2), p, out=q)
        for q in qs:
            q.div_(WORLD)
        for m, p, q in zip(mats, ps, qs):
            torch.bmm(p, q.transpose(1, 2), out=m.unsqueeze(0))
        K.psgd_error(flat, e, True)

    del state
    return step, ratio


def _topk(config, density):
    from fastopt.comm.hooks import TopKState, _topk_compress, _topk_decompress

    state = TopKState(None, density=density, backend="cpu")
    flat, views = _grads(config)
    box = {}

    def step():
        send, ks = _topk_compress(state, views, views, True)
        gathered = send.unsqueeze(0).expand(WORLD, -1).contiguous()  # (stands for the all-gather)
        _topk_decompress(views, gathered, ks, WORLD, True)
        box["sent"] = send.numel() * 4

    step()
    return step, flat.numel() * 4 / box["sent"]


def _qsgd(config, bits):
    from fastopt.comm.hooks import QSGDState, _qsgd_compress, _qsgd_decompress

    state = QSGDState(None, bits=bits, bucket_size=512, use_error_feedback=True, backend="cpu")
    flat, views = _grads(config)
    box = {}

    def step():
        send, bs, offs = _qsgd_compress(state, views, views, True, 0, 0)
        gathered = send.unsqueeze(0).expand(WORLD, -1).contiguous()
        _qsgd_decompress(state, views, gathered, bs, offs, WORLD, True)
        box["sent"] = send.numel()

    step()
    return step, flat.numel() * 4 / box["sent"]


def _setting(method):
    kind, arg = method.split("-", 1)
    return kind, (int(arg[1:]) if kind == "powersgd" else float(arg) if kind == "topk" else int(arg[:-3]))


def _ratio(config, method):
    """Uncompressed bytes / bytes one rank sends (fastopt.comm.bytes_for, as the hook states count them)."""
    from fastopt.comm import bytes_for

    if method == BASELINE:
        return 1.0
    kind, setting = _setting(method)
    w = config.width
    shapes = [(w, w), (w,)] * config.layers
    return 4 * config.numel / sum(bytes_for(kind, sh, setting, WORLD) for sh in shapes)


def _hook_workload(config, method):
    from fastopt.comm import _kernels as K

    if K._native_or_none() is None:
        raise Unsupported("needs fastopt._C with the comm kernels")
    kind, setting = _setting(method)
    step, ratio = {"powersgd": _powersgd, "topk": _topk, "qsgd": _qsgd}[kind](config, setting)
    if abs(ratio - _ratio(config, method)) > 1e-6 * ratio:
        raise AssertionError(f"{method}: the hook sent another byte count than bytes_for says")
    threads = _threads()

    def fn():  # a rank's share of the cores, as the ranks of the baseline have
        prev = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            step()
        finally:
            torch.set_num_threads(prev)

    return Workload(fn=fn)


def _threads():
    return max(1, (os.cpu_count() or 1) // WORLD)


def cases(ctx):
    if ctx.device.type != "cpu":
        config = _config(ctx.quick)
        return [Case(config=config.name, method=m, items=config.numel, bytes_moved=0,
                     setup=lambda: (_ for _ in ()).throw(Unsupported("the comm-hooks suite runs on the CPU (gloo)")))
                for m in METHODS]
    config = _config(ctx.quick)
    run = _Run(total=len(METHODS) * ctx.rounds)
    out = []
    for m in METHODS:
        info = {"ranks": WORLD, "dtype": "float32", "compression_ratio": round(_ratio(config, m), 2)}

        def setup(m=m):
            try:
                if m == BASELINE:
                    return run.allreduce(config)
                return _hook_workload(config, m)
            finally:
                run.finish_one()

        out.append(Case(config=config.name, method=m, items=config.numel, bytes_moved=0, setup=setup, info=info))
    return out


def bars(ctx):
    config = _config(ctx.quick)
    return [Bar(config.name, m, "speedup_vs_" + BASELINE.replace("-", "_"), 10.0) for m in HOOKS]


SUITE = register(Suite(name="comm-hooks", cases=cases, unit="elements", baseline=BASELINE, bars=bars,
                       memory_bound=False, what="one step's compress + decompress (hooks) / all-reduce (baseline)"))
