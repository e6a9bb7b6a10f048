"""Property-based tests (hypothesis): every kernel backend against the torch reference on random cases.

Every optimizer class (full-precision, low-bit states, Muon), ``fastopt.sparse.nm_mask`` and
``fastopt.ot.sinkhorn`` are run on random shapes (numel 0, 1, primes, 0-d, n-d, and now and then one
more than a CPU chunk), dtypes (fp32 / bf16 / fp16, mixed in one group), hyperparameters from their
valid ranges, param groups with their own hyperparameters, 1-3 steps, on each kernel backend and on
``backend="torch"`` with identical inputs, and the results compared with the per-dtype tolerances of
the example-based tests (tests/test_adam.py, test_zoo.py, test_lowbit.py, test_muon.py,
test_ot_sinkhorn.py).  Wherever the reference raises, the kernel must raise the same exception type.

Reproducible: the examples are derandomized (a fixed function of each test's source), so every run
tests the same cases, and a failure prints its falsifying example as the list of its draws.  The
budget is a couple of minutes on a 2-core CPU machine (the Triton interpreter gets small shapes and
few examples).  To hunt for new cases locally::

    FASTOPT_PROPERTY_EXPLORE=1 FASTOPT_PROPERTY_SCALE=20 python -m pytest tests/test_properties.py \
        --hypothesis-seed=123 --hypothesis-show-statistics

(``EXPLORE`` switches derandomization off, ``--hypothesis-seed`` makes that run replayable, ``SCALE``
multiplies the example counts.)  No example database is written.
"""
import inspect
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, Phase, event, note, settings
from hypothesis import strategies as st
from hypothesis import given

import fastopt
from fastopt import lowbit
from fastopt.lowbit.state import STATE_BITS
from fastopt.ot import sinkhorn
from fastopt.sparse import MAX_KERNEL_M, nm_mask

from conftest import KERNEL_DEVICE_BACKENDS

_EXPLORE = os.environ.get("FASTOPT_PROPERTY_EXPLORE", "") not in ("", "0")
_SCALE = float(os.environ.get("FASTOPT_PROPERTY_SCALE", "1"))


@pytest.fixture(autouse=True, scope="module")
def _no_local_constants():
    """Hypothesis (6.13x on) mixes constants it finds in the project's own loaded modules into about 5% of
    its draws, so the derandomized cases would depend on the library's source and on which modules
    earlier tests happened to import.  Switched off here: the same cases alone or in the whole suite."""
    try:
        from hypothesis.internal.conjecture import providers
        original, empty = providers._get_local_constants, providers.Constants()
    except (ImportError, AttributeError):  # another hypothesis: its own behaviour
        yield
        return
    providers._get_local_constants = lambda: empty
    providers.CONSTANTS_CACHE.cache.clear()
    yield
    providers._get_local_constants = original
    providers.CONSTANTS_CACHE.cache.clear()


def budget(n):
    """Hypothesis settings for a property run on ``n`` examples (times FASTOPT_PROPERTY_SCALE)."""
    return settings(max_examples=max(1, int(round(n * _SCALE))), derandomize=not _EXPLORE, database=None,
                    deadline=None, print_blob=True, phases=[Phase.explicit, Phase.generate, Phase.shrink],
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much])


def interpreted(device, backend):
    """The Triton interpreter on the CPU: correct but slow, so it gets small shapes and few examples."""
    return backend == "triton" and torch.device(device).type == "cpu"


INTERPRETED_DEVICE_BACKENDS = [(d, b) for d, b in KERNEL_DEVICE_BACKENDS if interpreted(d, b)]


def kernel_property(n, device_backends=KERNEL_DEVICE_BACKENDS, names=None):
    """A property ``fn(data, [name,] device, backend)`` run on ``n`` examples for each (device, backend)
    (and each of ``names``)."""
    def wrap(fn):
        fn = budget(n)(given(data=st.data())(fn))
        if names is not None:
            fn = pytest.mark.parametrize("name", names)(fn)
        return pytest.mark.parametrize("device,backend", device_backends)(fn)
    return wrap


def skip_interpreted(device, backend, instead):
    """The compiled-kernel run of a property skips the interpreter, which ``instead`` runs on fewer examples."""
    if interpreted(device, backend):
        pytest.skip(f"the Triton interpreter: see {instead}")


FP32 = dict(rtol=1e-5, atol=1e-6)
# Math is fp32 on every backend, storage rounds once per step: a last-bit flip at a rounding boundary
# is one storage ulp (the tolerances of tests/test_zoo.py's low-precision test).
TOL = {torch.float32: FP32, torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2), torch.float16: dict(rtol=2e-3, atol=1e-3)}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# -- strategies -------------------------------------------------------------------------------------

PRIMES = [2, 3, 5, 7, 11, 13, 17, 31, 61, 97, 127, 257, 509, 1021]
CHUNK = 65536  # the CPU/CUDA launchers' chunk and the Triton tables' largest block


def one_in(k):
    """True about once in ``k`` draws."""
    return st.sampled_from([False] * (k - 1) + [True])  # shrinks to False


def logu(lo, hi):
    """Log-uniform floats in [lo, hi]."""
    return st.floats(math.log10(lo), math.log10(hi)).map(lambda e: float(10.0 ** e))


