"""The Monge gap (Uscidda & Cuturi, "The Monge Gap: A Regularizer to Learn All Transport Maps", ICML 2023).

    gap = fastopt.ot.monge_gap(x, T(x), eps=0.1)          # x (n, d) or (B, n, d); T(x) of the same shape
    gap.backward()                                         # d gap / d T(x) (and d x, d a): envelope gradients

For a source measure ``mu = sum_i a_i delta_{x_i}`` (a probability vector ``a``) and a map ``T``,

    M_eps(T) = sum_i a_i c(x_i, T(x_i)) - W_eps(mu, T#mu),
    W_eps(mu, nu) = min_P <P, C> - eps H(P),   H(P) = -sum_ij P_ij log P_ij,

over the couplings ``P`` of ``mu`` and ``T#mu = sum_i a_i delta_{T(x_i)}`` (the paper's Eq. (8);
ott-jax's ``monge_gap_from_samples``, whose ``W_eps`` is ``SinkhornOutput.ent_reg_cost``).

Value convention.  :func:`fastopt.ot.sinkhorn`'s value is the KL-regularized cost
``OT_eps = min <P, C> + eps KL(P | a (x) b) = <a, f> + <b, g>`` at convergence (ott-jax's
``reg_ot_cost`` / ``kl_reg_cost``).  Since ``KL(P | a (x) b) = -H(P) + H(a) + H(b)`` for a coupling of
``a`` and ``b``, ``W_eps = OT_eps - eps (H(a) + H(b))`` (ott-jax's ``ent_reg_cost``), and here ``b = a``:

    M_eps(T) = sum_i a_i c(x_i, T(x_i)) - OT_eps(x, T(x)) + 2 eps H(a)    (uniform a: H(a) = log n).

With this (the paper's and ott's) convention the gap is never negative: the coupling ``diag(a)``
(``x_i -> T(x_i)``) costs ``sum_i a_i c(x_i, T(x_i)) - eps H(a)``, so ``M_eps(T) >= eps H(a) >= 0``, and
it tends to 0 as ``eps -> 0`` exactly when ``T`` is c-optimal on the samples.  ``M_eps`` with the KL
value instead (``sum a c - OT_eps``) would be the same minus ``2 eps H(a)``, and can be negative.

The cost ``c`` is fastopt's (:data:`fastopt.ot.COSTS`): ``"sqeuclidean"`` ``|x - y|^2`` (ott's
``costs.SqEuclidean``, not half of it) or ``"euclidean"`` ``|x - y|`` (ott's ``costs.Euclidean``);
``eps`` is absolute (ott's ``epsilon`` with ``relative_epsilon=None`` and ``scale_cost=1.0``, the
defaults of ``monge_gap_from_samples``).  ott's Sinkhorn stops at ``threshold=1e-3`` on
``|P^T 1 - b|_1`` by default; here ``tol`` bounds ``|P^T 1 - b|_2`` (1e-6 by default).
"""
import math
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from .. import _backend
from . import _checks
from .sinkhorn import SinkhornResult, _check_scales, _prepare, sinkhorn

__all__ = ["monge_gap"]


def _entropy(a):
    """``-sum_i a_i log a_i`` per batch entry (0 log 0 = 0, with a finite gradient there)."""
    pos = a > 0
    return -torch.where(pos, a * torch.log(torch.where(pos, a, 1.0)), 0.0).sum(-1)


def _displacement(x, y, cost):
    """``c(x_i, y_i)`` per point (..., n), in x's dtype."""
    diff = x - y
    if cost == "sqeuclidean":
        return (diff * diff).sum(-1)
    return torch.linalg.vector_norm(diff, dim=-1)  # (gradient 0 where x_i = y_i)


