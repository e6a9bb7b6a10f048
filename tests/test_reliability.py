"""What no public call may do, whatever the input: touch memory its tensors do not own, take state
that belongs to another parameter, race, or leave a step half done.  Each test feeds one kind of bad
input and checks the error and that every parameter and state is bit-for-bit what it was.

This module also runs under AddressSanitizer in CI (``.ci/asan``): there an out-of-bounds access in
the native kernels aborts the run."""
import pytest
import torch

import fastopt
from fastopt import _ops, lowbit
from fastopt.lowbit import codebook
from conftest import DEVICE_BACKENDS, KERNEL_DEVICE_BACKENDS
from zoo_cases import ZOO

BACKENDS = [b for d, b in DEVICE_BACKENDS if d == "cpu"]
KERNELS = [b for d, b in KERNEL_DEVICE_BACKENDS if d == "cpu"]

# One configuration of every optimizer that runs on the shared base class.
OPTIMIZERS = {
    "adamw": (fastopt.AdamW, dict(lr=1e-2)),
    "adam": (fastopt.Adam, dict(lr=1e-2, amsgrad=True)),
    **{name: (cls, cfgs[0]) for name, (cls, cfgs) in ZOO.items()},
    "elementwise_adamw": (lowbit.ElementwiseAdamW, dict(lr=1e-2)),
    "adamw8bit": (lowbit.AdamW8bit, dict(lr=1e-2, min_quant_size=256)),
}


def snapshot(opt, params):
    """Every parameter and every tensor of every state, cloned."""
    return ([p.detach().clone() for p in params],
            {i: {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)}
             for i, p in enumerate(params) if p in opt.state})


def assert_unchanged(opt, params, snap):
    before_params, before_states = snap
    for p, b in zip(params, before_params):
        assert torch.equal(p.detach(), b), "a parameter changed"
    after = {i: {k: v for k, v in opt.state[p].items() if torch.is_tensor(v)}
             for i, p in enumerate(params) if p in opt.state and opt.state[p]}
    assert after.keys() == before_states.keys(), "state was created or dropped"
    for i, states in before_states.items():
        assert states.keys() == after[i].keys()
        for k, v in states.items():
            assert torch.equal(after[i][k], v), f"state {k!r} of parameter {i} changed"


def two_params(sizes=(10, 1000), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(n, generator=gen)) for n in sizes]


