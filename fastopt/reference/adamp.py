"""Reference AdamP and SGDP steps (Heo et al., "AdamP: Slowing Down the Slowdown for Momentum Optimizers
on Scale-invariant Weights", ICLR 2021).

Match ``pytorch_optimizer.AdamP`` / ``pytorch_optimizer.SGDP`` (4.1.0; per-parameter and foreach paths)
on fp32 tensors, and the official ``adamp`` package (``adamp.AdamP`` / ``adamp.SGDP`` 0.3.0) up to the
two differences between the packages listed below.

Projection (both optimizers, only for ``p.dim() > 1``), with the "channel view" rows r = 0..p.shape[0]-1
(row r = ``p[r].flatten()``, length ``L = numel / p.shape[0]``) and the "layer view" (one row of length
``numel``); ``d`` is the step direction (AdamP: ``perturb``, SGDP: ``d_p``)::

    cos_r   = |<g_r, p_r>| / (max(||g_r||, eps) max(||p_r||, eps))        (torch.cosine_similarity)
    channel = max_r cos_r < fp32(delta / sqrt(L))
    layer   = |<g, p>| / (max(||g||, eps) max(||p||, eps)) < fp32(delta / sqrt(numel))
    if channel:  d_r <- d_r - p_r / (||p_r|| + eps) * <p_r, d_r> / (||p_r|| + eps)   (each row)
    elif layer:  d   <- d   - p   / (||p||   + eps) * <p, d>     / (||p||   + eps)
    ratio   = wd_ratio if (channel or layer) else 1                     (1 for 1-D tensors)

torch 2.13's ``cosine_similarity`` is ``sum((x / max(||x||, eps)) * (y / max(||y||, eps)))``; written
via the sums it is the expression above (equal up to rounding).  The comparison is in fp32 because the
Python threshold is cast to the tensor's dtype.

AdamP, with t = step + 1, per-step fp64 scalars ``step_size = lr / (1 - b1^t)`` (``lr`` if
``adam_debias``) and ``bc2_sqrt = sqrt(1 - b2^t)``::

    g = centralize(g)                                                   (use_gc, 2+-dim tensors)
    m = m + (1 - b1)(g - m)        v = b2 v + (1 - b2) g^2             (torch.lerp's formula, see _lerp)
    num = m * cautious_mask(m, g)  if cautious, else m                  (fastopt.reference._common)
    perturb = (nesterov ? lerp(num, g, 1 - b1) : num) * (bc2_sqrt / (sqrt(v) + eps))
    perturb <- projection(perturb)
    p = p (1 - wd (fixed_decay ? 1 : lr) ratio)  -  step_size perturb

SGDP::

    buf = momentum buf + (1 - dampening) g                        (state "momentum"; starts at 0)
    d_p = nesterov ? momentum buf + g : buf
    d_p <- projection(d_p)                                        (a copy: buf itself is not projected)
    p = p (1 - wd (fixed_decay ? 1 : lr) ratio / (1 - momentum))  -  lr d_p

Phase split (what a fused kernel does), per tensor with ``p.dim() > 1`` (1-D tensors need no phase A:
they run phase B with ``projected = False``):

* phase A, per element: update and store the moments (``m``, ``v`` / ``buf``) and form ``d``; per row r
  accumulate ``S_gp[r] = <g_r, p_r>``, ``S_gg[r] = ||g_r||^2``, ``S_pp[r] = ||p_r||^2``,
  ``S_pd[r] = <p_r, d_r>`` (``p`` is not written).  See :func:`projection_row_sums`.
* between phases (:func:`projection_coefficients`): ``cos_r``, ``channel``, ``layer`` as above from the
  row sums and their totals; per row ``den[r] = sqrt(S_pp[r]) + eps`` and ``radial[r] = S_pd[r] / den[r]``
  if channel, else ``den[r] = sqrt(sum S_pp) + eps`` and ``radial[r] = sum S_pd / den[r]``;
  ``projected = channel | layer`` (0-dim bool, no sync); ``decay = fp32(1 - wd_eff * ratio)``.
* phase B, per element: re-read the stored moments, ``g`` and ``p``; recompute ``d``;
  ``d <- d - (p / den[r]) radial[r]`` if projected; ``p = p decay - step d``.
* tensors with fewer than two dimensions: one pass (moments, ``d`` in fp32, ``p = p decay - step d``).

State: AdamP ``ADAMP_STATE_NAMES = ("exp_avg", "exp_avg_sq")`` (``STATE_NAMES`` is this one), SGDP
``SGDP_STATE_NAMES = ("momentum",)``; both plus ``state["step"]``.  No per-tensor scalar state.

Unsupported (``ValueError``):

* ``weight_decouple=False`` with ``weight_decay != 0``: upstream adds ``wd p`` to the gradient *after*
  the gradient has been used (moments and projection are done), so L2 decay has no effect on the step
  at all -- it only mutates ``p.grad``.  Use decoupled decay (the paper's and the official package's);
* AdamP's ``adanorm`` (a per-tensor norm EMA);
* SGDP with ``momentum == 1`` and weight decay (upstream divides by ``1 - momentum``);
* complex parameters, sparse gradients.

Differences between the two upstream packages (this reference follows pytorch_optimizer):

* AdamP's denominator: pytorch_optimizer ``(sqrt(v) + eps) / sqrt(1 - b2^t)``, official
  ``sqrt(v) / sqrt(1 - b2^t) + eps`` (the paper's).  Below rounding for the default eps = 1e-8 and
  ordinary gradients, visible for large eps;
* official SGDP without nesterov aliases ``d_p = buf`` and projects it in place, so with momentum > 0 its
  momentum buffer is projected too (not in the paper's algorithm); pytorch_optimizer projects a copy.

Deliberate differences from upstream: math is fp32 whatever the storage dtype; the step counter is a
per-tensor fp32 0-dim tensor (pytorch_optimizer: per group int); gradients are never written to;
``<p, d>`` is summed before dividing by ``||p|| + eps`` (upstream divides ``p`` first) -- equal up to
rounding.
"""
import math