def shapes(small=False, matrix=False):
    """Odd shapes: empty, one element, 0-d, primes, n-d with prime sides (:func:`draw_problem` adds
    now and then one more than a chunk)."""
    side = st.sampled_from([1, 2, 3, 5, 7, 13] if small else [1, 2, 3, 5, 7, 13, 31, 64])
    primes = st.sampled_from([p for p in PRIMES if p <= 257] if small else PRIMES)
    if matrix:  # Muon's hidden matrices: 2-d or 4-d (a conv weight), no empty side
        return st.one_of(st.tuples(side, side), st.tuples(primes, side), st.tuples(side, side, side, side))
    options = [st.just((0,)), st.just((1,)), st.just(()), primes.map(lambda p: (p,)), st.tuples(side, side),
               st.tuples(side, primes), st.tuples(side, side, side), st.tuples(side, st.just(0))]
    return st.one_of(*options)


BIG_SHAPES = st.sampled_from([(CHUNK + 1,), (3, CHUNK // 2 + 7)])


def lowbit_shapes(small=False):
    """Block multiples (quantized states when numel >= min_quant_size) and odd sizes (full precision)."""
    blocks = st.sampled_from([(128,), (256,), (2, 128), (512,), (3, 256)] if small else
                             [(128,), (256,), (2, 128), (512,), (3, 256), (64, 128), (4096,), (256 * 17,),
                              (4096 + 128,), (CHUNK + 256,)])
    odd = st.sampled_from([(0,), (1,), (7,), (100,), (13, 31)] if small else
                          [(0,), (1,), (7,), (1000,), (13, 31), (4095,)])
    return st.one_of(blocks, blocks, odd)


HYPER = {
    "lr": logu(1e-4, 1e-1),
    "betas": st.tuples(st.floats(0.0, 0.99), st.floats(0.5, 0.9999)),
    "eps": logu(1e-10, 1e-3),
    "weight_decay": st.one_of(st.just(0.0), st.floats(0.0, 0.2)),
    "amsgrad": st.booleans(),
    "maximize": st.booleans(),
    "decoupled_weight_decay": st.booleans(),
    "weight_decouple": st.booleans(),
    "fixed_decay": st.booleans(),
    "rectify": st.booleans(),
    "n_sma_threshold": st.integers(4, 6),
    "degenerated_to_sgd": st.booleans(),
    "ams_bound": st.booleans(),
    "adam_debias": st.booleans(),
    "grad_averaging": st.booleans(),
    "max_grad_norm": st.one_of(st.just(0.0), logu(0.1, 10.0)),
    "adam": st.booleans(),
    "pre_norm": st.booleans(),
    "clamp": st.floats(1.0, 10.0),
    "delta": st.floats(0.01, 0.5),
    "wd_ratio": st.floats(0.0, 1.0),
    "nesterov": st.booleans(),
    "momentum": st.floats(0.0, 0.99),
    "dampening": st.floats(0.0, 0.5),
    "lr_decay": st.one_of(st.just(0.0), logu(1e-4, 1e-1)),
    "initial_accumulator_value": st.one_of(st.just(0.0), st.floats(0.0, 1.0)),
    "alpha": st.floats(0.5, 0.999),
    "centered": st.booleans(),
}
CLASS_HYPER = {
    # Adan's max_grad_norm and LAMB's rectify are upstream arguments fastopt accepts only at their
    # defaults (ValueError otherwise: tests/test_signatures.py)
    "Adan": {"betas": st.tuples(st.floats(0.0, 0.99), st.floats(0.0, 0.99), st.floats(0.5, 0.9999)),
             "max_grad_norm": st.just(0.0)},
    "Lamb": {"rectify": st.just(False)},
    "Lion": {"betas": st.tuples(st.floats(0.0, 0.99), st.floats(0.0, 0.999)), "lr": logu(1e-5, 1e-2)},
    # AdaBelief's (g - m)^2 cancels to b1 (g - m_prev): an fp32 rounding difference of m (one FMA) is
    # amplified by 1 / b1, so keep b1 practical (>= 0.5) for the fp32 tolerance to mean something.
    "AdaBelief": {"eps": logu(1e-16, 1e-6), "betas": st.tuples(st.floats(0.5, 0.99), st.floats(0.5, 0.9999))},
    # L2 decay (weight_decouple=False) is refused by SGDP and AdamP: upstream's has no effect.
    "SGDP": {"weight_decouple": st.just(True)},
    "AdamP": {"weight_decouple": st.just(True)},
    # torch's SGD refuses nesterov without momentum or with dampening (tests/test_classic.py covers it)
    "SGD": {"nesterov": st.just(False)},
}
# Per-group overrides (the rest comes from the optimizer's defaults).
GROUP_KEYS = ("lr", "weight_decay", "betas", "eps", "momentum")


def hyper_names(cls):
    return [n for n in inspect.signature(cls.__init__).parameters if n in HYPER]


def hyper_strategy(cls, name):
    return CLASS_HYPER.get(cls.__name__, {}).get(name, HYPER[name])


def draw_hyper(data, cls, names=None, label=""):
    """A random subset of ``cls``'s hyperparameters, each from its valid range (the rest default)."""
    kw = {}
    for name in names if names is not None else hyper_names(cls):
        if data.draw(st.booleans(), label=f"{label}set {name}"):
            kw[name] = data.draw(hyper_strategy(cls, name), label=f"{label}{name}")
    return kw


def randn(shape, seed, dtype=torch.float32, scale=1.0, zeros=0.0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float32) * scale
    if zeros:
        x = torch.where(torch.rand(shape, generator=gen) < zeros, torch.zeros_like(x), x)
    return x.to(dtype)


# -- running optimizers side by side ----------------------------------------------------------------

def draw_problem(data, shape_strategy, dtypes=DTYPES, max_params=4, group_keys=GROUP_KEYS, cls=None, big=None):
    """Random parameters (shapes, dtypes), their split into groups with their own hyperparameters,
    the gradients of every step (some parameters frozen), and the occasional duplicate parameter;
    in about one case in five one parameter has a ``big`` shape (more than a chunk)."""
    n = data.draw(st.integers(1, max_params), label="number of params")
    shapes_ = [data.draw(shape_strategy, label=f"shape {i}") for i in range(n)]
    if big is not None and data.draw(one_in(5), label="one big param"):
        shapes_[data.draw(st.integers(0, n - 1), label="which")] = data.draw(big, label="big shape")
    dts = [data.draw(st.sampled_from(dtypes), label=f"dtype {i}") for i in range(n)]
    n_groups = data.draw(st.integers(1, min(3, n)), label="groups")
    where = [data.draw(st.integers(0, n_groups - 1), label=f"group of {i}") for i in range(n)]
    overrides = []
    for g in range(n_groups):
        names = [k for k in group_keys if cls is None or k in hyper_names(cls)]
        overrides.append(draw_hyper(data, cls, names, label=f"group {g} ") if g else {})
    frozen = [data.draw(one_in(8), label=f"frozen {i}") for i in range(n)]
    duplicate = data.draw(one_in(8), label="duplicate a param in its group")
    steps = data.draw(st.integers(1, 3), label="steps")
    scale = data.draw(st.sampled_from([1.0, 1e-3, 1e2]), label="grad scale")
    zeros = data.draw(st.sampled_from([0.0, 0.0, 0.3]), label="fraction of zero grads")
    seed = data.draw(st.integers(0, 2 ** 16), label="seed")
    for s in shapes_:
        numel = math.prod(s)
        event(f"numel {'0' if numel == 0 else '1' if numel == 1 else '> chunk' if numel > CHUNK else 'other'}")
    event(f"duplicate={duplicate}")
    return dict(shapes=shapes_, dtypes=dts, where=where, overrides=overrides, frozen=frozen, duplicate=duplicate,
                steps=steps, scale=scale, zeros=zeros, seed=seed)


def make_groups(problem, params):
    groups = []
    for g, over in enumerate(problem["overrides"]):
        ps = [p for p, w in zip(params, problem["where"]) if w == g]
        if ps:
            groups.append(dict(params=ps, **over))
    if problem["duplicate"]:
        groups[0]["params"].append(groups[0]["params"][0])
    return groups


def base_params(problem, device):
    return [randn(s, problem["seed"] + i, dt).to(device) for i, (s, dt) in
            enumerate(zip(problem["shapes"], problem["dtypes"]))]


def run_optimizer(build, problem, device):
    """Build the optimizer on fresh copies of the problem's params and step it; returns (opt, params)
    or the exception raised (construction or step)."""
    params = [torch.nn.Parameter(t.clone()) for t in base_params(problem, device)]
    try:
        opt = build(make_groups(problem, params))
        for k in range(problem["steps"]):
            for i, p in enumerate(params):
                if not problem["frozen"][i]:
                    seed = problem["seed"] + 1000 * (k + 1) + i
                    p.grad = randn(p.shape, seed, p.dtype, problem["scale"], problem["zeros"]).to(device)
            opt.step()
    except Exception as e:  # noqa: BLE001 - compared with the other backend's outcome
        return e, params
    return opt, params


def same_outcome(ref, ker, allow_ref_error):
    """Both raised the same exception type (True: nothing more to compare), or neither did (False)."""
    if isinstance(ref, Exception):
        note(f"reference raised {type(ref).__name__}: {ref}")
        if not allow_ref_error:
            raise AssertionError(f"the reference refused a valid case: {type(ref).__name__}: {ref}") from ref
        if not isinstance(ker, Exception):
            raise AssertionError(f"the reference raised {type(ref).__name__}: {ref}, the kernel backend ran")
        assert type(ker) is type(ref), \
            f"reference raised {type(ref).__name__}: {ref}; kernel {type(ker).__name__}: {ker}"
        return True
    if isinstance(ker, Exception):
        raise AssertionError(f"the kernel backend raised {type(ker).__name__}: {ker}; the reference ran") from ker
    return False


def assert_tensor_close(a, b, what, tol):
    """``b`` close to the reference ``a``: NaN and inf exactly where ``a`` has them; ``atol`` relative to
    the largest finite ``|a|`` (at least 1), so that states of gradients scaled by 100 get the rounding
    allowance of their magnitude.  A few elements (1 + numel / 10^4) may be off by up to 100 times the
    tolerance: where an update divides by a difference of nearly equal numbers (EXAdam's m^2 + eps with
    m^2 ~ eps after gradients that cancel), the last-bit difference of an FMA is amplified a
    thousandfold; a wrong index or a skipped chunk moves far more elements, or by far more."""
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    assert a.shape == b.shape, f"{what}: shape {tuple(b.shape)}, reference {tuple(a.shape)}"
    finite = a.isfinite()
    same = torch.equal(finite, b.isfinite()) and torch.equal(a[~finite].nan_to_num(), b[~finite].nan_to_num())
    assert same, (f"{what}: NaN/inf at {(~finite).nonzero()[:8].tolist()} (reference: {a[~finite][:8].tolist()}), "
                  f"here at {(~b.isfinite()).nonzero()[:8].tolist()} ({b[~b.isfinite()][:8].tolist()})")
    a, b = a[finite], b[finite]
    scale = max(1.0, float(a.abs().max())) if a.numel() else 1.0
    atol, rtol = tol["atol"] * scale, tol["rtol"]
    err = (b - a).abs()
    off = err > atol + rtol * a.abs()
    if not bool(off.any()):
        return
    if int(off.sum()) <= 1 + a.numel() // 10_000 and bool((err <= 100 * (atol + rtol * a.abs())).all()):
        return
    torch.testing.assert_close(b, a, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def assert_optimizers_close(ref, ref_p, ker, ker_p):
    for i, (a, b) in enumerate(zip(ref_p, ker_p)):
        what = f"param {i} {tuple(a.shape)} {a.dtype}"
        assert b.dtype == a.dtype and b.shape == a.shape
        assert_tensor_close(a, b, what, TOL[a.dtype])
        sa, sb = ref.state.get(a, {}), ker.state.get(b, {})
        assert set(sa) == set(sb), f"{what}: state keys {sorted(sa)} vs {sorted(sb)}"
        for key, va in sa.items():
            vb = sb[key]
            if not torch.is_tensor(va):
                assert va == vb, f"{what}: state {key} {va!r} vs {vb!r}"
                continue
            assert vb.dtype == va.dtype and vb.shape == va.shape, f"{what}: state {key}"
            if key == "step" or not va.is_floating_point():
                assert torch.equal(va.cpu(), vb.cpu()), f"{what}: state {key} {va} vs {vb}"
            else:
                assert_tensor_close(va, vb, f"{what}: state {key}", TOL[va.dtype])


# -- full-precision optimizers ------------------------------------------------------------------------

OPTIMIZERS = ["Adam", "AdamW", "Lion", "Adan", "AdaBelief", "DiffGrad", "EXAdam", "Lamb", "AdamP", "SGDP", "SGDSaI",
              "SGD", "Adagrad", "RMSprop"]


def test_every_optimizer_class_is_covered():
    """A new optimizer exported by fastopt must be added to the properties below."""
    exported = {n for n in dir(fastopt) if isinstance(getattr(fastopt, n), type)
                and issubclass(getattr(fastopt, n), torch.optim.Optimizer)}
    # Muon: test_muon_triton_matches_torch; OrthoGrad (a wrapper): test_orthograd_matches_reference;
    # OptimizerInBackward (steps these per parameter): bit-identical to them, tests/test_in_backward.py;
    # AdaHessian (a step needs a double backward): its update in the zoo cases and tests/test_adahessian.py;
    # MFAC (one window per group, not elementwise): tests/test_mfac.py; SAM (a wrapper): tests/test_sam.py
    assert exported == set(OPTIMIZERS) | {"Muon", "OrthoGrad", "OptimizerInBackward", "AdaHessian", "MFAC", "SAM"}


def check_optimizer(data, name, device, backend):
    cls = getattr(fastopt, name)
    small = interpreted(device, backend)
    problem = draw_problem(data, shapes(small=small), max_params=3 if small else 4, cls=cls,
                           big=None if small else BIG_SHAPES)
    kw = draw_hyper(data, cls)
    if name in ("Adam", "AdamW") and data.draw(st.booleans(), label="lr as a tensor"):
        kw["lr"] = kw.get("lr", 1e-3)
        lr_tensor = True
    else:
        lr_tensor = False
    options = ["none"]
    if "stochastic_rounding" in inspect.signature(cls.__init__).parameters:
        options += ["stochastic_rounding", "master_weights"]
    option = data.draw(st.sampled_from(options), label="bf16 option")
    if option != "none":
        kw[option] = True
        kw["seed"] = data.draw(st.integers(0, 1000), label="rounding seed")
    if name == "SGDSaI" and kw.get("weight_decouple") is False:
        # L2 decay with momentum is refused (upstream's has no effect): L2 only without momentum
        kw["momentum"] = 0.0
        for over in problem["overrides"]:
            over.pop("momentum", None)
    event(f"{name} option={option}")
    note(f"{name}(backend={backend!r}, {kw}) on {device}")

    def build(backend_):
        def make(groups):
            k = dict(kw)
            if lr_tensor:
                k["lr"] = torch.tensor(k["lr"], device=device)
            return cls(groups, backend=backend_, **k)
        return make

    ref, ref_p = run_optimizer(build("torch"), problem, device)
    ker, ker_p = run_optimizer(build(backend), problem, device)
    if same_outcome(ref, ker, allow_ref_error=problem["duplicate"]):
        return
    assert_optimizers_close(ref, ref_p, ker, ker_p)


@kernel_property(30, names=OPTIMIZERS)
def test_optimizer_matches_reference(data, name, device, backend):
    skip_interpreted(device, backend, "test_optimizer_matches_reference_interpreted")
    check_optimizer(data, name, device, backend)


@kernel_property(6, INTERPRETED_DEVICE_BACKENDS, names=OPTIMIZERS)
def test_optimizer_matches_reference_interpreted(data, name, device, backend):
    check_optimizer(data, name, device, backend)


# -- low-bit states ---------------------------------------------------------------------------------

LOWBIT = {"AdamW": lowbit.ElementwiseAdamW, "Adam": lowbit.ElementwiseAdam, "Lion": fastopt.Lion,
          "Adan": fastopt.Adan, "AdaBelief": fastopt.AdaBelief, "DiffGrad": fastopt.DiffGrad,
          "EXAdam": fastopt.EXAdam}


def assert_lowbit_close(ref, ref_p, ker, ker_p):
    """As tests/test_lowbit.py: an fp32 rounding difference may move a state across a code midpoint,
    which moves that element's update; allow it for a tiny fraction (and one element) of a tensor."""
    for i, (a, b) in enumerate(zip(ref_p, ker_p)):
        what = f"param {i} {tuple(a.shape)} {a.dtype}"
        sa, sb = ref.state.get(a, {}), ker.state.get(b, {})
        assert set(sa) == set(sb), f"{what}: state keys {sorted(sa)} vs {sorted(sb)}"
        if "state_format" not in sa:
            assert_optimizers_close(ref, [a], ker, [b])
            continue
        allowed = 1 + 1e-3 * a.numel()
        tol = TOL[a.dtype] if a.dtype != torch.float32 else dict(rtol=2e-5, atol=2e-6)
        x, y = b.detach().float().cpu(), a.detach().float().cpu()
        atol = tol["atol"] * max(1.0, float(y.abs().nan_to_num(0.0, 0.0, 0.0).max())) if y.numel() else 0.0
        off = int(((x - y).abs() > atol + tol["rtol"] * y.abs()).sum()) + int((x.isnan() != y.isnan()).sum())
        assert off <= allowed, f"{what}: {off} elements differ from the reference (max {(x - y).abs().max()})"
        for key, va in sa.items():
            vb = sb[key]
            if not torch.is_tensor(va):
                assert va == vb, f"{what}: state {key} {va!r} vs {vb!r}"
            elif key == "step":
                assert torch.equal(va.cpu(), vb.cpu()), f"{what}: step {va} vs {vb}"
            elif va.dtype == torch.uint8:
                codes = int((va.cpu() != vb.cpu()).sum())
                assert codes <= allowed, f"{what}: {codes} codes of state {key} differ"
            elif key.endswith(("_absmax", "_row", "_col")):
                # a code that differs (above) may be its block's maximum
                x, y = vb.float().cpu(), va.float().cpu()
                scales = int(((x - y).abs() > 1e-5 * y.abs()).sum())
                assert scales <= allowed, f"{what}: {scales} of {y.numel()} scales of state {key} differ"
            else:
                assert_tensor_close(va, vb, f"{what}: state {key}", TOL[va.dtype])


def check_lowbit(data, name, device, backend):
    cls = LOWBIT[name]
    small = interpreted(device, backend)
    problem = draw_problem(data, lowbit_shapes(small), max_params=3, cls=cls)
    kw = draw_hyper(data, cls)
    # "4-rank1" runs on the cpu and torch backends only (documented; the Triton and CUDA paths refuse it)
    bits = [b for b in STATE_BITS if b != "4-rank1" or backend not in ("triton", "cuda")]
    kw["state_bits"] = data.draw(st.sampled_from(bits), label="state_bits")
    kw["min_quant_size"] = data.draw(st.sampled_from([4096, 1, 256]), label="min_quant_size")
    option = data.draw(st.sampled_from(["none", "stochastic_rounding", "master_weights"]), label="bf16 option")
    if option != "none":
        kw[option] = True
    event(f"lowbit state_bits={kw['state_bits']}")
    note(f"{cls.__name__}(backend={backend!r}, {kw}) on {device}")

    def build(backend_):
        return lambda groups: cls(groups, backend=backend_, **kw)

    ref, ref_p = run_optimizer(build("torch"), problem, device)
    ker, ker_p = run_optimizer(build(backend), problem, device)
    if same_outcome(ref, ker, allow_ref_error=problem["duplicate"]):
        return
    assert_lowbit_close(ref, ref_p, ker, ker_p)


@kernel_property(20, names=list(LOWBIT))
def test_lowbit_optimizer_matches_reference(data, name, device, backend):
    skip_interpreted(device, backend, "test_lowbit_optimizer_matches_reference_interpreted")
    check_lowbit(data, name, device, backend)


@kernel_property(4, INTERPRETED_DEVICE_BACKENDS, names=["AdamW", "Lion", "AdaBelief"])
def test_lowbit_optimizer_matches_reference_interpreted(data, name, device, backend):
    check_lowbit(data, name, device, backend)


# -- Muon -------------------------------------------------------------------------------------------

MUON_HYPER = {
    "lr": logu(1e-3, 5e-2), "momentum": st.floats(0.0, 0.99),
    "weight_decay": st.one_of(st.just(0.0), st.floats(0.0, 0.1)),
    "weight_decouple": st.booleans(), "nesterov": st.booleans(), "ns_steps": st.integers(1, 4),
    "ns_coeffs": st.sampled_from(["original", "quintic"]), "use_adjusted_lr": st.booleans(),
    "adamw_lr": logu(1e-4, 1e-2), "adamw_betas": st.tuples(st.floats(0.0, 0.99), st.floats(0.5, 0.9999)),
    "adamw_wd": st.one_of(st.just(0.0), st.floats(0.0, 0.2)), "adamw_eps": logu(1e-10, 1e-6),
    "maximize": st.booleans(), "foreach": st.sampled_from([None, False]), "cautious": st.booleans(),
    "ns_method": st.sampled_from(["newton_schulz", "gram_newton_schulz"]),
}


def _rel(a, b):
    d = (a.double() - b.double()).norm()
    return (d / b.double().norm()).item() if d > 0 else 0.0


@pytest.mark.parametrize("device", [d for d, b in KERNEL_DEVICE_BACKENDS if b == "triton"])
@budget(6)
@given(data=st.data())
def test_muon_triton_matches_torch(data, device):
    """Muon's Triton Newton-Schulz against the torch reference (both bf16): the bounds of
    tests/test_muon.py's triton test; the AdamW params (the cpu/cuda kernel) within fp32 tolerance."""
    from fastopt.reference import muon as R

    small = interpreted(device, "triton")
    n_muon = data.draw(st.integers(1, 2), label="muon params")
    n_adamw = data.draw(st.integers(0, 2), label="adamw params")
    mshapes = [data.draw(shapes(small=True, matrix=True), label=f"muon shape {i}") for i in range(n_muon)]
    ashapes = [data.draw(shapes(small=small), label=f"adamw shape {i}") for i in range(n_adamw)]
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16]), label="dtype")
    kw = {}
    for name, strat in MUON_HYPER.items():
        if data.draw(st.booleans(), label=f"set {name}"):
            kw[name] = data.draw(strat, label=name)
    steps = data.draw(st.integers(1, 2 if small else 3), label="steps")
    seed = data.draw(st.integers(0, 2 ** 16), label="seed")
    note(f"Muon({kw}) muon {mshapes} adamw {ashapes} {dtype} on {device}")
    base = [randn(s, seed + i, dtype).to(device) for i, s in enumerate(mshapes + ashapes)]

    def run(backend_):
        ps = [torch.nn.Parameter(t.clone()) for t in base]
        groups = [dict(params=ps[:n_muon], use_muon=True)]
        if n_adamw:
            groups.append(dict(params=ps[n_muon:], use_muon=False))
        opt = fastopt.Muon(groups, backend=backend_, **kw)
        for k in range(steps):
            for i, p in enumerate(ps):
                p.grad = randn(p.shape, seed + 1000 * (k + 1) + i, dtype).to(device)
            opt.step()
        return opt, ps

    ref, ref_p = run("torch")
    tri, tri_p = run("triton")
    lr = kw.get("lr", 0.02)
    scale = max(R.adjusted_lr(lr, s, kw.get("use_adjusted_lr", False)) for s in mshapes)
    for i, (p, q, b) in enumerate(zip(tri_p[:n_muon], ref_p[:n_muon], base)):
        if steps == 1 or (not kw.get("weight_decay") or kw.get("weight_decouple", True)):
            # the momentum buffer never reads the (Newton-Schulz dependent) params
            assert torch.equal(tri.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"]), f"muon param {i}"
        d_tri, d_ref = p.detach().double() - b.double(), q.detach().double() - b.double()
        bound = steps * scale * 2 ** -6
        if dtype == torch.float32:
            assert _rel(d_tri, d_ref) <= 2e-2, f"muon param {i}: relative difference {_rel(d_tri, d_ref)}"
        else:  # + one bf16 rounding of p per step (a flip at a rounding boundary)
            assert _rel(d_tri, d_ref) <= 5e-2, f"muon param {i}: relative difference {_rel(d_tri, d_ref)}"
            bound += steps * 2 ** -7 * b.abs().max().item()
        assert (d_tri - d_ref).abs().max() <= bound, f"muon param {i}: {(d_tri - d_ref).abs().max()} > {bound}"
    for i, (p, q) in enumerate(zip(tri_p[n_muon:], ref_p[n_muon:])):
        assert_tensor_close(q, p, f"adamw param {i}", TOL[dtype])
    assert tri.param_groups[0]["step"] == ref.param_groups[0]["step"] == steps


# -- OrthoGrad's projection ---------------------------------------------------------------------------

@kernel_property(25)
def test_orthograd_matches_reference(data, device, backend):
    """fastopt.optim.orthograd.orthogonalize_gradients_ on the kernels against the reference (the torch
    backend, bitwise upstream's): each projected gradient within fp32 (bf16: one storage ulp) of the
    reference, relative to the tensor's largest gradient element; and orthogonal to its weight with its
    norm kept.  Nearly parallel (weight, gradient) pairs (|cos| > 0.999) are ill-conditioned -- the
    projection amplifies fp32 rounding in any summation order -- and only checked for finiteness."""
    from fastopt.optim.orthograd import orthogonalize_gradients_

    small = interpreted(device, backend)
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16]), label="dtype")
    n = data.draw(st.integers(1, 3), label="tensors")
    pairs = []
    for i in range(n):
        shape = data.draw(shapes(small=small), label=f"shape {i}")
        seed = data.draw(st.integers(0, 2 ** 16), label=f"seed {i}")
        scale = data.draw(logu(1e-3, 1e3), label=f"gradient scale {i}")
        pairs.append((randn(shape, seed, dtype), randn(shape, seed + 1, dtype, scale=scale,
                                                        zeros=data.draw(st.sampled_from([0.0, 0.3])))))

    def project(which):
        params = []
        for w, g in pairs:
            p = torch.nn.Parameter(w.clone().to(device))
            p.grad = g.clone().to(device)
            params.append(p)
        orthogonalize_gradients_(params, backend=which)
        return [p.grad.cpu() for p in params]

    ref, ker = project("torch"), project(backend)
    ulp = {torch.float32: 1e-5, torch.bfloat16: 2 ** -7}[dtype]
    for (w, g), r, k in zip(pairs, ref, ker):
        w64, g64, k64 = w.double().flatten(), g.double().flatten(), k.double().flatten()
        assert torch.isfinite(k64).all()
        if g64.numel() == 0:
            continue
        gmax = float(g64.abs().max())
        cos = float(w64 @ g64) / max(float(w64.norm() * g64.norm()), 1e-300)
        if abs(cos) > 0.999:
            event("nearly parallel")
            continue
        assert float((k64 - r.double().flatten()).abs().max()) <= 4 * ulp * gmax, (tuple(w.shape), cos)
        if float(k64.norm()) > 0:
            assert abs(float(w64 @ k64)) <= 1e-3 * float(w64.norm() * k64.norm()) + 4 * ulp * gmax
            assert float(k64.norm()) == pytest.approx(float(g64.norm()), rel=4 * ulp + 1e-5)



