"""Dense M-FAC (fastopt.MFAC, fastopt/reference/mfac.py, csrc/cpu/mfac_kernels.cpp, triton_kernels/mfac.py).

* the reference's inverse-Fisher-vector product equals an explicit fp64 solve of (damp I + G^T G / m) u = g
  (the official codes' scaling: divisor m = ngrads, also while the window is partly filled) at every step
  of a partly filled, a full and a wrapped-around window, to 1e-5 (measured: ~1e-12);
* the O(m^2) update of W = (m damp I + G G^T)^-1 stays equal to a fresh inverse;
* fastopt vs ista-daslab-optimizers 1.1.15's DenseMFAC on the CPU, step for step (see the upstream test);
* every kernel backend vs the torch reference (fp32 window: rtol 1e-5 on params; bf16 window: 2e-4,
  the dot products of rounded rows in another order, amplified by 1 / damp);
* state_dict round trips (weights_only) are exact; bad input raises before any state changes.
"""
import io
import sys
import types

import pytest
import torch

import fastopt
from fastopt import _backend, _ops
from fastopt.reference import mfac as ref

from conftest import KERNEL_DEVICE_BACKENDS

SHAPES = [(3, 5), (7,), (1,), (130,)]  # d = 153: odd, smaller and larger than one block of the kernels


def _params(shapes=SHAPES, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype).to(device)) for s in shapes]


def _grads(params, gen):
    return [torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) for p in params]


