"""Sparsity-constrained optimal transport: at most ``k`` nonzeros in every column of the plan.

Liu, Puigcerver, Blondel, "Sparsity-Constrained Optimal Transport", ICLR 2023 (arXiv:2209.15466),
building on Blondel, Seguy, Rolet, "Smooth and Sparse Optimal Transport", AISTATS 2018.

**Problem** (column ``j`` is a target, e.g. an expert in a mixture of experts, and ``k`` its capacity):

    min_{T in U(a, b)}  <T, C> + sum_j Omega(t_j),      Omega(t) = (reg / 2) |t|_2^2 + delta(|t|_0 <= k),

over plans ``T >= 0`` with ``T 1 = a``, ``T^T 1 = b`` and columns ``t_j``.  ``reg`` is the ``gamma`` of
POT's ``ot.smooth`` (``SquaredL2`` / ``SparsityConstrained``, the latter written by the paper's first
author: ``Omega(T) = 0.5 * gamma * |T|^2``), so ``sparsity_constrained_ot(C, a, b, k=k, reg=r)`` and
``ot.smooth.smooth_ot_semi_dual(a, b, C, r, reg_type="sparsity_constrained", max_nz=k)`` solve the same
problem (``k >= n``: POT's ``reg_type="l2"``); a regularizer written ``|t|^2 / (2 gamma')`` is
``reg = 1 / gamma'``.  Unregularized OT is the limit ``reg -> 0``; ``k >= n`` is quadratically
regularized OT; a plan exists only if ``k * m >= n``.

The primal is non-convex (the cardinality constraint).  The two problems below are concave, smooth
almost everywhere, and lower bounds: ``dual(alpha, beta) <= S(alpha) <= primal optimum`` for all
``alpha, beta`` (the first because ``delta_Omega(x + beta_j) >= b_j beta_j + b_j max_{Omega, j}(x)``,
restricting ``y`` to mass ``b_j``; the second is weak duality).  Also ``max S >= OT(a, b)`` (each
``max_{Omega, j}(x) <= max_i x_i``, the unregularized semi-dual's term) and, since ``max_{Omega, j}`` grows
with ``k``, ``max S <= OT(a, b) + (reg / 2) sum_j b_j^2`` (the value at ``k = 1``).

**Semi-dual** (``method="semi-dual"``, the default):

    max_alpha  S(alpha) = <alpha, a> - sum_j b_j max_{Omega, j}(alpha - c_j),
    max_{Omega, j}(x) = max_{y in simplex, |y|_0 <= k} <y, x> - (reg b_j / 2) |y|^2
                      = <y*, x> - (reg b_j / 2) |y*|^2,     y* = Proj_k(x / (reg b_j)),

where ``Proj_k`` is the projection onto the ``k``-sparse simplex, computed in closed form by keeping
the ``k`` largest entries and projecting them onto the simplex (sort, cumulative sum, threshold
``theta``: ``y_i = max(v_i - theta, 0)``).  ``grad S = a - T 1`` with the plan ``t_j = b_j y*_j``:
**every column has at most ``k`` nonzeros and sums exactly to ``b_j``** (the column marginal holds
exactly, up to rounding); the row marginal ``T 1 = a`` holds at a smooth maximum, approximately
otherwise (``log["err_a"]``).

**Dual** (``method="dual"``):

    max_{alpha, beta}  <alpha, a> + <beta, b> - sum_j delta_Omega(alpha + beta_j - c_j),
    delta_Omega(x) = max_{y >= 0, |y|_0 <= k} <y, x> - (reg / 2) |y|^2 = (1 / (2 reg)) sum_{i in top_k(x)} [x_i]_+^2,

with plan ``t_j = [top_k(alpha + beta_j - c_j)]_+ / reg`` (both marginals approximate) and gradient
``(a - T 1, b - T^T 1)``.

**Solver**: quasi-Newton ascent on the (semi-)dual from zero, with the gradient in closed form (no
autograd).  The objectives are concave and piecewise quadratic, with kinks where a top-k set changes
(smooth for ``k >= n``); the maximum of a binding constraint sits on a kink, where ``torch.optim.LBFGS``
(strong-Wolfe line search) stalls well below it.  We use BFGS with the weak Wolfe bisection line search
of Lewis & Overton ("Nonsmooth optimization via quasi-Newton methods", Math. Program. 2013), which works
well on such functions in practice: full inverse-Hessian BFGS when the problem has at most 2048 variables,
limited-memory (50 pairs) above (``history_size`` overrides).  POT solves the same objectives with
scipy's L-BFGS-B; on random problems this solver reaches a (semi-)dual value at least as high as POT's
(see the tests; L-BFGS with 50 pairs can end slightly lower on binding constraints).  Batched problems
are solved together, each batch entry with its own line search and memory.  Everything is dense torch
ops (topk, cumsum, gather/scatter, batched matmul), so it runs on any device.
"""
import math
from typing import NamedTuple, Optional, Union

