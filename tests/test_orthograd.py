"""fastopt.OrthoGrad (⊥Grad) against pytorch_optimizer.OrthoGrad (4.1.0): the reference against upstream's
projection, the fused projection against the reference on every backend, the wrapper around fastopt
optimizers against upstream's wrapper around torch's, and the wrapper's optimizer protocol."""
import pickle

import pytest
import torch

import fastopt
from conftest import DEVICE_BACKENDS, KERNEL_DEVICE_BACKENDS
from fastopt.optim.orthograd import orthogonalize_gradients_
from fastopt.reference.orthograd import orthograd_reference
from helpers import clone_params, make_params, run_side_by_side, set_grads

po = pytest.importorskip("pytorch_optimizer")
upstream_projection = po.base.optimizer.BaseOptimizer.apply_orthogonal_gradients

SHAPES = [(0,), (1,), (7,), (97,), (13, 31), (5, 3, 11)]
BIG = (65537,)  # one past a chunk; not under the Triton interpreter (slow)


def shapes_for(backend):
    return SHAPES + ([BIG] if backend != "triton" else [])


def pairs(shapes, dtype, device="cpu", seed=0, grad=None):
    """Parameters with random gradients (or ``grad(p)``), and an independent copy."""
    gen = torch.Generator().manual_seed(seed + 1)
    a = [torch.nn.Parameter(t) for t in make_params(shapes, dtype, device, seed)]
    for p in a:
        g = torch.randn(p.shape, generator=gen) if grad is None else grad(p.detach().float().cpu())
        p.grad = g.to(device=device, dtype=dtype)
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    for x, y in zip(a, b):
        y.grad = x.grad.clone()
    return a, b


GRADS = {
    "random": None,
    "parallel": lambda w: 3.0 * w,                              # no orthogonal part: the gradient becomes 0
    "near_parallel": lambda w: 3.0 * w + 1e-2 * torch.randn(w.shape, generator=torch.Generator().manual_seed(5)),
    "zero_weights": None,                                       # (weights zeroed below)
}


def _zero_weights(params):
    with torch.no_grad():
        for p in params:
            p.zero_()


# -- the reference ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", list(GRADS))
def test_reference_matches_upstream_projection(dtype, case):
    a, b = pairs(SHAPES + [BIG], dtype, grad=GRADS[case])
    if case == "zero_weights":
        _zero_weights(a), _zero_weights(b)
    upstream_projection(a, eps=1e-30)  # OrthoGrad's eps
    orthograd_reference(b, [p.grad for p in b])
    for x, y in zip(a, b):
        assert torch.equal(x.grad, y.grad), (x.shape, (x.grad.double() - y.grad.double()).abs().max())


def test_reference_known_values():
    w = torch.nn.Parameter(torch.tensor([1.0, 0.0]))
    g = torch.tensor([1.0, 1.0])
    orthograd_reference([w], [g])
    torch.testing.assert_close(g, torch.tensor([0.0, 2.0 ** 0.5]))  # the orthogonal part, at ||g||
    g = 3.0 * w.detach().clone()
    orthograd_reference([w], [g])
    assert torch.equal(g, torch.zeros(2))


# -- the fused projection -----------------------------------------------------------------------------
@pytest.mark.parametrize("device,backend", KERNEL_DEVICE_BACKENDS)
@pytest.mark.parametrize("case", list(GRADS))
def test_kernel_projection_matches_reference_fp32(device, backend, case):
    a, b = pairs(shapes_for(backend), torch.float32, device, grad=GRADS[case])
    if case == "zero_weights":
        _zero_weights(a), _zero_weights(b)
    exact = [p.grad.double() for p in a]
    orthograd_reference([p.double() for p in a], exact)
    scales = [float(p.grad.abs().max()) if p.numel() else 0.0 for p in a]
    orthograd_reference(a, [p.grad for p in a])
    orthogonalize_gradients_(b, backend=backend)
    for x, y, want, scale in zip(a, b, exact, scales):
        if case == "near_parallel":
            # ||g|| / ||g - c w|| ~ 300 amplifies fp32 rounding in any summation order: the kernel and
            # the fp32 reference (upstream's arithmetic) are each within the same bound of fp64
            for got in (y.grad, x.grad):
                torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-4 * scale)
            continue
        torch.testing.assert_close(y.grad, x.grad, rtol=1e-5, atol=1e-5)
        if case == "parallel":
            assert torch.equal(y.grad, torch.zeros_like(y.grad))
        if case == "zero_weights":  # c = 0, scale = ||g|| / (||g|| + 1e-30) = 1 in fp32: untouched
            assert torch.equal(y.grad, x.grad)


