"""Sinkhorn–Newton–Sparse (SNS): entropic optimal transport by a Sinkhorn warm start and sparse Newton steps.

Tang, Shavlovsky, Rahmanian, Tardini, Thekumparampil, Xiao, Ying, "Accelerating Sinkhorn Algorithm with
Sparse Newton Iterations", ICLR 2024 (arXiv:2401.12253), Algorithm 1.

Conventions (those of :mod:`fastopt.reference.ot`): cost ``C`` (..., n, m), weights ``a`` (..., n) and
``b`` (..., m), ``eps > 0``; potentials ``f``, ``g`` in cost units and the plan

    P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps).

**The Lyapunov potential** (the paper's Section 3; its ``x, y, eta`` are our ``f, g, 1/eps`` up to the
shifts ``eps log a``, ``eps log b``, under which Newton's method is invariant) is the concave function

    L(f, g) = <a, f> + <b, g> - eps * sum_ij (P_ij - a_i b_j),

with gradient and Hessian

    grad L = (a - P 1,  b - P^T 1)                      (the marginal residuals)
    hess L = -(1/eps) M,   M = [[diag(P 1), P], [P^T, diag(P^T 1)]].

``L`` is invariant along ``(1, -1)`` (``f + t``, ``g - t``), the null direction of ``M``; at its maximum
the marginals hold and ``L = <a, f> + <b, g> = OT_eps(a, b)`` (unit mass).  Sinkhorn's row and column
updates are exact block-coordinate ascent on ``L``.

**Algorithm** (Algorithm 1 of the paper; choices the paper leaves open, and additions, are marked):

1. *Sinkhorn stage*: log-domain Sinkhorn (the iterations of :func:`fastopt.ot.sinkhorn`, g then f, on
   its float32 kernels where possible: see *Precision of the Sinkhorn stage* below) for at most
   ``sinkhorn_iters`` iterations, stopped early once the marginal error is at most ``sinkhorn_tol``
   (checked every ``check_every`` iterations; default ``0.1 * min(|a|_2, |b|_2)``, 10% of the marginals:
   the paper runs a fixed number N1).
2. *Newton stage*: repeat at most ``newton_iters`` times, until the marginal error is at most ``tol``:

   a. *Sparsify*: ``M_rho`` = ``M`` with its off-diagonal block ``P`` replaced by its largest entries ``S``
      (the paper's ``Sparsify(hess, rho)`` keeps the largest Hessian entries); the diagonals
      ``diag(P 1)``, ``diag(P^T 1)`` are kept exact.  The rule (:func:`sparsify_plan`): ``sparsity`` a float
      ``rho`` in (0, 1] keeps the ``K = ceil(rho * n * m)`` largest entries of ``P`` (per batch entry); an
      int ``k >= 1`` keeps the ``k`` largest entries of every row (``K = n * k``).  ``M_rho`` has
      ``n + m + 2K`` nonzeros.  Since ``v^T M_rho v = sum_kept P_ij (u_i + w_j)^2 +
      sum_dropped P_ij (u_i^2 + w_j^2) >= 0``, ``M_rho`` is positive semi-definite and its Newton direction
      is an ascent direction.  *Addition*: when a full Newton step (``t = 1``) fails to halve the marginal
      error of some batch entry, ``K`` (or ``k``) is multiplied by ``sparsity_growth`` (default 2, capped
      at all entries) for the next steps: a too-sparse Hessian (large ``eps``, spread plans) otherwise
      gives slow linear convergence; ``sparsity_growth=1`` keeps the paper's fixed ``rho``.
   b. *Newton direction* by conjugate gradients on ``M_rho d = eps * grad L`` (``cg_tol``: relative
      residual, ``cg_max_iter``).  The null direction ``(1, -1)`` of ``M`` is handled by solving the
      projected system ``Pi M_rho Pi d = Pi eps grad L`` on its orthogonal complement (``Pi`` the
      projector; ``d`` stays in the complement, which does not restrict ``L``).  *Addition*: the
      preconditioner ``Pi diag(P 1, P^T 1)^{-1} Pi`` (Jacobi; CG becomes invariant to the scale of the
      weights).  If the result is not an ascent direction (rounding), the preconditioned gradient is used.
   c. *Line search* (backtracking, Armijo): the largest ``t = ls_beta^j``, ``j <= ls_max_backtracks``, with
      ``L(z + t d) - L(z) >= ls_c1 * t * <grad L, d>``.  The increase is evaluated without cancellation as
      ``t (<a, d_f> + <b, d_g>) - eps * sum_ij P_ij expm1(t (d_f,i + d_g,j) / eps)`` (``exp(log P_ij + x)``
      where ``P_ij`` underflows), so the test stays meaningful down to marginal errors near rounding.
      Trial steps with ``t (max|d_f| + max|d_g|) / eps > 50`` are skipped (no plan entry can grow by more
      than ``e^50`` in one step).
   d. ``(f, g) += t d``.  *Addition*: a batch entry whose line search accepts no step (far from the
      optimum at very small ``eps``, where ``M`` is nearly singular along weakly coupled clusters and the
      Newton step is huge) gets ``check_every * 2^j`` Sinkhorn iterations instead (``j`` consecutive
      failures; counted in ``sinkhorn_iters``, ``log["fallbacks"]``), then Newton resumes.

The marginal error (stopping criterion, ``log["err"]``) is ``sqrt(|P 1 - a|^2 + |P^T 1 - b|^2)``, which
after a Sinkhorn iteration (rows exact) equals :func:`fastopt.reference.ot.marginal_error` (and POT's
``sinkhorn_log`` criterion ``|P^T 1 - b|_2``).

**Precision of the Sinkhorn stage.**  Stage 1 only has to reach about 10% marginal error, and Newton's
quadratic convergence then does the rest in the problem's dtype, so a float64 problem hands the kernels
(``backend="auto"``, ``"cpu"``, ``"triton"``) a float32 copy of its cost (or of its points) and its
weights as they are (the kernels' problem keeps them in float64, :mod:`fastopt.ot.sinkhorn`); the
float32 potentials that come back are widened to float64 and everything after them (the Newton stage,
the error, the value, the plan) is float64 on the float64 cost, which is never replaced.  The float32
potentials are exact to about ``2^-24 max|C|``, a relative error of ``2^-24 max|C| / eps`` in the plan,
so the kernels are used only where that is at most about 6e-3 (``max|C| / eps <= 1e5``), where
``sinkhorn_tol`` is at least ``1e-4 min(|a|_2, |b|_2)`` (float32 can reach it) and where float32 holds the
costs and ``1 / eps``; otherwise ``"auto"`` runs the float64 torch reference (a named kernel backend
raises).  The Sinkhorn *fallbacks* of the Newton stage (below) use the float32 kernels only while the
marginal error is above ``sinkhorn_tol`` (far from the optimum; near it float32 iterations would undo
float64 Newton steps) and the float64 reference otherwise.  ``backend="torch"`` is the PyTorch
reference throughout, in the problem's dtype; ``log["sinkhorn_backend"]`` says what ran stage 1.
Float32 problems run their Sinkhorn iterations on the kernels as :func:`fastopt.ot.sinkhorn` does.

**Online problems** (``x=``, ``y=``: points and a cost name instead of ``C``).  No n x m tensor is held:
the Sinkhorn iterations run on the kernels' online passes (the cost formed tile by tile) or, for the
torch reference, on the soft-minimum by blocks of rows (and of columns); every Newton-stage pass forms
the costs of a block of ``block_rows`` rows from the points (temporaries of ``block_rows x m`` entries;
when one block holds every row, its costs are formed once and kept) and reduces it: the row and column
sums of ``P`` (the state; for float32 points on a kernel backend, the kernels' soft-minimum passes
instead: ``P 1 = a |b| exp((f - Phi(g)) / eps)`` with ``Phi`` the soft-minimum over the columns with
weights ``b``, and ``P^T 1`` likewise), the per-row top-k (int ``sparsity``:
each block's rows) or the global top-K (float ``sparsity``: each block's K largest merged into the
running K largest), and each line-search trial's ``sum_ij P_ij expm1(...)``.  The sparse Hessian
``(rows, cols, vals)`` (``O(n + m + K)``) and the CG products on it are those of the dense problem, and
the entries are computed by the same operations, so results agree with the dense problem on
``C = cost_matrix(x, y)`` up to the rounding of the block sums.  The cost is one extra pass over the
costs per block (forming them costs ``O(d)`` per entry) instead of reading a stored ``log P``.

Cost: a Newton iteration makes a few dense passes (form ``log P`` and ``P``, row and column sums, a top-K
selection, one pass per line-search trial) plus CG products at ``O(n + m + K)`` each (gathers and
scatter-adds on the kept entries); a Sinkhorn iteration makes two dense log-sum-exp passes.  The paper
counts iterations (Sinkhorn + Newton), and so does ``log["iterations"]``; ``log["cg_iters_total"]`` gives
the CG products beside it.  Batched problems share the loops (each batch entry has its own step sizes
and stops improving once it has converged); ``K`` is common to the batch.
"""
import math
import numbers
from typing import NamedTuple, Optional, Tuple, Union

