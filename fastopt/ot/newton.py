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

1. *Sinkhorn stage*: log-domain Sinkhorn (the iterations of :func:`fastopt.ot.sinkhorn`, g then f: its
   kernels for float32 costs, see ``backend=``) for at most ``sinkhorn_iters`` iterations, stopped early
   once the marginal error is at most ``sinkhorn_tol`` (checked every ``check_every`` iterations; default
   ``0.1 * min(|a|_2, |b|_2)``, 10% of the marginals: the paper runs a fixed number N1).
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
from . import _checks
from ._result import _LoggedResult
from .sinkhorn import _balanced_problem, _iterate

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
    """The flattened problem: ``C / eps`` (B, n, m), the weights and their logs, the null direction."""

    def __init__(self, C, a, b, eps):
        self.C_eps = C / eps
        self.a, self.b, self.eps = a, b, eps
        self.log_a = torch.where(a > 0, a.log(), -math.inf)
        self.log_b = torch.where(b > 0, b.log(), -math.inf)
        self.n = a.shape[-1]
        self.valid = torch.cat([a > 0, b > 0], dim=-1)
        self.null = torch.cat([(a > 0).to(C.dtype), -(b > 0).to(C.dtype)], dim=-1)

    def state(self, f, g):
        """``log P``, ``P``, its row and column sums, the gradient (marginal residuals, 0 where no mass) and
        the marginal error at ``(f, g)``."""
        logP = (f / self.eps + self.log_a)[:, :, None] + (g / self.eps + self.log_b)[:, None, :] - self.C_eps
        P = logP.exp()
        d = torch.cat([P.sum(-1), P.sum(-2)], dim=-1)
        grad = torch.where(self.valid, torch.cat([self.a, self.b], dim=-1) - d, 0.0)
        return logP, P, d, grad, grad.norm(dim=-1)

    def gain(self, logP, P, delta, t):
        """``L(z + t delta) - L(z)`` per batch entry, ``t (<a, d_f> + <b, d_g>) - eps sum_ij P_ij
        expm1(t (d_f,i + d_g,j) / eps)``: no difference of two values of ``L``, so it stays accurate near the
        optimum; ``exp(log P_ij + x_ij)`` where ``P_ij`` underflows to 0."""
        n, eps = self.n, self.eps
        lin = (self.a * delta[:, :n]).sum(-1) + (self.b * delta[:, n:]).sum(-1)
        x = (t / eps)[:, None, None] * (delta[:, :n, None] + delta[:, None, n:])
        terms = torch.where(P > 0, P * torch.expm1(x), (logP + x).exp())
        return t * lin - eps * terms.sum((-1, -2))


def _line_search(prob, logP, P, delta, slope, active, c1, beta, max_backtracks, max_exponent=50.0):
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
        ok = ok | (~tried & (prob.gain(logP, P, delta, t) >= c1 * t * slope))
        stop = ok | (t < beta ** max_backtracks * (1 + 1e-6))
        if bool(stop.all()):
            break
        t = torch.where(stop, t, t * beta)
        tried = ~active | (t == 0)
    return torch.where(ok, t, 0.0), ok


def _newton_direction(prob, P, d, grad, active, mode, count, cg_tol, cg_max_iter):
    """The sparse Newton direction ``M_rho^{-1} eps grad`` (projected CG) and the CG iterations; the
    preconditioned gradient where that is not an ascent direction."""
    rows, cols, vals = _sparsify(P, mode, count)
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