# -- nm_mask ----------------------------------------------------------------------------------------

@st.composite
def nm_cases(draw, small):
    m = draw(st.one_of(st.sampled_from([1, 2, 4, 8]), st.integers(1, MAX_KERNEL_M)), label="m")
    n = draw(st.integers(0, m), label="n")
    ndim = draw(st.integers(1, 3), label="ndim")
    dim = draw(st.integers(-ndim, ndim - 1), label="dim")
    pad = draw(st.booleans(), label="pad")
    groups = draw(st.integers(0, 3 if small else 6), label="groups along dim")
    length = groups * m + (draw(st.integers(1, m - 1), label="partial group") if pad and m > 1 else 0)
    sides = st.sampled_from([1, 2, 3, 5, 7] if small else [0, 1, 2, 3, 5, 7, 31])
    shape = [draw(sides, label=f"side {i}") for i in range(ndim)]
    shape[dim % ndim] = length
    if not small and draw(one_in(10), label="big"):
        shape[(dim + 1) % ndim if ndim > 1 else 0] = CHUNK // max(1, length) + 3 if ndim > 1 else shape[0]
    values = draw(st.sampled_from(["randn", "ties", "specials", "zeros"]), label="values")
    dtype = draw(st.sampled_from(DTYPES), label="dtype")
    strided = draw(st.booleans(), label="non-contiguous") and ndim > 1
    seed = draw(st.integers(0, 2 ** 16), label="seed")
    return dict(n=n, m=m, dim=dim, pad=pad, shape=tuple(shape), values=values, dtype=dtype, strided=strided, seed=seed)