import torch

from . import _checks
from ._result import _LoggedResult

__all__ = ["sparsity_constrained_ot", "sparse_simplex_projection", "SparseOTResult"]


class _SparseOTFields(NamedTuple):
    plan: Optional[torch.Tensor]
    alpha: torch.Tensor
    beta: Optional[torch.Tensor]
    log: dict


class SparseOTResult(_SparseOTFields, _LoggedResult):
    """``plan`` (..., n, m) (None unless ``return_plan``); ``alpha`` (..., n); ``beta`` (..., m) for the dual
    (None for the semi-dual); ``log``: see :func:`sparsity_constrained_ot`.  A NamedTuple ``(plan, alpha,
    beta, log)`` and an :class:`~fastopt.ot.OTResult`: ``value``, ``n_iter``, ``error``, ``converged`` read
    ``log["value"]``, ``log["n_iter"]``, ``log["err"]`` and ``log["converged"]`` (every batch entry)."""

    __slots__ = ()


def sparse_simplex_projection(V: torch.Tensor, k: int, dim: int = -1) -> torch.Tensor:
    """Euclidean projection of every slice of ``V`` along ``dim`` onto the ``k``-sparse simplex
    ``{y >= 0, sum y = 1, |y|_0 <= k}``: the ``k`` largest entries projected onto the simplex, the others 0
    (Kyrillidis et al., ICML 2013; the closed form used by Liu et al. 2023).  ``k >= size`` is the plain
    simplex projection."""
    k = _checks.integer(k, "k", "sparse_simplex_projection")
    V = V.movedim(dim, -1)
    y = _project_last(V, min(k, V.shape[-1]))
    return y.movedim(-1, dim)


def _project_last(V, k):
    vals, idx = V.topk(k, dim=-1)  # sorted, largest first
    css = vals.cumsum(-1) - 1
    ar = torch.arange(1, k + 1, dtype=V.dtype, device=V.device)
    support = (vals - css / ar > 0).sum(-1, keepdim=True).clamp_min(1)
    theta = css.gather(-1, support - 1) / support.to(V.dtype)
    return torch.zeros_like(V).scatter(-1, idx, (vals - theta).clamp_min(0))


# -- validation ---------------------------------------------------------------------------------
def _check_inputs(C, a, b, k, reg, max_iter, tol, method, history_size, fn):
    _checks.cost_matrix(C, "C", fn, dtypes=(torch.float32, torch.float64))
    if method not in ("semi-dual", "dual"):
        raise ValueError(f"{fn}: method must be 'semi-dual' or 'dual', got {method!r}")
    n, m = C.shape[-2:]
    k = _checks.integer(k, "k (nonzeros per column)", fn)
    if k * m < n:
        raise ValueError(f"{fn}: no plan has at most k={k} nonzeros in each of the m={m} columns and covers all "
                         f"n={n} rows (needs k * m >= n)")
    reg = _checks.real(reg, "reg", fn)
    tol = _checks.real(tol, "tol", fn)
    max_iter = _checks.integer(max_iter, "max_iter", fn)
    if history_size not in ("auto", "full"):
        if isinstance(history_size, str):
            raise ValueError(f"{fn}: history_size must be an integer >= 1 (or auto / full), got {history_size!r}")
        history_size = _checks.integer(history_size, "history_size (or auto / full)", fn)
    a, b = _checks.dense_marginals(C, a, b, fn, positive=True)
    return a, b, k, reg, tol, max_iter, history_size