# -- the math ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("m", [1, 5])
def test_ifvp_matches_explicit_fp64(m):
    """lr 1, no momentum/decay: p_before - p_after is the IFVP; the window's rows are the last gradients."""
    damp = 1e-3
    params = _params([(4, 5), (3,)], torch.float64)
    opt = fastopt.MFAC(params, lr=1.0, ngrads=m, damp=damp, grads_dtype="float64", backend="torch")
    gen = torch.Generator().manual_seed(1)
    history = []
    for t in range(1, 2 * m + 4):  # partly filled, full, wrapped around (twice for m = 5)
        gs = _grads(params, gen)
        for p, g in zip(params, gs):
            p.grad = g
        g = torch.cat([x.reshape(-1) for x in gs])
        history.append(g)
        before = torch.cat([p.detach().reshape(-1) for p in params])
        opt.step()
        after = torch.cat([p.detach().reshape(-1) for p in params])
        window = opt.state[params[0]]["grads"]
        # the ring: row (s - 1) % m holds the gradient of step s, for the last m steps; unwritten rows are 0
        for s in range(max(1, t - m + 1), t + 1):
            assert torch.equal(window[(s - 1) % m], history[s - 1])
        if t < m:
            assert not window[t:].any()
        want = ref.mfac_ifvp_explicit(window, g, damp)
        torch.testing.assert_close(before - after, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_inverse_update_stays_exact():
    """W after many O(m^2) replacements (between refreshes) equals a fresh inverse of m damp I + K."""
    m, d, damp = 16, 40, 1e-2
    gen = torch.Generator().manual_seed(2)
    window = torch.zeros(m, d, dtype=torch.float64)
    gram = torch.zeros(m, m, dtype=torch.float64)
    inv = torch.eye(m, dtype=torch.float64) / (m * damp)
    for t in range(3 * m):
        s = t % m
        window[s] = torch.randn(d, generator=gen, dtype=torch.float64) * (1 + t % 3)
        row = window @ window[s]
        gram[s, :] = row
        gram[:, s] = row
        ref.mfac_replace_inverse_(inv, gram, s, m, damp)
    fresh = ref.mfac_refresh_inverse(gram, m, damp)
    torch.testing.assert_close(inv, fresh, rtol=1e-9, atol=1e-9 * fresh.abs().max().item())
    assert torch.allclose(fresh @ (gram + m * damp * torch.eye(m, dtype=torch.float64)),
                          torch.eye(m, dtype=torch.float64), atol=1e-9)


# -- upstream ---------------------------------------------------------------------------------------------
def _lu_no_pivot(a, pivot=True, get_infos=False):
    """Unpivoted LU, packed as torch.lu returns it (torch has none on the CPU)."""
    assert not pivot and not get_infos
    n = a.shape[0]
    u = a.clone()
    low = torch.zeros_like(a)
    for k in range(n - 1):
        f = u[k + 1:, k] / u[k, k]
        u[k + 1:, k:] -= f[:, None] * u[k, k:][None, :]
        low[k + 1:, k] = f
    return torch.triu(u) + torch.tril(low, -1), torch.arange(1, n + 1, dtype=torch.int32)


@pytest.fixture
def ista_dense_mfac(monkeypatch):
    """ista-daslab-optimizers 1.1.15's ``DenseMFAC`` made to run on the CPU, with exactly three shims:
    stub modules for its logging / GPU-tool imports (``wandb``, ``gpustat``, ``ista_daslab_cuda_tools``:
    never used by the dense M-FAC math; ``ista_daslab_cuda_dense_mfac`` is absent, so it takes its own
    PyTorch path), ``torch.lu(pivot=False)`` (not implemented on CPUs by torch) by an unpivoted LU, and
    its ``nn.parallel.parallel_apply`` over one device by a plain loop (torch's needs an accelerator).
    Everything else -- the ring, the dot products, the LU-based D / B recursion, the update -- is theirs."""
    from _upstream_lowrank import _ista_module

    for name in ("wandb", "gpustat", "ista_daslab_cuda_tools"):
        stub = types.ModuleType(name)
        stub.log = lambda *a, **k: None
        monkeypatch.setitem(sys.modules, name, stub)
    before = set(sys.modules)
    cls = _ista_module("dense_mfac.dense_mfac").DenseMFAC
    core = sys.modules["ista_daslab_optimizers.dense_mfac.dense_core_mfac"]
    for name in set(sys.modules) - before:  # imported with the stubs: do not leave them to other tests
        if name.startswith("ista_daslab_optimizers.") and name != "ista_daslab_optimizers.utils":
            monkeypatch.delitem(sys.modules, name, raising=False)
    seq = types.SimpleNamespace(parallel_apply=lambda fs, args: [f(a) for f, a in zip(fs, args)])
    monkeypatch.setattr(core, "nn", types.SimpleNamespace(parallel=seq))
    monkeypatch.setattr(torch, "lu", _lu_no_pivot)
    return cls


@pytest.mark.parametrize("backend", ["torch"] + [b for d, b in KERNEL_DEVICE_BACKENDS if d == "cpu"])
def test_matches_ista_dense_mfac_step_for_step(ista_dense_mfac, backend):
    """DenseMFAC(lr, weight_decay, ngrads, damp) == MFAC(momentum=0, weight_decay_mode='decoupled'): the
    same params after each of 20 steps (m = 8: filling, full, wrapped twice).  Upstream is fp32 with an
    O(m^3) LU per step, fastopt fp32 passes with an fp64 m x m part: relative 2e-6 (measured ~3e-7)."""
    shapes = [(6, 7), (5,)]
    a, b = _params(shapes), _params(shapes)
    up = ista_dense_mfac(a, lr=0.05, weight_decay=0.01, ngrads=8, damp=0.1)
    ours = fastopt.MFAC(b, lr=0.05, weight_decay=0.01, ngrads=8, damp=0.1, weight_decay_mode="decoupled",
                        backend=backend)
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        for p, q, g in zip(a, b, _grads(a, gen)):
            p.grad, q.grad = g.clone(), g.clone()
        up.step()
        ours.step()
        for p, q in zip(a, b):
            torch.testing.assert_close(q, p, rtol=2e-6, atol=2e-6 * p.abs().max().item())


# -- backends ---------------------------------------------------------------------------------------------
CONFIGS = {
    "plain": dict(),
    "momentum-l2": dict(momentum=0.9, weight_decay=0.05),
    "decoupled": dict(momentum=0.5, weight_decay=0.01, weight_decay_mode="decoupled"),
}


def _run(backend, device, grads_dtype, cfg, steps, m=4, none_grad=False):
    params = _params(device=device)
    opt = fastopt.MFAC(params, lr=0.01, ngrads=m, damp=0.1, grads_dtype=grads_dtype, backend=backend, **cfg)
    gen = torch.Generator().manual_seed(4)
    for _ in range(steps):
        for i, (p, g) in enumerate(zip(params, _grads(params, gen))):
            p.grad = None if (none_grad and i == 1) else g
        opt.step()
    return params, opt


@pytest.mark.parametrize("device,backend", KERNEL_DEVICE_BACKENDS)
@pytest.mark.parametrize("grads_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_backend_matches_reference(device, backend, grads_dtype, cfg):
    """9 steps of m = 4 (partly filled, full, refreshed at 4 and 8, wrapped): params, window, Gram and
    momentum equal the torch reference's."""
    got, opt = _run(backend, device, grads_dtype, CONFIGS[cfg], 9)
    want, ropt = _run("torch", device, grads_dtype, CONFIGS[cfg], 9)
    tol = 1e-5 if grads_dtype == "float32" else 2e-4
    for p, q in zip(got, want):
        torch.testing.assert_close(p, q, rtol=tol, atol=tol)
    s, r = opt.state[got[0]], ropt.state[want[0]]
    assert s["grads"].dtype == getattr(torch, grads_dtype)
    torch.testing.assert_close(s["grads"].float(), r["grads"].float(), rtol=tol, atol=tol)
    torch.testing.assert_close(s["gram"], r["gram"], rtol=1e-5, atol=1e-5 * r["gram"].abs().max().item())
    if "momentum_buffer" in r:
        torch.testing.assert_close(s["momentum_buffer"], r["momentum_buffer"], rtol=tol, atol=tol * 10)


@pytest.mark.parametrize("device,backend", [("cpu", "torch")] + KERNEL_DEVICE_BACKENDS)
def test_none_grad_is_a_zero_gradient(device, backend):
    """A param without a grad (while others have one) enters the window as zeros."""
    got, _ = _run(backend, device, "float32", CONFIGS["momentum-l2"], 3, none_grad=True)
    params = _params(device=device)
    opt = fastopt.MFAC(params, lr=0.01, ngrads=4, damp=0.1, backend=backend, **CONFIGS["momentum-l2"])
    gen = torch.Generator().manual_seed(4)
    for _ in range(3):
        for i, (p, g) in enumerate(zip(params, _grads(params, gen))):
            p.grad = torch.zeros_like(p) if i == 1 else g
        opt.step()
    for p, q in zip(got, params):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("grads_dtype", ["float32", "bfloat16"])
def test_cpu_kernel_many_blocks_and_threads(grads_dtype):
    """The CPU kernels on a window of several column blocks per tensor (16K columns each, 64K for a bf16
    window on the AVX-512 loops, the last partial) and enough work for the OpenMP team (the small tests
    run one block on one thread): equal to the reference."""
    if "cpu" not in _backend.available_backends("cpu"):
        pytest.skip("no cpu kernel")

    def run(backend):
        gen = torch.Generator().manual_seed(6)
        ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(140_001,), (3,), (17_000,)]]
        opt = fastopt.MFAC(ps, lr=0.01, ngrads=6, damp=0.5, momentum=0.9, weight_decay=0.01,
                           grads_dtype=grads_dtype, backend=backend)
        for _ in range(8):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        return ps, opt.state[ps[0]]

    got, s = run("cpu")
    want, r = run("torch")
    tol = 1e-5 if grads_dtype == "float32" else 2e-4
    for p, q in zip(got, want):
        torch.testing.assert_close(p, q, rtol=tol, atol=tol)
    torch.testing.assert_close(s["gram"], r["gram"], rtol=1e-5, atol=1e-5 * r["gram"].abs().max().item())