def nm_tensor(c):
    gen = torch.Generator().manual_seed(c["seed"])
    shape = c["shape"][::-1] if c["strided"] else c["shape"]
    if c["values"] == "randn":
        w = torch.randn(shape, generator=gen)
    elif c["values"] == "zeros":
        w = torch.zeros(shape)
    else:
        w = torch.randint(-3, 4, shape, generator=gen).float()
        if c["values"] == "specials":
            flat = w.view(-1)
            for every, value in ((7, float("nan")), (11, float("inf")), (13, -float("inf")), (5, -0.0)):
                start = int(torch.randint(0, every, (1,), generator=gen))
                flat[start::every] = value
    w = w.to(c["dtype"])
    return w.permute(*reversed(range(w.dim()))) if c["strided"] else w


@kernel_property(150)
def test_nm_mask_matches_reference(data, device, backend):
    c = data.draw(nm_cases(interpreted(device, backend)), label="case")
    w = nm_tensor(c).to(device)
    event(f"nm values={c['values']}")

    def run(backend_):
        try:
            return nm_mask(w, c["n"], c["m"], c["dim"], pad=c["pad"], backend=backend_)
        except Exception as e:  # noqa: BLE001
            return e

    ref, ker = run("torch"), run(backend)
    if same_outcome(ref, ker, allow_ref_error=False):
        return
    assert ker.dtype == torch.bool and ker.shape == w.shape
    assert torch.equal(ker.cpu(), ref.cpu()), f"{int((ker.cpu() != ref.cpu()).sum())} of {w.numel()} differ"


