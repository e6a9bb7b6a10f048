"""The benchmark report, ``python -m fastopt.bench``: the harness and one module per suite.

``harness`` holds what every suite shares (the Suite / Case / Workload / Bar records, the timers, the
bandwidth probe, the noise rule, the tables, the summary of bars, the JSON and PNG output, the command
line); each other module here builds one op's suites and registers them on import.  Add a suite by
writing ``fastopt/bench/<op>.py`` (see ``adamw.py``) and importing it below.

The repository's top-level ``bench/`` folder is separate: its ``test_bench_*.py`` files run the same
cases under pytest-benchmark (``pytest bench/ --benchmark-only``), built with these modules, and its
``results/`` holds the committed output of real report runs (see ``bench/README.md``).
"""
from . import adamw  # noqa: F401  (registers the "adamw" suite)
from . import zoo  # noqa: F401  (registers the "zoo-<optimizer>" suites)
from . import muon  # noqa: F401  (registers the "newton_schulz" and "muon" suites)
from . import lowbit  # noqa: F401  (registers the "lowbit-adamw" suite)
from . import sparse  # noqa: F401  (registers the "nm-mask", "transposable-24" and "sparse-step" suites)
from . import ot  # noqa: F401  (registers the "sinkhorn" suite)
from . import ot_divergence  # noqa: F401  (registers the "sinkhorn-divergence" suite)
from . import ot_sliced  # noqa: F401  (registers the "sliced-wasserstein" suite)
from . import ot_newton  # noqa: F401  (registers the "sinkhorn-newton" suite)
from . import ot_partial  # noqa: F401  (registers the "ot-partial" suite)
from . import fsdp  # noqa: F401  (registers the "fsdp" suite)
from . import lowrank  # noqa: F401  (registers the "lowrank" suite)
from . import sam  # noqa: F401  (registers the "sam" and "asam" suites)
from . import mfac  # noqa: F401  (registers the "mfac" suite)
from . import saf  # noqa: F401  (registers the "saf" suite)
from . import adahessian  # noqa: F401  (registers the "adahessian" and "adahessian-step" suites)
from . import classic  # noqa: F401  (registers the "classic-sgd", "classic-adagrad" and "classic-rmsprop" suites)
from . import lightsb  # noqa: F401  (registers the "lightsb" suite)
from . import ot_monge  # noqa: F401  (registers the "monge-gap" suite)
from . import sparse_select  # noqa: F401  (registers the "magnitude-select" suite)
from . import wtacrs  # noqa: F401  (registers the "wtacrs" suite)
from . import sparse_unstructured  # noqa: F401  (registers the "sparse-unstructured" suite)
from . import comm  # noqa: F401  (registers the "comm-hooks" suite)
from .harness import SUITES, Bar, Case, Suite, Unsupported, Workload, main, register  # noqa: F401