# -- checkpoints ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("grads_dtype", ["float32", "bfloat16"])
def test_state_dict_round_trip_is_exact(grads_dtype):
    params, opt = _run("auto", "cpu", grads_dtype, CONFIGS["momentum-l2"], 6)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = fastopt.MFAC(twin, lr=0.01, ngrads=4, damp=0.1, grads_dtype=grads_dtype, **CONFIGS["momentum-l2"])
    opt2.load_state_dict(sd)
    s, s2 = opt.state[params[0]], opt2.state[twin[0]]
    for k in ("grads", "gram", "inv", "damp", "momentum_buffer", "step"):
        assert s2[k].dtype == s[k].dtype and torch.equal(s2[k], s[k]), k
        assert s2[k] is not s[k]
    gen = torch.Generator().manual_seed(9)
    for _ in range(3):  # continuing gives the same params bit for bit
        for p, q, g in zip(params, twin, _grads(params, gen)):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        opt2.step()
    for p, q in zip(params, twin):
        assert torch.equal(p, q)


def test_load_state_dict_checks_before_changing_anything():
    params, opt = _run("torch", "cpu", "float32", CONFIGS["plain"], 2)
    sd = opt.state_dict()
    other = _params(SHAPES[:-1] + [(131,)])  # d = 154: the saved window has 153 columns
    opt2 = fastopt.MFAC(other, ngrads=4)
    with pytest.raises(ValueError, match="'grads'"):
        opt2.load_state_dict(sd)
    assert not opt2.state and opt2.param_groups[0]["lr"] == 1e-3
    with pytest.raises(ValueError, match="3 params"):
        fastopt.MFAC(other[:3], ngrads=4).load_state_dict(sd)


# -- bad input --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=-1.0), "lr"), (dict(momentum=1.0), "momentum"), (dict(weight_decay=-0.1), "weight_decay"),
    (dict(ngrads=0), "ngrads"), (dict(ngrads=2.0), "ngrads"), (dict(damp=0.0), "damp"),
    (dict(weight_decay_mode="adamw"), "weight_decay_mode"), (dict(grads_dtype="float16"), "grads_dtype"),
    (dict(backend="bogus"), "backend"),
])
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastopt.MFAC(_params(), **kwargs)


