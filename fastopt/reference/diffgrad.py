"""Reference diffGrad step (Dubey et al., "diffGrad: An Optimization Method for Convolutional Neural
Networks", IEEE TNNLS 2019, arXiv:1909.11015).

Matches ``pytorch_optimizer.DiffGrad`` (4.1.0; per-parameter and foreach paths) on fp32 tensors,
including ``rectify`` (RAdam-style, with ``n_sma_threshold`` / ``degenerated_to_sgd``), ``ams_bound``,
L2 / decoupled / fixed decoupled weight decay, ``adam_debias`` (an upstream group option passed
through ``**kwargs``) and ``maximize``.

The diffGrad friction coefficient is ``sigmoid(|g_{t-1} - g_t|)``; ``previous_grad`` starts at zero
(as in the paper's code and upstream), so the first step uses ``sigmoid(|g_1|)``.  The stored
``previous_grad`` is the gradient *after* maximize negation and the L2 term, as upstream stores it.

Upstream's eps placement (kept here): without ``rectify`` the second-moment bias correction is folded
into the step size, ``lr sqrt(1 - b2^t) / (1 - b1^t)``, and the denominator is
``sqrt(v + 1e-15) + eps`` (a hard-coded 1e-15 inside the root), i.e. eps is not bias-corrected as in
AdaBelief/Adan.  With ``rectify`` the step size is ``lr rt / (1 - b1^t)``.

State: ``exp_avg``, ``exp_avg_sq``, ``previous_grad`` and, only when ``ams_bound``,
``max_exp_avg_sq`` (as upstream; :func:`diffgrad_init_state` reads ``group["ams_bound"]``).

Unsupported (``ValueError``): ``adanorm`` (a per-tensor norm EMA), complex parameters, sparse
gradients.  ``foreach`` is an upstream implementation switch only.

Deliberate differences from upstream: math is always fp32 whatever the storage dtype; the step
counter is a per-tensor fp32 0-dim tensor (upstream: a per-group int); gradients are never written to
(upstream adds the L2 term to ``p.grad`` in place and negates it in place for ``maximize``).
"""
import math

import torch

from .adabelief import rectify_step_size
from .lion import prepare_grad, skipped, weight_decay_step

STATE_NAMES = ("exp_avg", "exp_avg_sq", "previous_grad", "max_exp_avg_sq")

EXP_AVG_SQ_EPS = 1e-15  # upstream's hard-coded term inside the square root


def diffgrad_init_state(p, state, group=None):
    """Fill the empty state dict of ``p``: an fp32 step counter, zeroed ``exp_avg`` / ``exp_avg_sq`` /
    ``previous_grad``, and a zeroed ``max_exp_avg_sq`` when ``group["ams_bound"]``."""
    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
    ams_bound = bool(group.get("ams_bound", False)) if group is not None else False
    for name in STATE_NAMES:
        if name == "max_exp_avg_sq" and not ams_bound:
            continue
        state[name] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _check(params, grads, states, *, betas, ams_bound, adanorm):
    if len(betas) != 2:
        raise ValueError(f"DiffGrad takes two betas, got {betas!r}")
    if adanorm:
        raise ValueError("DiffGrad reference: adanorm is not supported")
    if not (len(params) == len(grads) == len(states)):
        raise ValueError("params, grads and states must have the same length")
    needed = ("step", "exp_avg", "exp_avg_sq", "previous_grad") + (("max_exp_avg_sq",) if ams_bound else ())
    for p, g, st in zip(params, grads, states):
        if torch.is_complex(p):
            raise ValueError("DiffGrad reference: complex parameters are not supported")
        if g.is_sparse:
            raise ValueError("DiffGrad reference: sparse gradients are not supported")
        missing = [n for n in needed if n not in st]
        if missing:
            raise ValueError(f"DiffGrad reference: state is missing {missing}; call diffgrad_init_state "
                             "(with ams_bound in the group) first")


