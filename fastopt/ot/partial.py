"""Partial optimal transport: entropic partial Wasserstein (:func:`partial_wasserstein`) and the
progressive partial OT pseudo-label solver of P²OT / SP²OT (:func:`progressive_partial_ot`).

    res = fastopt.ot.partial_wasserstein(x, y, mass=0.6, eps=0.05)    # transport 60% of the mass
    res.value.backward()                                             # envelope gradients w.r.t. x, y
    res.transport_cost                                               # <P, C>: POT's "partial_w_dist"
    lab = fastopt.ot.progressive_partial_ot(log_p, rho=0.3, eps=0.1, gamma=1.0)   # pseudo-labels

:func:`partial_wasserstein` solves the problem of POT's ``ot.partial.entropic_partial_wasserstein(a,
b, M, reg, m)``: ``min <P, C> + eps sum P log P`` over ``P >= 0`` with ``P 1 <= a``, ``P^T 1 <= b``,
``sum P = m``, by the same iteration (Benamou et al. 2015, iterative Bregman projections with
Dykstra's corrections, as POT does it: ``K = exp(-C / eps)`` scaled to mass ``m``, then per
iteration the row projection ``K <- diag(min(a / K 1, 1)) K``, the column projection
``K <- K diag(min(b / K^T 1, 1))`` and the mass projection ``K <- K m / sum K``, each row and column
projection applied to the plan with its previous correction undone).  The plan stays of the form
``P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps)``, so every projection is a row or column soft-minimum
of fastopt's Sinkhorn kernels (no n x m matrix for points): in cost units the row projection is
``f <- min(f_pre, Phi(g) - eps log|b|)`` with ``Phi`` the weighted soft-minimum of
:mod:`.sinkhorn` and ``f_pre`` the potential with the last correction undone, and the total mass
comes from the column sums of the column pass.  The plans agree with POT's for the same number of
iterations (to rounding: fp64 on ``backend="torch"``, fp32 kernels otherwise).

:func:`progressive_partial_ot` is the scaling solver of the official P²OT code
(``SemiCurrSinkhornKnopp``, github.com/rhfeiyang/PPOT): cost ``-log p`` (N samples x K classes)
extended by a virtual class of cost 0 that takes the mass ``1 - rho`` not transported, row marginal
``1 / N``, class marginal ``rho / K`` held by a KL penalty of weight ``gamma`` (the power
``gamma / (gamma + eps)`` on the class scalings) and the virtual column held exactly.
"""
import math
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
from torch import Tensor

from .. import _backend
from . import _checks
from ._result import OTResult
from .sinkhorn import _check_scales, _prepare, _Problem

__all__ = ["partial_wasserstein", "PartialOTResult", "progressive_partial_ot", "ProgressivePartialOTResult"]

_NEG_INF = float("-inf")


def _softmin(prob, h64, eps, rows, w64=None):
    """``prob.softmin`` of an fp64 potential ``h64`` (over the columns' side when ``rows``): the kernels see
    ``h`` minus its weighted mean (of the size of the costs), the mean is added back in fp64
    (``softmin(h + c) = softmin(h) - c``).  ``w64``: other weights than the problem's for this pass."""
    if w64 is None:
        w64 = prob.b64 if rows else prob.a64
    valid = w64 > 0
    h64 = torch.where(valid, h64, 0.0)
    c = (w64 * h64).sum(1) / w64.sum(1)
    hc = torch.where(valid, h64 - c[:, None], 0.0).to(prob.work_dtype)
    if w64 is prob.b64 or w64 is prob.a64:
        return prob.softmin(hc, eps, rows).double() - c[:, None]
    name = "wb" if rows else "wa"
    kept = getattr(prob, name)
    setattr(prob, name, (w64 / w64.amax(1, keepdim=True)).to(prob.work_dtype))
    try:
        return prob.softmin(hc, eps, rows).double() - c[:, None]
    finally:
        setattr(prob, name, kept)


def _lse(t, dim):
    return torch.logsumexp(t, dim=dim)


