"""One result, whatever the threads: the cpu backend steps every element and gives
the same bits for any OpenMP team size, also when the runtime hands back a smaller team than asked
for (``OMP_DYNAMIC=true``).

OpenMP reads ``OMP_NUM_THREADS`` / ``OMP_DYNAMIC`` when the runtime starts, so every configuration
runs in a fresh subprocess (``_WORKER``), which writes its results to a file; the test compares them
bit for bit with the one-thread run, and with the torch backend within the usual tolerance.
"""
import concurrent.futures
import os
import subprocess
import sys

import pytest
import torch

import fastopt

pytestmark = pytest.mark.skipif("cpu" not in fastopt.available_backends("cpu"), reason="no cpu backend built")

# 400000 elements in all: a [256, 1250] matrix (rows for AdamP, rank-1 states), a 1-D tensor, and a small
# one (full-precision states in the low-bit optimizers); every size > the launcher's parallel threshold
# except the small one, the two big ones block multiples (quantized states).
_WORKER = r"""
import sys
import torch
import fastopt
from fastopt import lowbit

backend, out, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
# torch caps its OpenMP team at the core count when imported; ask for the team size under test again
# (with OMP_DYNAMIC=true the runtime may still hand back a smaller team).
torch.set_num_threads(threads)
CASES = {
    "AdamW": lambda ps: fastopt.AdamW(ps, lr=1e-2, weight_decay=0.1, backend=backend),
    "Lion": lambda ps: fastopt.Lion(ps, lr=1e-3, weight_decay=0.1, backend=backend),
    "AdamW8bit": lambda ps: lowbit.AdamW8bit(ps, lr=1e-2, backend=backend),
    "AdamW4bit-rank1": lambda ps: lowbit.AdamW4bit(ps, lr=1e-2, state_bits="4-rank1", backend=backend),
    "Lamb": lambda ps: fastopt.Lamb(ps, lr=1e-2, weight_decay=0.01, pre_norm=True, backend=backend),
    "AdamP": lambda ps: fastopt.AdamP(ps, lr=1e-2, weight_decay=0.01, backend=backend),
    "SGDSaI": lambda ps: fastopt.SGDSaI(ps, lr=1e-2, backend=backend),
}
gen = torch.Generator().manual_seed(1234)
shapes = [(256, 1250), (256 * 312,), (128,)]
init = [torch.randn(s, generator=gen) for s in shapes]
grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(3)]
result = {}
for name, make in CASES.items():
    ps = [torch.nn.Parameter(x.clone()) for x in init]
    opt = make(ps)
    for step in range(3):
        for p, g in zip(ps, grads[step]):
            p.grad = g.clone()
        opt.step()
    result[name] = [p.detach().clone() for p in ps]
    result[name + ".unchanged"] = sum(int((p.detach() == x).sum()) for p, x in zip(ps, init))
    result[name + ".state"] = {f"{i}.{k}": v.clone() for i, p in enumerate(ps)
                               for k, v in opt.state[p].items() if torch.is_tensor(v)}
torch.save(result, out)
"""

NUMEL = 256 * 1250 + 256 * 312 + 128
CASES = ["AdamW", "Lion", "AdamW8bit", "AdamW4bit-rank1", "Lamb", "AdamP", "SGDSaI"]


def _run(tmp_path, backend, threads, dynamic):
    out = tmp_path / f"{backend}-{threads}-{dynamic}.pt"
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OMP_DYNAMIC="true" if dynamic else "false")
    env.pop("OMP_THREAD_LIMIT", None)
    proc = subprocess.run([sys.executable, "-c", _WORKER, backend, str(out), str(threads)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out, weights_only=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("threads")
    configs = [("cpu", 1, False), ("torch", 1, False), ("cpu", 1, True)]
    configs += [("cpu", threads, dynamic) for threads in (2, 3, 7) for dynamic in (True, False)]
    # three workers at a time: each spends most of its time importing torch and fastopt (one core), and
    # the results do not depend on what else runs (the point of the test)
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        return dict(zip(configs, pool.map(lambda c: _run(tmp, *c), configs)))


@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic", "static"])
@pytest.mark.parametrize("threads", [1, 2, 3, 7])
def test_every_element_stepped_and_bits_independent_of_threads(runs, threads, dynamic):
    one, ref = runs[("cpu", 1, False)], runs[("torch", 1, False)]
    got = runs[("cpu", threads, dynamic)]
    for name in CASES:
        # Every element is stepped: as many keep their value as on the torch backend (a handful: a
        # Lion sign step or a clamped LAMB update may land exactly on the start).
        assert got[name + ".unchanged"] == ref[name + ".unchanged"] <= 8, (name, got[name + ".unchanged"], NUMEL)
        for i, (a, b) in enumerate(zip(got[name], one[name])):
            assert torch.equal(a, b), (name, i, (a != b).sum().item())
        assert got[name + ".state"].keys() == one[name + ".state"].keys()
        for key, value in one[name + ".state"].items():
            assert torch.equal(got[name + ".state"][key], value), (name, key)


def test_cpu_matches_torch_backend(runs):
    cpu, ref = runs[("cpu", 7, True)], runs[("torch", 1, False)]
    for name in CASES:
        for a, b in zip(cpu[name], ref[name]):
            diff = (a - b).abs()
            if "bit" in name:
                # a state that rounds across a code midpoint moves that element's update (bounded by lr)
                assert (diff > 2e-6 + 2e-5 * b.abs()).float().mean().item() < 1e-3, name
                assert diff.max().item() <= 4e-2, name
            else:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