# -- objectives (value to maximize, gradient, plan) ----------------------------------------------
def _semi_dual(alpha, C, a, b, k, reg):
    """``S(alpha)`` per batch entry, ``grad S = a - T 1`` and the plan ``T`` (columns ``b_j y*_j``)."""
    scale = reg * b[:, None, :]  # (B, 1, m)
    Y = _project_last(((alpha[:, :, None] - C) / scale).transpose(-1, -2), k).transpose(-1, -2)  # (B, n, m)
    X = alpha[:, :, None] - C
    inner = (Y * X).sum(-2) - 0.5 * scale[:, 0, :] * Y.square().sum(-2)  # max_Omega_j, (B, m)
    T = Y * b[:, None, :]
    value = (alpha * a).sum(-1) - (b * inner).sum(-1)
    return value, a - T.sum(-1), T


def _dual(alpha, beta, C, a, b, k, reg):
    """The dual value per batch entry, its gradient ``(a - T 1, b - T^T 1)`` and ``T``."""
    X = alpha[:, :, None] + beta[:, None, :] - C
    n = X.shape[-2]
    if k < n:
        vals, idx = X.topk(k, dim=-2)
        X = torch.zeros_like(X).scatter(-2, idx, vals.clamp_min(0))
    else:
        X = X.clamp_min(0)
    T = X / reg
    value = (alpha * a).sum(-1) + (beta * b).sum(-1) - X.square().sum((-1, -2)) / (2 * reg)
    return value, torch.cat([a - T.sum(-1), b - T.sum(-2)], dim=-1), T


def _two_loop(g, S, Y, R, gamma):
    """L-BFGS product ``H g`` per batch entry from the pairs ``S[i], Y[i]`` (B, n) with ``R[i] = 1 / y.s``
    (0 for an empty slot) and the initial scaling ``gamma`` (B,)."""
    q = g.clone()
    alphas = []
    for s, y, r in zip(reversed(S), reversed(Y), reversed(R)):
        al = r * (s * q).sum(-1)
        q -= al[:, None] * y
        alphas.append(al)
    q *= gamma[:, None]
    for s, y, r, al in zip(S, Y, R, reversed(alphas)):
        be = r * (y * q).sum(-1)
        q += (al - be)[:, None] * s
    return q


