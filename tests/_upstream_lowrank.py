"""Test helper: import the upstream low-rank projection packages, or skip the calling test.

* ``galore_projector()`` -> galore-torch 1.0's ``GaLoreProjector`` class.
* ``q_galore_projector()`` -> q-galore-torch 1.0's ``GaLoreProjector`` class (``q_galore_torch.q_galore_projector``).
* ``ista_fft_projector()`` -> ista-daslab-optimizers 1.1.15's ``FFTLowRankProjector`` class.
* ``ista_dct()`` -> its ``ista_daslab_optimizers.utils.dct`` module (``dct3_matrix``, ``dct_type2_makhoul``).
* ``ista_dct_adamw()`` -> its ``ista_daslab_optimizers.fft_low_rank.dct_adamw`` module (``DCTAdamW``).

ista-daslab-optimizers is installed with ``--no-deps`` and its package ``__init__`` loads CUDA extensions,
so its pure-torch modules are imported through a stub package object whose ``__path__`` points at the
installed sources (the package ``__init__`` never runs). Each function calls ``pytest.importorskip``
(or ``pytest.skip``), so a test that uses one skips cleanly where the package is missing.
"""
import importlib
import importlib.util
import sys
import types

import pytest

_ISTA = "ista_daslab_optimizers"


def galore_projector():
    """galore-torch 1.0's ``GaLoreProjector`` (skips the test if galore-torch is not installed)."""
    mod = pytest.importorskip("galore_torch.galore_projector")
    return mod.GaLoreProjector


def q_galore_projector():
    """q-galore-torch 1.0's ``GaLoreProjector`` (skips the test if q-galore-torch is not installed)."""
    mod = pytest.importorskip("q_galore_torch.q_galore_projector")
    return mod.GaLoreProjector


def _ista_module(name):
    """Import ``ista_daslab_optimizers.<name>`` without running the package ``__init__`` (CUDA extensions)."""
    full = f"{_ISTA}.{name}"
    if full in sys.modules:
        return sys.modules[full]
    pkg = sys.modules.get(_ISTA)
    if pkg is None:
        spec = importlib.util.find_spec(_ISTA)
        if spec is None or not spec.submodule_search_locations:
            pytest.skip(f"{_ISTA} is not installed")
        pkg = types.ModuleType(_ISTA)
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules[_ISTA] = pkg
    try:
        return importlib.import_module(full)
    except ImportError as exc:  # a pure-torch module that still needs something missing here
        pytest.skip(f"cannot import {full}: {exc}")


def ista_dct():
    """ista-daslab-optimizers' ``utils.dct`` module (``dct3_matrix``, ``dct_type2_makhoul``)."""
    return _ista_module("utils.dct")


def ista_fft_projector():
    """ista-daslab-optimizers' ``FFTLowRankProjector`` class (``fft_low_rank.fft_projector``)."""
    return _ista_module("fft_low_rank.fft_projector").FFTLowRankProjector


def ista_dct_adamw():
    """ista-daslab-optimizers' ``fft_low_rank.dct_adamw`` module (``DCTAdamW``)."""
    return _ista_module("fft_low_rank.dct_adamw")