def test_cuda_backend_is_refused():
    with pytest.raises(fastopt.BackendUnavailableError, match="cuda"):
        fastopt.MFAC(_params(), backend="cuda")


def _snapshot(params, opt):
    out = [p.detach().clone() for p in params]
    for st in opt.state.values():
        out += [v.clone() for v in st.values()]
    return out


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("case", ["fp16 params", "sparse grad", "nan lr", "ngrads changed",
                                  "second group bad"])
def test_bad_step_input_changes_nothing(case):
    params, opt = _run("auto", "cpu", "float32", CONFIGS["momentum-l2"], 2)
    gen = torch.Generator().manual_seed(5)
    for p, g in zip(params, _grads(params, gen)):
        p.grad = g
    extra = None
    if case == "fp16 params":
        extra = torch.nn.Parameter(torch.zeros(3, dtype=torch.float16))
        extra.grad = torch.zeros(3, dtype=torch.float16)
        err = TypeError
    elif case == "sparse grad":
        params[1].grad = params[1].grad.to_sparse()
        err = TypeError
    elif case == "nan lr":
        opt.param_groups[0]["lr"] = float("nan")
        err = ValueError
    elif case == "ngrads changed":
        opt.param_groups[0]["ngrads"] = 5
        err = ValueError
    else:
        extra = torch.nn.Parameter(torch.zeros(3))
        extra.grad = torch.zeros(3)
    if extra is not None:
        opt.add_param_group({"params": [extra]})
        if case == "second group bad":
            opt.param_groups[1]["damp"] = -1.0
            err = ValueError
    before = _snapshot(params, opt)
    with pytest.raises(err):
        opt.step()
    assert _same(_snapshot(params, opt), before)


def test_ops_validate_sizes():
    """The native/Triton entry points check every size before a kernel runs (and C++ checks again)."""
    window = torch.zeros(4, 10)
    params, grads = [torch.zeros(9)], [torch.zeros(9)]
    dx = torch.zeros(4, dtype=torch.float64)
    with pytest.raises(ValueError, match="window 10 columns"):
        _ops.mfac_dots(window, params, grads, dx, None, 0, 1, 0.0, "cpu")
    with pytest.raises(ValueError, match="slot"):
        _ops.mfac_dots(torch.zeros(4, 9), params, grads, dx, None, 2, 1, 0.0, "cpu")
    with pytest.raises(ValueError, match="dots_k"):
        _ops.mfac_dots(torch.zeros(4, 9, dtype=torch.bfloat16), params, grads, dx, None, 0, 1, 0.0, "cpu")
    with pytest.raises(ValueError, match="coef"):
        _ops.mfac_update(torch.zeros(4, 9), params, grads, None, torch.zeros(2), 3, 0.1, 0.1, 0.0, 0.0, 0.0, "cpu")
    with pytest.raises(ValueError, match="momentum"):
        _ops.mfac_update(torch.zeros(4, 9), params, grads, torch.zeros(8), torch.zeros(4), 3, 0.1, 0.1, 0.9, 0.0,
                         0.0, "cpu")
    if "cpu" in _backend.available_backends("cpu"):
        with pytest.raises(ValueError, match="numels do not sum"):
            _backend.native().mfac_dots_cpu(window.data_ptr(), 4, 10, 1, 0, 0, [params[0].data_ptr()],
                                            [grads[0].data_ptr()], [9], 0.0, dx.data_ptr(), 0)


_AVX2_SCRIPT = """
import torch, fastopt
def run(backend, dt):
    gen = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(3, 5), (7,), (1,), (130,)]]
    opt = fastopt.MFAC(ps, lr=0.01, ngrads=4, damp=0.1, momentum=0.9, weight_decay=0.05, grads_dtype=dt,
                       backend=backend)
    for _ in range(9):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in ps])
for dt in ("float32", "bfloat16"):
    print(dt, (run("cpu", dt) - run("torch", dt)).abs().max().item())
"""


def test_cpu_kernel_without_avx512_matches_reference():
    """FASTOPT_CPU_ISA=avx2 keeps the CPU kernels off their AVX-512 / BF16 loops (which this test run may
    use): that path too equals the reference (in a subprocess: the choice is made once per process)."""
    import os
    import subprocess

    if "cpu" not in _backend.available_backends("cpu"):
        pytest.skip("no cpu kernel")
    env = dict(os.environ, FASTOPT_CPU_ISA="avx2")
    out = subprocess.run([sys.executable, "-c", _AVX2_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    diffs = dict(line.split() for line in out.stdout.strip().splitlines())
    assert float(diffs["float32"]) <= 1e-5 and float(diffs["bfloat16"]) <= 2e-4, diffs
