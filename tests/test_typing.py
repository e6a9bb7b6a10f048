"""Type hints on the public API and the ``py.typed`` marker that makes them visible.

Every public callable of ``fastopt``, ``fastopt.optim``, ``fastopt.lowbit``, ``fastopt.sparse`` and
``fastopt.ot`` (the module's ``__all__``, else its names without a leading underscore), and the
functional form of the README (``fastopt.functional.adam``), annotates every parameter (``self``/``cls``
and ``*args``/``**kwargs`` excepted) and its return value; constructors must say ``-> None``.  For a
class: its constructor and the public methods of it and its public fastopt bases, except overrides of
torch's own ``torch.optim.Optimizer`` / ``nn.Module`` methods (``step``, ``zero_grad``, ``state_dict``,
...: their contract is torch's).  ALL-CAPS class attributes (``REFERENCE``: the reference function of
an optimizer) are constants, not API.  The hints must also resolve (``typing.get_type_hints``), so a
misspelled forward reference fails here, not in a user's type checker.
"""
import inspect
import os
import shutil
import subprocess
import sys
import textwrap
import typing

import pytest

import fastopt
import fastopt.lowbit
import fastopt.optim
import fastopt.optim.functional
import fastopt.ot
import fastopt.sparse

MODULES = [fastopt, fastopt.optim, fastopt.lowbit, fastopt.sparse, fastopt.ot]
# The functional module is mostly the optimizers' internals; its user-facing part is the README's.
EXTRA = {"fastopt.functional.adam": fastopt.functional.adam}


def _public_names(mod):
    names = getattr(mod, "__all__", None)
    if names is None:
        names = [n for n in vars(mod) if not n.startswith("_")]
    return [n for n in names if not inspect.ismodule(getattr(mod, n))]


def _overrides_torch(cls, name):
    """Whether ``name`` is defined by a base class of ``cls`` outside fastopt (torch's Optimizer, Module)."""
    return any(name in vars(base) for base in cls.__mro__[1:]
               if base is not object and not base.__module__.startswith("fastopt"))


def _targets():
    out, seen = {}, set()

    def add(qual, fn, skip_first):
        if id(fn) not in seen:
            seen.add(id(fn))
            out[qual] = (fn, skip_first)

    for mod in MODULES:
        for name in _public_names(mod):
            obj = getattr(mod, name)
            qual = f"{mod.__name__}.{name}"
            if inspect.isfunction(obj):
                add(qual, obj, False)
            elif inspect.isclass(obj) and obj.__module__.startswith("fastopt"):
                if issubclass(obj, tuple) and hasattr(obj, "_fields"):
                    continue  # NamedTuple results: fields are annotated by construction
                for cls in obj.__mro__:
                    if not cls.__module__.startswith("fastopt"):
                        break
                    if cls.__name__.startswith("_"):
                        continue  # a private base (zoo._ZooOptimizer): its callers are the public classes
                    for mname, member in vars(cls).items():
                        if mname != "__init__" and (mname.startswith("_") or mname.isupper()):
                            continue
                        if mname != "__init__" and _overrides_torch(obj, mname):
                            continue
                        if isinstance(member, property):
                            member, first = member.fget, True
                        elif isinstance(member, (classmethod, staticmethod)):
                            member, first = member.__func__, isinstance(member, classmethod)
                        else:
                            first = True
                        if inspect.isfunction(member):
                            add(f"{cls.__module__}.{cls.__qualname__}.{mname}", member, first)
    for qual, fn in EXTRA.items():
        add(qual, fn, False)
    return out


TARGETS = _targets()


def test_the_walk_finds_the_api():
    """The list the next test runs on holds what the issue names (so the test cannot pass on nothing)."""
    expected = ["fastopt.clip_grad_norm_", "fastopt.available_backends", "fastopt.build_info",
                "fastopt.optim.muon.Muon.__init__", "fastopt.optim.adam.AdamW.__init__",
                "fastopt.functional.adam", "fastopt.lowbit.quantize_blockwise", "fastopt.lowbit.dequantize_blockwise",
                "fastopt.lowbit.int8.Int8Linear.__init__", "fastopt.lowbit.int8.Int8Linear.from_linear",
                "fastopt.lowbit.int8.Int8Linear.load_float_weight", "fastopt.lowbit.int8_linear_",
                "fastopt.lowbit.quantize_int8", "fastopt.lowbit.dequantize_int8", "fastopt.lowbit.is_int8_weight",
                "fastopt.lowbit.codebook", "fastopt.lowbit.state_formats", "fastopt.sparse.nm_mask",
                "fastopt.sparse.transposable_mask", "fastopt.sparse.is_nm_sparse", "fastopt.sparse.compress_2to4",
                "fastopt.sparse.nm_param_groups", "fastopt.sparse.training.NMSparsity.beta",
                "fastopt.sparse.training.NMSparsity.from_state", "fastopt.ot.sinkhorn",
                "fastopt.ot.sinkhorn_divergence",
                "fastopt.ot.sinkhorn.SinkhornResult.plan", "fastopt.ot.sliced_wasserstein",
                "fastopt.ot.max_sliced_wasserstein", "fastopt.ot.vmf_distributional_sliced_wasserstein",
                "fastopt.ot.wasserstein_1d", "fastopt.ot.random_projections", "fastopt.ot.sample_vmf",
                "fastopt.ot.sinkhorn_newton_sparse", "fastopt.ot.sparsity_constrained_ot"]
    missing = [q for q in expected if q not in TARGETS]
    assert not missing, missing
    # the low-bit presets (AdamW8bit, Lion4bit, ...) are walked through their constructors
    assert sum(q.startswith("fastopt.lowbit.") and q.endswith(".__init__") for q in TARGETS) >= 1


