"""Pure-PyTorch references for entropic optimal transport: the executable spec of the Sinkhorn kernels.

Problem (balanced): for weights ``a`` (n) and ``b`` (m), a cost ``C`` (n x m) and ``eps > 0``,

    OT_eps(a, b) = min_{P >= 0, P 1 = a, P^T 1 = b}  <P, C> + eps * KL(P | a (x) b).

The plan is the same as POT's ``ot.sinkhorn`` (whose entropy term is ``sum P log P``: the two differ by
a constant on the feasible set).  Dual potentials ``f`` (n) and ``g`` (m), in cost units, with the plan

    P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps),

and at the optimum ``OT_eps = <a, f> + <b, g>`` (geomloss' convention).  POT's log scalings are
``log_u = log a + f / eps`` and ``log_v = log b + g / eps``.

One Sinkhorn iteration (log domain, the order of POT's ``sinkhorn_log``: g first):

    g_j = -tau_b * eps * LSE_i(log a_i + (f_i - C_ij) / eps)
    f_i = -tau_a * eps * LSE_j(log b_j + (g_j - C_ij) / eps)

with ``tau = rho / (rho + eps)`` for the unbalanced problem whose marginal constraints are replaced by
``rho * KL(P 1 | a) + rho * KL(P^T 1 | b)`` (POT's ``ot.unbalanced.sinkhorn_unbalanced`` with
``reg_type="kl"``, ``reg_m=rho``), and ``tau = 1`` for the balanced one.

Padding (ragged batches): an entry with weight 0 (``log a = -inf``) carries no mass; its potential is
reported as 0.
"""
import math

import torch

__all__ = ["sqeuclidean_cost", "euclidean_cost", "cost_matrix", "lse_reference", "softmin_reference",
           "sinkhorn_reference", "marginal_error"]


def sqeuclidean_cost(x, y):
    """``C_ij = |x_i - y_j|^2`` (POT's ``ot.dist`` default; geomloss' ``p=2`` cost is half of it), in fp64
    when the inputs are fp64 and fp32 otherwise; batched over leading dimensions."""
    xf, yf = _wide(x), _wide(y)
    return ((xf[..., :, None, :] - yf[..., None, :, :]) ** 2).sum(-1)


def euclidean_cost(x, y):
    """``C_ij = |x_i - y_j|`` (``ot.dist(metric="euclidean")``, geomloss' ``p=1``)."""
    return sqeuclidean_cost(x, y).sqrt()


def cost_matrix(x, y, cost):
    if cost == "sqeuclidean":
        return sqeuclidean_cost(x, y)
    if cost == "euclidean":
        return euclidean_cost(x, y)
    raise ValueError(f"unknown cost {cost!r} (expected 'sqeuclidean' or 'euclidean')")


def _wide(t):
    return t if t.dtype == torch.float64 else t.float()


def lse_reference(C, h, eps):
    """``out_i = LSE_j(h_j - C_ij / eps)`` over the last axis of ``C`` (..., n, m), ``h`` (..., m);
    ``-inf`` where every term is ``-inf``."""
    return torch.logsumexp(h[..., None, :] - C / eps, dim=-1)


