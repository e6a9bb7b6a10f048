"""fastopt.ot.LightSB (Light Schrödinger Bridge, Korotin et al., ICLR 2024): the fused passes (cpu, triton)
against the official formulas (fastopt.reference.lightsb) in fp64, the sampler's conditional law, a
Gaussian-to-Gaussian bridge against the closed-form entropic OT solution, and argument errors."""
import copy
import math

import pytest
import torch

from conftest import DEVICE_BACKENDS
from fastopt import BackendUnavailableError
from fastopt.ot import LightSB
from fastopt.ot.lightsb import lightsb_pass
from fastopt.reference import lightsb as ref

KERNELS = [b for d, b in DEVICE_BACKENDS if d == "cpu" and b != "torch"]
needs_cpu = pytest.mark.skipif("cpu" not in KERNELS, reason="fastopt._C is not built")

# (K, d, N, M, eps): one component and dimension, odd sizes, K beyond the C++ tile of 128 components,
# small eps (logits of hundreds: the log-sum-exp's rescaling matters)
CASES = [(1, 1, 1, 1, 1.0), (5, 2, 7, 9, 0.1), (130, 3, 50, 33, 0.01), (17, 16, 64, 31, 0.002), (64, 5, 3, 1, 3.0)]
TRITON_CASES = [(5, 2, 7, 9, 0.1), (19, 3, 21, 5, 0.01)]  # (the interpreter is slow)


def _cases():
    out = []
    for backend in KERNELS:
        for case in (CASES if backend == "cpu" else TRITON_CASES):
            for diag in (True, False):
                out.append(pytest.param(backend, case, diag, id=f"{backend}-{'diag' if diag else 'full'}-{case}"))
    return out


def _model(K, d, eps, diag, backend, seed=0):
    torch.manual_seed(seed)
    m = LightSB(d, K, eps, is_diagonal=diag, backend=backend)
    with torch.no_grad():
        m.log_alpha_raw.normal_(0.0, 1.0)
        m.S_log_diagonal_matrix.normal_(-0.5, 0.5)
    return m


def _grads(m, fn, inputs):
    params = [p for p in m.parameters()]
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    val = fn(m, *leaves)
    grads = torch.autograd.grad(val, leaves + params, allow_unused=True)
    return [val.detach()] + [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, leaves + params)]


def _assert_matches(m, fn, inputs):
    """The fused result vs the official formula in fp64, within 1e-5 of each tensor's scale or 4 x the fp32
    official code's own error (both measured against fp64)."""
    got = _grads(m, fn, inputs)
    r32 = copy.deepcopy(m)
    r32.backend = "torch"
    want32 = _grads(r32, fn, inputs)
    r64 = copy.deepcopy(m).double()
    r64.backend = "torch"
    want = _grads(r64, fn, [t.double() for t in inputs])
    names = ["value"] + [f"input{i}" for i in range(len(inputs))] + [n for n, _ in m.named_parameters()]
    for name, g, w32, w in zip(names, got, want32, want):
        scale = w.abs().max().item()
        err, err32 = (g.double() - w).abs().max().item(), (w32.double() - w).abs().max().item()
        assert err <= 1e-5 * scale + 4 * err32 + 1e-12, f"{name}: error {err:.3g} (fp32 official {err32:.3g}, scale {scale:.3g})"


@pytest.mark.parametrize("backend,case,diag", _cases())
def test_loss_value_and_all_gradients_match_the_official_formulas(backend, case, diag):
    K, d, N, M, eps = case
    m = _model(K, d, eps, diag, backend)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(N, d, generator=g), 0.5 + torch.randn(M, d, generator=g)
    _assert_matches(m, lambda mod, a, b: mod.loss(a, b), [x, y])


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("diag", [True, False])
def test_per_row_log_c_and_log_v_with_any_upstream_gradient(backend, diag):
    m = _model(7, 3, 0.05, diag, backend, seed=3)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(13, 3, generator=g)
    w = torch.randn(13, generator=g)
    _assert_matches(m, lambda mod, a: (mod.get_log_C(a) * w.to(a.dtype)).sum(), [x])
    _assert_matches(m, lambda mod, a: (mod.get_log_potential(a) * w.to(a.dtype)).sum(), [x])
    with torch.no_grad():
        ref_c = ref.log_C_reference(x, m.log_alpha_raw, m.r, m.S_log_diagonal_matrix, m.S_rotation_matrix, 0.05, diag)
        torch.testing.assert_close(m.get_log_C(x), ref_c, rtol=1e-5, atol=1e-4)


