"""Online, batched, log-domain Sinkhorn (entropic optimal transport) with envelope-theorem gradients.

    res = fastopt.ot.sinkhorn(x, y, eps=0.05)             # x (n, d) or (B, n, d), y (m, d) or (B, m, d)
    res.value.backward()                                   # d OT_eps / dx without unrolling the loop
    S = fastopt.ot.sinkhorn_divergence(x, y, eps=0.05)    # debiased: OT(x,y) - (OT(x,x) + OT(y,y)) / 2

Conventions (the spec is :mod:`fastopt.reference.ot`): the cost is ``|x - y|^2`` (POT's ``ot.dist``
default; geomloss' ``p=2`` cost is half of it, so geomloss' ``blur`` corresponds to
``eps = 2 * blur**2`` here and its values are half of ours) or ``|x - y|``; the problem is
``min <P, C> + eps KL(P | a (x) b)`` under the marginal constraints (the plan of POT's ``ot.sinkhorn``),
or with ``rho * KL`` marginal penalties (``rho=``, POT's ``ot.unbalanced.sinkhorn_unbalanced`` with
``reg_type="kl"``).  The returned potentials satisfy ``P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps)``.

On the ``cpu`` and ``triton`` backends the cost is never stored: each half-iteration is one pass that
computes the costs tile by tile and reduces them with an online log-sum-exp (O((n + m) d) memory).
The ``torch`` backend is the dense reference (and the one for float64).
"""
import math
from dataclasses import dataclass

import torch

from .. import _backend, _ops
from ..reference.ot import cost_matrix as dense_cost
from ..reference.ot import lse_reference

__all__ = ["sinkhorn", "sinkhorn_divergence", "SinkhornResult", "COSTS"]

COSTS = {"sqeuclidean": 0, "euclidean": 1}
NEG_INF = float("-inf")


@dataclass
class SinkhornResult:
    """What :func:`sinkhorn` returns.

    ``value``: the entropic OT value per batch entry (a scalar for unbatched inputs), differentiable
    with respect to the points, the weights and the cost matrix (envelope theorem: the potentials are
    treated as optimal, nothing is unrolled).  Balanced: ``<a, f> + <b, g>``; unbalanced:
    ``<a, rho (1 - e^{-f/rho})> + <b, rho (1 - e^{-g/rho})> - eps (<P, 1> - <a, 1><b, 1>)``.
    ``f`` (B, n), ``g`` (B, m): the potentials (fp32, or fp64 for fp64 inputs; 0 at padding).
    ``n_iter``: iterations run (eps-scaling steps included); ``error``: the last error per batch entry
    (balanced: ``|P^T 1 - b|_2``, POT's criterion; unbalanced: the largest change of ``f / eps`` and
    ``g / eps`` in the last iteration), ``converged``: whether every entry reached ``tol``.
    """

    value: torch.Tensor
    f: torch.Tensor
    g: torch.Tensor
    n_iter: int
    error: torch.Tensor
    converged: bool
    eps: float
    _problem: object = None

    def plan(self):
        """The transport plan ``P`` (B, n, m) (or (n, m)), materialized: for small problems."""
        pr = self._problem
        with torch.no_grad():
            C = pr.dense_cost()
            logp = (pr.log_a[..., :, None] + pr.log_b[..., None, :]
                    + (self.f.reshape(pr.log_a.shape)[..., :, None] + self.g.reshape(pr.log_b.shape)[..., None, :] - C)
                    / self.eps)
            P = torch.exp(logp)
        return P[0] if pr.unbatched else P