@pytest.mark.parametrize("device,backend", KERNEL_DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_projection_matches_reference_half(device, backend, dtype):
    """fp32 math in both; the stored result may differ by one rounding of the 16-bit storage."""
    a, b = pairs(shapes_for(backend), dtype, device)
    orthograd_reference(a, [p.grad for p in a])
    orthogonalize_gradients_(b, backend=backend)
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
    for x, y in zip(a, b):
        torch.testing.assert_close(y.grad.float(), x.grad.float(), rtol=ulp, atol=1e-3)


@pytest.mark.parametrize("device,backend", KERNEL_DEVICE_BACKENDS)
def test_kernel_projection_is_orthogonal_and_keeps_the_norm(device, backend):
    a, _ = pairs([(300,), (17, 19)], torch.float32, device)
    norms = [p.grad.norm() for p in a]
    orthogonalize_gradients_(a, backend=backend)
    for p, n in zip(a, norms):
        assert abs(float(torch.dot(p.detach().reshape(-1), p.grad.reshape(-1)))) < 1e-4 * float(p.detach().norm() * n)
        torch.testing.assert_close(p.grad.norm(), n, rtol=1e-5, atol=0)


def test_layouts_the_kernels_do_not_take_run_the_reference():
    """fp64, a transposed weight with a contiguous gradient: 'auto' runs the reference; a named
    kernel backend says why it cannot."""
    w64 = torch.nn.Parameter(torch.randn(5, 7, dtype=torch.float64))
    wt = torch.nn.Parameter(torch.randn(7, 5).t())
    for p in (w64, wt):
        p.grad = torch.randn(p.shape, dtype=p.dtype)
    want = [p.grad.clone() for p in (w64, wt)]
    orthograd_reference([w64, wt], want)
    orthogonalize_gradients_([w64, wt], backend="auto")
    assert torch.equal(w64.grad, want[0]) and torch.equal(wt.grad, want[1])
    if fastopt._backend.has_cpu():
        with pytest.raises(fastopt.BackendUnavailableError, match="float64"):
            orthogonalize_gradients_([w64], backend="cpu")
        with pytest.raises(fastopt.BackendUnavailableError, match="strides"):
            orthogonalize_gradients_([wt], backend="cpu")


# -- the wrapper against upstream's ----------------------------------------------------------------------
def _inner_backend(backend):
    return "torch" if backend == "torch" else backend


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_wraps_adamw_like_upstream_fp32(device, backend):
    base = make_params(shapes_for(backend), device=device)
    up_p, fo_p = clone_params(base), clone_params(base)
    up = po.OrthoGrad(torch.optim.AdamW(up_p, lr=1e-2, weight_decay=0.1))
    fo = fastopt.OrthoGrad(fastopt.AdamW(fo_p, lr=1e-2, weight_decay=0.1, backend=_inner_backend(backend)),
                           backend=backend)
    run_side_by_side([up, fo], [up_p, fo_p], steps=5)
    for a, b in zip(up_p, fo_p):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fo.state[b]["exp_avg_sq"], up.state[a]["exp_avg_sq"], rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_wraps_adamw_like_upstream_bf16(device, backend):
    """bf16 parameters: upstream's AdamW steps in bf16, fastopt's in fp32 with bf16 storage, so the
    weights may differ by two bf16 ulps (2^-7 relative each)."""
    base = make_params(shapes_for(backend), dtype=torch.bfloat16, device=device)
    up_p, fo_p = clone_params(base), clone_params(base)
    up = po.OrthoGrad(torch.optim.AdamW(up_p, lr=1e-2))
    fo = fastopt.OrthoGrad(fastopt.AdamW(fo_p, lr=1e-2, backend=_inner_backend(backend)), backend=backend)
    run_side_by_side([up, fo], [up_p, fo_p], steps=3)
    for a, b in zip(up_p, fo_p):
        torch.testing.assert_close(b.float(), a.float(), rtol=2 ** -6, atol=2 ** -7)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_wraps_lion_like_upstream(device, backend):
    base = make_params(shapes_for(backend), device=device)
    up_p, fo_p = clone_params(base), clone_params(base)
    up = po.OrthoGrad(po.Lion(up_p, lr=1e-3, weight_decay=0.1))
    fo = fastopt.OrthoGrad(fastopt.Lion(fo_p, lr=1e-3, weight_decay=0.1, backend=_inner_backend(backend)),
                           backend=backend)
    run_side_by_side([up, fo], [up_p, fo_p], steps=5)
    for a, b in zip(up_p, fo_p):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_wraps_a_lowbit_optimizer(device, backend):
    """OrthoGrad(AdamW8bit) is AdamW8bit stepping on the projected gradients."""
    base = make_params([(7,), (64, 64), (300,)], device=device)  # (64, 64): quantized states
    a_p, b_p = clone_params(base), clone_params(base)
    a = fastopt.OrthoGrad(fastopt.lowbit.AdamW8bit(a_p, lr=1e-2), backend=backend)
    b = fastopt.lowbit.AdamW8bit(b_p, lr=1e-2)
    for k in range(3):
        set_grads([a_p, b_p], seed=10 + k)
        a.step()
        orthograd_reference(b_p, [p.grad for p in b_p])
        b.step()
    for x, y in zip(a_p, b_p):
        if backend == "torch":
            assert torch.equal(x, y)
        else:
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    assert a.state[a_p[1]]["exp_avg"].dtype == torch.uint8  # the wrapped optimizer's state, quantized


# -- the optimizer protocol ------------------------------------------------------------------------------
def _loss_fn(params, target):
    return sum(((p.float() - t) ** 2).sum() * (i + 1) for i, (p, t) in enumerate(zip(params, target)))


def test_closure_like_upstream():
    base = make_params([(7,), (13, 31)])
    target = make_params([(7,), (13, 31)], seed=3)
    up_p, fo_p = clone_params(base), clone_params(base)
    up = po.OrthoGrad(torch.optim.AdamW(up_p, lr=1e-2))
    fo = fastopt.OrthoGrad(fastopt.AdamW(fo_p, lr=1e-2))
    calls = []
    for opt, ps in ((up, up_p), (fo, fo_p)):
        def closure(opt=opt, ps=ps):
            calls.append(opt)
            opt.zero_grad()
            loss = _loss_fn(ps, target)
            loss.backward()
            return loss
        for _ in range(3):
            loss = opt.step(closure)
            assert torch.is_tensor(loss) and loss.ndim == 0
    assert calls.count(fo) == 3
    for a, b in zip(up_p, fo_p):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6)  # the projected gradients