def give_grads(params, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


# -- state that belongs to another parameter ------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_state_loaded_in_another_order_is_refused(name, backend):
    """``Opt([b, a]).load_state_dict(Opt([a, b]).state_dict())``: refused at load with a clear error,
    the optimizer untouched, and it steps normally afterwards."""
    cls, cfg = OPTIMIZERS[name]
    a, b = two_params((256, 512))
    src = cls([a, b], **cfg, backend=backend)
    give_grads([a, b])
    src.step()
    saved = src.state_dict()
    c, d = two_params((512, 256), seed=3)
    dst = cls([c, d], **cfg, backend=backend)
    give_grads([c, d], seed=4)
    dst.step()
    snap = snapshot(dst, [c, d])
    with pytest.raises(ValueError, match="another order|does not match|low-bit|full-precision"):
        dst.load_state_dict(saved)
    assert_unchanged(dst, [c, d], snap)
    dst.step()  # still a working optimizer
    assert not torch.equal(c.detach(), snap[0][0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["adamw", "lion", "adan", "lamb", "adamw8bit"])
def test_state_replaced_by_hand_is_refused_before_any_change(name, backend):
    """A state tensor swapped for one of another shape, dtype or layout is caught before the step
    touches anything (the first parameter's bucket included)."""
    cls, cfg = OPTIMIZERS[name]
    params = two_params((256, 512))
    opt = cls(params, **cfg, backend=backend)
    give_grads(params)
    opt.step()
    state = opt.state[params[1]]
    key = next(k for k in ("exp_avg", "exp_avg_sq") if k in state)
    good = state[key]
    bad_values = [torch.zeros(7, dtype=good.dtype), torch.zeros(good.numel() * 2, dtype=good.dtype)[::2]]
    bad_values.append(torch.zeros(good.shape, dtype=torch.float16 if good.dtype != torch.float16 else torch.float32))
    for bad in bad_values:
        state[key] = bad
        snap = snapshot(opt, params)
        with pytest.raises(ValueError, match="state|does not match"):
            opt.step()
        assert_unchanged(opt, params, snap)
    state[key] = good
    opt.step()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", [fastopt.AdamW, fastopt.Adam])
def test_lowbit_checkpoint_into_full_precision_adam_is_refused(cls, backend):
    """An 8-bit checkpoint loaded into fastopt.AdamW / Adam (whose kernel would read the uint8 codes as
    floats) is refused at load, whatever backend either was built with."""
    p = torch.nn.Parameter(torch.randn(4096))
    src = lowbit.AdamW8bit([p], lr=1e-2, backend="cpu" if "cpu" in BACKENDS else "torch")
    give_grads([p])
    src.step()
    q = torch.nn.Parameter(p.detach().clone())
    dst = cls([q], lr=1e-2, backend=backend)
    with pytest.raises(ValueError, match="low-bit states"):
        dst.load_state_dict(src.state_dict())
    assert not dst.state
    give_grads([q])
    dst.step()


@pytest.mark.parametrize("backend", BACKENDS)
def test_constructed_backend_wins_over_the_checkpoint(backend):
    """The ``backend`` a checkpoint was saved with does not replace the loading optimizer's."""
    params = two_params()
    other = "torch" if backend != "torch" else BACKENDS[-1]
    src = fastopt.Lion(params, lr=1e-2, backend=other)
    give_grads(params)
    src.step()
    dst = fastopt.Lion([torch.nn.Parameter(p.detach().clone()) for p in params], lr=1e-2, backend=backend)
    dst.load_state_dict(src.state_dict())
    assert [g["backend"] for g in dst.param_groups] == [backend]
    # a torch.optim checkpoint has no backend key: the constructed one stays as well
    ref = torch.optim.AdamW(params, lr=1e-2)
    ref.step()
    adamw = fastopt.AdamW([torch.nn.Parameter(p.detach().clone()) for p in params], lr=1e-2, backend=backend)
    adamw.load_state_dict(ref.state_dict())
    assert adamw.param_groups[0]["backend"] == backend


# -- the native boundary --------------------------------------------------------------------------

def adam_args(params, grads, ms, vs, steps, backend):
    return (params, grads, ms, vs, [], steps, 1e-3, None, 0.9, 0.999, 1e-8, 0.01, True, False, False, None, None,
            backend)


@pytest.mark.parametrize("backend", KERNELS)
def test_custom_op_refuses_tensors_that_do_not_fit(backend):
    """``fastopt::adam_step_`` called directly: a state with the wrong numel, dtype or device, a
    non-dense state, a storage smaller than the tensor's extent -- each refused before any kernel runs."""
    def fresh():
        ps = [torch.randn(100), torch.randn(33)]
        return ps, [torch.randn_like(p) for p in ps], [torch.zeros_like(p) for p in ps], \
            [torch.zeros_like(p) for p in ps], [torch.zeros(()) for _ in ps]

    ps, gs, ms, vs, steps = fresh()
    _ops.adam_step_(*adam_args(ps, gs, ms, vs, steps, backend))  # fits
    assert float(steps[0]) == 1.0
    cases = [
        ("elements", lambda ms: ms.__setitem__(1, torch.zeros(10))),
        ("expected torch.float32", lambda ms: ms.__setitem__(0, torch.zeros(100, dtype=torch.float16))),
        ("not dense", lambda ms: ms.__setitem__(0, torch.zeros(200)[::2])),
        ("elements", lambda ms: ms.__setitem__(0, torch.zeros(100).expand(2, 100)[0, :50])),
    ]
    for match, corrupt in cases:
        ps, gs, ms, vs, steps = fresh()
        corrupt(ms)
        snap = [t.clone() for t in ps + ms + vs + steps]
        with pytest.raises(ValueError, match=match):
            _ops.adam_step_(*adam_args(ps, gs, ms, vs, steps, backend))
        assert all(torch.equal(a, b) for a, b in zip(ps + ms + vs + steps, snap))


@pytest.mark.parametrize("backend", KERNELS)
def test_storage_resized_after_a_checked_call_is_refused(backend):
    """The boundary remembers calls it checked, but a storage shrunk since then changes the tensor's
    address, so the call is checked again and refused."""
    ps = [torch.randn(1000)]
    gs, ms, vs, steps = [torch.randn(1000)], [torch.zeros(1000)], [torch.zeros(1000)], [torch.zeros(())]
    _ops.adam_step_(*adam_args(ps, gs, ms, vs, steps, backend))
    _ops.adam_step_(*adam_args(ps, gs, ms, vs, steps, backend))
    ms[0].untyped_storage().resize_(16)  # 4 floats left of 1000
    with pytest.raises(ValueError, match="storage .* smaller than its extent|no storage"):
        _ops.adam_step_(*adam_args(ps, gs, ms, vs, steps, backend))
    ms[0].untyped_storage().resize_(0)
    with pytest.raises(ValueError, match="smaller than its extent|no storage"):
        _ops.adam_step_(*adam_args(ps, gs, ms, vs, steps, backend))
    assert float(steps[0]) == 2.0


@pytest.mark.parametrize("backend", KERNELS)
def test_elementwise_and_lowbit_ops_refuse_mismatched_lists(backend):
    p, g = torch.randn(256), torch.randn(256)
    step = torch.zeros(())

    def elementwise(state, mask=None):
        _ops.elementwise_step_("lion", [p], [g], [state], [step], [0.9, 0.99, 0.0], 1, 1e-3, None, False, None,
                               None, 0, [], None, None, 0, False, backend, [mask] if mask is not None else [], [],
                               0.0, 0.0)
    with pytest.raises(ValueError, match="states\\[0\\] has 255 elements, expected 256"):
        elementwise(torch.zeros(255))
    with pytest.raises(ValueError, match="sparse_mask\\[0\\] has 128 elements"):
        elementwise(torch.zeros(256), torch.ones(128, dtype=torch.bool))
    with pytest.raises(ValueError, match="states .* for 1 params|state tensors"):
        _ops.elementwise_step_("lion", [p], [g], [], [step], [0.9, 0.99, 0.0], 1, 1e-3, None, False, None, None, 0,
                               [], None, None, 0, False, backend, [], [], 0.0, 0.0)
    assert float(step) == 0.0

    books = [codebook("dyn8s"), codebook("dyn8u")]

    def low(codes, absmax, books=books):
        _ops.lowbit_step_("adamw", [p], [g], codes, absmax, books, 256, [step], [0.9, 0.999, 1e-8, 0.01], 0, 1e-3,
                          None, False, None, None, 0, False, [], [], [], backend)
    codes = [torch.zeros(256, dtype=torch.uint8) for _ in range(2)]
    absmax = [torch.zeros(1) for _ in range(2)]
    with pytest.raises(ValueError, match="has 128 elements, expected 256"):  # 4-bit-sized codes, 8-bit books
        low([codes[0], torch.zeros(128, dtype=torch.uint8)], absmax)
    with pytest.raises(ValueError, match="absmax\\[1\\]\\[0\\] has 2 elements, expected 1"):
        low(codes, [absmax[0], torch.zeros(2)])
    with pytest.raises(ValueError, match="codebook"):
        low(codes, absmax, [books[0], torch.zeros(books[1].numel(), dtype=torch.int32)])
    low(codes, absmax, [b.clone() for b in books])  # a copy of a fastopt codebook is one
    assert float(step) == 1.0

    x = torch.randn(512)
    with pytest.raises(ValueError, match="codes\\[0\\] has 256 elements, expected 512"):
        _ops.blockwise_codec_(x, torch.zeros(256, dtype=torch.uint8), torch.zeros(2), codebook("dyn8s"), 256, False,
                              backend)
    with pytest.raises(ValueError, match="out\\[0\\] has 4 elements"):
        _ops.nm_mask_(torch.randn(8), torch.zeros(4, dtype=torch.uint8), 1, 8, 1, 2, 4, backend)
    with pytest.raises(ValueError, match="does not cover"):
        _ops.nm_mask_(torch.randn(8), torch.zeros(16, dtype=torch.uint8), 1, 16, 1, 2, 4, backend)


# -- one result, no race ---------------------------------------------------------------------------

def test_repeated_parameter_in_a_group_is_refused():
    p = torch.nn.Parameter(torch.randn(5))
    for cls, cfg in OPTIMIZERS.values():
        with pytest.warns(UserWarning, match="duplicate"), pytest.raises(ValueError, match="more than once"):
            cls([p, p], **cfg)
        opt = cls([p], **cfg)
        with pytest.warns(UserWarning, match="duplicate"), pytest.raises(ValueError, match="more than once"):
            opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))] * 2})
        assert len(opt.param_groups) == 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["adamw", "lion", "lamb", "adamw8bit"])