class _Problem:
    """Validated inputs in kernel layout: x (B, n, d), y (B, m, d) contiguous, or C (B, n, m) with its
    transpose; fp32 log weights (-inf: no mass)."""

    def __init__(self, x, y, C, log_a, log_b, cost, backend, unbatched, work_dtype):
        self.x, self.y, self.C = x, y, C
        self.CT = C.transpose(1, 2).contiguous() if C is not None and backend != "torch" else None
        self.log_a, self.log_b = log_a, log_b
        self.cost, self.backend, self.unbatched, self.work_dtype = cost, backend, unbatched, work_dtype
        self._dense = None

    def dense_cost(self):
        if self.C is not None:
            return self.C.to(self.work_dtype)
        if self._dense is None:
            self._dense = dense_cost(self.x.to(self.work_dtype), self.y.to(self.work_dtype), self.cost)
        return self._dense

    def lse(self, h, eps, rows):
        """``LSE_j(h_j - C_ij / eps)`` for every row i (``rows``) or ``LSE_i(h_i - C_ij / eps)`` for
        every column j."""
        if self.backend == "torch":
            C = self.dense_cost()
            return lse_reference(C if rows else C.transpose(1, 2), h, eps)
        out = torch.empty(h.shape[0], self.log_a.shape[1] if rows else self.log_b.shape[1],
                          dtype=torch.float32, device=h.device)
        if self.C is not None:
            _ops.ot_pass(None, None, self.C if rows else self.CT, h.contiguous(), None, out, float(eps),
                         COSTS[self.cost], 0, self.backend)
        else:
            _ops.ot_pass(self.x if rows else self.y, self.y if rows else self.x, None, h.contiguous(), None, out,
                         float(eps), COSTS[self.cost], 0, self.backend)
        return out

    def grad_points(self, h, c, eps, rows):
        """``sum_j exp(c_i + h_j - C_ij / eps) dC_ij / dx_i`` for the x points (``rows``) or the y points."""
        src, dst = (self.x, self.y) if rows else (self.y, self.x)
        if self.backend == "torch":
            xs, ys = src.to(self.work_dtype), dst.to(self.work_dtype)
            C = dense_cost(xs, ys, self.cost)
            P = torch.exp(c[..., :, None] + h[..., None, :] - C / eps)
            if self.cost == "sqeuclidean":
                return 2.0 * (xs * P.sum(-1, keepdim=True) - P @ ys)
            W = torch.where(C > 0, P / torch.where(C > 0, C, 1.0), 0.0)
            return xs * W.sum(-1, keepdim=True) - W @ ys
        out = torch.empty(src.shape, dtype=torch.float32, device=src.device)
        _ops.ot_pass(src, dst, None, h.contiguous(), c.contiguous(), out, float(eps), COSTS[self.cost], 1, self.backend)
        return out


def _check_weights(w, name, shape, device):
    if w is None:
        return None
    if not torch.is_tensor(w):
        raise TypeError(f"sinkhorn: {name} must be a tensor, got {type(w).__name__}")
    if w.is_complex() or not w.is_floating_point():
        raise TypeError(f"sinkhorn: {name} must be a real floating-point tensor, got {w.dtype}")
    if tuple(w.shape) != shape and tuple(w.shape) != shape[1:]:
        raise ValueError(f"sinkhorn: {name} has shape {tuple(w.shape)}, expected {shape[1:]} or {shape}")
    if w.device != device:
        raise ValueError(f"sinkhorn: {name} is on {w.device}, the points on {device}")
    wd = w.detach()
    if not bool(torch.isfinite(wd).all()) or bool((wd < 0).any()):
        raise ValueError(f"sinkhorn: {name} must be finite and non-negative")
    return w.expand(shape) if w.dim() == len(shape) - 1 else w