def test_state_dict_round_trip_and_delegation():
    base = make_params([(7,), (13, 31)])
    a_p, b_p = clone_params(base), clone_params(base)
    a = fastopt.OrthoGrad(fastopt.AdamW(a_p, lr=1e-2))
    run_side_by_side([a], [a_p], steps=2)
    assert a.param_groups is a.optimizer.param_groups and a.state is a.optimizer.state
    assert a.defaults is a.optimizer.defaults
    sd = a.state_dict()
    assert sd.keys() == a.optimizer.state_dict().keys() and len(sd["state"]) == 2
    b = fastopt.OrthoGrad(fastopt.AdamW, params=b_p, lr=5.0)  # the class form; lr comes from the state dict
    with torch.no_grad():
        for x, y in zip(a_p, b_p):
            y.copy_(x)
    b.load_state_dict(pickle.loads(pickle.dumps(sd)))
    assert b.param_groups[0]["lr"] == 1e-2
    run_side_by_side([a, b], [a_p, b_p], steps=2, seed0=50)
    for x, y in zip(a_p, b_p):
        assert torch.equal(x, y)
    a.zero_grad()
    assert all(p.grad is None for p in a_p)
    extra = torch.nn.Parameter(torch.randn(4))
    a.add_param_group({"params": [extra]})
    assert a.optimizer.param_groups[-1]["params"] == [extra]
    sched = torch.optim.lr_scheduler.StepLR(a, step_size=1, gamma=0.5)
    run_side_by_side([a], [a_p + [extra]], steps=1)
    sched.step()
    assert a.optimizer.param_groups[0]["lr"] == 5e-3
    c = pickle.loads(pickle.dumps(a))
    assert len(c.param_groups) == 2 and c.state_dict()["param_groups"] == a.state_dict()["param_groups"]
    hooked = []
    a.register_step_post_hook(lambda opt, args, kwargs: hooked.append(opt))
    run_side_by_side([a], [a_p + [extra]], steps=1)
    assert hooked == [a]
    assert "OrthoGrad(" in repr(a) and "AdamW" in repr(a)