@pytest.mark.parametrize("qual", sorted(TARGETS))
def test_public_callable_is_annotated(qual):
    fn, skip_first = TARGETS[qual]
    sig = inspect.signature(fn)
    params = list(sig.parameters.values())
    if skip_first:
        params = params[1:]
    missing = [p.name for p in params
               if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.annotation is inspect.Parameter.empty]
    assert not missing, f"{qual}: parameters without a type hint: {missing}"
    assert sig.return_annotation is not inspect.Signature.empty, f"{qual}: no return annotation"
    if fn.__name__ == "__init__":
        assert sig.return_annotation in (None, "None"), f"{qual}: a constructor returns None"
    hints = typing.get_type_hints(inspect.unwrap(fn))  # every hint resolves (forward references included)
    assert "return" in hints


@pytest.mark.parametrize("cls", [c for c in (getattr(fastopt, n) for n in _public_names(fastopt))
                                 if inspect.isclass(c) and issubclass(c, fastopt.optim.FusedOptimizer)]
                         + [fastopt.Muon, fastopt.lowbit.AdamW8bit, fastopt.lowbit.Lion4bit])
def test_constructor_signature_is_annotated(cls):
    """What IDEs and ``help()`` show: ``inspect.signature(cls)`` (the presets' own synthesized one too)."""
    missing = [p.name for p in inspect.signature(cls).parameters.values()
               if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.annotation is inspect.Parameter.empty]
    assert not missing, f"{cls.__name__}: {missing}"


def test_py_typed_ships():
    """PEP 561: the marker sits in the package and setup.py installs it."""
    pkg = os.path.dirname(fastopt.__file__)
    assert os.path.isfile(os.path.join(pkg, "py.typed"))
    setup_py = os.path.join(os.path.dirname(pkg), "setup.py")
    if os.path.isfile(setup_py):  # a source checkout (an installed wheel has no setup.py)
        with open(setup_py) as f:
            assert '"py.typed"' in f.read()


USER_SCRIPT = """
import torch
import fastopt

model = torch.nn.Linear(8, 4)
opt = fastopt.AdamW(model.parameters(), lr=1e-3)
x, y = torch.randn(16, 3), torch.randn(20, 3)
res = fastopt.ot.sinkhorn(x, y, eps=0.1)
reveal_type(opt)
reveal_type(res.value)
reveal_type(fastopt.lowbit.quantize_blockwise(torch.randn(256)))
fastopt.ot.sinkhorn(x, y, eps="big")
"""


def test_mypy_sees_the_hints_of_an_installed_copy(tmp_path):
    """A user's type checker reads the hints: mypy (pinned in requirements-dev.txt; skipped when absent)
    on a user script, with fastopt as an installed package (its files and ``py.typed`` copied into a
    directory on PYTHONPATH: an editable install's import hook is invisible to mypy).  Without
    ``py.typed`` mypy skips the package ("missing library stubs or py.typed marker") and every revealed
    type is ``Any``."""
    pytest.importorskip("mypy")
    site = tmp_path / "site"
    shutil.copytree(os.path.dirname(fastopt.__file__), site / "fastopt",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__", "*.pyc"))
    script = tmp_path / "user_script.py"
    script.write_text(textwrap.dedent(USER_SCRIPT))
    env = dict(os.environ, PYTHONPATH=str(site))
    proc = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental", "--cache-dir", str(tmp_path / "cache"),
                           "--no-error-summary", script.name], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert 'Revealed type is "fastopt.optim.adam.AdamW"' in out, out
    assert 'Revealed type is "torch._tensor.Tensor"' in out, out
    assert 'Revealed type is "tuple[torch._tensor.Tensor, torch._tensor.Tensor]"' in out, out
    assert 'Argument "eps" to "sinkhorn" has incompatible type "str"; expected "float"' in out, out
    assert "py.typed" not in out and "import-untyped" not in out and "import-not-found" not in out, out