# -- Sinkhorn ---------------------------------------------------------------------------------------

@st.composite
def sinkhorn_cases(draw, small):
    batch = draw(st.sampled_from([None, 1, 2, 3]), label="batch")
    sizes = st.one_of(st.just(1), st.sampled_from([2, 3, 5, 7, 13] if small else [2, 3, 5, 7, 13, 31]),
                      st.integers(1, 16 if small else 64))
    n, m = draw(sizes, label="n"), draw(sizes, label="m")
    d = draw(st.sampled_from([1, 2, 3, 4, 5, 17, 0]), label="d")
    return dict(
        batch=batch, n=n, m=m, d=d,
        cost=draw(st.sampled_from(["sqeuclidean", "euclidean"]), label="cost"),
        dense=draw(st.booleans(), label="dense cost matrix"),
        rho=draw(st.one_of(st.none(), logu(0.1, 10.0)), label="rho"),
        eps=draw(st.one_of(logu(0.05, 10.0), logu(0.05, 1e8)), label="eps"),
        n_iter=draw(st.integers(1, 12 if small else 60), label="n_iter"),
        weights=draw(st.booleans(), label="weights"),
        masks=draw(st.booleans(), label="masks") and batch is not None,
        eps_scaling=draw(st.one_of(st.none(), st.floats(0.3, 0.5 if small else 0.9)), label="eps_scaling"),
        init=draw(st.booleans(), label="init"),
        dtype=draw(st.sampled_from([torch.float32, torch.float32, torch.float16, torch.bfloat16]), label="dtype"),
        seed=draw(st.integers(0, 2 ** 16), label="seed"))