@pytest.mark.parametrize("backend", sorted({b for d, b in DEVICE_BACKENDS if d == "cpu"}))
def test_grad_scaler(backend):
    """GradScaler unscales (the wrapper does not take the scale itself), then the projection runs on
    unscaled gradients: the same weights as without scaling; a step with an inf is skipped."""
    base = make_params([(7,), (13, 31)])
    target = make_params([(7,), (13, 31)], seed=3)
    a_p, b_p = clone_params(base), clone_params(base)
    a = fastopt.OrthoGrad(fastopt.AdamW(a_p, lr=1e-2, backend=_inner_backend(backend)), backend=backend)
    b = fastopt.OrthoGrad(fastopt.AdamW(b_p, lr=1e-2, backend=_inner_backend(backend)), backend=backend)
    assert a._step_supports_amp_scaling is False
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    for _ in range(3):
        a.zero_grad(), b.zero_grad()
        scaler.scale(_loss_fn(a_p, target)).backward()
        scaler.step(a)
        scaler.update()
        _loss_fn(b_p, target).backward()
        b.step()
    for x, y in zip(a_p, b_p):
        assert torch.equal(x, y)  # a power-of-two scale unscales exactly
    before = [p.detach().clone() for p in a_p]
    a.zero_grad()
    scaler.scale(_loss_fn(a_p, target)).backward()
    a_p[0].grad[0] = float("inf")
    scaler.step(a)
    scaler.update()
    assert all(torch.equal(x, y) for x, y in zip(before, a_p))
    assert scaler.get_scale() == 2.0 ** 9


def test_bad_input_raises_clearly():
    p = torch.nn.Parameter(torch.randn(5))
    with pytest.raises(TypeError, match="Optimizer instance or class"):
        fastopt.OrthoGrad([p])
    with pytest.raises(TypeError, match="Optimizer instance or class"):
        fastopt.OrthoGrad(object())
    with pytest.raises(ValueError, match="params"):
        fastopt.OrthoGrad(fastopt.AdamW, lr=1e-3)
    with pytest.raises(TypeError, match="unexpected"):
        fastopt.OrthoGrad(fastopt.AdamW([p]), lr=1e-3)
    with pytest.raises(ValueError, match="unknown backend"):
        fastopt.OrthoGrad(fastopt.AdamW([p]), backend="gpu")
    emb = torch.nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    opt = fastopt.OrthoGrad(torch.optim.SGD(emb.parameters(), lr=0.1))
    before = emb.weight.grad.clone()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()
    assert torch.equal(emb.weight.grad.to_dense(), before.to_dense())


def test_signature_matches_upstream():
    """Upstream's named arguments, in order, with their defaults; ``backend`` keyword-only."""
    import inspect

    def named(fn):
        return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()
                if p.name != "self" and p.kind is p.POSITIONAL_OR_KEYWORD]

    assert named(fastopt.OrthoGrad.__init__) == named(po.OrthoGrad.__init__) == [
        ("optimizer", inspect.Parameter.empty), ("foreach", None)]
    assert inspect.signature(fastopt.OrthoGrad.__init__).parameters["backend"].kind is inspect.Parameter.KEYWORD_ONLY