class _PartialState:
    """``P_ij = a_i b_j exp((f_i + g_j + k - C_ij) / eps)``: f (B, n), g (B, m), k (B,) in fp64, with the
    Dykstra corrections ``qf`` (B, n), ``qg`` (B, m) (<= 0: the last projection's change) and the last
    column soft-minimum ``psi`` (B, m) (the column sums are ``b_j |a| exp((g_j + k - psi_j) / eps)``)."""

    def __init__(self, f, g, k, qf, qg, psi):
        self.f, self.g, self.k, self.qf, self.qg, self.psi = f, g, k, qf, qg, psi


def _log_col_sums(prob, st, eps):
    """log of the column sums (B, m) of the plan (-inf at zero weights)."""
    return prob.log_b + prob.log_mass_a[:, None] + (st.g + st.k[:, None] - st.psi) / eps


def _solve_partial(prob, eps, mass, n_iter, tol, check_every):
    va, vb = prob.valid_a, prob.valid_b
    log_mass = math.log(mass)
    f = torch.where(va, -eps * prob.log_a, 0.0)  # (P = exp(-C / eps) up to the mass scaling: POT's start)
    g = torch.where(vb, -eps * prob.log_b, 0.0)
    st = _PartialState(f, g, torch.zeros_like(prob.mass_a), torch.zeros_like(f), torch.zeros_like(g), None)
    st.psi = _softmin(prob, f, eps, rows=False)
    st.k = eps * (log_mass - _lse(_log_col_sums(prob, st, eps), 1))
    B = va.shape[0]
    err = torch.full((B,), math.inf, dtype=torch.float64, device=va.device)
    converged, it = False, 0
    while it < n_iter:
        f_old, g_old, k_old = st.f, st.g, st.k
        # rows: K <- diag(min(a / K 1, 1)) K on the plan with the last row correction undone
        phi = _softmin(prob, st.g, eps, rows=True)
        f_pre = st.f - st.qf
        f = torch.where(va, torch.minimum(f_pre, phi - (st.k + eps * prob.log_mass_b)[:, None]), 0.0)
        st.qf, st.f = torch.where(va, f - f_pre, 0.0), f
        # columns: K <- K diag(min(b / K^T 1, 1)), likewise
        st.psi = _softmin(prob, st.f, eps, rows=False)
        g_pre = st.g - st.qg
        g = torch.where(vb, torch.minimum(g_pre, st.psi - (st.k + eps * prob.log_mass_a)[:, None]), 0.0)
        st.qg, st.g = torch.where(vb, g - g_pre, 0.0), g
        # mass: K <- K m / sum K (its correction is a constant: it cancels)
        st.k = st.k + eps * (log_mass - _lse(_log_col_sums(prob, st, eps), 1))
        it += 1
        if it % check_every == 0 or it == n_iter:
            # the largest change of log P_ij bounded by the changes of f / eps, g / eps and k / eps
            df = torch.where(va, (st.f - f_old).abs(), 0.0).amax(1)
            dg = torch.where(vb, (st.g - g_old).abs(), 0.0).amax(1)
            err = (df + dg + (st.k - k_old).abs()) / eps
            if bool((err < tol).all()):
                converged = True
                break
    return st, it, err, converged


class _Value(torch.autograd.Function):
    """The regularized value, with its envelope gradients computed beforehand (``P dC``)."""

    @staticmethod
    def forward(ctx, x, y, C, v, gx, gy, gC):
        ctx.grads = (gx, gy, gC)
        ctx.dtypes = [t.dtype if t is not None else None for t in (x, y, C)]
        return v.clone()

    @staticmethod
    def backward(ctx, gv):
        out = []
        for need, g, dt in zip(ctx.needs_input_grad[:3], ctx.grads, ctx.dtypes):
            if not need or g is None:
                out.append(None)
            else:
                out.append((g * gv.to(g.dtype).reshape(-1, *([1] * (g.dim() - 1)))).to(dt))
        return (*out, None, None, None, None)