def sinkhorn_inputs(c, device):
    """fp64 inputs of case ``c`` (rounded through ``c["dtype"]`` so every precision sees the same points)."""
    gen = torch.Generator().manual_seed(c["seed"])
    B = c["batch"] or 1
    x = torch.randn(B, c["n"], c["d"], generator=gen, dtype=torch.float64)
    y = torch.randn(B, c["m"], c["d"], generator=gen, dtype=torch.float64) * 0.8 + 0.5
    x, y = x.to(c["dtype"]).double(), y.to(c["dtype"]).double()
    kw = {}
    x_mask = torch.ones(B, c["n"], dtype=torch.bool)
    y_mask = torch.ones(B, c["m"], dtype=torch.bool)
    if c["masks"]:
        x_mask, y_mask = torch.rand(B, c["n"], generator=gen) < 0.8, torch.rand(B, c["m"], generator=gen) < 0.8
        x_mask[:, 0] = y_mask[:, 0] = True
        kw["x_mask"], kw["y_mask"] = x_mask, y_mask
    if c["weights"]:  # (normalized over the valid points: balanced OT needs equal masses)
        a = (torch.rand(B, c["n"], generator=gen, dtype=torch.float64) + 0.2) * x_mask
        b = (torch.rand(B, c["m"], generator=gen, dtype=torch.float64) + 0.2) * y_mask
        kw["a"], kw["b"] = a / a.sum(1, keepdim=True), b / b.sum(1, keepdim=True) * (1.3 if c["rho"] else 1.0)
    if c["init"]:
        kw["init"] = (torch.randn(B, c["n"], generator=gen, dtype=torch.float64) * 0.1,
                      torch.randn(B, c["m"], generator=gen, dtype=torch.float64) * 0.1)
    if c["batch"] is None:
        x, y = x[0], y[0]
        kw = {k: (tuple(t[0] for t in v) if k == "init" else v[0]) for k, v in kw.items()}
    kw = {k: (tuple(t.to(device) for t in v) if k == "init" else v.to(device)) for k, v in kw.items()}
    return x.to(device), y.to(device), kw