def _check_points(t, name):
    if not torch.is_tensor(t):
        raise TypeError(f"sinkhorn: {name} must be a tensor, got {type(t).__name__}")
    if t.is_complex() or not t.is_floating_point():
        raise TypeError(f"sinkhorn: {name} must be a real floating-point tensor, got {t.dtype}")
    if t.dim() not in (2, 3):
        raise ValueError(f"sinkhorn: {name} must be (n, d) or (B, n, d), got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t.detach()).all()):
        raise ValueError(f"sinkhorn: {name} has non-finite values")


def _prepare(x, y, a, b, cost_matrix, x_mask, y_mask, cost, backend, rho):
    if cost not in COSTS:
        raise ValueError(f"sinkhorn: cost must be one of {tuple(COSTS)}, got {cost!r}")
    if cost_matrix is not None:
        if x is not None or y is not None:
            raise ValueError("sinkhorn: pass either the points x, y or cost_matrix, not both")
        if not torch.is_tensor(cost_matrix) or cost_matrix.is_complex() or not cost_matrix.is_floating_point():
            raise TypeError("sinkhorn: cost_matrix must be a real floating-point tensor")
        if cost_matrix.dim() not in (2, 3):
            raise ValueError(f"sinkhorn: cost_matrix must be (n, m) or (B, n, m), got {tuple(cost_matrix.shape)}")
        if not bool(torch.isfinite(cost_matrix.detach()).all()):
            raise ValueError("sinkhorn: cost_matrix has non-finite values")
        unbatched = cost_matrix.dim() == 2
        C = cost_matrix[None] if unbatched else cost_matrix
        B, n, m = C.shape
        device, dtype = C.device, C.dtype
    else:
        if x is None or y is None:
            raise ValueError("sinkhorn: give the points x and y (or cost_matrix=)")
        _check_points(x, "x")
        _check_points(y, "y")
        if x.dim() != y.dim():
            raise ValueError(f"sinkhorn: x is {x.dim()}-d and y is {y.dim()}-d")
        unbatched = x.dim() == 2
        xb, yb = (x[None], y[None]) if unbatched else (x, y)
        if xb.shape[0] != yb.shape[0] or xb.shape[2] != yb.shape[2]:
            raise ValueError(f"sinkhorn: x {tuple(x.shape)} and y {tuple(y.shape)} need the same batch and dimension")
        if x.device != y.device or x.dtype != y.dtype:
            raise ValueError(f"sinkhorn: x and y must share device and dtype ({x.device}/{x.dtype} vs "
                             f"{y.device}/{y.dtype})")
        B, n, _ = xb.shape
        m = yb.shape[1]
        device, dtype = x.device, x.dtype
        C = None
    a = _check_weights(a, "a", (B, n), device)
    b = _check_weights(b, "b", (B, m), device)
    masks = []
    for mask, name, size in ((x_mask, "x_mask", n), (y_mask, "y_mask", m)):
        if mask is not None:
            if not torch.is_tensor(mask) or mask.dtype != torch.bool:
                raise TypeError(f"sinkhorn: {name} must be a bool tensor")
            if tuple(mask.shape) not in ((B, size), (size,)):
                raise ValueError(f"sinkhorn: {name} has shape {tuple(mask.shape)}, expected {(B, size)}")
            mask = mask.to(device).expand(B, size)
        masks.append(mask)

    def weights(w, mask, size):
        if w is None:
            valid = mask if mask is not None else torch.ones(B, size, dtype=torch.bool, device=device)
            count = valid.sum(1, keepdim=True)
            if bool((count == 0).any()):
                raise ValueError("sinkhorn: a batch entry has no valid point")
            w = valid.to(torch.float64 if dtype == torch.float64 else torch.float32) / count
        elif mask is not None:
            w = w * mask
        return w

    a = weights(a, masks[0], n)
    b = weights(b, masks[1], m)
    for w, name in ((a, "a"), (b, "b")):
        if bool((w.detach().sum(1) <= 0).any()):
            raise ValueError(f"sinkhorn: the weights {name} of a batch entry sum to 0")
    if rho is None or math.isinf(rho):
        sa, sb = a.detach().double().sum(1), b.detach().double().sum(1)
        if bool(((sa - sb).abs() > 1e-5 * torch.maximum(sa, sb)).any()):
            raise ValueError(f"sinkhorn: balanced OT needs equal total masses, got {sa.tolist()} and {sb.tolist()} "
                             "(normalize the weights, or pass rho= for unbalanced OT)")
    if dtype == torch.float64:
        if backend not in ("auto", "torch"):
            _backend.check_backend_name(backend)
            raise _backend.BackendUnavailableError(f"sinkhorn: the {backend!r} kernels take fp32/fp16/bf16 inputs; "
                                                   "float64 runs on backend='torch'")
        chosen = "torch"
    else:
        chosen = _backend.resolve(backend, device, dtype, True)
        if chosen == "cuda":  # the OT kernels are Triton's on GPUs
            if backend == "cuda":
                raise _backend.BackendUnavailableError("sinkhorn: no CUDA C++ kernel; use backend='triton' or 'auto'")
            chosen = _backend.resolve("triton", device, dtype, True)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    if C is not None:
        prob = _Problem(None, None, C.contiguous(), _log(a, work), _log(b, work), cost, chosen, unbatched, work)
    else:
        prob = _Problem(xb.detach().contiguous(), yb.detach().contiguous(), None, _log(a, work), _log(b, work), cost,
                        chosen, unbatched, work)
    return prob, a, b, C


def _log(w, work):
    w = w.detach().to(work)
    return torch.where(w > 0, torch.log(torch.where(w > 0, w, 1.0)), NEG_INF)


def _diameter(prob):
    if prob.C is not None:
        return float(prob.C.detach().max())
    pts = torch.cat([prob.x, prob.y], dim=1).float()
    span = float((pts.amax(1) - pts.amin(1)).norm(dim=-1).max())
    return span * span if prob.cost == "sqeuclidean" else span


def _solve(prob, eps, rho, n_iter, tol, check_every, eps_scaling, f=None, g=None):
    tau = 1.0 if rho is None or math.isinf(rho) else rho / (rho + eps)
    B = prob.log_a.shape[0]
    f = torch.zeros_like(prob.log_a) if f is None else f.to(prob.log_a.dtype).clone()
    g = torch.zeros_like(prob.log_b) if g is None else g.to(prob.log_b.dtype).clone()
    la, lb = prob.log_a, prob.log_b
    it = 0
    if eps_scaling is not None:
        e = max(_diameter(prob), eps)
        while e > eps and it < n_iter:
            t = 1.0 if rho is None or math.isinf(rho) else rho / (rho + e)
            g = -t * e * prob.lse(la + f / e, e, rows=False)
            f = -t * e * prob.lse(lb + g / e, e, rows=True)
            it += 1
            e *= eps_scaling
    err = torch.full((B,), math.inf, dtype=la.dtype, device=la.device)
    lse_cols = prob.lse(la + f / eps, eps, rows=False)
    converged = False
    while it < n_iter:
        f_prev, g_prev = f, g
        g = -tau * eps * lse_cols
        f = -tau * eps * prob.lse(lb + g / eps, eps, rows=True)
        it += 1
        lse_cols = prob.lse(la + f / eps, eps, rows=False)
        if it % check_every == 0 or it == n_iter:
            if tau == 1.0:  # P^T 1 = b * exp(g / eps + LSE_i(log a + (f - C) / eps))
                col = torch.exp(lb + g / eps + lse_cols)
                err = torch.linalg.vector_norm(torch.where(torch.isfinite(lb), col - lb.exp(), 0.0), dim=1)
            else:
                err = torch.maximum(_change(f, f_prev, la), _change(g, g_prev, lb)) / eps
            if bool((err < tol).all()):
                converged = True
                break
    f = torch.where(torch.isfinite(la), f, 0.0)
    g = torch.where(torch.isfinite(lb), g, 0.0)
    return f, g, it, err, converged


def _change(new, old, log_w):
    return torch.where(torch.isfinite(log_w), (new - old).abs(), 0.0).amax(dim=1)


class _Value(torch.autograd.Function):
    """The OT value from converged potentials; backward by the envelope theorem."""

    @staticmethod
    def forward(ctx, x, y, C, a, b, f, g, prob, eps, rho):
        ctx.prob, ctx.eps, ctx.rho = prob, eps, rho
        ctx.dtypes = [t.dtype if t is not None else None for t in (x, y, C, a, b)]
        ctx.save_for_backward(f, g)
        af, bf = a.detach().to(f.dtype), b.detach().to(g.dtype)
        if rho is None or math.isinf(rho):
            return (af * f).sum(1) + (bf * g).sum(1)
        tau = rho / (rho + eps)
        mass = (af * torch.exp(f * (1.0 - 1.0 / tau) / eps)).sum(1)
        return ((af * rho * (1 - torch.exp(-f / rho))).sum(1) + (bf * rho * (1 - torch.exp(-g / rho))).sum(1)
                - eps * (mass - af.sum(1) * bf.sum(1)))

    @staticmethod
    def backward(ctx, gv):
        f, g = ctx.saved_tensors
        prob, eps, rho = ctx.prob, ctx.eps, ctx.rho
        gx = gy = gC = ga = gb = None
        ha, hb = prob.log_a + f / eps, prob.log_b + g / eps
        scale = gv.to(f.dtype)
        if ctx.needs_input_grad[0]:
            gx = prob.grad_points(hb, ha, eps, rows=True) * scale[:, None, None]
        if ctx.needs_input_grad[1]:
            gy = prob.grad_points(ha, hb, eps, rows=False) * scale[:, None, None]
        if ctx.needs_input_grad[2]:
            C = prob.dense_cost()
            gC = torch.exp(ha[..., :, None] + hb[..., None, :] - C / eps) * scale[:, None, None]
        balanced = rho is None or math.isinf(rho)
        if ctx.needs_input_grad[3]:
            ga = f if balanced else _unbalanced_weight_grad(f, eps, rho, prob.log_b.exp().sum(1))
            ga = ga * scale[:, None]
        if ctx.needs_input_grad[4]:
            gb = g if balanced else _unbalanced_weight_grad(g, eps, rho, prob.log_a.exp().sum(1))
            gb = gb * scale[:, None]
        grads = [t.to(dt) if t is not None else None for t, dt in zip((gx, gy, gC, ga, gb), ctx.dtypes)]
        return (*grads, None, None, None, None, None)


def _unbalanced_weight_grad(f, eps, rho, other_mass):
    tau = rho / (rho + eps)
    return rho * (1 - torch.exp(-f / rho)) - eps * (torch.exp(f * (1.0 - 1.0 / tau) / eps) - other_mass[:, None])


def sinkhorn(x=None, y=None, a=None, b=None, *, eps, cost="sqeuclidean", cost_matrix=None, x_mask=None, y_mask=None,
             rho=None, n_iter=1000, tol=1e-6, check_every=10, eps_scaling=None, init=None, backend="auto"):
    """Entropic optimal transport between the point clouds ``x`` (n, d) / (B, n, d) and ``y`` (m, d) /
    (B, m, d) with weights ``a``, ``b`` (default: uniform over the valid points), or on a dense
    ``cost_matrix`` (n, m) / (B, n, m).  Returns a :class:`SinkhornResult`.

    Log-domain Sinkhorn (POT's ``sinkhorn_log`` order, g then f) until the error is at most ``tol``
    for every batch entry (checked every ``check_every`` iterations and after the last) or ``n_iter``
    iterations.  ``x_mask``/``y_mask`` (bool (B, n)/(B, m)) mark the valid points of ragged batches;
    padded points carry no mass.  ``rho``: unbalanced OT with ``rho * KL`` marginal penalties.
    ``eps_scaling`` (a ratio in (0, 1)): first one iteration at each of ``eps0, eps0 * r, ...`` from the
    squared diameter down to ``eps`` (geomloss' annealing), then iterations at ``eps``.  ``init``:
    ``(f, g)`` warm start.  fp16/bf16 points are read as such and accumulated in fp32; float64 runs
    the dense torch reference.
    """
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not (0 < eps < math.inf):
        raise ValueError(f"sinkhorn: eps must be a positive finite float, got {eps!r}")
    if rho is not None and (not isinstance(rho, (int, float)) or not rho > 0):
        raise ValueError(f"sinkhorn: rho must be a positive float (or None: balanced), got {rho!r}")
    if not isinstance(n_iter, int) or n_iter < 1:
        raise ValueError(f"sinkhorn: n_iter must be an int >= 1, got {n_iter!r}")
    if not isinstance(check_every, int) or check_every < 1:
        raise ValueError(f"sinkhorn: check_every must be an int >= 1, got {check_every!r}")
    if not isinstance(tol, (int, float)) or tol < 0:
        raise ValueError(f"sinkhorn: tol must be >= 0, got {tol!r}")
    if eps_scaling is not None and not (isinstance(eps_scaling, float) and 0.0 < eps_scaling < 1.0):
        raise ValueError(f"sinkhorn: eps_scaling must be a float in (0, 1), got {eps_scaling!r}")
    _backend.check_backend_name(backend)
    prob, a_eff, b_eff, C = _prepare(x, y, a, b, cost_matrix, x_mask, y_mask, cost, backend, rho)
    f0 = g0 = None
    if init is not None:
        f0, g0 = (t.detach().reshape(prob.log_a.shape if i == 0 else prob.log_b.shape) for i, t in enumerate(init))
    with torch.no_grad():
        f, g, it, err, converged = _solve(prob, float(eps), rho, n_iter, float(tol), check_every, eps_scaling, f0, g0)
    if cost_matrix is not None:
        value = _Value.apply(None, None, C, a_eff, b_eff, f, g, prob, float(eps), rho)
    else:
        xb, yb = (x[None], y[None]) if prob.unbatched else (x, y)
        value = _Value.apply(xb, yb, None, a_eff, b_eff, f, g, prob, float(eps), rho)
    if prob.unbatched:
        value, f_out, g_out = value[0], f[0], g[0]
    else:
        f_out, g_out = f, g
    return SinkhornResult(value=value, f=f_out, g=g_out, n_iter=it, error=err, converged=converged, eps=float(eps),
                          _problem=prob)


def sinkhorn_divergence(x, y, a=None, b=None, *, eps, cost="sqeuclidean", x_mask=None, y_mask=None, rho=None,
                        **kwargs):
    """The debiased Sinkhorn divergence ``S = OT(x, y) - OT(x, x) / 2 - OT(y, y) / 2`` (Feydy et al.,
    AISTATS 2019), plus ``eps (|a| - |b|)^2 / 2`` when unbalanced (geomloss' convention); differentiable
    like :func:`sinkhorn` (whose keyword arguments it takes)."""
    xy = sinkhorn(x, y, a, b, eps=eps, cost=cost, x_mask=x_mask, y_mask=y_mask, rho=rho, **kwargs)
    xx = sinkhorn(x, x, a, a, eps=eps, cost=cost, x_mask=x_mask, y_mask=x_mask, rho=rho, **kwargs)
    yy = sinkhorn(y, y, b, b, eps=eps, cost=cost, x_mask=y_mask, y_mask=y_mask, rho=rho, **kwargs)
    s = xy.value - 0.5 * (xx.value + yy.value)
    if rho is not None and not math.isinf(rho):
        pa, pb = xy._problem.log_a.exp().sum(1), xy._problem.log_b.exp().sum(1)
        extra = 0.5 * eps * (pa - pb) ** 2
        s = s + (extra[0] if xy._problem.unbatched else extra)
    return s