@dataclass
class PartialOTResult(OTResult):
    """What :func:`partial_wasserstein` returns (an :class:`~fastopt.ot.OTResult`).

    ``value``: the regularized objective ``<P, C> + eps sum P log P`` per batch entry (POT's objective,
    with ``Omega(P) = sum P log P``), differentiable with respect to the points and the cost matrix
    (envelope theorem: ``d value / d C = P``; the weights and the mass are constants).
    ``transport_cost``: ``<P, C>``, what POT's ``log["partial_w_dist"]`` reports (not differentiable).
    ``f`` (B, n), ``g`` (B, m): potentials with ``P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps)``
    (0 at zero weights).  ``mass``: the transported mass.  ``n_iter``: iterations run; ``error``: the
    last bound on the change of ``log P`` in one iteration (``max |df| + max |dg|`` over ``eps``);
    ``converged``: whether every entry reached ``tol``.  ``log``: ``{"value", "n_iter", "err", "eps",
    "transport_cost", "partial_w_dist"}``.
    """

    value: torch.Tensor
    transport_cost: torch.Tensor
    f: torch.Tensor
    g: torch.Tensor
    n_iter: int
    error: torch.Tensor
    converged: bool
    eps: float
    mass: float
    _problem: object = None

    @property
    def log(self) -> Dict[str, Any]:
        """The diagnostics: ``value``, ``n_iter``, ``err``, ``eps``, ``transport_cost`` (= POT's ``partial_w_dist``)."""
        return {"value": self.value, "n_iter": self.n_iter, "err": self.error, "eps": self.eps,
                "transport_cost": self.transport_cost, "partial_w_dist": self.transport_cost}

    def plan(self) -> torch.Tensor:
        """The plan ``P`` (B, n, m) (or (n, m)), materialized: for small problems."""
        pr = self._problem
        f, g = (self.f[None], self.g[None]) if pr.unbatched else (self.f, self.g)
        with torch.no_grad():
            P = _dense_plan(pr, f.double(), g.double(), self.eps, pr.work_dtype)
        return P[0] if pr.unbatched else P


def _dense_plan(prob, f, g, eps, dtype):
    """``P = exp(log a_i + f_i / eps + log b_j + g_j / eps - C_ij / eps)`` in ``dtype``, in place on one n x m
    buffer (the row and column terms formed in fp64)."""
    row = (prob.log_a + f / eps).to(dtype)
    col = (prob.log_b + g / eps).to(dtype)
    P = prob.dense_cost().to(dtype, copy=True).mul_(-1.0 / eps)
    return P.add_(row[:, :, None]).add_(col[:, None, :]).exp_()