import torch

from ._common import cautious_mask, centralize, check_inputs, init_state, prepare_grad, skipped

ADAMP_STATE_NAMES = ("exp_avg", "exp_avg_sq")
SGDP_STATE_NAMES = ("momentum",)
STATE_NAMES = ADAMP_STATE_NAMES


def adamp_init_state(p, state, group=None):
    """Fill the empty state dict of ``p`` for AdamP: fp32 step counter and zeroed ``exp_avg``,
    ``exp_avg_sq``."""
    init_state(p, state, ADAMP_STATE_NAMES)


def sgdp_init_state(p, state, group=None):
    """Fill the empty state dict of ``p`` for SGDP: fp32 step counter and a zeroed ``momentum``."""
    init_state(p, state, SGDP_STATE_NAMES)


def _lerp(a, b, w):
    """``torch.lerp(a, b, w)`` for a Python float weight, with torch's two formulas."""
    if w < 0.5:
        return a + w * (b - a)
    return b - (b - a) * (1.0 - w)


def projection_row_sums(p32, g, d):
    """Phase A sums of one tensor (``dim() > 1``), fp32, shape ``[rows, 4]``: per row
    ``(<g, p>, ||g||^2, ||p||^2, <p, d>)`` with rows = ``p.shape[0]``."""
    rows = p32.shape[0]
    pr, gr, dr = p32.reshape(rows, -1), g.reshape(rows, -1), d.reshape(rows, -1)
    return torch.stack([(gr * pr).sum(1), (gr * gr).sum(1), (pr * pr).sum(1), (pr * dr).sum(1)], dim=1)


def _cos(s_gp, s_gg, s_pp, eps):
    return (s_gp / (s_gg.sqrt().clamp_min(eps) * s_pp.sqrt().clamp_min(eps))).abs()


