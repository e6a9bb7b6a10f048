"""Optimal transport: online batched log-domain Sinkhorn (:mod:`.sinkhorn`), Sinkhorn–Newton–Sparse
(:mod:`.newton`), sparsity-constrained OT (:mod:`.sparse_ot`) and the sliced Wasserstein family
(:mod:`.sliced`).

Results.  The solvers (:func:`sinkhorn`, :func:`sinkhorn_newton_sparse`, :func:`sparsity_constrained_ot`)
return an :class:`OTResult`: whatever else each result holds, ``res.value`` is the objective per batch
entry, ``res.n_iter`` the iterations run, ``res.error`` the final error per batch entry (what ``tol``
bounds), ``res.converged`` whether every batch entry reached ``tol``, and ``res.log`` a dict of
diagnostics (always present; at least ``"value"``, ``"n_iter"`` and ``"err"``, plus the keys each
solver documents).  Their own fields stay as they are: :class:`SinkhornResult` is a dataclass
(``f``, ``g``, ``eps``; ``plan()`` materializes the plan, which the online solver never stores);
:class:`SNSResult` ``(f, g, plan, log)`` and :class:`SparseOTResult` ``(plan, alpha, beta, log)`` are
NamedTuples (unpacking and indexing work), whose ``plan`` is a tensor when ``return_plan``.  The dual
potentials are ``f``, ``g`` for the entropic solvers and ``alpha``, ``beta`` for sparse OT (the
paper's names: a different regularizer, the same role).  The sliced distances are estimators, not
solvers: they return tensors (the distance, with the directions as a tuple when asked), like a loss.

Errors.  Every function checks its arguments before any work, with one rule and one message per kind
of argument (:mod:`._checks`): a message starts with the function's name; a wrong type raises a
``TypeError`` that is also a ``ValueError``; bad values a ``ValueError``; a backend that cannot run
the problem a :class:`~fastopt.BackendUnavailableError`.
"""
from ._result import OTResult  # noqa: F401
from .sinkhorn import COSTS, SinkhornResult, sinkhorn, sinkhorn_divergence  # noqa: F401
from .sliced import (CONTROL_VARIATES, max_sliced_wasserstein, random_projections, sample_vmf,  # noqa: F401
                     sliced_wasserstein, vmf_distributional_sliced_wasserstein, wasserstein_1d)
from .newton import SNSResult, sinkhorn_newton_sparse  # noqa: F401
from .sparse_ot import SparseOTResult, sparsity_constrained_ot  # noqa: F401
from .lightsb import LightSB  # noqa: F401
from .monge_gap import monge_gap  # noqa: F401
from .partial import PartialOTResult, ProgressivePartialOTResult, partial_wasserstein, progressive_partial_ot  # noqa: F401
