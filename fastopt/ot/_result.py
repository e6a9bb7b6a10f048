"""The result convention of the OT solvers (see :mod:`fastopt.ot`): every solver returns an
:class:`OTResult` with ``value``, ``n_iter``, ``error``, ``converged`` and ``log``."""
from typing import Any, Dict

import torch


class OTResult:
    """What every OT solver returns (:func:`~fastopt.ot.sinkhorn`, :func:`~fastopt.ot.sinkhorn_newton_sparse`,
    :func:`~fastopt.ot.sparsity_constrained_ot`), beside its own fields:

    * ``value``: the objective at the returned solution, per batch entry (a tensor of the batch shape);
    * ``n_iter``: the iterations run (an int);
    * ``error``: the final error per batch entry, the quantity the solver's ``tol`` bounds;
    * ``converged``: whether every batch entry reached ``tol`` (a bool);
    * ``log``: a dict of diagnostics, always present, holding at least ``"value"``, ``"n_iter"`` and
      ``"err"`` (the attributes above) and the keys each solver documents.
    """

    __slots__ = ()


class _LoggedResult(OTResult):
    """:class:`OTResult`'s attributes read from the ``log`` dict of a NamedTuple result."""

    __slots__ = ()
    log: Dict[str, Any]

    @property
    def value(self) -> torch.Tensor:
        return self.log["value"]

    @property
    def n_iter(self) -> int:
        return self.log["n_iter"]

    @property
    def error(self) -> torch.Tensor:
        return self.log["err"]

    @property
    def converged(self) -> bool:
        return bool(self.log["converged"].all())