def projection_coefficients(sums, numel, *, delta, eps):
    """Between phases: from the ``[rows, 4]`` sums return ``(den, radial, projected, channel)``: per-row
    fp32 ``den`` and ``radial`` (``d_r <- d_r - p_r / den[r] * radial[r]`` when ``projected``), and
    0-dim bools ``projected`` (channel or layer) and ``channel``.  No host sync."""
    rows = sums.shape[0]
    s_gp, s_gg, s_pp, s_pd = sums.unbind(1)
    thr_c = torch.tensor(delta / math.sqrt(numel // rows), dtype=torch.float32, device=sums.device)
    thr_l = torch.tensor(delta / math.sqrt(numel), dtype=torch.float32, device=sums.device)
    channel = _cos(s_gp, s_gg, s_pp, eps).max() < thr_c
    layer = _cos(s_gp.sum(), s_gg.sum(), s_pp.sum(), eps) < thr_l
    den = torch.where(channel, s_pp.sqrt(), s_pp.sum().sqrt()) + eps
    radial = torch.where(channel, s_pd, s_pd.sum()) / den
    return den, radial, channel | layer, channel


def _project(p32, d, den, radial, projected):
    """Phase B: ``d - (p / den[r]) radial[r]`` where projected, else ``d``."""
    shape = [-1] + [1] * (p32.dim() - 1)
    return torch.where(projected, d - (p32 / den.view(shape)) * radial.view(shape), d)


def _check(name, params, grads, states, state_names, *, weight_decay, weight_decouple, extra):
    for opt, on in extra.items():
        if on:
            raise ValueError(f"{name} reference: {opt} is not supported")
    if not weight_decouple and weight_decay != 0.0:
        raise ValueError(f"{name} reference: weight_decouple=False is not supported (upstream adds wd*p to the "
                         "gradient after it has been used, so its L2 decay does not change the step); use "
                         "decoupled weight decay")
    check_inputs(name, params, grads, states, ("step",) + state_names, "call the init_state function first")


def _projected_step(p, d_of, g, st, *, delta, eps, wd_eff, wd_ratio, step_size, phase_a_d):
    """Shared between-phase and phase-B logic.  ``phase_a_d`` is phase A's direction, ``d_of()``
    recomputes it in phase B from the stored state; ``wd_eff`` (fp64 tensor) is the decay per unit ratio."""
    p32 = p.float()
    if p.dim() > 1 and p.numel() > 0:
        sums = projection_row_sums(p32, g, phase_a_d)
        den, radial, projected, _ = projection_coefficients(sums, p.numel(), delta=delta, eps=eps)
        ratio = torch.where(projected, torch.tensor(wd_ratio, dtype=torch.float64, device=p.device),
                            torch.tensor(1.0, dtype=torch.float64, device=p.device))
    else:
        projected = None
        ratio = torch.tensor(1.0, dtype=torch.float64, device=p.device)
    decay = (1.0 - wd_eff * ratio).float()
    # phase B (tensors of fewer than two dimensions have no phase B in the kernels: they step in one pass
    # with the fp32 direction of phase A, not one recomputed from the stored, possibly bf16, moments)
    d = d_of() if projected is not None else phase_a_d
    p32 = p.float()
    if projected is not None:
        d = _project(p32, d, den, radial, projected)
    p.copy_(p32 * decay - step_size * d)


def adamp_reference(params, grads, states, *, lr, betas=(0.9, 0.999), weight_decay=0.0, weight_decouple=True,
                    fixed_decay=False, delta=0.1, wd_ratio=0.1, nesterov=False, eps=1e-8, adam_debias=False,
                    use_gc=False, cautious=False, adanorm=False, maximize=False, grad_scale=None,
                    found_inf=None):
    """One AdamP step, in place (equations and phase split: module docstring).  ``states[i]`` is the
    state dict of ``params[i]``; ``lr`` may be a float or a 0-dim tensor; if ``found_inf`` is nonzero
    nothing changes."""
    _check("AdamP", params, grads, states, ADAMP_STATE_NAMES, weight_decay=weight_decay,
           weight_decouple=weight_decouple, extra=dict(adanorm=adanorm))
    if len(betas) != 2:
        raise ValueError(f"AdamP takes two betas, got {betas!r}")
    if skipped(found_inf):
        return
    beta1, beta2 = float(betas[0]), float(betas[1])
    eps, wd = float(eps), float(weight_decay)
    for p, grad, st in zip(params, grads, states):
        device = p.device
        t = st["step"].to(device=device, dtype=torch.float64) + 1.0
        lr64 = torch.as_tensor(lr, dtype=torch.float64, device=device)
        b1 = torch.tensor(beta1, dtype=torch.float64, device=device)
        b2 = torch.tensor(beta2, dtype=torch.float64, device=device)
        step_size = (lr64 if adam_debias else lr64 / (1.0 - torch.pow(b1, t))).float()
        bc2_sqrt = torch.sqrt(1.0 - torch.pow(b2, t)).float()
        wd_eff = wd * (torch.ones_like(lr64) if fixed_decay else lr64)

        def direction(m, v, g):
            inv = (1.0 / (v.sqrt() + eps)) * bc2_sqrt
            num = m * cautious_mask(m, g) if cautious else m
            return (_lerp(num, g, 1.0 - beta1) if nesterov else num) * inv

        def grad_of(grad):
            g = prepare_grad(grad, maximize, grad_scale)
            return centralize(g) if use_gc else g

        # phase A: moments, direction (sums taken in _projected_step)
        g = grad_of(grad)
        m = _lerp(st["exp_avg"].float(), g, 1.0 - beta1)
        v = beta2 * st["exp_avg_sq"].float() + (1.0 - beta2) * g * g
        d = direction(m, v, g)
        st["exp_avg"].copy_(m)
        st["exp_avg_sq"].copy_(v)

        def d_of(grad=grad, st=st, direction=direction, grad_of=grad_of):
            return direction(st["exp_avg"].float(), st["exp_avg_sq"].float(), grad_of(grad))

        _projected_step(p, d_of, g, st, delta=delta, eps=eps, wd_eff=wd_eff, wd_ratio=float(wd_ratio),
                        step_size=step_size, phase_a_d=d)
        st["step"].add_(1)


def sgdp_reference(params, grads, states, *, lr, momentum=0.0, dampening=0.0, weight_decay=0.0,
                   weight_decouple=True, fixed_decay=False, delta=0.1, wd_ratio=0.1, nesterov=False, eps=1e-8,
                   maximize=False, grad_scale=None, found_inf=None):
    """One SGDP step, in place (equations and phase split: module docstring).  ``states[i]`` is the
    state dict of ``params[i]``; ``lr`` may be a float or a 0-dim tensor; if ``found_inf`` is nonzero
    nothing changes."""
    _check("SGDP", params, grads, states, SGDP_STATE_NAMES, weight_decay=weight_decay,
           weight_decouple=weight_decouple, extra={})
    momentum, dampening = float(momentum), float(dampening)
    wd = float(weight_decay)
    if wd != 0.0 and momentum == 1.0:
        raise ValueError("SGDP reference: momentum=1 with weight decay is not supported (upstream divides the "
                         "decay by 1 - momentum)")
    if skipped(found_inf):
        return
    eps = float(eps)
    for p, grad, st in zip(params, grads, states):
        device = p.device
        lr64 = torch.as_tensor(lr, dtype=torch.float64, device=device)
        wd_eff = (wd / (1.0 - momentum) if wd != 0.0 else 0.0) * (torch.ones_like(lr64) if fixed_decay else lr64)

        def direction(buf, g):
            return buf * momentum + g if nesterov else buf

        # phase A: momentum buffer, direction (sums taken in _projected_step)
        g = prepare_grad(grad, maximize, grad_scale)
        buf = st["momentum"].float() * momentum + (1.0 - dampening) * g
        d = direction(buf, g)
        st["momentum"].copy_(buf)

        def d_of(grad=grad, st=st):
            return direction(st["momentum"].float(), prepare_grad(grad, maximize, grad_scale))

        _projected_step(p, d_of, g, st, delta=delta, eps=eps, wd_eff=wd_eff, wd_ratio=float(wd_ratio),
                        step_size=lr64.float(), phase_a_d=d)
        st["step"].add_(1)