def cost_of(c, x, y):
    from fastopt.reference.ot import cost_matrix

    C = cost_matrix(x if x.dim() == 3 else x[None], y if y.dim() == 3 else y[None], c["cost"])
    return C if x.dim() == 3 else C[0]


def solve(c, x, y, kw, dtype, backend):
    def cast(t):
        return t if t.dtype == torch.bool else t.to(dtype if dtype == torch.float64 else torch.float32)
    common = dict(eps=c["eps"], rho=c["rho"], n_iter=c["n_iter"], tol=0.0, eps_scaling=c["eps_scaling"],
                  backend=backend)
    kw = {k: (tuple(cast(t) for t in v) if k == "init" else cast(v)) for k, v in kw.items()}
    try:
        if c["dense"]:
            kw = {k: v for k, v in kw.items() if k not in ("x_mask", "y_mask")}
            return sinkhorn(cost_matrix=cast(cost_of(c, x, y)), **kw, **common)
        return sinkhorn(x.to(dtype), y.to(dtype), cost=c["cost"], **kw, **common)
    except Exception as e:  # noqa: BLE001
        return e


@kernel_property(80)
def test_sinkhorn_matches_reference(data, device, backend):
    """Each backend's error against the fp64 reference is at most twice a same-precision torch run's
    plus 1e-5 relative (tests/test_ot_sinkhorn.py).  fp64 runs only on the torch backend (documented)."""
    skip_interpreted(device, backend, "test_sinkhorn_matches_reference_interpreted")
    if backend not in fastopt._backend.CAPABILITIES["ot"].kernels:
        pytest.skip(f"no OT kernel on backend {backend!r}")
    check_sinkhorn(data, device, backend)


