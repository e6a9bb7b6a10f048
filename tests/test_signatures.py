"""Drop-in means the same signature: every constructor argument of the
pytorch_optimizer (4.1.0) classes fastopt replaces, with its default and position; the options upstream
reads from ``**kwargs`` (``use_gc``, ``adanorm``, ``cautious``, ...) accepted with their defaults;
options fastopt does not implement raise ValueError only away from their default; torch's error
messages; schedulers that need ``momentum``; real signatures and own docstrings of the public classes."""
import inspect
import re

import pytest
import torch

import fastopt
import fastopt.lowbit

po = pytest.importorskip("pytorch_optimizer")

ZOO_NAMES = ["Adan", "AdaBelief", "DiffGrad", "EXAdam", "Lion", "Lamb", "AdamP", "SGDP", "SGDSaI"]

# Upstream reads these group options with group.get(name) (default: absent = off); adanorm_r's None
# means 0.95 there.
KWARG_DEFAULTS = {"use_gc": False, "adanorm": False, "adanorm_r": 0.95, "cautious": False, "adam_debias": False}


def upstream_named(name):
    """[(name, default)] of the upstream constructor's named arguments, in order (no self, no **kwargs)."""
    sig = inspect.signature(getattr(po, name).__init__)
    return [(p.name, p.default) for p in sig.parameters.values()
            if p.name != "self" and p.kind is p.POSITIONAL_OR_KEYWORD]


def upstream_kwarg_options(name):
    """The options the upstream class reads from its group beyond its named arguments: every
    ``group.get('x')`` in its source, when the class keeps ``**kwargs`` in its defaults."""
    cls = getattr(po, name)
    src = inspect.getsource(cls)
    if "**kwargs,\n        }" not in src and "**kwargs}" not in src:
        return set()  # (SGDP, SGDSaI, EXAdam: **kwargs accepted and dropped)
    found = set(re.findall(r"group\.get\('(\w+)'", src))
    return found - {"foreach"} - {n for n, _ in upstream_named(name)}


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_named_arguments_match_upstream(name):
    """Same names, same order (positional calls bind alike), same defaults."""
    ours = [(p.name, p.default) for p in inspect.signature(getattr(fastopt, name).__init__).parameters.values()
            if p.name != "self" and p.kind is p.POSITIONAL_OR_KEYWORD]
    assert ours == upstream_named(name)


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_upstream_group_options_accepted_with_their_defaults(name):
    options = upstream_kwarg_options(name)
    if name in ("Lion", "AdamP"):
        assert {"use_gc", "cautious", "adanorm"} <= options  # the scan finds what it must
    params = inspect.signature(getattr(fastopt, name).__init__).parameters
    for opt in options:
        assert opt in params, f"{name} lacks upstream option {opt}"
        assert params[opt].default == KWARG_DEFAULTS[opt], (name, opt, params[opt].default)


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_every_upstream_default_passed_explicitly_constructs(name):
    """Passing every upstream argument with its default value (named and kwargs options) works, and
    steps (on the torch reference and the default backend)."""
    kwargs = {n: d for n, d in upstream_named(name) if n != "params"}
    kwargs.update({o: KWARG_DEFAULTS[o] for o in upstream_kwarg_options(name)})
    for backend in ("torch", "auto"):
        p = torch.nn.Parameter(torch.randn(4, 3))
        opt = getattr(fastopt, name)([p], **kwargs, backend=backend)
        before = p.detach().clone()
        p.grad = torch.randn(4, 3)
        opt.step()
        assert not torch.equal(p.detach(), before)


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_positional_call_binds_as_upstream(name):
    """The first few arguments passed positionally land where upstream puts them."""
    named = upstream_named(name)[1:]
    values = [d for _, d in named][:5]
    p = torch.nn.Parameter(torch.randn(3, 2))
    opt = getattr(fastopt, name)([p], *values)
    for (key, default), value in zip(named, values):
        got = opt.defaults[key]
        assert got == (tuple(value) if isinstance(value, tuple) else value), key


