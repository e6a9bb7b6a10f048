"""The fused sliced-Wasserstein kernels (triton_kernels/sliced.py, backend="triton"): values and gradients
against the torch path in float64 (which tests/test_ot_sliced.py checks against POT), both kernel modes
(projection in the kernel, and projections from a GEMM for d > 16), shared and per-batch directions,
max-SW / v-DSW / wasserstein_1d through the kernel, the backend choice and its errors, opcheck; beyond one
program (the multi-block sort + merge passes, forced here with small block sizes) and the quantile merge
for weighted / unequal-size measures, with gradients for the points, directions and weights, against the
torch path and POT.

Without a GPU the kernel runs under TRITON_INTERPRET=1 (slow: the problems here are small)."""
import pytest
import torch

from fastopt import _backend, _ops
from fastopt.ot import sliced as S
from fastopt.ot.sliced import (max_sliced_wasserstein, random_projections, sliced_wasserstein,
                               vmf_distributional_sliced_wasserstein, wasserstein_1d)

from conftest import DEVICE_BACKENDS

TRITON_DEVICES = [d for d, b in DEVICE_BACKENDS if b == "triton"]
pytestmark = pytest.mark.skipif(not TRITON_DEVICES, reason="triton is not installed")
DEV = TRITON_DEVICES[0] if TRITON_DEVICES else "cpu"


def _clouds(batch, n, d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*batch, n, d, generator=gen, dtype=torch.float64)
    y = torch.randn(*batch, n, d, generator=gen, dtype=torch.float64) * 1.3 + 0.4
    return x, y


def _value_and_grads(x, y, proj, p, backend, dtype):
    xs, ys, ps = (t.detach().to(DEV, dtype).requires_grad_() for t in (x, y, proj))
    v = sliced_wasserstein(xs, ys, projections=ps, p=p, backend=backend)
    (v * torch.arange(1, v.numel() + 1, device=DEV, dtype=v.dtype).reshape(v.shape)).sum().backward()
    return [t.detach().double().cpu() for t in (v, xs.grad, ys.grad, ps.grad)]


@pytest.mark.parametrize("batch,n,d,L,p,shared", [
    ((), 100, 3, 6, 2.0, True),          # the common case: projection in the kernel, p = 2
    ((2,), 37, 5, 4, 1.0, True),         # batch sharing one direction set, p = 1, n not a power of 2
    ((2,), 50, 4, 3, 3.5, False),        # per-batch directions, general p
    ((2, 1), 23, 20, 3, 2.0, False),     # d > 16: a GEMM projects, the kernel sorts and reduces
    ((), 1, 2, 2, 2.0, True),            # one point
])
def test_fused_matches_torch_values_and_gradients(batch, n, d, L, p, shared):
    x, y = _clouds(batch, n, d)
    proj = random_projections(d, L, batch_shape=() if shared else batch, dtype=torch.float64, seed=3)
    ref = _value_and_grads(x, y, proj, p, "torch", torch.float64)
    got = _value_and_grads(x, y, proj, p, "triton", torch.float32)
    f32 = _value_and_grads(x, y, proj, p, "torch", torch.float32)  # the same precision on the torch path
    for name, r, g, f in zip(("value", "dx", "dy", "dtheta"), ref, got, f32):
        assert g.shape == r.shape, name
        scale = r.abs().max().clamp_min(1e-30)
        err, err32 = (g - r).abs().max() / scale, (f - r).abs().max() / scale
        assert err <= max(2 * err32, 1e-6), (name, float(err), float(err32))


def test_fused_matches_pot():
    ot = pytest.importorskip("ot")
    x, y = _clouds((), 64, 3, seed=5)
    proj = random_projections(3, 5, dtype=torch.float64, seed=6)
    want = ot.sliced_wasserstein_distance(x.numpy(), y.numpy(), projections=proj.numpy(), p=2)
    got = sliced_wasserstein(x.float().to(DEV), y.float().to(DEV), projections=proj.float().to(DEV), backend="triton")
    assert abs(float(got) - float(want)) <= 2e-6 * float(want)


def test_fused_ties_and_half_inputs():
    # ties sort equal values next to each other: the distance does not depend on their order
    x, y = _clouds((), 40, 2, seed=7)
    x[10:20] = x[0]
    y[5:25] = 0.25
    proj = random_projections(2, 4, dtype=torch.float64, seed=8)
    want = sliced_wasserstein(x, y, projections=proj, backend="torch")
    got = sliced_wasserstein(x.float().to(DEV), y.float().to(DEV), projections=proj.float().to(DEV), backend="triton")
    assert abs(float(got) - float(want)) <= 1e-6 * float(want)
    # fp16 points are upcast to fp32 (the same values as the rounded points in float64)
    xh, yh = x.half(), y.half()
    want = sliced_wasserstein(xh.double(), yh.double(), projections=proj, backend="torch")
    xg = xh.to(DEV).requires_grad_()
    got = sliced_wasserstein(xg, yh.to(DEV), projections=proj.float().to(DEV), backend="triton")
    got.backward()
    assert got.dtype == torch.float32 and xg.grad.dtype == torch.float16
    assert abs(float(got) - float(want)) <= 1e-6 * float(want)