@needs_cpu
def test_cpu_pass_is_deterministic_and_needs_no_gradient_buffers():
    m = _model(40, 4, 0.1, True, "cpu")
    x = torch.randn(1000, 4)
    pts, coords, la, cen, sig = m._side(x, 0, None)
    outs = []
    for _ in range(2):
        out, bufs = torch.empty(1000), (torch.empty(1000, 4), None, torch.empty(40), torch.empty(40, 4), torch.empty(40, 4))
        lightsb_pass(pts.detach(), None, la.detach(), cen.detach(), sig.detach(), out, None, *bufs, 0, 0.1, 1e-3, "cpu")
        outs.append((out, *[b for b in bufs if b is not None]))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    out2 = torch.empty(1000)
    lightsb_pass(pts.detach(), None, la.detach(), cen.detach(), sig.detach(), out2, None, None, None, None, None, None,
                 0, 0.1, 1.0, "cpu")
    assert torch.equal(out2, outs[0][0])


def _conditional_moments(m, x0):
    """The exact mean and covariance of y | x0 (the mixture of the official forward)."""
    with torch.no_grad():
        S = m.get_S().double()
        r, eps = m.r.double(), m._eps
        x = x0.double()
        logits = ref.conditional_logits(x[None], r, S, (m.log_alpha_raw.double() / eps), eps, m.is_diagonal)[0]
        w = torch.softmax(logits, 0)
        if m.is_diagonal:
            mu, cov = r + S * x, torch.diag_embed(eps * S)
        else:
            mu, cov = r + S @ x, eps * S
        mean = (w[:, None] * mu).sum(0)
        second = (w[:, None, None] * (cov + mu[:, :, None] * mu[:, None, :])).sum(0)
        return mean, second - mean[:, None] * mean[None, :]


@pytest.mark.parametrize("diag", [True, False])
def test_sampler_draws_the_conditional_mixture(diag):
    m = _model(3, 2, 0.5, diag, "auto", seed=5)
    m.sampling_batch_size = 7000  # (a sub-batch boundary inside the 20000 rows)
    with torch.no_grad():
        m.r.copy_(torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.0]]))
        m.S_log_diagonal_matrix.copy_(torch.tensor([[0.0, -1.0], [-0.5, 0.3], [0.2, 0.2]]))
    x0 = torch.tensor([0.3, -0.2])
    torch.manual_seed(0)
    y = m(x0.expand(20000, 2).contiguous()).double()
    mean, cov = _conditional_moments(m, x0)
    # 20000 samples: the standard error of the mean is sqrt(var / 20000) < 0.02 here
    torch.testing.assert_close(y.mean(0), mean, atol=0.06, rtol=0)
    torch.testing.assert_close(torch.cov(y.T), cov, atol=0.12, rtol=0.06)


def test_gaussian_to_gaussian_bridge_matches_the_closed_form():
    """Train LightSB (full S, eps 0.1 as the official notebooks' 2-D runs) between two 2-D Gaussians with Adam;
    the bridge's y | x must carry N(m0, S0) to N(m1, S1) (sample mean within 0.1, covariance within 0.15) and
    its conditional mean must be the entropic OT map E[y | x] = m1 + A (x - m0), with A the closed form
    S0^(-1/2) ((S0^(1/2) S1 S0^(1/2) + eps^2 / 4)^(1/2) - eps / 2) S0^(-1/2) (the Gaussian EOT solution of cost
    |x - y|^2 / 2, whose conditional covariance is eps A), within 0.1 on x at +-1 standard deviation."""
    eps = 0.1
    m0, m1 = torch.tensor([-1.0, 0.5]), torch.tensor([1.0, -0.5])
    L0, L1 = torch.tensor([[1.0, 0.0], [0.5, 0.8]]), torch.tensor([[0.6, 0.0], [-0.3, 1.2]])
    S0, S1 = L0 @ L0.T, L1 @ L1.T
    g = torch.Generator().manual_seed(1)

    def src(n):
        return m0 + torch.randn(n, 2, generator=g) @ L0.T

    def tgt(n):
        return m1 + torch.randn(n, 2, generator=g) @ L1.T

    torch.manual_seed(0)
    sb = LightSB(2, 2, eps, is_diagonal=False)
    sb.init_r_by_samples(tgt(2))
    opt = torch.optim.Adam(sb.parameters(), lr=0.05)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (tiny tensors: a team of torch threads only costs time, a lot on a loaded machine)
    try:
        for step in range(400):
            if step == 250:
                opt.param_groups[0]["lr"] = 0.01
            loss = sb.loss(src(256), tgt(256))
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    torch.manual_seed(1)
    x = src(20000)
    y = sb(x)
    torch.testing.assert_close(y.mean(0), m1, atol=0.1, rtol=0)
    torch.testing.assert_close(torch.cov(y.T), S1, atol=0.15, rtol=0)

    def sqrtm(a):
        e, v = torch.linalg.eigh(a.double())
        return (v * e.sqrt()) @ v.T

    h = sqrtm(S0)
    hi = torch.linalg.inv(h)
    A = hi @ (sqrtm(h @ S1.double() @ h + eps ** 2 / 4 * torch.eye(2, dtype=torch.float64))
              - eps / 2 * torch.eye(2, dtype=torch.float64)) @ hi
    for x0 in (m0, m0 + L0[:, 0], m0 - L0[:, 1]):
        mean, cov = _conditional_moments(sb, x0)
        torch.testing.assert_close(mean, m1.double() + A @ (x0 - m0).double(), atol=0.1, rtol=0)
        torch.testing.assert_close(cov, eps * A, atol=0.03, rtol=0)