def monge_gap(x: Tensor, Tx: Tensor, a: Optional[Tensor] = None, *, eps: float, cost: str = "sqeuclidean",
              n_iter: int = 1000, tol: float = 1e-6, check_every: int = 10, eps_scaling: Optional[float] = None,
              return_output: bool = False, backend: str = "auto") -> Union[Tensor, Tuple[Tensor, SinkhornResult]]:
    """The entropic Monge gap of the map ``x_i -> Tx_i`` on the source measure ``(x, a)``:
    ``sum_i a_i c(x_i, Tx_i) - W_eps((x, a), (Tx, a))`` with ``W_eps`` the entropy-regularized OT cost
    ``<P, C> - eps H(P)`` (ott-jax's ``ent_reg_cost``; see the module docstring for how it relates to
    :func:`~fastopt.ot.sinkhorn`'s value: ``W_eps = OT_eps - 2 eps H(a)``).  The gap is ``>= eps H(a)``.

    ``x``, ``Tx``: (n, d) or (B, n, d), the same shape, dtype and device (``Tx`` is the map's image of
    ``x``, point by point).  ``a``: weights (n,) or (B, n), non-negative with a positive total, normalized
    here to a probability vector (default: uniform; ``a`` / ``a.sum(-1)`` otherwise); ``T#mu`` carries
    the same weights.  ``eps``: the absolute entropic regularization (> 0); ``cost``: ``"sqeuclidean"``
    (``|x - y|^2``) or ``"euclidean"`` (``|x - y|``).  ``n_iter``, ``tol``, ``check_every``,
    ``eps_scaling`` and ``backend`` are :func:`~fastopt.ot.sinkhorn`'s (the online kernels: the n x n
    cost is never stored on the ``cpu`` / ``triton`` backends; float64 runs on ``torch``).

    Returns the gap per batch entry (a scalar for unbatched inputs; float32 for fp16/bf16 inputs),
    differentiable with respect to ``x``, ``Tx`` and ``a`` (the OT term by the envelope theorem, as
    :func:`~fastopt.ot.sinkhorn`: nothing is unrolled); with ``return_output=True`` the pair
    ``(gap, SinkhornResult)`` of the OT problem between ``(x, a)`` and ``(Tx, a)`` (ott's
    ``return_output``).  Every argument is checked before any work (``ValueError``; a wrong type is a
    ``TypeError`` that is also a ``ValueError``; messages start with ``monge_gap:``).
    """
    fn = "monge_gap"
    values = _checks.eager()
    eps = _checks.real(eps, "eps", fn)
    _checks.cost_name(cost, fn)
    n_iter = _checks.integer(n_iter, "n_iter", fn)
    check_every = _checks.integer(check_every, "check_every", fn)
    tol = _checks.real(tol, "tol", fn, low_ok=True, finite=False)
    if eps_scaling is not None:
        eps_scaling = _checks.real(eps_scaling, "eps_scaling", fn, high=1.0)
    if not isinstance(return_output, bool):
        raise _checks.ArgumentTypeError(f"{fn}: return_output must be a bool, got {return_output!r}")
    if backend not in _backend.BACKENDS:
        raise ValueError(f"{fn}: unknown backend {backend!r}; expected one of {_backend.BACKENDS}")
    _checks.points(x, "x", fn, any_batch=False, nonempty=True, values=values)
    _checks.points(Tx, "Tx", fn, any_batch=False, nonempty=True, values=values)
    if Tx.shape != x.shape:
        raise ValueError(f"{fn}: Tx must have the shape of x (the image of each point), got Tx {tuple(Tx.shape)} "
                         f"and x {tuple(x.shape)}")
    _checks.same_device(Tx, "Tx", x.device, "x", fn)
    if Tx.dtype != x.dtype:
        raise ValueError(f"{fn}: x and Tx must have the same dtype, got {x.dtype} and {Tx.dtype}")
    unbatched = x.dim() == 2
    B, n = (1, x.shape[0]) if unbatched else x.shape[:2]
    if a is not None:
        _checks.weights(a, "a", fn, n=n, batch=(B,), ref="x", ref_shape=x.shape, device=x.device, values=values)
    # the solver's own checks (backend, eps and costs within the working precision) under this name
    prob = _prepare(x, Tx, None, None, None, None, None, cost, backend, None, fn=fn)[0]
    _check_scales(prob, eps, fn)

    work = prob.work_dtype
    if a is None:
        w = None
        ent = torch.full((B,), math.log(n), dtype=torch.float64, device=x.device)
    else:
        w = a.to(work) if not (unbatched and a.dim() == 2) else a[0].to(work)  # ((1, n) weights for (n, d) points)
        w = w / w.sum(-1, keepdim=True)
        ent = _entropy(w.double())
        if unbatched or a.dim() == 1:
            ent = ent.expand(B)
    res = sinkhorn(x, Tx, w, w, eps=eps, cost=cost, n_iter=n_iter, tol=tol, check_every=check_every,
                   eps_scaling=eps_scaling, backend=prob.backend)
    disp = _displacement(x.to(work).double(), Tx.to(work).double(), cost)  # (B, n) or (n,)
    disp = disp.mean(-1) if w is None else (w.double() * disp).sum(-1)
    value = res.value.double()
    if unbatched:
        ent = ent[0]
    gap = (disp - value + 2.0 * eps * ent).to(work)
    return (gap, res) if return_output else gap
