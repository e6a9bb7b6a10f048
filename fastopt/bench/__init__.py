"""Benchmarks: ``python -m fastopt.bench`` runs the report (see ``fastopt.bench.harness``).

Each op's suite lives in its own module here and registers itself on import; add a suite by writing
``fastopt/bench/<op>.py`` (see ``adamw.py``) and importing it below.
"""
from . import adamw  # noqa: F401  (registers the "adamw" suite)
from . import zoo  # noqa: F401  (registers the "zoo-<optimizer>" suites)
from . import muon  # noqa: F401  (registers the "newton_schulz" and "muon" suites)
from . import lowbit  # noqa: F401  (registers the "lowbit-adamw" suite)
from . import sparse  # noqa: F401  (registers the "nm-mask", "transposable-24" and "sparse-step" suites)
from . import ot  # noqa: F401  (registers the "sinkhorn" suite)
from . import ot_sliced  # noqa: F401  (registers the "sliced-wasserstein" suite)
from . import ot_newton  # noqa: F401  (registers the "sinkhorn-newton" suite)
from .harness import SUITES, Bar, Case, Suite, Unsupported, Workload, main, register  # noqa: F401