def diffgrad_reference(params, grads, states, *, lr, betas=(0.9, 0.999), weight_decay=0.0,
                       weight_decouple=True, fixed_decay=False, rectify=False, n_sma_threshold=5,
                       degenerated_to_sgd=True, ams_bound=False, eps=1e-8, adam_debias=False, adanorm=False,
                       maximize=False, grad_scale=None, found_inf=None):
    """One diffGrad step, in place.  ``states[i]`` is the state dict of ``params[i]``.

    Per tensor, with t = step + 1, b1, b2 = betas, g the gradient (negated if ``maximize``, divided
    by ``grad_scale`` if given).  Per-step scalars, fp64, rounded to fp32 where they meet tensors::

        if rectify:  step_size, n_sma = lr * rt(t), n_sma(t)   (see adabelief.rectify_step_size)
        else:        step_size = lr * sqrt(1 - b2^t)
        step_size /= 1 - b1^t                                 unless adam_debias
        mode = adaptive  if not rectify or n_sma >= n_sma_threshold
               sgd       elif step_size > 0
               none      otherwise (states still update, p does not move)
        decay = 1 - wd * (1 if fixed_decay else lr)           (weight_decouple)

    element math, in this order::

        p   = p decay                      if weight_decouple and wd != 0
        g   = g + wd p                     if not weight_decouple and wd != 0
        m   = m + (1 - b1)(g - m)                          # exp_avg
        v   = b2 v + (1 - b2) g g                          # exp_avg_sq
        vmax = max(vmax, v); v' = vmax     if ams_bound    # max_exp_avg_sq, else v' = v
        denom = sqrt(v' + 1e-15) + eps
        dfc = sigmoid(|previous_grad - g|)
        p   = p - step_size ((dfc m) / denom)   mode adaptive
        p   = p - step_size m                   mode sgd
        previous_grad = g
        step = t

    If ``found_inf`` is nonzero nothing changes (AMP skipped step).  ``lr`` may be a 0-dim tensor.
    """
    _check(params, grads, states, betas=betas, ams_bound=ams_bound, adanorm=adanorm)
    if skipped(found_inf):
        return
    beta1, beta2 = (float(b) for b in betas)
    lr = float(lr)
    # Per-tensor scalars first, so that an invalid rectification raises before anything is written.
    coefs = []
    for st in states:
        t = st["step"].item() + 1.0
        if rectify:
            step_size, n_sma = rectify_step_size(t, lr, beta2, n_sma_threshold, degenerated_to_sgd)
        else:
            step_size, n_sma = lr * math.sqrt(1.0 - beta2 ** t), 0.0
        if not adam_debias:
            step_size = step_size / (1.0 - beta1 ** t)
        adaptive = not rectify or n_sma >= n_sma_threshold
        sgd = not adaptive and step_size > 0
        coefs.append((step_size, adaptive, sgd))
    for p, grad, st, (step_size, adaptive, sgd) in zip(params, grads, states, coefs):
        p32 = p.float()
        g = prepare_grad(grad, maximize, grad_scale)
        p32, g = weight_decay_step(p32, g, weight_decay, weight_decouple, fixed_decay, lr)

        m = st["exp_avg"].float()
        m = m + (1.0 - beta1) * (g - m)
        v = beta2 * st["exp_avg_sq"].float() + (1.0 - beta2) * g * g
        vd = v
        if ams_bound:
            vd = torch.maximum(st["max_exp_avg_sq"].float(), v)
            st["max_exp_avg_sq"].copy_(vd)
        if adaptive:
            denom = (vd + EXP_AVG_SQ_EPS).sqrt() + eps
            dfc = torch.sigmoid((st["previous_grad"].float() - g).abs())
            p32 = p32 - step_size * ((dfc * m) / denom)
        elif sgd:
            p32 = p32 - step_size * m

        p.copy_(p32)
        st["exp_avg"].copy_(m)
        st["exp_avg_sq"].copy_(v)
        st["previous_grad"].copy_(g)
        st["step"].add_(1)