def test_fused_nan_points_give_nan():
    # a NaN sorts by its bits, possibly past the padding; the kernel flags it like the torch path
    x, y = _clouds((2,), 20, 3, seed=13)
    x[1, 4, 0] = float("nan")
    y[1, 7, 1] = -float("nan")
    proj = random_projections(3, 3, dtype=torch.float64, seed=14)
    xg = x.float().to(DEV).requires_grad_()
    got = sliced_wasserstein(xg, y.float().to(DEV), projections=proj.float().to(DEV), backend="triton")
    got.sum().backward()  # the gradient pass runs with NaN keys and stays inside its rows
    want = sliced_wasserstein(x, y, projections=proj, backend="torch")
    assert torch.isnan(want[1]) and torch.isnan(got[1].cpu())
    assert abs(float(got[0]) - float(want[0])) <= 1e-6 * float(want[0])


def test_fused_larger_sort():
    # one program sorts 1200 points (a 2048-wide block)
    x, y = _clouds((), 1200, 3, seed=9)
    proj = random_projections(3, 2, dtype=torch.float64, seed=10)
    want = sliced_wasserstein(x, y, projections=proj, p=1, backend="torch")
    got = sliced_wasserstein(x.float().to(DEV), y.float().to(DEV), projections=proj.float().to(DEV), p=1,
                             backend="triton")
    assert abs(float(got) - float(want)) <= 1e-5 * float(want)