def _minimize_bfgs(fg, x, *, max_iter, tol, history_size, scale=0.0, c1=1e-4, c2=0.9, max_ls=60, patience=20):
    """Batched (L-)BFGS with a weak Wolfe bisection line search (Lewis & Overton, "Nonsmooth optimization
    via quasi-Newton methods", Math. Program. 2013), which keeps working on piecewise-smooth objectives
    where a strong-Wolfe search stalls at the first kink; near the optimum, where ``f`` changes only by
    rounding (``|f(x + t d) - f(x)| <= 0.01 sqrt(machine eps) (|f| + scale)``), sufficient decrease is
    tested on the slope instead (Hager & Zhang's approximate Wolfe condition).

    ``fg(x) -> (f (B,), g (B, n))``; every batch entry has its own line search and memory (the full
    inverse Hessian when ``history_size`` is None).  An entry stops when ``max|g| <= tol``, when no step
    satisfies the Wolfe conditions, or after ``patience`` steps in a row that lower ``f`` by rounding-level
    amounts only (at a kink of a nonsmooth optimum, or at the rounding floor).  Returns
    ``(x, f, g, iterations, evaluations)``."""
    B, n = x.shape
    f, g = fg(x)
    evals = 1
    full = history_size is None
    if full:
        H = torch.eye(n, dtype=x.dtype, device=x.device).expand(B, n, n).clone()
    S, Y, R = [], [], []
    gamma = 1.0 / g.abs().sum(-1).clamp_min(1e-300)  # first step: |d|_1 = 1
    first = torch.ones(B, dtype=torch.bool, device=x.device)
    active = g.abs().amax(-1) > tol
    stalled = torch.zeros(B, dtype=torch.int64, device=x.device)
    it = 0
    while it < max_iter and bool(active.any()):
        if full:
            d = -torch.where(first[:, None], gamma[:, None] * g, (H @ g[:, :, None])[:, :, 0])
        else:
            d = -_two_loop(g, S, Y, R, gamma)
        gd = (g * d).sum(-1)
        reset = active & ~(gd < 0)
        if bool(reset.any()):  # not a descent direction (rounding): steepest descent for those entries
            d = torch.where(reset[:, None], -gamma[:, None] * g, d)
            gd = (g * d).sum(-1)
        noise = 0.01 * math.sqrt(torch.finfo(x.dtype).eps) * (f.abs() + scale)
        t = torch.ones(B, dtype=x.dtype, device=x.device)
        lo, hi = torch.zeros_like(t), torch.full_like(t, math.inf)
        accepted = torch.zeros_like(active)
        x_new, f_new, g_new = x, f, g
        for _ in range(max_ls):
            xt = x + t[:, None] * d
            ft, gt = fg(xt)
            evals += 1
            dt = (gt * d).sum(-1)
            # sufficient decrease: Armijo, or where f changes by rounding only, the approximate Wolfe test
            # of Hager & Zhang (2005) on the slope, exact for quadratics
            armijo = (ft <= f + c1 * t * gd) | ((ft <= f + noise) & (dt <= (2 * 0.1 - 1) * gd))
            curvature = dt >= c2 * gd
            ok = active & ~accepted & armijo & curvature
            x_new = torch.where(ok[:, None], xt, x_new)
            f_new = torch.where(ok, ft, f_new)
            g_new = torch.where(ok[:, None], gt, g_new)
            accepted |= ok
            pending = active & ~accepted
            if not bool(pending.any()):
                break
            hi = torch.where(pending & ~armijo, t, hi)
            lo = torch.where(pending & armijo & ~curvature, t, lo)
            t = torch.where(pending, torch.where(torch.isinf(hi), 2 * lo, 0.5 * (lo + hi)), t)
        s, y = x_new - x, g_new - g
        sy = (s * y).sum(-1)
        use = accepted & (sy > 0)
        r = torch.where(use, 1.0 / torch.where(use, sy, 1.0), 0.0)
        gamma = torch.where(use, sy / (y * y).sum(-1).clamp_min(1e-300), gamma)
        if full:  # H <- (I - r s y^T) H (I - r y s^T) + r s s^T, H = gamma I before the first update
            H = torch.where((use & first)[:, None, None],
                            gamma[:, None, None] * torch.eye(n, dtype=x.dtype, device=x.device), H)
            Hy = (H @ y[:, :, None])[:, :, 0]
            yHy = (y * Hy).sum(-1)
            upd = (-r[:, None, None] * (s[:, :, None] * Hy[:, None, :] + Hy[:, :, None] * s[:, None, :])
                   + ((r * r * yHy + r)[:, None, None]) * s[:, :, None] * s[:, None, :])
            H = H + torch.where(use[:, None, None], upd, 0.0)
        else:
            S.append(torch.where(use[:, None], s, 0.0))
            Y.append(torch.where(use[:, None], y, 0.0))
            R.append(r)
            if len(S) > history_size:
                S.pop(0), Y.pop(0), R.pop(0)
        first = first & ~use
        progress = f - f_new > noise
        x, f, g = x_new, f_new, g_new
        stalled = torch.where(progress, 0, stalled + 1)
        active = accepted & (g.abs().amax(-1) > tol) & (stalled < patience)
        it += 1
    return x, f, g, it, evals