def partial_wasserstein(x: Optional[Tensor] = None, y: Optional[Tensor] = None, a: Optional[Tensor] = None,
                        b: Optional[Tensor] = None, *, mass: float, eps: float, cost: str = "sqeuclidean",
                        cost_matrix: Optional[Tensor] = None, x_mask: Optional[Tensor] = None,
                        y_mask: Optional[Tensor] = None, n_iter: int = 1000, tol: float = 1e-6,
                        check_every: int = 10, backend: str = "auto") -> PartialOTResult:
    """Entropic partial optimal transport of ``mass`` between the point clouds ``x`` (n, d) / (B, n, d) and
    ``y`` (m, d) / (B, m, d) with weights ``a``, ``b`` (default uniform: total mass 1 each; the totals
    may differ), or on a dense ``cost_matrix`` (n, m) / (B, n, m).  Returns a :class:`PartialOTResult`.

    The problem and the iteration are POT's ``ot.partial.entropic_partial_wasserstein(a, b, M, eps,
    mass)`` (``M`` the cost: ``|x - y|^2`` or ``|x - y|``): the plan ``P`` minimizes
    ``<P, C> + eps sum P log P`` under ``P 1 <= a``, ``P^T 1 <= b`` and ``sum P = mass``, by POT's
    Bregman projections with Dykstra's corrections; ``n_iter`` iterations with ``tol=0`` give POT's
    plan for ``numItermax=n_iter``.  It stops when the change of ``log P`` in one iteration is below
    ``tol`` for every batch entry (checked every ``check_every`` iterations; POT checks
    ``|P - P_prev|_F``, which needs the plan).  On the ``cpu`` and ``triton`` backends every pass
    computes the costs tile by tile (O((n + m) d) memory for points); float64 runs the dense torch
    reference.  ``x_mask``/``y_mask``: ragged batches (padded points carry no mass).

    Every input is checked first: ``mass`` must be in ``(0, min(|a|, |b|)]`` for every batch entry
    (POT's feasibility rule), ``eps`` > 0 within the precision's reach, weights finite and non-negative.
    """
    fn = "partial_wasserstein"
    mass = _checks.real(mass, "mass", fn, tensor=True)
    eps = _checks.real(eps, "eps", fn)
    n_iter = _checks.integer(n_iter, "n_iter", fn)
    check_every = _checks.integer(check_every, "check_every", fn)
    tol = _checks.real(tol, "tol", fn, low_ok=True, finite=False)
    _backend.check_backend_name(backend)
    # (rho=1.0: the masses of a and b may differ, as in unbalanced OT; rho plays no other part here)
    prob, _, _, C = _prepare(x, y, a, b, cost_matrix, x_mask, y_mask, cost, backend, 1.0, fn=fn)
    _check_scales(prob, eps, fn)
    most = torch.minimum(prob.mass_a, prob.mass_b)
    if bool((mass > most * (1 + 1e-6)).any()):
        raise ValueError(f"{fn}: mass must be at most min(|a|, |b|) (the mass each side can give or take) in every "
                         f"batch entry, got mass={mass!r} and min(|a|, |b|) = {float(most.min()):.6g}")
    with torch.no_grad():
        st, it, err, converged = _solve_partial(prob, eps, mass, n_iter, tol, check_every)
        f, g = st.f + st.k[:, None], st.g  # the constant goes to f
        work = prob.work_dtype
        # row and column sums of the final plan, in fp64
        log_rows = prob.log_a + prob.log_mass_b[:, None] + (f - _softmin(prob, g, eps, rows=True)) / eps
        log_cols = _log_col_sums(prob, st, eps)
        R, S = log_rows.exp(), log_cols.exp()
        ent_a = torch.where(prob.valid_a, eps * prob.log_a + f, 0.0)
        ent_b = torch.where(prob.valid_b, eps * prob.log_b + g, 0.0)
        value = (R * ent_a).sum(1) + (S * ent_b).sum(1)  # = <P, C> + eps sum P log P (see the README)
        gx = gy = gC = None
        if C is not None or prob.backend == "torch":
            P = _dense_plan(prob, f, g, eps, work)
            if C is not None and cost_matrix.requires_grad:
                gC = P
            tcost = torch.einsum("bij,bij->b", P, prob.dense_cost()).double()
        if C is None:
            need = x.requires_grad or y.requires_grad
            if prob.backend != "torch" or need:
                # P = exp(ha_i + hb_j - C_ij / eps); <P, C> by Euler's identity from the point gradients
                ha = (prob.log_a + f / eps).to(work)
                hb = (prob.log_b + g / eps).to(work)
                gx = prob.grad_points(hb, ha, eps, rows=True)
                gy = prob.grad_points(ha, hb, eps, rows=False)
                if prob.backend != "torch":
                    if prob.d == 0:
                        tcost = torch.zeros_like(value)
                    else:
                        xs, ys = prob.x[..., :prob.d].double(), prob.y[..., :prob.d].double()
                        ctr = torch.cat([xs, ys], 1).mean(1, keepdim=True)
                        p = 2.0 if cost == "sqeuclidean" else 1.0
                        tcost = (((xs - ctr) * gx.double()).sum((1, 2)) + ((ys - ctr) * gy.double()).sum((1, 2))) / p
    if C is not None:
        v = _Value.apply(None, None, cost_matrix if not prob.unbatched else cost_matrix[None], value.to(work),
                         None, None, gC)
    else:
        xb, yb = (x[None], y[None]) if prob.unbatched else (x, y)
        v = _Value.apply(xb, yb, None, value.to(work), gx, gy, None)
    converged = converged and bool(torch.isfinite(v.detach()).all())
    tcost = tcost.to(work)
    f, g = f.to(work), g.to(work)
    if prob.unbatched:
        v, tcost, f, g = v[0], tcost[0], f[0], g[0]
    return PartialOTResult(value=v, transport_cost=tcost, f=f, g=g, n_iter=it, error=err.to(work),
                           converged=converged, eps=eps, mass=mass, _problem=prob)


# -- progressive partial OT (P²OT / SP²OT pseudo-labels) -------------------------------------------------