import torch

from .. import _backend
from ..reference.ot import cost_matrix as _cost_block
from ..reference.ot import softmin_reference
from . import _checks
from ._result import _LoggedResult
from .sinkhorn import _check_scales, _cost_scale, _iterate, _prepare

__all__ = ["sinkhorn_newton_sparse", "sparsify_plan", "lyapunov", "SNSResult"]


class _SNSFields(NamedTuple):
    f: torch.Tensor
    g: torch.Tensor
    plan: Optional[torch.Tensor]
    log: dict


class SNSResult(_SNSFields, _LoggedResult):
    """``f`` (..., n) and ``g`` (..., m): the potentials (0 where a weight is 0); ``plan`` (..., n, m) when
    ``return_plan`` (else None); ``log``: see :func:`sinkhorn_newton_sparse`.  A NamedTuple ``(f, g, plan,
    log)`` and an :class:`~fastopt.ot.OTResult`: ``value``, ``n_iter``, ``error``, ``converged`` read
    ``log["value"]``, ``log["n_iter"]`` (Sinkhorn and Newton iterations), ``log["err"]`` and
    ``log["converged"]`` (every batch entry)."""

    __slots__ = ()


# -- validation ---------------------------------------------------------------------------------
def _check_sparsity(sparsity, n, m, fn):
    """``("row", k)`` (the ``k`` largest entries of every row) or ``("top", K)`` (the ``K`` largest)."""
    if isinstance(sparsity, numbers.Integral) and not isinstance(sparsity, bool):
        return ("row", min(_checks.integer(sparsity, "sparsity (entries kept per row of P)", fn), m))
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):
        raise _checks.ArgumentTypeError(f"{fn}: sparsity must be a float in (0, 1] or an int >= 1, got {sparsity!r}")
    sparsity = _checks.real(sparsity, "sparsity (fraction of the entries of P kept)", fn, high=1.0, high_ok=True)
    return ("top", min(n * m, max(1, math.ceil(round(sparsity * n * m, 6)))))


# -- the pieces ---------------------------------------------------------------------------------
def _log_plan(C, log_a, log_b, f, g, eps):
    return log_a[..., :, None] + log_b[..., None, :] + (f[..., :, None] + g[..., None, :] - C) / eps