# -- the solver ---------------------------------------------------------------------------------
@torch.no_grad()
def sinkhorn_newton_sparse(C: torch.Tensor, a: Optional[torch.Tensor] = None, b: Optional[torch.Tensor] = None,
                           eps: float = 1e-2, *, sinkhorn_iters: int = 1000, sinkhorn_tol: Optional[float] = None,
                           newton_iters: int = 100, sparsity: Optional[Union[float, int]] = None,
                           sparsity_growth: float = 2.0, tol: Optional[float] = None, cg_tol: float = 1e-3,
                           cg_max_iter: int = 500, ls_c1: float = 1e-4, ls_beta: float = 0.5,
                           ls_max_backtracks: int = 30, check_every: int = 10, f: Optional[torch.Tensor] = None,
                           g: Optional[torch.Tensor] = None, return_plan: bool = False,
                           backend: str = "auto") -> SNSResult:
    """Entropic OT by Sinkhorn–Newton–Sparse (Tang et al., ICLR 2024, Algorithm 1; see the module docstring
    for the equations and the exact rules).

    Args:
        C: cost (..., n, m), float32 or float64, finite (any sign); leading dimensions are a batch.
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
        f, g: warm start potentials (stage 1, or stage 2 with ``sinkhorn_iters=0``, starts from them).
        return_plan: also return the plan ``P`` (..., n, m).
        backend: what runs the Sinkhorn iterations (:func:`fastopt.ot.sinkhorn`'s backends: ``"auto"``,
            ``"cpu"`` and ``"triton"`` are the kernels, for float32 costs; ``"torch"`` the dense PyTorch
            path, which float64 costs always take).  The Newton stage is dense PyTorch on every backend.

    Returns:
        :class:`SNSResult` ``(f, g, plan, log)``; ``log`` holds ``sinkhorn_iters`` and ``newton_iters``
        (iterations run), ``iterations`` and ``n_iter`` (both their sum: the paper's iteration count),
        ``cg_iters`` (per Newton step, the most over the batch) and ``cg_iters_total``, ``err`` (final
        marginal error per batch entry), ``err_history`` (the largest over the batch after every stage-1
        check and every Newton step) with ``iter_history`` (the iteration count at each entry), ``steps``
        (line-search step of each Newton step, the smallest over the batch), ``hessian_nnz`` (entries of
        ``P`` kept at each Newton step, ``K``; the sparsified Hessian has ``n + m + 2K`` nonzeros),
        ``fallbacks`` (Newton steps with no acceptable step size, replaced by Sinkhorn iterations),
        ``converged`` (bool per batch entry), ``stop`` ("tol" or "newton_iters": why stage 2 ended) and
        ``value`` (``<a, f> + <b, g>``, the entropic OT value at convergence).  The result's ``value``,
        ``n_iter``, ``error`` and ``converged`` (every entry) read them (:class:`~fastopt.ot.OTResult`).

    Raises:
        ValueError: bad ``eps`` or hyperparameters, a non-tensor / non-float / non-finite cost, negative
        or non-finite weights, mismatched shapes or devices, unequal masses; all before any work.
        BackendUnavailableError: a ``backend`` that cannot run here (or float64 on a kernel backend).
    """
    fn = "sinkhorn_newton_sparse"
    eps = _checks.real(eps, "eps", fn, tensor=True)
    _checks.cost_matrix(C, "C", fn, dtypes=(torch.float32, torch.float64))
    n, m = C.shape[-2:]
    batch = C.shape[:-2]
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
        tol = 1e-10 if C.dtype == torch.float64 else 1e-5
    tol = _checks.real(tol, "tol", fn)
    if sparsity is None:
        sparsity = min(1.0, max(0.05, 16.0 / min(n, m)))
    mode, count = _check_sparsity(sparsity, n, m, fn)
    _backend.check_backend_name(backend)
    B = math.prod(batch)
    warm = []
    for name, w, size in (("f", f, n), ("g", g, m)):
        if w is None:
            warm.append(torch.zeros(B, size, dtype=C.dtype, device=C.device))
            continue
        try:
            if not isinstance(w, torch.Tensor) or w.device != C.device or not bool(torch.isfinite(w).all()):
                raise RuntimeError
            warm.append(w.to(C.dtype).expand(*batch, size).reshape(B, size))
        except RuntimeError:
            raise ValueError(f"{fn}: {name} (warm start) must be a finite tensor on {C.device} that broadcasts to "
                             f"{(*batch, size)}") from None
    f2, g2 = warm
    if sinkhorn_tol is None:
        size = float(torch.minimum(a.norm(dim=-1), b.norm(dim=-1)).min()) if B > 0 else 1.0
        sinkhorn_tol = max(tol, 0.1 * size)
    sinkhorn_tol = _checks.real(sinkhorn_tol, "sinkhorn_tol", fn)
    if B == 0:
        empty = torch.zeros(batch, dtype=C.dtype, device=C.device)
        log = {"sinkhorn_iters": 0, "newton_iters": 0, "iterations": 0, "n_iter": 0, "cg_iters": [],
               "cg_iters_total": 0,
               "err": empty, "err_history": [], "iter_history": [], "steps": [], "hessian_nnz": [],
               "converged": empty.bool(), "stop": "tol", "fallbacks": 0, "tol": tol, "sinkhorn_tol": sinkhorn_tol,
               "value": empty}
        return SNSResult(torch.zeros(*batch, n, dtype=C.dtype, device=C.device),
                         torch.zeros(*batch, m, dtype=C.dtype, device=C.device),
                         torch.zeros(*batch, n, m, dtype=C.dtype, device=C.device) if return_plan else None, log)

    a2, b2 = a.reshape(B, n), b.reshape(B, m)
    prob = _Problem(C.reshape(B, n, m), a2, b2, eps)
    # the Sinkhorn iterations of both stages: fastopt.ot.sinkhorn's (kernels for float32 costs)
    stage1 = _balanced_problem(C.reshape(B, n, m), a2, b2, eps, backend, fn)
    log = {"err_history": [], "iter_history": [], "cg_iters": [], "steps": [], "hessian_nnz": []}

    # stage 1: Sinkhorn (log domain), stopped early at sinkhorn_tol
    it1 = 0
    while it1 < sinkhorn_iters:
        chunk = min(check_every, sinkhorn_iters - it1)
        f2, g2, err = _iterate(stage1, eps, chunk, f2, g2)
        it1 += chunk
        log["err_history"].append(float(err.max()))
        log["iter_history"].append(it1)
        if bool((err <= sinkhorn_tol).all()):
            break

    # stage 2: sparse Newton with a backtracking line search
    it2, stop, fallbacks, streak = 0, "newton_iters", 0, 0
    logP, P, d, grad, err = prob.state(f2, g2)
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
        delta, slope, cg_it, kept = _newton_direction(prob, P, d, grad, active, mode, count, cg_tol, cg_max_iter)
        log["cg_iters"].append(cg_it)
        log["hessian_nnz"].append(kept)
        t, ok = _line_search(prob, logP, P, delta, slope, active, ls_c1, ls_beta, ls_max_backtracks)
        log["steps"].append(float(t[active].min()))
        f2 = f2 + t[:, None] * delta[:, :n]
        g2 = g2 + t[:, None] * delta[:, n:]
        it2 += 1
        failed = ~ok
        if bool(failed.any()):  # no acceptable step: Sinkhorn iterations for those entries, then Newton again
            chunk = check_every * 2 ** min(streak, 20)
            f_sk, g_sk, _ = _iterate(stage1, eps, chunk, f2, g2)
            f2 = torch.where(failed[:, None], f_sk, f2)
            g2 = torch.where(failed[:, None], g_sk, g2)
            it1 += chunk
            fallbacks += 1
            streak += 1
        else:
            streak = 0
        err_old = err
        logP, P, d, grad, err = prob.state(f2, g2)
        log["err_history"].append(float(err.max()))
        log["iter_history"].append(it1 + it2)
        slow = active & (t == 1) & (err > 0.5 * err_old)
        if sparsity_growth > 1 and bool(slow.any()):
            cap = n * m if mode == "top" else m
            count = min(cap, math.ceil(count * sparsity_growth))

    f2 = torch.where(a2 > 0, f2, 0.0)
    g2 = torch.where(b2 > 0, g2, 0.0)
    log.update({
        "sinkhorn_iters": it1, "newton_iters": it2, "iterations": it1 + it2, "n_iter": it1 + it2,
        "cg_iters_total": sum(log["cg_iters"]), "err": err.reshape(batch), "converged": (err <= tol).reshape(batch),
        "stop": stop, "fallbacks": fallbacks, "tol": tol, "sinkhorn_tol": sinkhorn_tol,
        "value": ((a2 * f2).sum(-1) + (b2 * g2).sum(-1)).reshape(batch),
    })
    plan = P.reshape(*batch, n, m) if return_plan else None
    return SNSResult(f2.reshape(*batch, n), g2.reshape(*batch, m), plan, log)