@dataclass
class ProgressivePartialOTResult(OTResult):
    """What :func:`progressive_partial_ot` returns (an :class:`~fastopt.ot.OTResult`).

    ``plan``: the pseudo-labels (B, N, K) (or (N, K)), the official code's returned plan: ``N P`` over
    the K real classes (each row sums to the sample's transported share, at most 1: ``plan.sum(-1)`` is
    the sample weight, ``plan.argmax(-1)`` the hard label).  ``labels``: ``plan.argmax(-1)``.
    ``virtual``: the mass of each sample left on the virtual class (``N P`` of the extra column).
    ``b``: the class scalings (B, K + 1) (the multiplicative ``b`` of the official code: a warm start
    ``init=``).  ``value``: ``<P, C>`` over the real classes with ``P`` the unscaled plan (``plan / N``),
    not differentiable.  ``n_iter``, ``error`` (the official stop quantity ``|b - b_prev|_2``),
    ``converged``, ``log``: ``{"value", "n_iter", "err"}``.
    """

    plan: torch.Tensor
    labels: torch.Tensor
    virtual: torch.Tensor
    b: torch.Tensor
    value: torch.Tensor
    n_iter: int
    error: torch.Tensor
    converged: bool

    @property
    def log(self) -> Dict[str, Any]:
        return {"value": self.value, "n_iter": self.n_iter, "err": self.error}


def progressive_partial_ot(log_p: Tensor, rho: float, *, eps: float, gamma: float, n_iter: int = 1000,
                           tol: float = 1e-6, semi_relaxed: bool = True, init: Optional[Tensor] = None,
                           backend: str = "auto") -> ProgressivePartialOTResult:
    """Pseudo-labels of P²OT (Zhang et al., ICLR 2024) / SP²OT: the plan of the progressive partial OT
    problem between N samples and K classes, as the official solver computes it.

    ``log_p`` (N, K) or (B, N, K): the log class probabilities (``log_softmax`` of the logits; the cost
    is ``-log_p``); ``rho`` in [0, 1]: the total mass selected (the caller ramps it); ``eps`` > 0: the
    entropic regularization; ``gamma`` > 0: the weight of the KL penalty that holds the class marginal
    near uniform (``semi_relaxed=False``: the class marginal is exact, the official "pot" variant).

    The problem (the official code): the cost extended by a virtual class of cost 0, ``Q = exp(-C /
    eps)``, marginals ``1 / N`` per sample and ``rho / K`` per class, ``1 - rho`` for the virtual
    class; from ``b = 1 / (K + 1)`` (or ``init``) repeat ``a = (1 / N) / (Q b)``, ``b = Pb / (Q^T a)``
    and ``b_k <- b_k ** (gamma / (gamma + eps))`` for the K real classes (the virtual column stays
    exact) until ``|b - b_prev|_2 <= tol`` or ``n_iter`` iterations; the plan is ``N a_i Q_ij b_j``.
    Computed in the log domain (``eps log a``, ``eps log b`` with the soft-minimum passes of the
    Sinkhorn kernels: fp32 on ``cpu``/``triton``, float64 on ``torch``), so it does not underflow where
    ``Q`` would.
    """
    fn = "progressive_partial_ot"
    _checks.cost_matrix(log_p, "log_p", fn, any_batch=False)
    if bool((log_p.detach() > 1e-6).any()):
        raise ValueError(f"{fn}: log_p must hold log-probabilities (<= 0), got a maximum of "
                         f"{float(log_p.detach().max()):.3g}; pass log_softmax(logits)")
    rho = _checks.real(rho, "rho", fn, low_ok=True, high=1.0, high_ok=True, tensor=True)
    eps = _checks.real(eps, "eps", fn)
    gamma = _checks.real(gamma, "gamma", fn, finite=False)
    n_iter = _checks.integer(n_iter, "n_iter", fn)
    tol = _checks.real(tol, "tol", fn, low_ok=True, finite=False)
    if not isinstance(semi_relaxed, bool):
        raise _checks.ArgumentTypeError(f"{fn}: semi_relaxed must be a bool, got {semi_relaxed!r}")
    _backend.check_backend_name(backend)
    unbatched = log_p.dim() == 2
    lp = log_p.detach()[None] if unbatched else log_p.detach()
    B, N, K = lp.shape
    dtype, device = lp.dtype, lp.device
    b0 = None
    if init is not None:
        _checks.weights(init, "init", fn, n=K + 1, batch=(B,), ref="log_p", ref_shape=log_p.shape, device=device)
        b0 = init.detach().double().expand(B, K + 1)
        if bool((b0[:, :K] <= 0).any()):
            raise ValueError(f"{fn}: init must have positive class scalings (the first K entries)")
    why = "float64 inputs (the kernels take fp32/fp16/bf16; float64 runs on backend='torch')" \
        if dtype == torch.float64 else None
    chosen = _backend.resolve(backend, device, dtype, op="ot", reason=why, name=fn)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    C = torch.cat([-lp, lp.new_zeros(B, N, 1)], 2).contiguous()  # the virtual class costs 0
    # the class marginal Pb: rho / K per class, 1 - rho on the virtual class (0: no column)
    pb = torch.full((B, K + 1), rho / K, dtype=torch.float64, device=device)
    pb[:, K] = 1.0 - rho
    ones_n = torch.ones(B, N, dtype=torch.float64, device=device)
    w_cols = (pb > 0).double()  # the columns in play (a class of marginal 0 gets b = 0)
    prob = _Problem(None, None, C, (ones_n, ones_n.sum(1)), (w_cols, w_cols.sum(1)), "sqeuclidean", chosen, False,
                    work, 0)
    _check_scales(prob, eps, fn)
    with torch.no_grad():
        res = _ppot_solve(prob, pb, eps, gamma, n_iter, tol, semi_relaxed, b0, N, K)
    g, f, it, err, converged = res
    logq = (f[:, :, None] + g[:, None, :] - C.double()) / eps + math.log(N)
    full = torch.exp(torch.where(w_cols.bool()[:, None, :], logq, _NEG_INF))
    plan, virtual = full[..., :K], full[..., K]
    value = (plan * C[..., :K].double()).sum((1, 2)) / N
    b = torch.exp(torch.where(w_cols.bool(), g / eps, _NEG_INF))
    plan, virtual, b, value = plan.to(work), virtual.to(work), b.to(work), value.to(work)
    labels = plan.argmax(-1)
    if unbatched:
        plan, labels, virtual, b, value = plan[0], labels[0], virtual[0], b[0], value[0]
    return ProgressivePartialOTResult(plan=plan, labels=labels, virtual=virtual, b=b, value=value, n_iter=it,
                                      error=err.to(work), converged=converged)