def test_parameters_sharing_memory_are_refused(name, backend):
    """Two parameters that are overlapping views of one buffer would be stepped concurrently: refused
    before any change.  Adjacent views (a flat buffer cut in pieces) are fine."""
    cls, cfg = OPTIMIZERS[name]
    buf = torch.randn(600)
    a, b = torch.nn.Parameter(buf[:400]), torch.nn.Parameter(buf[300:])
    opt = cls([a, b], **cfg, backend=backend)
    give_grads([a, b])
    snap = snapshot(opt, [a, b])
    with pytest.raises(ValueError, match="share memory"):
        opt.step()
    assert_unchanged(opt, [a, b], snap)
    c, d = torch.nn.Parameter(buf[:300]), torch.nn.Parameter(buf[300:])
    opt = cls([c, d], **cfg, backend=backend)
    give_grads([c, d])
    opt.step()


# -- nothing half-updated ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["adamw", "lion", "lamb", "adamw8bit"])
def test_expanded_parameter_is_refused_before_any_change(name, backend):
    cls, cfg = OPTIMIZERS[name]
    dense = torch.nn.Parameter(torch.randn(4096))
    expanded = torch.randn(1, 8).expand(4, 8)  # a leaf whose 32 elements share 8 floats
    opt = cls([dense, expanded], **cfg, backend=backend)
    dense.grad = torch.randn_like(dense)
    expanded.grad = torch.randn(4, 8)
    snap = snapshot(opt, [dense, expanded])
    with pytest.raises(ValueError, match="share memory|expand"):
        opt.step()
    assert_unchanged(opt, [dense, expanded], snap)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["adamw", "lion", "lamb", "sgdsai", "adamp"])