def test_torch_backend_is_the_official_formula_and_auto_takes_fp64_there():
    m = _model(4, 3, 0.2, True, "auto").double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    want = ref.loss_reference(x, y, m.log_alpha_raw, m.r, m.S_log_diagonal_matrix, None, float(m.epsilon), True)
    assert torch.equal(m.loss(x, y), want)


def test_argument_errors():
    with pytest.raises(ValueError, match="LightSB: dim must be an integer >= 1"):
        LightSB(0, 3)
    with pytest.raises(ValueError, match="LightSB: n_potentials"):
        LightSB(2, 0)
    with pytest.raises(ValueError, match="LightSB: epsilon must be a finite number > 0"):
        LightSB(2, 3, epsilon=0.0)
    with pytest.raises(TypeError, match="LightSB: is_diagonal must be a bool"):
        LightSB(2, 3, is_diagonal=1)
    with pytest.raises(ValueError, match="unknown backend"):
        LightSB(2, 3, backend="gpu")
    m = LightSB(2, 3, 0.1)
    with pytest.raises(ValueError, match=r"LightSB.loss: x must have shape \(N, 2\)"):
        m.loss(torch.randn(4, 3), torch.randn(4, 2))
    with pytest.raises(ValueError, match="LightSB.loss: y has no rows"):
        m.loss(torch.randn(4, 2), torch.randn(0, 2))
    with pytest.raises(TypeError, match="LightSB.get_log_C: x must be a torch.Tensor"):
        m.get_log_C([[0.0, 1.0]])
    with pytest.raises(TypeError, match="LightSB.get_log_potential: y must be a floating-point tensor"):
        m.get_log_potential(torch.ones(3, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="LightSB.init_r_by_samples: samples must be a tensor of shape"):
        m.init_r_by_samples(torch.randn(2, 2))
    with pytest.raises(ValueError, match="LightSB.set_epsilon: epsilon must be a finite number > 0"):
        m.set_epsilon(-1.0)
    if "cpu" in KERNELS:
        m.backend = "cpu"
        with pytest.raises(BackendUnavailableError, match="LightSB.loss: backend 'cpu' does not support dtypes"):
            m.loss(torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64))
        with pytest.raises(ValueError, match="fastopt::lightsb_pass_: out must be a contiguous tensor"):
            lightsb_pass(torch.randn(4, 2), None, torch.randn(3), torch.randn(3, 2), torch.rand(3, 2),
                         torch.empty(8)[::2], None, None, None, None, None, None, 0, 0.1, 1.0, "cpu")
        with pytest.raises(ValueError, match="fastopt::lightsb_pass_: dla, dcen and dsig go together"):
            lightsb_pass(torch.randn(4, 2), None, torch.randn(3), torch.randn(3, 2), torch.rand(3, 2),
                         torch.empty(4), None, None, None, torch.empty(3), None, None, 0, 0.1, 1.0, "cpu")


def test_set_epsilon_and_state_dict_keep_the_kernels_epsilon():
    m = LightSB(2, 3, 0.1)
    m.set_epsilon(0.5)
    m2 = LightSB(2, 3, 0.1)
    m2.load_state_dict(m.state_dict())
    assert m2._eps == 0.5 and math.isclose(float(m2.get_log_alpha()[0].detach() * 0.5), float(m2.log_alpha_raw[0].detach()), rel_tol=1e-6)
    x, y = torch.randn(5, 2), torch.randn(4, 2)
    want = ref.loss_reference(x, y, m2.log_alpha_raw, m2.r, m2.S_log_diagonal_matrix, None, 0.5, True)
    torch.testing.assert_close(m2.loss(x, y), want, rtol=1e-5, atol=1e-5)


def test_auto_runs_the_cpu_kernel_on_fp32_cpu_tensors():
    m = LightSB(3, 4, 0.1)
    x = torch.randn(5, 3)
    assert m._resolve("LightSB.loss", x) == ("cpu" if "cpu" in KERNELS else "torch")
    assert m._resolve("LightSB.loss", x.double()) == "torch"


@needs_cpu
def test_cpu_pass_with_many_rows_per_block():
    """More rows than 256 blocks of 64 (the C++ pass then flushes several fp32 chunks into each block's fp64
    sums): the loss and its parameter gradients still match the official formulas."""
    m = _model(3, 2, 0.3, True, "cpu", seed=7)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(20011, 2, generator=g), torch.randn(16411, 2, generator=g)
    _assert_matches(m, lambda mod, a, b: mod.loss(a, b), [x, y])