def test_wasserstein_1d_fused():
    gen = torch.Generator().manual_seed(11)
    u, v = torch.randn(3, 2, 45, generator=gen, dtype=torch.float64), torch.rand(3, 2, 45, generator=gen, dtype=torch.float64)
    for p in (1.0, 2.0, 1.5):
        want = wasserstein_1d(u, v, p=p, dim=-1, backend="torch")
        ug = u.float().to(DEV).requires_grad_()
        got = wasserstein_1d(ug, v.float().to(DEV), p=p, dim=-1, backend="triton")
        got.sum().backward()
        ur = u.clone().requires_grad_()
        wasserstein_1d(ur, v, p=p, dim=-1, backend="torch").sum().backward()
        torch.testing.assert_close(got.double().cpu(), want, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(ug.grad.double().cpu(), ur.grad, rtol=1e-4, atol=1e-6)


def test_max_sw_and_vmf_dsw_through_the_kernel():
    x, y = _clouds((2,), 30, 3, seed=12)
    xf, yf = x.float(), y.float()
    kw = dict(n_iter=3, n_init=2, seed=0)
    want, th_want = max_sliced_wasserstein(xf, yf, backend="torch", **kw)
    got, th_got = max_sliced_wasserstein(xf.to(DEV), yf.to(DEV), backend="triton", **kw)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(th_got.cpu(), th_want, rtol=1e-3, atol=1e-4)
    kw = dict(kappa=5.0, n_projections=3, n_iter=2, seed=1)
    want, mu_want = vmf_distributional_sliced_wasserstein(xf, yf, backend="torch", **kw)
    got, mu_got = vmf_distributional_sliced_wasserstein(xf.to(DEV), yf.to(DEV), backend="triton", **kw)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(mu_got.cpu(), mu_want, rtol=1e-3, atol=1e-4)


def test_backend_choice_and_errors(monkeypatch):
    x, y = _clouds((), 20, 3)
    xf, yf = x.float(), y.float()
    # auto takes the kernel on CUDA only (under the interpreter it would be slower than torch)
    calls = []
    real = _ops.sliced_wpp
    monkeypatch.setattr(_ops, "sliced_wpp", lambda *a: (calls.append(1), real(*a)))
    sliced_wasserstein(xf, yf, n_projections=3, seed=0)
    assert calls == []
    sliced_wasserstein(xf.to(DEV), yf.to(DEV), n_projections=3, seed=0, backend="triton")
    assert calls == [1]
    for backend in ("cpu", "cuda"):
        with pytest.raises(_backend.BackendUnavailableError, match="no '(cpu|cuda)' kernel"):
            sliced_wasserstein(xf, yf, backend=backend)
    with pytest.raises(ValueError, match="backend must be one of"):
        sliced_wasserstein(xf, yf, backend="gpu")
    cases = [
        (dict(x=x, y=y), "float32"),
        (dict(x=xf, y=yf, control_variate="lower"), "control variates"),
    ]
    # weights, n != m and any size are the kernels' (auto picks them on CUDA); float64 is not
    big = torch.zeros(S._FUSED_MAX_N + 1, 2)
    for args in ((xf, yf, torch.ones(20), None), (xf, yf[:15], None, None), (big, big, None, None),
                 (xf, yf[:15], None, torch.ones(15))):
        assert S._fused_reason(*args, torch.float32) is None
    assert "float32" in S._fused_reason(x, y, None, None, torch.float64)
    for kw, match in cases:
        kw = {k: (v.to(DEV) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        with pytest.raises(_backend.BackendUnavailableError, match=match):
            sliced_wasserstein(n_projections=2, seed=0, backend="triton", **kw)
    assert calls == [1]  # no kernel ran for a refused problem


def test_sliced_wpp_opcheck():
    x, y = (t.float().to(DEV) for t in _clouds((2,), 9, 3))
    dirs = random_projections(3, 4, device=DEV, seed=0).mT.contiguous().unsqueeze(0)
    torch.library.opcheck(_ops.sliced_wpp_, (x, y, dirs, torch.empty(2, 4, device=DEV), torch.empty(2, 4, 9, device=DEV),
                                             torch.empty(2, 4, 9, device=DEV), 2.0, True, "triton"))
    px, py = torch.randn(2, 4, 9, device=DEV), torch.randn(2, 4, 9, device=DEV)
    torch.library.opcheck(_ops.sliced_wpp_, (px, py, None, torch.empty(2, 4, device=DEV), torch.empty(0, device=DEV),
                                             torch.empty(0, device=DEV), 1.5, False, "triton"))


# -- beyond one program, weights, n != m -------------------------------------------------------------------------
def _small_blocks(monkeypatch):
    """Blocks of 64 keys (merge chunks and reductions of 64) so that a few hundred points need several sorted
    blocks and merge passes (a run without a partner included) under the interpreter."""
    tsl = _backend.triton_kernels().sliced
    for name, value in (("MAX_N", 64), ("SORT_BLOCK", 64), ("MERGE_BLOCK", 64), ("REDUCE_BLOCK", 64)):
        monkeypatch.setattr(tsl, name, value)
    return tsl


def test_multiblock_sort_and_merge(monkeypatch):
    tsl = _small_blocks(monkeypatch)
    gen = torch.Generator().manual_seed(21)
    px = torch.randn(2, 1, 150, generator=gen)
    px[1, 0, 40:90] = 0.5  # ties across blocks: the index keeps the sort stable
    # int32 keys (the value only: no gradient) on the first row, int64 keys (value, index) on the one with ties
    for key64, row in ((False, 0), (True, 1)):
        keys = tsl._sorted_keys(px[row].contiguous().to(DEV), None, 1, 1, 150, 1, 0, key64).cpu()
        hi = (keys >> 32).to(torch.int32) if key64 else keys
        vals = torch.where(hi < 0, hi ^ 0x7FFFFFFF, hi).view(torch.float32)
        want, order = torch.sort(px[row, 0], stable=True)
        assert torch.equal(vals, want)
        if key64:
            assert torch.equal(keys & 0xFFFFFFFF, order)


def test_multiblock_matches_torch(monkeypatch):
    _small_blocks(monkeypatch)
    x, y = _clouds((), 150, 3, seed=22)
    proj = random_projections(3, 1, dtype=torch.float64, seed=23)
    ref = _value_and_grads(x, y, proj, 1.5, "torch", torch.float64)
    got = _value_and_grads(x, y, proj, 1.5, "triton", torch.float32)
    f32 = _value_and_grads(x, y, proj, 1.5, "torch", torch.float32)
    for name, r, g, f in zip(("value", "dx", "dy", "dtheta"), ref, got, f32):
        scale = r.abs().max()
        err, err32 = (g - r).abs().max() / scale, (f - r).abs().max() / scale
        assert err <= max(2 * err32, 1e-6), (name, float(err), float(err32))


def _weighted_value_and_grads(x, y, a, b, proj, p, backend, dtype):
    ts = [None if t is None else t.detach().to(DEV, dtype).requires_grad_() for t in (x, y, a, b, proj)]
    v = sliced_wasserstein(ts[0], ts[1], ts[2], ts[3], projections=ts[4], p=p, backend=backend)
    (v * torch.arange(1, v.numel() + 1, device=DEV, dtype=v.dtype).reshape(v.shape)).sum().backward()
    return [v.detach().double().cpu()] + [None if t is None else t.grad.double().cpu() for t in ts]


@pytest.mark.parametrize("batch,n,m,d,L,weights,p,shared", [
    ((2,), 40, 27, 3, 1, "ab", 1.5, True),    # both weighted, per-batch a and shared b, general p
    ((), 33, 20, 3, 2, "", 2.0, True),         # uniform weights, n != m
    ((), 25, 25, 3, 1, "b", 1.0, True),        # n == m but one side weighted
    ((2,), 12, 9, 20, 1, "a", 2.0, False),     # d > 16 (a GEMM projects), per-batch directions
])
def test_weighted_and_unequal_match_torch(batch, n, m, d, L, weights, p, shared):
    gen = torch.Generator().manual_seed(24)
    x = torch.randn(*batch, n, d, generator=gen, dtype=torch.float64)
    y = torch.randn(*batch, m, d, generator=gen, dtype=torch.float64) * 1.2 + 0.3
    a = torch.rand(*batch, n, generator=gen, dtype=torch.float64) + 0.1 if "a" in weights else None
    b = torch.rand(m, generator=gen, dtype=torch.float64) + 0.1 if "b" in weights else None
    proj = random_projections(d, L, batch_shape=() if shared else batch, dtype=torch.float64, seed=25)
    ref = _weighted_value_and_grads(x, y, a, b, proj, p, "torch", torch.float64)
    got = _weighted_value_and_grads(x, y, a, b, proj, p, "triton", torch.float32)
    f32 = _weighted_value_and_grads(x, y, a, b, proj, p, "torch", torch.float32)
    for name, r, g, f in zip(("value", "dx", "dy", "da", "db", "dtheta"), ref, got, f32):
        if r is None:
            assert g is None, name
            continue
        scale = r.abs().max()
        err, err32 = (g - r).abs().max() / scale, (f - r).abs().max() / scale
        assert err <= max(2 * err32, 2e-6), (name, float(err), float(err32))
    ot = pytest.importorskip("ot")
    for i in range(len(ref[0].reshape(-1))):
        xi, yi = x.reshape(-1, n, d)[i].numpy(), y.reshape(-1, m, d)[i].numpy()
        pi = (proj if shared else proj.reshape(-1, d, L)[i]).numpy()
        ai = None if a is None else (a.reshape(-1, n)[i] / a.reshape(-1, n)[i].sum()).numpy()
        bi = None if b is None else (b / b.sum()).numpy()
        want = ot.sliced_wasserstein_distance(xi, yi, ai, bi, projections=pi, p=p)
        assert abs(float(got[0].reshape(-1)[i]) - float(want)) <= 2e-6 * float(want)


def test_weighted_multiblock_wasserstein_1d_matches_pot(monkeypatch):
    _small_blocks(monkeypatch)
    gen = torch.Generator().manual_seed(26)
    f64 = dict(generator=gen, dtype=torch.float64)
    u, v = torch.randn(150, 1, **f64), torch.rand(97, 1, **f64)
    uw, vw = torch.rand(150, **f64) + 0.05, torch.rand(97, **f64)
    uw, vw = uw / uw.sum(), vw / vw.sum()
    ug, uwg = u.float().to(DEV).requires_grad_(), uw.float().to(DEV).requires_grad_()
    got = wasserstein_1d(ug, v.float().to(DEV), uwg, vw.float().to(DEV), p=2, backend="triton")
    got.sum().backward()
    ur, uwr = u.clone().requires_grad_(), uw.clone().requires_grad_()
    want = wasserstein_1d(ur, v, uwr, vw, p=2, backend="torch")
    want.sum().backward()
    torch.testing.assert_close(got.double().cpu(), want, rtol=2e-6, atol=0)
    torch.testing.assert_close(ug.grad.double().cpu(), ur.grad, rtol=0, atol=2e-6 * float(ur.grad.abs().max()))
    torch.testing.assert_close(uwg.grad.double().cpu(), uwr.grad, rtol=0, atol=2e-6 * float(uwr.grad.abs().max()))
    ot = pytest.importorskip("ot")
    pot = ot.wasserstein_1d(u.numpy(), v.numpy(), uw.numpy(), vw.numpy(), p=2)
    assert abs(float(got.detach()) - float(pot[0])) <= 2e-6 * float(pot[0])


def test_sliced_wpp_quantile_opcheck():
    px, py = torch.randn(1, 2, 9, device=DEV), torch.randn(1, 2, 7, device=DEV)
    a = torch.rand(1, 9, device=DEV)
    a = a / a.sum()
    empty = torch.empty(0, device=DEV)
    args = (px, py, None, a, None, torch.empty(1, 2, device=DEV), torch.empty(1, 2, 9, device=DEV),
            torch.empty(1, 2, 7, device=DEV), torch.empty(1, 2, 9, device=DEV), empty,
            torch.empty(1, 2, 9, dtype=torch.int64, device=DEV), torch.empty(0, dtype=torch.int64, device=DEV),
            2.0, True, "triton")
    torch.library.opcheck(_ops.sliced_wpp_quantile_, args)