UNSUPPORTED = [
    ("Adan", dict(max_grad_norm=1.0), "max_grad_norm"),
    ("Adan", dict(adanorm=True), "adanorm"),
    ("AdaBelief", dict(adanorm=True), "adanorm"),
    ("DiffGrad", dict(adanorm=True), "adanorm"),
    ("Lion", dict(adanorm=True), "adanorm"),
    ("Lamb", dict(adanorm=True), "adanorm"),
    ("Lamb", dict(rectify=True), "rectify"),
    ("AdamP", dict(adanorm=True), "adanorm"),
]


@pytest.mark.parametrize("name,kwargs,match", UNSUPPORTED, ids=[f"{n}-{m}" for n, _, m in UNSUPPORTED])
def test_unsupported_options_raise_only_away_from_default(name, kwargs, match):
    cls = getattr(fastopt, name)
    p = torch.nn.Parameter(torch.randn(3, 2))
    with pytest.raises(ValueError, match=match):
        cls([p], **kwargs)
    # ... and in a param group added later, before anything is touched
    opt = cls([p])
    q = torch.nn.Parameter(torch.randn(2))
    opt.add_param_group(dict(params=[q], **kwargs))
    p.grad, q.grad = torch.randn(3, 2), torch.randn(2)
    before = p.detach().clone()
    with pytest.raises(ValueError, match=match):
        opt.step()
    assert torch.equal(p.detach(), before) and not opt.state[p]


def test_lamb_rectify_companions_accepted():
    """degenerated_to_sgd / n_sma_threshold only act with rectify (as upstream): any value is accepted."""
    p = torch.nn.Parameter(torch.randn(3, 2))
    opt = fastopt.Lamb([p], degenerated_to_sgd=True, n_sma_threshold=7)
    assert opt.defaults["n_sma_threshold"] == 7


@pytest.mark.parametrize("name,option", [("Lion", "use_gc"), ("Lion", "cautious"), ("Adan", "use_gc")])
def test_gc_cautious_with_lowbit_states_need_the_torch_backend(name, option):
    kernel = [b for b in ("cpu", "triton") if b in fastopt.available_backends(torch.device("cpu"))]
    if not kernel:
        pytest.skip("no kernel backend on this install")
    p = torch.nn.Parameter(torch.randn(64, 64))
    p.grad = torch.randn(64, 64)
    before = p.detach().clone()
    opt = getattr(fastopt.lowbit, name + "8bit")([p], backend=kernel[0], min_quant_size=0, **{option: True})
    with pytest.raises(ValueError, match="backend='torch'"):
        opt.step()
    assert torch.equal(p.detach(), before) and not opt.state[p]
    ref = getattr(fastopt.lowbit, name + "8bit")([p], backend="torch", min_quant_size=0, **{option: True})
    ref.step()
    assert not torch.equal(p.detach(), before)


# -- torch's error messages ---------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [torch.optim.Adam, fastopt.Adam, fastopt.AdamW, fastopt.lowbit.AdamW8bit, fastopt.Lion])
def test_multi_element_tensor_lr_message(cls):
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match=r"^Tensor lr must be 1-element$"):
        cls([p], lr=torch.tensor([1e-3, 2e-3]))


@pytest.mark.parametrize("cls", [torch.optim.Adam, fastopt.Adam, fastopt.AdamW, fastopt.lowbit.AdamW8bit])
@pytest.mark.parametrize("betas", [(torch.tensor(0.9), 0.999), (0.9, torch.tensor(0.999))])
def test_mixed_float_tensor_betas_raise_as_torch(cls, betas):
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match=r"^betas must be either both floats or both Tensors$"):
        cls([p], betas=betas)


def test_tensor_betas_both_tensors_accepted_as_torch():
    p = torch.nn.Parameter(torch.zeros(3))
    torch.optim.Adam([p], betas=(torch.tensor(0.9), torch.tensor(0.999)))
    fastopt.Adam([p], betas=(torch.tensor(0.9), torch.tensor(0.999)))