@torch.no_grad()
def sparsity_constrained_ot(C: torch.Tensor, a: Optional[torch.Tensor] = None, b: Optional[torch.Tensor] = None, *,
                            k: int, reg: float = 1.0, max_iter: int = 1000, tol: Optional[float] = None,
                            method: str = "semi-dual", return_plan: bool = True,
                            history_size: Union[str, int] = "auto") -> SparseOTResult:
    """Optimal transport with at most ``k`` nonzeros per column of the plan and squared-L2 regularization
    (Liu, Puigcerver, Blondel, ICLR 2023; equations in the module docstring), by quasi-Newton ascent on the
    semi-dual or the dual.  No autograd graph is recorded.

    Args:
        C: cost (..., n, m), float32 or float64, finite; leading dimensions are a batch.
        a, b: weights (..., n) / (..., m) (or (n,) / (m,)), finite and > 0, equal total masses (relative
            difference <= 1e-5; ``b`` is rescaled to ``a``'s mass); None means uniform.
        k: the most nonzeros in a column of the plan (an int >= 1 with ``k * m >= n``; ``k >= n``: no
            constraint, quadratically regularized OT).
        reg: the regularization ``gamma > 0`` of ``Omega(t) = (gamma / 2) |t|^2`` (POT's ``reg``).
        max_iter: quasi-Newton iterations at most.
        tol: a batch entry stops once every entry of the gradient (a marginal residual: ``a - T 1``, and
            ``b - T^T 1`` for the dual) is at most ``tol`` in absolute value (default 1e-9 in float64, 1e-6
            in float32), or when no step satisfies the weak Wolfe conditions or 20 steps in a row gain
            only rounding-level amounts (the optimum is on a kink: a binding constraint; or the rounding
            floor).
        method: "semi-dual" (default; columns sum exactly to ``b``) or "dual".
        return_plan: return the plan (else ``plan`` is None).
        history_size: "auto" (full BFGS up to 2048 variables, else 50 pairs), "full", or an int (L-BFGS
            with that many pairs; the full inverse Hessian costs ``O(n^2)`` memory per batch entry).

    Returns:
        :class:`SparseOTResult` ``(plan, alpha, beta, log)``; ``log``: ``value`` (the maximized
        (semi-)dual objective per batch entry, a lower bound on the constrained primal optimum),
        ``primal`` (``<T, C> + (reg / 2) |T|^2`` of the returned plan), ``err_a`` / ``err_b``
        (``|T 1 - a|_1``, ``|T^T 1 - b|_1``), ``max_nnz_per_column``, ``max_grad`` (the final largest
        marginal residual entry), ``err`` (the same per batch entry) with ``converged`` (per batch entry:
        ``err <= tol``) and ``tol``, ``n_iter`` and ``n_evals`` (iterations and objective evaluations).
        The result's ``value``, ``n_iter``, ``error`` and ``converged`` (every entry) read them
        (:class:`~fastopt.ot.OTResult`).

    Raises:
        ValueError: bad ``k``/``reg``/``tol``/``max_iter``/``method``, infeasible ``k * m < n``, non-finite
        cost, non-positive or non-finite weights, shape or device mismatch, unequal masses; before any work.
    """
    if tol is None and isinstance(C, torch.Tensor):
        tol = 1e-9 if C.dtype == torch.float64 else 1e-6
    a, b, k, reg, tol, max_iter, history_size = _check_inputs(C, a, b, k, reg, max_iter, tol, method, history_size,
                                                               "sparsity_constrained_ot")
    n, m = C.shape[-2:]
    batch = C.shape[:-2]
    k = min(k, n)
    B = math.prod(batch)
    C2, a2, b2 = C.reshape(B, n, m), a.reshape(B, n), b.reshape(B, m)
    size = n if method == "semi-dual" else n + m
    z = torch.zeros(B, size, dtype=C.dtype, device=C.device)

    def evaluate(zz):
        if method == "semi-dual":
            return _semi_dual(zz, C2, a2, b2, k, reg)
        return _dual(zz[:, :n], zz[:, n:], C2, a2, b2, k, reg)

    def fg(zz):
        value, grad, _ = evaluate(zz)
        return -value, -grad  # maximize the (semi-)dual: minimize its negation

    n_iter = n_evals = 0
    if B > 0:
        if history_size == "auto":
            history_size = "full" if size <= 2048 else 50
        scale = C2.abs().amax((-1, -2)) + reg  # the size of the objective's terms, for the rounding test
        z, _, _, n_iter, n_evals = _minimize_bfgs(fg, z, max_iter=max_iter, tol=tol, scale=scale,
                                                  history_size=None if history_size == "full" else history_size)
    zz = z
    value, grad, T = evaluate(zz)
    primal = (T * C2).sum((-1, -2)) + 0.5 * reg * T.square().sum((-1, -2))
    err = grad.abs().amax(-1)  # what the stopping test bounds by tol
    log = {
        "value": value.reshape(batch), "primal": primal.reshape(batch),
        "err": err.reshape(batch), "converged": (err <= tol).reshape(batch), "tol": tol,
        "err_a": (T.sum(-1) - a2).abs().sum(-1).reshape(batch),
        "err_b": (T.sum(-2) - b2).abs().sum(-1).reshape(batch),
        "max_nnz_per_column": int((T > 0).sum(-2).amax()) if T.numel() else 0,
        "n_iter": n_iter, "n_evals": n_evals,
        "max_grad": float(grad.abs().amax()) if grad.numel() else 0.0,
        "method": method, "k": k, "reg": reg,
    }
    alpha = zz[:, :n].reshape(*batch, n).clone()
    beta = zz[:, n:].reshape(*batch, m).clone() if method == "dual" else None
    plan = T.reshape(*batch, n, m) if return_plan else None
    return SparseOTResult(plan, alpha, beta, log)