@kernel_property(12, INTERPRETED_DEVICE_BACKENDS)
def test_sinkhorn_matches_reference_interpreted(data, device, backend):
    check_sinkhorn(data, device, backend)


def check_sinkhorn(data, device, backend):
    small = interpreted(device, backend)
    c = data.draw(sinkhorn_cases(small), label="case")
    event(f"sinkhorn dtype={c['dtype']} d={c['d']}")
    x, y, kw = sinkhorn_inputs(c, device)
    dtype = c["dtype"]
    ref64 = solve(c, x, y, kw, torch.float64, "torch")
    same = solve(c, x, y, kw, dtype, "torch")
    got = solve(c, x, y, kw, dtype, backend)
    if same_outcome(ref64, got, allow_ref_error=c["d"] == 0) or same_outcome(same, got, allow_ref_error=False):
        return
    assert got.n_iter == same.n_iter == ref64.n_iter == c["n_iter"]
    # A kernel may compute the cost another way (|x|^2 + |y|^2 - 2 x.y, FMAs): allow a few fp32 ulps of
    # the largest cost on top of the example-based tests' bound (it matters for d = 17).
    cost_ulps = 8 * 2.0 ** -24 * float(cost_of(c, x, y).max()) if x.numel() and y.numel() else 0.0
    for name in ("f", "g", "value"):
        r, t, k = (getattr(res, name).double().cpu() for res in (ref64, same, got))
        assert k.shape == r.shape, name
        err_t, err_k = float((t - r).abs().max()), float((k - r).abs().max())
        bound = 2 * err_t + 1e-5 * (1 + float(r.abs().max())) + cost_ulps
        assert err_k <= bound, f"{name}: kernel error {err_k} > {bound} (torch error {err_t})"