# -- Muon and schedulers ------------------------------------------------------------------------------
def test_muon_defaults_carry_lr_and_momentum_for_one_cycle():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    opt = fastopt.Muon(model.parameters(), lr=0.02, momentum=0.95, adamw_lr=3e-4)
    assert opt.defaults["lr"] == 0.02 and opt.defaults["momentum"] == 0.95
    # each group keeps its kind's lr: the AdamW group its adamw_lr (its "momentum" key, filled in by
    # torch's add_param_group from the defaults, is not read by the AdamW update)
    kinds = {g["use_muon"]: g for g in opt.param_groups}
    assert kinds[False]["lr"] == 3e-4
    assert kinds[True]["lr"] == 0.02 and kinds[True]["momentum"] == 0.95
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=20, cycle_momentum=True,
                                                base_momentum=0.85, max_momentum=0.95)
    seen = []
    for _ in range(4):
        model(torch.randn(4, 8)).square().sum().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        seen.append((kinds[True]["lr"], kinds[True]["momentum"]))
    lrs, moms = zip(*seen)
    assert all(b > a for a, b in zip(lrs, lrs[1:]))        # warming up
    assert all(b < a for a, b in zip(moms, moms[1:]))      # momentum cycles down while lr goes up
    assert 0.85 <= min(moms) and max(moms) <= 0.95


# -- real signatures, own docstrings, type hints --------------------------------------------------------
def _public_classes():
    out = []
    for mod in (fastopt, fastopt.lowbit):
        names = getattr(mod, "__all__", None) or [n for n in dir(mod) if not n.startswith("_")]
        out += [(f"{mod.__name__}.{n}", getattr(mod, n)) for n in names if inspect.isclass(getattr(mod, n))]
    return out


PUBLIC = _public_classes()


def test_public_class_list_is_not_empty():
    names = {n for n, _ in PUBLIC}
    assert {"fastopt.Lion", "fastopt.AdamP", "fastopt.lowbit.AdamW8bit", "fastopt.lowbit.Lion4bit"} <= names


@pytest.mark.parametrize("name,cls", PUBLIC, ids=[n for n, _ in PUBLIC])
def test_public_class_has_its_own_docstring(name, cls):
    doc = cls.__dict__.get("__doc__")
    assert isinstance(doc, str) and len(doc.strip()) > 40, f"{name} has no docstring of its own"


OPTIMIZERS = [(n, c) for n, c in PUBLIC if issubclass(c, torch.optim.Optimizer)]


@pytest.mark.parametrize("name,cls", OPTIMIZERS, ids=[n for n, _ in OPTIMIZERS])
def test_optimizer_docstring_says_update_args_and_differences(name, cls):
    doc = cls.__doc__
    assert "Args" in doc or "Arguments" in doc or "Args are" in doc, name
    assert "<-" in doc, f"{name}: no update equation"


LOWBIT = [(n, c) for n, c in PUBLIC if n.startswith("fastopt.lowbit.") and issubclass(c, torch.optim.Optimizer)]


@pytest.mark.parametrize("name,cls", LOWBIT, ids=[n for n, _ in LOWBIT])
def test_lowbit_classes_show_their_real_signature(name, cls):
    sig = inspect.signature(cls)
    kinds = {p.kind for p in sig.parameters.values()}
    assert inspect.Parameter.VAR_POSITIONAL not in kinds and inspect.Parameter.VAR_KEYWORD not in kinds
    assert "lr" in sig.parameters and "state_bits" in sig.parameters
    preset = re.search(r"(8bit|4bit|Fp8)$", name)
    if preset:
        assert sig.parameters["state_bits"].default == {"8bit": 8, "4bit": 4, "Fp8": "fp8"}[preset.group(1)]
        base = cls.__mro__[1]
        want = {k: p.default for k, p in inspect.signature(base).parameters.items() if k != "state_bits"}
        got = {k: p.default for k, p in sig.parameters.items() if k != "state_bits"}
        assert got == want
        p = torch.nn.Parameter(torch.randn(3))
        with pytest.raises(TypeError, match="bogus"):
            cls([p], bogus=1)


TYPED = [(n, c) for n, c in OPTIMIZERS if n != "fastopt.Muon"]


@pytest.mark.parametrize("name,cls", TYPED, ids=[n for n, _ in TYPED])
def test_public_optimizer_constructors_are_annotated(name, cls):
    sig = inspect.signature(cls)
    missing = [k for k, p in sig.parameters.items() if p.annotation is p.empty]
    assert not missing, f"{name}: {missing} not annotated"