def _ppot_solve(prob, pb, eps, gamma, n_iter, tol, semi, b0, N, K):
    """The official iteration in cost units: ``f = eps log a``, ``g = eps log b`` (B, K + 1) fp64."""
    B = pb.shape[0]
    cols = prob.valid_b
    log_pb = torch.where(cols, torch.log(torch.where(cols, pb, 1.0)), 0.0)
    power = gamma / (gamma + eps) if math.isfinite(gamma) else 1.0
    if b0 is None:  # b = 1 / (K + 1), the virtual column included
        b0 = torch.full((B, K + 1), 1.0 / (K + 1), dtype=torch.float64, device=pb.device)
    g = eps * torch.log(torch.where(b0 > 0, b0, 1.0))
    # the columns with b_j > 0 (those of the marginal; the first pass: those of the start b)
    w_first = (b0 > 0).double()
    err = torch.full((B,), math.inf, dtype=torch.float64, device=pb.device)
    converged, it = False, 0
    f = None
    while it < n_iter:
        g_prev = g
        w = w_first if it == 0 else prob.b64
        # a = (1 / N) / (Q b):  eps log a_i = -eps log N - eps LSE_j((g_j - C_ij) / eps)
        f = -eps * math.log(N) - eps * w.sum(1).log()[:, None] + _softmin(prob, g, eps, rows=True, w64=w)
        # b = Pb / (Q^T a)
        g = eps * log_pb - eps * math.log(N) + _softmin(prob, f, eps, rows=False)
        if semi:
            g = torch.cat([g[:, :K] * power, g[:, K:]], 1)
        g = torch.where(cols, g, 0.0)
        it += 1
        bn = torch.where(cols, torch.exp(g / eps), 0.0)
        bp = torch.where(w > 0, torch.exp(g_prev / eps), 0.0)
        err = torch.linalg.vector_norm(bn - bp, dim=1)
        if bool((err <= tol).all()):
            converged = True
            break
    return g, f, it, err, converged
