"""The Triton launchers' steady state: no host-to-device copies, no device allocations, one launch per step.

Run through the real optimizers (``backend="triton"``; on CPU under ``TRITON_INTERPRET=1``):

* the second and later steps over the same tensors build no table, allocate nothing and make no
  separate step-increment launch, counted two independent ways: the launchers' own counters
  (``multi_tensor.launch_stats``) and a ``TorchDispatchMode`` that sees every ATen op (``lift_fresh`` of
  a ``torch.tensor``, ``zeros``, ``_to_copy``, ``split`` ...) whose innermost Python caller outside
  torch is a file of ``triton_kernels/`` (the kernels' own tensor traffic runs in Triton's interpreter
  and is not counted; on a GPU the same ops are the H2D copies and allocations);
* a tensor with new storage invalidates its table (rebuilt once, results still those of the cpu
  backend); the cache stays bounded when every step brings new tensors;
* the step increment folded into the main kernel (the last program to draw a ticket increments every
  counter) gives bit-for-bit the numbers of the separate increment launch (``multi_tensor.FOLD_STEPS``
  False), AMP-skipped steps included, and leaves the ticket counter at 0.
"""
import os
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastopt
from conftest import NEEDS_TRITON, TRITON_DEVICE as DEVICE
from fastopt import _backend

pytestmark = NEEDS_TRITON

TORCH_DIR = os.path.dirname(torch.__file__)
KERNELS_DIR = os.path.dirname(os.path.abspath(_backend.triton_kernels().__file__))
HERE = os.path.abspath(__file__)


def mt():
    return sys.modules["fastopt.triton_kernels.multi_tensor"]


