"""The package's rooms: the low-bit (``fastopt/lowbit``) and sparse (``fastopt/sparse``) modules sit below the
optimizers and never import ``fastopt.optim`` -- not at module level, not inside a function, not by a
relative path.  The optimizers compose them; the public low-bit presets (``fastopt.lowbit.AdamW8bit``, ...)
are defined in ``fastopt.optim`` and attached to ``fastopt.lowbit`` by the top-level package.

The check reads the source with ``ast`` (importing would not see a lazy import inside a function).
"""
import ast
import pathlib

import pytest

import fastopt

PACKAGE = pathlib.Path(fastopt.__file__).parent
LOWER_ROOMS = ("lowbit", "sparse")
FORBIDDEN = "fastopt.optim"


def _module_name(path):
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _package_of(path):
    """The package a module's relative imports start from."""
    name = _module_name(path)
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _imported(tree, package):
    """Every (line, dotted name) the module imports, relative imports resolved against ``package``;
    ``from X import y`` yields both ``X`` and ``X.y`` (``y`` may be a submodule)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                if node.level - 1 > len(base) - 1:
                    raise AssertionError(f"line {node.lineno}: a relative import above the fastopt package")
                base = base[:len(base) - (node.level - 1)]
                if node.module:
                    base += node.module.split(".")
                module = ".".join(base)
            else:
                module = node.module or ""
            yield node.lineno, module
            for alias in node.names:
                yield node.lineno, f"{module}.{alias.name}"
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")):
            yield node.lineno, node.args[0].value


def _is_forbidden(name):
    return name == FORBIDDEN or name.startswith(FORBIDDEN + ".")


def _violations(path, source=None):
    source = path.read_text() if source is None else source
    tree = ast.parse(source, filename=str(path))
    found = {}
    for line, name in _imported(tree, _package_of(path)):
        if _is_forbidden(name) and (line not in found or len(name) < len(found[line])):
            found[line] = name
    return [f"{path.relative_to(PACKAGE.parent)}:{line}: imports {name}" for line, name in sorted(found.items())]


MODULES = sorted(p for room in LOWER_ROOMS for p in (PACKAGE / room).rglob("*.py"))


def test_the_rooms_have_modules():
    assert {p.parent.name for p in MODULES} >= set(LOWER_ROOMS)
    assert len(MODULES) >= 4


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_lower_rooms_do_not_import_optim(path):
    bad = _violations(path)
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("source", [
    "from ..optim import functional",
    "from .. import optim",
    "from ..optim.base import ElementwiseOptimizer",
    "import fastopt.optim.base",
    "from fastopt import optim",
    "from fastopt.optim import lion",
    "def f():\n    from ..optim import zoo\n",
    "import importlib\nimportlib.import_module('fastopt.optim.muon')",
])
def test_the_check_sees_every_form(source):
    """The check itself: absolute, relative and function-local imports of fastopt.optim are all caught
    (from a module of fastopt/lowbit), and sibling imports are not."""
    path = PACKAGE / "lowbit" / "example.py"
    assert _violations(path, source)


@pytest.mark.parametrize("source", ["from . import codebook", "from .. import _backend, _ops",
                                    "from ..reference import adam_reference", "import fastopt.optimal"])
def test_the_check_allows_the_rest(source):
    assert not _violations(PACKAGE / "lowbit" / "example.py", source)


def test_relative_imports_resolve_at_depth():
    """A module two packages down reaches fastopt.optim with three dots."""
    path = PACKAGE / "sparse" / "sub" / "deep.py"
    assert _violations(path, "from ...optim import base")
    assert not _violations(path, "from ..optim import base")  # fastopt.sparse.optim: not the optimizers