def softmin_reference(C, w, g, eps):
    """The weighted soft-minimum ``out_i = -eps log(sum_j w_j exp((g_j - C_ij) / eps) / sum_j w_j)`` over
    the last axis of ``C`` (..., n, m), for weights ``w`` (..., m) (>= 0, at least one > 0; 0: no mass)
    and a potential ``g`` (..., m), in cost units.

    This is ``-eps LSE_j(log w_j + (g_j - C_ij) / eps) + eps log sum_j w_j``, evaluated without the
    cancellation that ruins it when ``eps`` is large against the costs: with ``d_ij = C_ij - g_j`` and
    ``d_i = min_j d_ij`` (over ``w_j > 0``), ``x_ij = (d_i - d_ij) / eps <= 0``,
    ``S_i = sum_j w_j exp(x_ij)`` and ``T_i = sum_j w_j expm1(x_ij) = S_i - W`` (``W = sum_j w_j``),

        out_i = d_i - eps * (log1p(T_i / W) if T_i / W > -1/2 else log(S_i / W)).

    Every term is then relative to quantities of the size of the costs, so fp32 is accurate for any
    ``eps`` (``log w + (g - C) / eps`` in fp32 drops ``(g - C) / eps`` once it is below 1e-7 |log w|)."""
    valid = (w > 0)[..., None, :]
    d = torch.where(valid, C - g[..., None, :], math.inf)
    dmin = d.amin(dim=-1, keepdim=True)
    x = torch.where(valid, (dmin - d) / eps, -math.inf)
    wj = w[..., None, :]
    W = w.sum(dim=-1)[..., None, None]
    S = (wj * torch.exp(x)).sum(dim=-1, keepdim=True)
    T = (torch.where(valid, wj * torch.expm1(x), 0.0)).sum(dim=-1, keepdim=True)
    r = T / W
    L = torch.where(r > -0.5, torch.log1p(torch.clamp(r, min=-0.5)), torch.log(S / W))
    return (dmin - eps * L).squeeze(-1)


def marginal_error(C, log_a, log_b, f, g, eps):
    """``|P^T 1 - b|_2`` per batch entry (POT's ``sinkhorn_log`` stopping criterion)."""
    logp = log_a[..., :, None] + log_b[..., None, :] + (f[..., :, None] + g[..., None, :] - C) / eps
    col = torch.exp(torch.logsumexp(logp, dim=-2))
    return torch.linalg.vector_norm(col - log_b.exp(), dim=-1)


def sinkhorn_reference(C, log_a, log_b, eps, *, n_iter=1000, tol=1e-9, check_every=10, rho=None, f=None, g=None):
    """Log-domain Sinkhorn on a dense cost ``C`` (..., n, m) with log weights ``log_a`` (..., n) and
    ``log_b`` (..., m); returns ``(f, g, iterations, error)``.

    Iterates until the error (checked every ``check_every`` iterations and after the last one) is
    below ``tol`` for every batch entry, or ``n_iter`` iterations.  The error is the marginal error
    (:func:`marginal_error`) when balanced; when unbalanced (``rho``: KL marginals of that strength)
    it is the largest change of ``f / eps`` and ``g / eps`` in the last iteration (the log scalings,
    as POT's ``sinkhorn_unbalanced`` measures it).  ``f``/``g``: warm start.
    """
    tau = 1.0 if rho is None or math.isinf(rho) else rho / (rho + eps)
    shape_f, shape_g = C.shape[:-1], C.shape[:-2] + C.shape[-1:]
    f = torch.zeros(shape_f, dtype=C.dtype, device=C.device) if f is None else f.to(C.dtype).clone()
    g = torch.zeros(shape_g, dtype=C.dtype, device=C.device) if g is None else g.to(C.dtype).clone()
    CT = C.transpose(-1, -2)
    it, err = 0, torch.full(C.shape[:-2], math.inf, dtype=C.dtype, device=C.device)
    while it < n_iter:
        f_prev, g_prev = f, g
        g = -tau * eps * lse_reference(CT, log_a + f / eps, eps)
        f = -tau * eps * lse_reference(C, log_b + g / eps, eps)
        it += 1
        if it % check_every == 0 or it == n_iter:
            if tau == 1.0:
                err = marginal_error(C, log_a, log_b, f, g, eps)
            else:
                err = torch.maximum(_change(f, f_prev, log_a), _change(g, g_prev, log_b)) / eps
            if bool((err < tol).all()):
                break
    f = torch.where(torch.isfinite(log_a), f, 0.0)
    g = torch.where(torch.isfinite(log_b), g, 0.0)
    return f, g, it, err


def _change(new, old, log_w):
    d = torch.where(torch.isfinite(log_w), (new - old).abs(), 0.0)
    return d.amax(dim=-1)