class LauncherOps(TorchDispatchMode):
    """Counts the ATen ops whose innermost non-torch Python caller is in ``triton_kernels/``."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        f = sys._getframe(1)
        while f is not None and (f.f_code.co_filename.startswith(TORCH_DIR) or f.f_code.co_filename == HERE):
            f = f.f_back
        if f is not None and os.path.abspath(f.f_code.co_filename).startswith(KERNELS_DIR):
            self.ops.append(f"{func} from {os.path.basename(f.f_code.co_filename)}:{f.f_lineno}")
        return func(*args, **(kwargs or {}))


# sizes: 2 programs for the first tensor (elementwise chunks of 65536, low-bit tiles of 8192 under the
# interpreter), an odd one, a bf16-friendly square; all multiples of 256 where the low-bit step needs it
SHAPES = [(70144,), (64, 64), (33, 7)]
LOWBIT_SHAPES = [(8192 * 2 + 256,), (64, 64), (256,)]


def make(cls, backend, shapes, dtype=torch.float32, **kw):
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, dtype=dtype, device=DEVICE)) for s in shapes]
    return ps, cls(ps, backend=backend, **kw)


def fill_grads(ps, i, new=False):
    """Deterministic grads for step ``i``, written in place (same storage) unless ``new``."""
    gen = torch.Generator().manual_seed(100 + i)
    for p in ps:
        g = torch.randn(p.shape, generator=gen).to(p.dtype)
        if new or p.grad is None:
            p.grad = g.to(DEVICE)
        else:
            p.grad.copy_(g)


def counted_step(opt):
    before = dict(mt().launch_stats)
    with LauncherOps() as mode:
        opt.step()
    stats = {k: v - before.get(k, 0) for k, v in mt().launch_stats.items() if v - before.get(k, 0)}
    return stats, mode.ops


OPTIMIZERS = {
    "AdamW": (fastopt.AdamW, SHAPES, dict(lr=1e-2, weight_decay=0.1)),
    "Lion": (fastopt.Lion, SHAPES, dict(lr=1e-3, weight_decay=0.1)),
    "AdamW8bit": (fastopt.lowbit.AdamW8bit, LOWBIT_SHAPES, dict(lr=1e-2, min_quant_size=0)),
}


def state_tensors(opt):
    return [v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]


def uncached_run(cls, shapes, kw, steps, new_grads=(), new_param=()):
    """The params and states after ``steps`` Triton steps, every cache dropped before each step (every
    table rebuilt, as the launchers did before they cached): the oracle of the cached runs, which must
    match it bit for bit (the cpu backend may differ in the last bit after a few steps: fp64 exp)."""
    ps, opt = make(cls, "triton", shapes, **kw)
    for i in range(steps):
        fill_grads(ps, i, new=i in new_grads)
        if i in new_param:
            with torch.no_grad():
                ps[1].data = ps[1].data.clone()
        mt().clear_caches()
        opt.step()
    mt().clear_caches()
    return [p.detach().cpu().clone() for p in ps] + [t.cpu().clone() for t in state_tensors(opt)]


def assert_same(opt, ps, expect, what):
    got = [p.detach().cpu() for p in ps] + [t.cpu() for t in state_tensors(opt)]
    assert len(got) == len(expect)
    for a, b in zip(got, expect):
        assert torch.equal(a, b), what


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_steady_state_copies_and_allocates_nothing(name):
    cls, shapes, kw = OPTIMIZERS[name]
    expect = uncached_run(cls, shapes, kw, 3)
    ps, opt = make(cls, "triton", shapes, **kw)
    per_step = []
    for i in range(3):
        fill_grads(ps, i)
        per_step.append(counted_step(opt))
    (first, first_ops), *steady = per_step
    # the first step builds its tables (the instruments see them) ...
    assert first.get("tables", 0) >= 1 and first_ops, (first, first_ops)
    # ... the later ones nothing, and the step increment is in the main launch
    for stats, ops in steady:
        assert stats == {}, stats
        assert ops == [], ops
    assert_same(opt, ps, expect, name)


@pytest.mark.parametrize("name", ["AdamW", "AdamW8bit"])
def test_new_storage_invalidates_the_table(name):
    cls, shapes, kw = OPTIMIZERS[name]
    # step 2: every grad is a new tensor (new addresses); step 3: one param gets new storage
    expect = uncached_run(cls, shapes, kw, 4, new_grads=(2,), new_param=(3,))
    ps, opt = make(cls, "triton", shapes, **kw)
    for i in range(4):
        fill_grads(ps, i, new=i == 2)
        if i == 3:
            with torch.no_grad():
                ps[1].data = ps[1].data.clone()
        stats, _ = counted_step(opt)
        if i > 0:  # step 0 builds the size tables too; steps 2, 3 the address table only, step 1 nothing
            assert stats.get("tables", 0) == (1 if i in (2, 3) else 0), (i, stats)
    assert_same(opt, ps, expect, name)


def test_cache_stays_bounded(monkeypatch):
    shapes, kw = [(300,), (7, 3)], dict(lr=1e-3)
    expect = uncached_run(fastopt.Lion, shapes, kw, 6, new_grads=range(6))
    monkeypatch.setattr(mt()._tables, "max_entries", 3)
    ps, opt = make(fastopt.Lion, "triton", shapes, **kw)
    keep = []
    for i in range(6):
        fill_grads(ps, i, new=True)
        keep.append([p.grad for p in ps])  # keep old grads alive: every step has new addresses
        stats, _ = counted_step(opt)
        assert stats.get("tables", 0) == (2 if i == 0 else 1), stats  # the address table (+ the sizes' once)
        assert len(mt()._tables) <= 3
    assert_same(opt, ps, expect, "Lion")


def test_device_cache_lru():
    cache = mt().DeviceCache(max_entries=2, max_bytes=1 << 20)
    made = []

    def maker(k, n=4):
        def make():
            made.append(k)
            return (torch.zeros(n),)
        return make

    a = cache.get("a", maker("a"))
    assert cache.get("a", maker("a")) is a and made == ["a"]
    cache.get("b", maker("b"))
    cache.get("a", maker("a"))      # a is now the most recent
    cache.get("c", maker("c"))      # evicts b
    assert len(cache) == 2
    cache.get("a", maker("a"))
    cache.get("b", maker("b"))
    assert made == ["a", "b", "c", "b"]
    big = mt().DeviceCache(max_entries=10, max_bytes=64)
    big.get("x", maker("x", 8))     # 32 bytes
    big.get("y", maker("y", 8))     # 64 in all: kept
    big.get("z", maker("z", 8))     # over 64 bytes: x goes
    assert len(big) == 2
    big.get("w", maker("w", 100))   # larger than the budget alone: kept, as the newest entry
    assert len(big) == 1


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_folded_step_increment_is_bit_identical(monkeypatch, name):
    cls, shapes, kw = OPTIMIZERS[name]
    results = {}
    for fold in (True, False):
        monkeypatch.setattr(mt(), "FOLD_STEPS", fold)
        ps, opt = make(cls, "triton", shapes, **kw)
        opt.grad_scale = torch.tensor(4.0, device=DEVICE)
        launches = 0
        for i in range(4):
            fill_grads(ps, i)
            for p in ps:
                p.grad.mul_(4.0)
            opt.found_inf = torch.tensor(1.0 if i == 2 else 0.0, device=DEVICE)  # step 2: AMP-skipped
            stats, _ = counted_step(opt)
            launches += stats.get("step_launches", 0)
            assert int(mt().ticket_counter(ps[0].device)) == 0
        steps = [float(st["step"]) for st in opt.state.values()]
        assert steps == [3.0] * len(ps), steps
        assert (launches == 0) == fold, launches
        results[fold] = [p.detach().cpu().clone() for p in ps] + [t.cpu().clone() for t in state_tensors(opt)]
    for a, b in zip(results[True], results[False]):
        assert torch.equal(a, b), name


def test_empty_tensors_still_count_steps():
    """A call whose tensors are all empty has no program: its counters are incremented by the separate
    launch; mixed with non-empty ones, by the last program (every row of the table)."""
    ps, opt = make(fastopt.AdamW, "triton", [(0,), (5,), (0, 3)], lr=1e-2)
    only_empty, opt2 = make(fastopt.AdamW, "triton", [(0,), (0, 3)], lr=1e-2)
    for i in range(2):
        fill_grads(ps, i)
        fill_grads(only_empty, i)
        opt.step()
        opt2.step()
    assert [float(st["step"]) for st in opt.state.values()] == [2.0] * 3
    assert [float(st["step"]) for st in opt2.state.values()] == [2.0] * 2