def lyapunov(C: torch.Tensor, a: torch.Tensor, b: torch.Tensor, f: torch.Tensor, g: torch.Tensor,
             eps: float) -> torch.Tensor:
    """The Lyapunov potential ``L(f, g) = <a, f> + <b, g> - eps * sum_ij (P_ij - a_i b_j)`` (concave; its
    maximum is ``OT_eps`` for unit mass), per batch entry.  Zero weights carry no mass."""
    log_a = torch.where(a > 0, a.log(), -math.inf)
    log_b = torch.where(b > 0, b.log(), -math.inf)
    P = _log_plan(C, log_a, log_b, f, g, eps).exp()
    fa = torch.where(a > 0, a * f, 0.0).sum(-1)
    gb = torch.where(b > 0, b * g, 0.0).sum(-1)
    return fa + gb - eps * (P.sum((-1, -2)) - a.sum(-1) * b.sum(-1))


def sparsify_plan(P: torch.Tensor,
                  sparsity: Union[float, int]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The entries of ``P`` (..., n, m) kept in the sparsified Hessian, as ``(rows, cols, values)``, each of
    shape (..., K):

    * ``sparsity`` a float ``rho`` in (0, 1]: the ``K = ceil(rho * n * m)`` largest entries of ``P`` (per
      batch entry; ties broken by ``torch.topk``);
    * ``sparsity`` an int ``k >= 1``: the ``k`` largest entries of every row (``K = n * min(k, m)``),
      listed row by row.
    """
    n, m = P.shape[-2:]
    return _sparsify(P, *_check_sparsity(sparsity, n, m, "sparsify_plan"))


def _sparsify(P, mode, count):
    n, m = P.shape[-2:]
    batch = P.shape[:-2]
    if mode == "top":
        vals, idx = P.reshape(*batch, n * m).topk(count, dim=-1, sorted=False)
        return torch.div(idx, m, rounding_mode="floor"), idx % m, vals
    vals, cols = P.topk(count, dim=-1, sorted=False)
    rows = torch.arange(n, device=P.device).view(n, 1).expand(*batch, n, count)
    return rows.reshape(*batch, n * count), cols.reshape(*batch, n * count), vals.reshape(*batch, n * count)


def _hessian_matvec(v, d, rows, cols, vals, n):
    """``M_rho v`` for ``v`` = (v_f, v_g) of shape (B, n + m); ``d`` = (P 1, P^T 1)."""
    vf, vg = v[:, :n], v[:, n:]
    out = d * v
    out[:, :n].scatter_add_(1, rows, vals * vg.gather(1, cols))
    out[:, n:].scatter_add_(1, cols, vals * vf.gather(1, rows))
    return out


def _project_null(v, null):
    """Remove the component of ``v`` (B, n + m) along the null direction ``null`` = (1, -1) on the
    entries with mass."""
    return v - ((v * null).sum(-1) / (null * null).sum(-1))[:, None] * null


def _pcg(matvec, rhs, dinv, null, tol, max_iter):
    """Preconditioned conjugate gradients for the projected system ``Pi M Pi x = Pi rhs`` on the complement
    of ``null`` (``Pi`` the orthogonal projector; ``x`` stays in the complement), with the symmetric
    preconditioner ``Pi diag(dinv) Pi``; batched, each entry stopped at relative projected residual
    ``tol``.  Returns ``(x, iterations)``."""
    x = torch.zeros_like(rhs)
    r = _project_null(rhs, null)
    z = _project_null(dinv * r, null)
    p = z.clone()
    rz = (r * z).sum(-1)
    target = tol * r.norm(dim=-1)
    it = 0
    while it < max_iter:
        done = r.norm(dim=-1) <= target
        if bool(done.all()):
            break
        Ap = matvec(p)
        pAp = (p * Ap).sum(-1)
        step = torch.where(~done & (pAp > 0), rz / torch.where(pAp > 0, pAp, 1.0), 0.0)
        x += step[:, None] * p
        r = _project_null(r - step[:, None] * Ap, null)
        z = _project_null(dinv * r, null)
        rz_new = (r * z).sum(-1)
        beta = torch.where(~done & (rz > 0), rz_new / torch.where(rz > 0, rz, 1.0), 0.0)
        p = z + beta[:, None] * p
        rz = torch.where(done, rz, rz_new)
        it += 1
    return x, it


class _Problem:
    """The flattened dense problem: ``C / eps`` (B, n, m), the weights and their logs, the null direction.
    Its state keeps ``log P`` and ``P`` (the ``stash`` that :meth:`sparsify` and :meth:`gain` read)."""

    def __init__(self, C, a, b, eps):
        self.C_eps = C / eps
        _weights(self, a, b, eps, C.dtype)

    def log_plan(self, f, g):
        return (f / self.eps + self.log_a)[:, :, None] + (g / self.eps + self.log_b)[:, None, :] - self.C_eps

    def state(self, f, g):
        """The stash ``(log P, P)``, the row and column sums of ``P``, the gradient (marginal residuals, 0
        where no mass) and the marginal error at ``(f, g)``."""
        logP = self.log_plan(f, g)
        P = logP.exp()
        d = torch.cat([P.sum(-1), P.sum(-2)], dim=-1)
        grad = torch.where(self.valid, torch.cat([self.a, self.b], dim=-1) - d, 0.0)
        return (logP, P), d, grad, grad.norm(dim=-1)

    def sparsify(self, stash, f, g, mode, count):
        return _sparsify(stash[1], mode, count)

    def gain(self, stash, f, g, delta, t):
        """``L(z + t delta) - L(z)`` per batch entry, ``t (<a, d_f> + <b, d_g>) - eps sum_ij P_ij
        expm1(t (d_f,i + d_g,j) / eps)``: no difference of two values of ``L``, so it stays accurate near the
        optimum; ``exp(log P_ij + x_ij)`` where ``P_ij`` underflows to 0."""
        logP, P = stash
        return t * self.linear(delta) - self.eps * _expm1_terms(logP, P, delta, t, self.eps, 0, self.n)

    def linear(self, delta):
        return (self.a * delta[:, :self.n]).sum(-1) + (self.b * delta[:, self.n:]).sum(-1)

    def plan(self, f, g):
        return self.log_plan(f, g).exp()


def _weights(prob, a, b, eps, dtype):
    prob.a, prob.b, prob.eps = a, b, eps
    prob.log_a = torch.where(a > 0, a.log(), -math.inf)
    prob.log_b = torch.where(b > 0, b.log(), -math.inf)
    prob.n = a.shape[-1]
    prob.valid = torch.cat([a > 0, b > 0], dim=-1)
    prob.null = torch.cat([(a > 0).to(dtype), -(b > 0).to(dtype)], dim=-1)


def _expm1_terms(logP, P, delta, t, eps, i0, n):
    """``sum_ij P_ij expm1(t (d_f,i + d_g,j) / eps)`` over the rows ``i0 .. i0 + rows`` of ``P`` (B, rows, m)."""
    x = (t / eps)[:, None, None] * (delta[:, i0:i0 + P.shape[1], None] + delta[:, None, n:])
    return torch.where(P > 0, P * torch.expm1(x), (logP + x).exp()).sum((-1, -2))


class _OnlineProblem:
    """The problem on points ``x`` (B, n, d), ``y`` (B, m, d): the same interface as :class:`_Problem`, but
    every pass over ``P`` goes by blocks of ``block`` rows, each forming its costs from the points
    (temporaries of ``block x m`` entries: ``P`` and ``C`` are never held whole).  The stash is None."""

    def __init__(self, x, y, cost, a, b, eps, block):
        self.x, self.y, self.cost, self.block = x, y, cost, block
        _weights(self, a, b, eps, x.dtype)
        # one block holds every row: its costs are kept (no more memory than a block's temporaries)
        self.C_eps = _cost_block(x, y, cost) / eps if block >= self.n else None

    def blocks(self, f, g):
        """``(i0, log P[:, i0:i0 + block])`` for every row block, as :meth:`_Problem.log_plan` (the same
        operations, entry by entry)."""
        fe = f / self.eps + self.log_a
        ge = (g / self.eps + self.log_b)[:, None, :]
        for i0 in range(0, self.n, self.block):
            C_eps = self.C_eps if self.C_eps is not None else \
                _cost_block(self.x[:, i0:i0 + self.block], self.y, self.cost) / self.eps
            yield i0, fe[:, i0:i0 + self.block, None] + ge - C_eps

    kernel = None  # a float32 problem of fastopt.ot.sinkhorn on a kernel backend: it gives the row/column sums

    def state(self, f, g):
        if self.kernel is not None:
            # P 1 = a |b| exp((f - Phi(g)) / eps) with Phi the kernels' weighted soft-minimum over the columns
            # (weights proportional to b), and P^T 1 likewise: two online passes
            k = self.kernel
            rows = torch.where(self.valid[:, :self.n], self.a * self.b.sum(-1, keepdim=True)
                               * torch.exp((f - k.softmin(g, self.eps, rows=True)) / self.eps), 0.0)
            cols = torch.where(self.valid[:, self.n:], self.b * self.a.sum(-1, keepdim=True)
                               * torch.exp((g - k.softmin(f, self.eps, rows=False)) / self.eps), 0.0)
        else:
            rows = torch.empty_like(self.a)
            cols = torch.zeros_like(self.b)
            for i0, logP in self.blocks(f, g):
                P = logP.exp()
                rows[:, i0:i0 + P.shape[1]] = P.sum(-1)
                cols += P.sum(-2)
        d = torch.cat([rows, cols], dim=-1)
        grad = torch.where(self.valid, torch.cat([self.a, self.b], dim=-1) - d, 0.0)
        return None, d, grad, grad.norm(dim=-1)

    def sparsify(self, stash, f, g, mode, count):
        """:func:`_sparsify` by row blocks: the ``k`` largest of each row, or the ``K`` largest overall
        (each block's ``K`` largest merged into the running ``K`` largest)."""
        m = self.y.shape[1]
        parts, best = [], None
        for i0, logP in self.blocks(f, g):
            P = logP.exp()
            if mode == "row":
                r, c, v = _sparsify(P, mode, count)
                parts.append((r + i0, c, v))
                continue
            vals, idx = P.reshape(P.shape[0], -1).topk(min(count, P.shape[1] * m), dim=-1, sorted=False)
            idx = idx + i0 * m
            if best is not None:
                vals, idx = torch.cat([best[0], vals], -1), torch.cat([best[1], idx], -1)
                if vals.shape[-1] > count:
                    vals, pick = vals.topk(count, dim=-1, sorted=False)
                    idx = idx.gather(-1, pick)
            best = (vals, idx)
        if mode == "row":
            return tuple(torch.cat(t, -1) for t in zip(*parts))
        vals, idx = best
        return torch.div(idx, m, rounding_mode="floor"), idx % m, vals

    def gain(self, stash, f, g, delta, t):
        terms = 0.0
        for i0, logP in self.blocks(f, g):
            terms = terms + _expm1_terms(logP, logP.exp(), delta, t, self.eps, i0, self.n)
        return t * self.linear(delta) - self.eps * terms

    linear = _Problem.linear

    def plan(self, f, g):
        return torch.cat([logP.exp() for _, logP in self.blocks(f, g)], dim=1)


def _line_search(prob, stash, f, g, delta, slope, active, c1, beta, max_backtracks, max_exponent=50.0):
    """Backtracking (Armijo) line search: the largest ``t = beta^k``, ``k <= max_backtracks``, with
    ``L(z + t delta) - L(z) >= c1 t <grad L, delta>``, starting from the largest ``t`` of that grid with
    ``t (max|d_f| + max|d_g|) / eps <= max_exponent`` (no plan entry grows by more than ``e^max_exponent``:
    steps beyond it are not tried).  Returns ``(t, ok)``, ``t = 0`` where no step was accepted."""
    n = prob.n
    reach = (delta[:, :n].abs().amax(-1) + delta[:, n:].abs().amax(-1)) / prob.eps
    k0 = torch.ceil(torch.log(max_exponent / reach.clamp_min(1e-300)) / math.log(beta)).clamp_min(0)
    t = torch.where(active & (k0 <= max_backtracks), beta ** k0.clamp_max(max_backtracks), 0.0).to(delta.dtype)
    ok = ~active
    tried = ~active | (t == 0)
    for _ in range(max_backtracks + 1):
        ok = ok | (~tried & (prob.gain(stash, f, g, delta, t) >= c1 * t * slope))
        stop = ok | (t < beta ** max_backtracks * (1 + 1e-6))
        if bool(stop.all()):
            break
        t = torch.where(stop, t, t * beta)
        tried = ~active | (t == 0)
    return torch.where(ok, t, 0.0), ok


def _newton_direction(prob, stash, f, g, d, grad, active, mode, count, cg_tol, cg_max_iter):
    """The sparse Newton direction ``M_rho^{-1} eps grad`` (projected CG) and the CG iterations; the
    preconditioned gradient where that is not an ascent direction."""
    rows, cols, vals = prob.sparsify(stash, f, g, mode, count)
    dinv = torch.where(d > 0, 1.0 / torch.where(d > 0, d, 1.0), 0.0)
    rhs = prob.eps * torch.where(active[:, None], grad, 0.0)
    delta, cg_it = _pcg(lambda v: _hessian_matvec(v, d, rows, cols, vals, prob.n), rhs, dinv, prob.null,
                        cg_tol, cg_max_iter)
    delta = _project_null(torch.where(prob.valid, delta, 0.0), prob.null)
    slope = (grad * delta).sum(-1)
    bad = active & ~(slope > 0)
    if bool(bad.any()):
        delta = torch.where(bad[:, None], _project_null(dinv * rhs, prob.null), delta)
        slope = (grad * delta).sum(-1)
    return delta, slope, cg_it, rows.shape[-1]


# -- the Sinkhorn iterations (stage 1 and the fallbacks) -------------------------------------------
# float64 problems run their Sinkhorn iterations on the float32 kernels when the costs against eps leave
# float32 potentials a relative accuracy of about 1e-2 in the plan (2^-24 max|C| / eps <= 6e-3) and the
# stage-1 target is within float32's reach; Newton then refines in float64.
_FP32_STAGE_RATIO = 1e5
_FP32_STAGE_TOL = 1e-4
# elements of one row-block temporary (block x m, times d while forming the costs) of the online passes
_BLOCK_ELEMENTS = 1 << 20


def _block_rows(B, rows, cols, d):
    return max(1, min(rows, _BLOCK_ELEMENTS // max(1, B * cols * max(1, d))))


def _blocked_softmin(prob, block_x, block_y):
    """``prob.softmin`` (:class:`fastopt.ot.sinkhorn._Problem`, the torch reference on points) by blocks of
    rows (and of columns: the costs are symmetric in x and y), forming each block's costs from the points."""
    def softmin(h, eps, rows):
        src, dst, w, block = (prob.x, prob.y, prob.wb, block_x) if rows else (prob.y, prob.x, prob.wa, block_y)
        out = torch.empty(h.shape[0], src.shape[1], dtype=prob.work_dtype, device=h.device)
        for i0 in range(0, src.shape[1], block):
            C = _cost_block(src[:, i0:i0 + block].to(prob.work_dtype), dst.to(prob.work_dtype), prob.cost)
            out[:, i0:i0 + block] = softmin_reference(C, w, h, eps)
        return out
    return softmin


class _Stage:
    """The Sinkhorn iterations of both stages: ``fast`` (float32 kernels where the problem allows it, see
    ``_FP32_STAGE_RATIO``) and ``exact`` (the working dtype; made on first use), problems of
    :mod:`fastopt.ot.sinkhorn` for :func:`_iterate`."""

    def __init__(self, C, x, y, cost, a, b, eps, backend, sinkhorn_tol, size, fn, block):
        self.args = (C, x, y, cost, a, b, eps, fn, block)
        dtype = (C if C is not None else x).dtype
        device = (C if C is not None else x).device
        self.fast = self._exact = None
        if dtype == torch.float64 and backend != "torch":
            chosen = _backend.resolve(backend, device, torch.float32, op="ot", name=fn)
            if chosen != "torch":
                self.fast = self._make(chosen, torch.float32, backend != "auto", sinkhorn_tol, size)
        if self.fast is None:
            self._exact = self._make(backend, dtype, True, None, size)
            self.fast = self._exact

    def _make(self, backend, dtype, strict, sinkhorn_tol, size):
        C, x, y, cost, a, b, eps, fn, block = self.args
        if C is not None:
            prob = _prepare(None, None, a, b, C.to(dtype), None, None, "sqeuclidean", backend, None, fn=fn)[0]
        else:
            prob = _prepare(x.to(dtype), y.to(dtype), a, b, None, None, None, cost, backend, None, fn=fn)[0]
        if dtype == torch.float64 or sinkhorn_tol is None:
            _check_scales(prob, eps, fn)
        else:  # float32 for a float64 problem: only where its precision suffices
            scale = _cost_scale(prob)
            why = None
            if scale / eps > _FP32_STAGE_RATIO:
                why = f"costs up to {scale:.3g} against eps={eps:g} (ratio above {_FP32_STAGE_RATIO:.0e})"
            elif sinkhorn_tol < _FP32_STAGE_TOL * size:
                why = f"sinkhorn_tol={sinkhorn_tol:g} (below {_FP32_STAGE_TOL:g} times the marginals' size)"
            else:
                try:
                    _check_scales(prob, eps, fn)
                except ValueError as e:
                    why = str(e)
            if why is not None:
                if strict:
                    raise _backend.BackendUnavailableError(
                        f"{fn}: backend {prob.backend!r} runs the Sinkhorn iterations of a float64 problem in "
                        f"float32, which cannot take {why}; use backend='torch' or 'auto'")
                return None
        if prob.backend == "torch" and prob.x is not None:  # the reference on points, without the n x m cost
            B, n, d = prob.x.shape
            m = prob.y.shape[1]
            prob.softmin = _blocked_softmin(prob, block or _block_rows(B, n, m, d), block or _block_rows(B, m, n, d))
        return prob

    @property
    def exact(self):
        if self._exact is None:
            C, x = self.args[:2]
            self._exact = self._make("torch", (C if C is not None else x).dtype, True, None, None)
        return self._exact

    def run(self, prob, eps, n_iter, f, g):
        f2, g2, err = _iterate(prob, eps, n_iter, f, g)
        return f2.to(f.dtype), g2.to(g.dtype), err.to(f.dtype)


# -- the solver ---------------------------------------------------------------------------------
def _check_points(x, y, cost, fn):
    for t, name in ((x, "x"), (y, "y")):
        _checks.float_tensor(t, name, fn, dtypes=(torch.float32, torch.float64))
        _checks.points(t, name, fn, any_batch=True, nonempty=True, values=True)
    _checks.point_pair(x, y, fn, same_dtype=True)
    _checks.cost_name(cost, fn)


def _point_marginals(x, y, a, b, fn):
    """:func:`fastopt.ot._checks.dense_marginals` for the points ``x`` (..., n, d), ``y`` (..., m, d)."""
    batch, n, m = x.shape[:-2], x.shape[-2], y.shape[-2]
    out = []
    for w, name, size, ref in ((a, "a", n, x), (b, "b", m, y)):
        if w is None:
            w = torch.full((*batch, size), 1.0 / size, dtype=x.dtype, device=x.device)
        else:
            w = _checks.weights(w, name, fn, n=size, batch=batch, ref="x" if name == "a" else "y",
                                ref_shape=ref.shape, device=x.device, dtype=x.dtype,
                                broadcast=True).expand(*batch, size)
        out.append(w)
    a, b = out
    mass_a, mass_b = a.sum(-1), b.sum(-1)
    _checks.balanced(mass_a, mass_b, fn)
    return a, b * (mass_a / mass_b)[..., None]


@torch.no_grad()
def sinkhorn_newton_sparse(C: Optional[torch.Tensor] = None, a: Optional[torch.Tensor] = None,
                           b: Optional[torch.Tensor] = None, eps: float = 1e-2, *, x: Optional[torch.Tensor] = None,
                           y: Optional[torch.Tensor] = None, cost: str = "sqeuclidean",
                           block_rows: Optional[int] = None, sinkhorn_iters: int = 1000,
                           sinkhorn_tol: Optional[float] = None,
                           newton_iters: int = 100, sparsity: Optional[Union[float, int]] = None,
                           sparsity_growth: float = 2.0, tol: Optional[float] = None, cg_tol: float = 1e-3,
                           cg_max_iter: int = 500, ls_c1: float = 1e-4, ls_beta: float = 0.5,
                           ls_max_backtracks: int = 30, check_every: int = 10, f: Optional[torch.Tensor] = None,
                           g: Optional[torch.Tensor] = None, return_plan: bool = False,
                           backend: str = "auto") -> SNSResult:
    """Entropic OT by Sinkhorn–Newton–Sparse (Tang et al., ICLR 2024, Algorithm 1; see the module docstring
    for the equations and the exact rules).

    Args:
        C: cost (..., n, m), float32 or float64, finite (any sign); leading dimensions are a batch.  Or,
            instead (``C`` None), the points:
        x, y: points (..., n, d) and (..., m, d) (the same batch shape, dimension, dtype float32 or
            float64, and device) with the cost ``cost`` (``"sqeuclidean"``: ``|x_i - y_j|^2``, or
            ``"euclidean"``): the *online* problem, solved without ever holding an n x m tensor (unless
            ``return_plan``): the Sinkhorn iterations run on the kernels (or the torch reference by row
            blocks), and every pass of the Newton stage (row and column sums of ``P``, the sparsification,
            the line search) goes by blocks of ``block_rows`` rows.  Same results as ``C =``
            :func:`fastopt.reference.ot.cost_matrix` ``(x, y, cost)`` up to rounding.
        cost: the cost of the points (with ``x``, ``y`` only).
        block_rows: rows per block of the online passes (with ``x``, ``y`` only; also the columns per block
            of the torch reference's column soft-minimum; default: blocks of about 2^20 entries, divided by
            ``d``, the size of the temporary that forms the costs).
        a, b: weights (..., n) / (..., m) (or (n,) / (m,), broadcast over the batch), non-negative and
            finite with equal total masses (relative difference <= 1e-5; ``b`` is rescaled to ``a``'s mass);
            None means uniform.  A zero weight carries no mass and gets potential 0.
        eps: entropic regularization (> 0, cost units).
        sinkhorn_iters: at most this many Sinkhorn iterations in stage 1 (0: start Newton at once).
        sinkhorn_tol: stage 1 stops early once the marginal error is at most this (default
            ``max(tol, 0.1 * min(|a|_2, |b|_2))``: 10% of the marginals' size).
        newton_iters: at most this many Newton steps in stage 2.
        sparsity: entries of ``P`` kept in the Hessian: a float ``rho`` in (0, 1] keeps the
            ``ceil(rho * n * m)`` largest entries, an int ``k`` the ``k`` largest of each row (see
            :func:`sparsify_plan`).  Default ``min(1, max(0.05, 16 / min(n, m)))``.
        sparsity_growth: after a full Newton step (line-search step 1) that fails to halve the marginal
            error of some batch entry, the number of kept entries is multiplied by this (capped at all
            entries) for the following steps; 1 keeps it fixed (the paper's fixed ``rho``).
        tol: target marginal error ``sqrt(|P1 - a|^2 + |P^T1 - b|^2)`` (default 1e-10 in float64,
            1e-5 in float32).
        cg_tol, cg_max_iter: relative (projected) residual and iteration cap of each CG solve.
        ls_c1, ls_beta, ls_max_backtracks: Armijo constant, backtracking factor, and the most halvings
            (the smallest step tried is ``ls_beta ** ls_max_backtracks``).
        check_every: Sinkhorn iterations between marginal-error checks in stage 1.
        f, g: warm start potentials (stage 1, or stage 2 with ``sinkhorn_iters=0``, starts from them; stage 1
            is skipped when their marginal error is already at most ``sinkhorn_tol``).
        return_plan: also return the plan ``P`` (..., n, m) (materialized only then).
        backend: what runs the Sinkhorn iterations (:func:`fastopt.ot.sinkhorn`'s backends).  ``"auto"``,
            ``"cpu"``, ``"triton"``: the float32 kernels, also for float64 problems where float32 suffices
            for the Sinkhorn stage (see the module docstring; ``"auto"`` then falls back to the torch
            reference, a named kernel backend raises); ``"torch"``: the PyTorch reference in the problem's
            dtype.  The Newton stage is PyTorch in the problem's dtype on every backend.

    Returns:
        :class:`SNSResult` ``(f, g, plan, log)``; ``log`` holds ``sinkhorn_iters`` and ``newton_iters``
        (iterations run), ``iterations`` and ``n_iter`` (both their sum: the paper's iteration count),
        ``cg_iters`` (per Newton step, the most over the batch) and ``cg_iters_total``, ``err`` (final
        marginal error per batch entry), ``err_history`` (the largest over the batch after every stage-1
        check and every Newton step) with ``iter_history`` (the iteration count at each entry), ``steps``
        (line-search step of each Newton step, the smallest over the batch), ``hessian_nnz`` (entries of
        ``P`` kept at each Newton step, ``K``; the sparsified Hessian has ``n + m + 2K`` nonzeros),
        ``fallbacks`` (Newton steps with no acceptable step size, replaced by Sinkhorn iterations),
        ``converged`` (bool per batch entry), ``stop`` ("tol" or "newton_iters": why stage 2 ended),
        ``value`` (``<a, f> + <b, g>``, the entropic OT value at convergence) and ``sinkhorn_backend``
        (what ran the stage-1 iterations, e.g. ``"cpu/float32"``).  The result's ``value``, ``n_iter``,
        ``error`` and ``converged`` (every entry) read them (:class:`~fastopt.ot.OTResult`).

    Raises:
        ValueError: bad ``eps`` or hyperparameters, a non-tensor / non-float / non-finite cost or points,
        both or neither of ``C`` and ``x``, ``y``, negative or non-finite weights, mismatched shapes or
        devices, unequal masses; all before any work.
        BackendUnavailableError: a ``backend`` that cannot run here (or a float64 problem that float32 kernels
        cannot take, on a named kernel backend).
    """
    fn = "sinkhorn_newton_sparse"
    eps = _checks.real(eps, "eps", fn, tensor=True)
    online = x is not None or y is not None
    if online:
        if C is not None:
            raise ValueError(f"{fn}: pass either the cost C or the points x=, y=, not both")
        if x is None or y is None:
            raise ValueError(f"{fn}: give both points x= and y= (or the cost C)")
        _check_points(x, y, cost, fn)
        n, m = x.shape[-2], y.shape[-2]
        batch, dtype, device = x.shape[:-2], x.dtype, x.device
        a, b = _point_marginals(x, y, a, b, fn)
        if block_rows is not None:
            block_rows = _checks.integer(block_rows, "block_rows", fn)
    else:
        if C is None:
            raise ValueError(f"{fn}: give the cost C or the points x=, y=")
        if block_rows is not None:
            raise ValueError(f"{fn}: block_rows applies to the points x=, y= (the online problem), not to C")
        _checks.cost_matrix(C, "C", fn, dtypes=(torch.float32, torch.float64))
        n, m = C.shape[-2:]
        batch, dtype, device = C.shape[:-2], C.dtype, C.device
        a, b = _checks.dense_marginals(C, a, b, fn)
    sinkhorn_iters = _checks.integer(sinkhorn_iters, "sinkhorn_iters", fn, low=0)
    newton_iters = _checks.integer(newton_iters, "newton_iters", fn, low=0)
    cg_max_iter = _checks.integer(cg_max_iter, "cg_max_iter", fn)
    check_every = _checks.integer(check_every, "check_every", fn)
    ls_max_backtracks = _checks.integer(ls_max_backtracks, "ls_max_backtracks", fn)
    cg_tol = _checks.real(cg_tol, "cg_tol", fn, high=1.0)
    ls_c1 = _checks.real(ls_c1, "ls_c1", fn, high=1.0)
    ls_beta = _checks.real(ls_beta, "ls_beta", fn, high=1.0)
    sparsity_growth = _checks.real(sparsity_growth, "sparsity_growth", fn, low=1.0, low_ok=True)
    if tol is None:
        tol = 1e-10 if dtype == torch.float64 else 1e-5
    tol = _checks.real(tol, "tol", fn)
    if sparsity is None:
        sparsity = min(1.0, max(0.05, 16.0 / min(n, m)))
    mode, count = _check_sparsity(sparsity, n, m, fn)
    _backend.check_backend_name(backend)
    B = math.prod(batch)
    warm = []
    for name, w, size in (("f", f, n), ("g", g, m)):
        if w is None:
            warm.append(torch.zeros(B, size, dtype=dtype, device=device))
            continue
        try:
            if not isinstance(w, torch.Tensor) or w.device != device or not bool(torch.isfinite(w).all()):
                raise RuntimeError
            warm.append(w.to(dtype).expand(*batch, size).reshape(B, size))
        except RuntimeError:
            raise ValueError(f"{fn}: {name} (warm start) must be a finite tensor on {device} that broadcasts to "
                             f"{(*batch, size)}") from None
    f2, g2 = warm
    size = float(torch.minimum(a.norm(dim=-1), b.norm(dim=-1)).min()) if B > 0 else 1.0
    if sinkhorn_tol is None:
        sinkhorn_tol = max(tol, 0.1 * size)
    sinkhorn_tol = _checks.real(sinkhorn_tol, "sinkhorn_tol", fn)
    if B == 0:
        empty = torch.zeros(batch, dtype=dtype, device=device)
        log = {"sinkhorn_iters": 0, "newton_iters": 0, "iterations": 0, "n_iter": 0, "cg_iters": [],
               "cg_iters_total": 0,
               "err": empty, "err_history": [], "iter_history": [], "steps": [], "hessian_nnz": [],
               "converged": empty.bool(), "stop": "tol", "fallbacks": 0, "tol": tol, "sinkhorn_tol": sinkhorn_tol,
               "value": empty, "sinkhorn_backend": None}
        return SNSResult(torch.zeros(*batch, n, dtype=dtype, device=device),
                         torch.zeros(*batch, m, dtype=dtype, device=device),
                         torch.zeros(*batch, n, m, dtype=dtype, device=device) if return_plan else None, log)

    a2, b2 = a.reshape(B, n), b.reshape(B, m)
    if online:
        d = x.shape[-1]
        x3, y3 = x.reshape(B, n, d).contiguous(), y.reshape(B, m, d).contiguous()
        block = block_rows or _block_rows(B, n, m, d)
        prob = _OnlineProblem(x3, y3, cost, a2, b2, eps, block)
        stage = _Stage(None, x3, y3, cost, a2, b2, eps, backend, sinkhorn_tol, size, fn, block_rows)
        if dtype == torch.float32 and stage.fast.backend != "torch":  # row/column sums by the kernels' passes
            prob.kernel = stage.fast
    else:
        prob = _Problem(C.reshape(B, n, m), a2, b2, eps)
        stage = _Stage(C.reshape(B, n, m), None, None, None, a2, b2, eps, backend, sinkhorn_tol, size, fn, None)
    log = {"err_history": [], "iter_history": [], "cg_iters": [], "steps": [], "hessian_nnz": [],
           "sinkhorn_backend": f"{stage.fast.backend}/{str(stage.fast.work_dtype).replace('torch.', '')}"}

    # stage 1: Sinkhorn (log domain), stopped early at sinkhorn_tol (a warm start already there skips it:
    # float32 iterations would only blur it)
    it1 = 0
    if (f is not None or g is not None) and sinkhorn_iters > 0 and bool((prob.state(f2, g2)[3] <= sinkhorn_tol).all()):
        sinkhorn_iters = 0
    while it1 < sinkhorn_iters:
        chunk = min(check_every, sinkhorn_iters - it1)
        f2, g2, err = stage.run(stage.fast, eps, chunk, f2, g2)
        it1 += chunk
        log["err_history"].append(float(err.max()))
        log["iter_history"].append(it1)
        if bool((err <= sinkhorn_tol).all()):
            break

    # stage 2: sparse Newton with a backtracking line search
    it2, stop, fallbacks, streak = 0, "newton_iters", 0, 0
    stash, dsum, grad, err = prob.state(f2, g2)
    if it1 == 0:
        log["err_history"].append(float(err.max()))
        log["iter_history"].append(0)
    while True:
        active = err > tol
        if not bool(active.any()):
            stop = "tol"
            break
        if it2 >= newton_iters:
            break
        delta, slope, cg_it, kept = _newton_direction(prob, stash, f2, g2, dsum, grad, active, mode, count, cg_tol,
                                                      cg_max_iter)
        log["cg_iters"].append(cg_it)
        log["hessian_nnz"].append(kept)
        t, ok = _line_search(prob, stash, f2, g2, delta, slope, active, ls_c1, ls_beta, ls_max_backtracks)
        log["steps"].append(float(t[active].min()))
        f2 = f2 + t[:, None] * delta[:, :n]
        g2 = g2 + t[:, None] * delta[:, n:]
        it2 += 1
        failed = ~ok
        if bool(failed.any()):  # no acceptable step: Sinkhorn iterations for those entries, then Newton again
            chunk = check_every * 2 ** min(streak, 20)
            # float32 iterations only far from the optimum (they would undo what float64 Newton reached)
            sk = stage.fast if bool((err[failed] > sinkhorn_tol).all()) else stage.exact
            f_sk, g_sk, _ = stage.run(sk, eps, chunk, f2, g2)
            f2 = torch.where(failed[:, None], f_sk, f2)
            g2 = torch.where(failed[:, None], g_sk, g2)
            it1 += chunk
            fallbacks += 1
            streak += 1
        else:
            streak = 0
        err_old = err
        stash, dsum, grad, err = prob.state(f2, g2)
        log["err_history"].append(float(err.max()))
        log["iter_history"].append(it1 + it2)
        slow = active & (t == 1) & (err > 0.5 * err_old)
        if sparsity_growth > 1 and bool(slow.any()):
            cap = n * m if mode == "top" else m
            count = min(cap, math.ceil(count * sparsity_growth))

    plan = None
    if return_plan:  # (the dense problem's stash holds P at the final potentials)
        plan = (stash[1] if stash is not None else prob.plan(f2, g2)).reshape(*batch, n, m)
    f2 = torch.where(a2 > 0, f2, 0.0)
    g2 = torch.where(b2 > 0, g2, 0.0)
    log.update({
        "sinkhorn_iters": it1, "newton_iters": it2, "iterations": it1 + it2, "n_iter": it1 + it2,
        "cg_iters_total": sum(log["cg_iters"]), "err": err.reshape(batch), "converged": (err <= tol).reshape(batch),
        "stop": stop, "fallbacks": fallbacks, "tol": tol, "sinkhorn_tol": sinkhorn_tol,
        "value": ((a2 * f2).sum(-1) + (b2 * g2).sum(-1)).reshape(batch),
    })
    return SNSResult(f2.reshape(*batch, n), g2.reshape(*batch, m), plan, log)