def test_two_dimensional_tensor_lr_acts_as_a_scalar(name, backend):
    """``lr=torch.tensor([[1e-2]])`` (torch.optim accepts any one-element tensor) gives the float lr's
    result on every bucket, fp64 (torch fallback) and fp32 alike."""
    cls, cfg = OPTIMIZERS[name]
    cfg = {k: v for k, v in cfg.items() if k != "lr"}
    base = [torch.randn(64), torch.randn(32, dtype=torch.float64)]
    runs = []
    for lr in (1e-2, torch.tensor([[1e-2]])):
        params = [torch.nn.Parameter(t.clone()) for t in base]
        opt = cls(params, lr=lr, **cfg, backend=backend if backend == "torch" else "auto")
        for k in range(2):
            give_grads(params, seed=k)
            opt.step()
        runs.append(params)
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    if name == "adamw":
        params = [torch.nn.Parameter(t.clone()) for t in base]
        ref = torch.optim.AdamW(params, lr=torch.tensor([[1e-2]]))
        for k in range(2):
            give_grads(params, seed=k)
            ref.step()
        for a, b in zip(runs[1], params):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_integer_parameter_is_refused(name, backend):
    cls, cfg = OPTIMIZERS[name]
    dense = torch.nn.Parameter(torch.randn(8))
    ints = torch.zeros(8, dtype=torch.int64)
    opt = cls([dense, ints], **cfg, backend=backend)
    dense.grad = torch.randn(8)
    ints.grad = torch.ones(8, dtype=torch.int64)
    snap = snapshot(opt, [dense, ints])
    with pytest.raises(TypeError, match="floating-point"):
        opt.step()
    assert_unchanged(opt, [dense, ints], snap)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_grad_scale_is_refused_before_any_bucket(backend):
    """AMP's scale is checked for every device before the first bucket runs."""
    params = [torch.nn.Parameter(torch.randn(8)), torch.nn.Parameter(torch.randn(8, dtype=torch.bfloat16))]
    opt = fastopt.Lion(params, lr=1e-2, backend=backend)
    give_grads(params)
    opt.grad_scale = torch.ones(2)
    snap = snapshot(opt, params)
    with pytest.raises(ValueError, match="grad_scale"):
        opt.step()
    assert_unchanged(opt, params, snap)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_muon_parameters_sharing_memory_are_refused(backend):
    buf = torch.randn(12, 8)
    a, b = torch.nn.Parameter(buf[:8]), torch.nn.Parameter(buf[6:])
    opt = fastopt.Muon([a, b], lr=1e-2, backend=backend)
    give_grads([a, b])
    snap = snapshot(opt, [a, b])
    with pytest.raises(ValueError, match="share memory"):
        opt.step()
    assert_unchanged(opt, [a, b], snap)
