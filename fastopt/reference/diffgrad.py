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
import torch

from ._common import init_state
from .adabelief import adaptive_reference, ams_state_names

STATE_NAMES = ("exp_avg", "exp_avg_sq", "previous_grad", "max_exp_avg_sq")

EXP_AVG_SQ_EPS = 1e-15  # upstream's hard-coded term inside the square root


def diffgrad_init_state(p, state, group=None):
    """Fill the empty state dict of ``p``: an fp32 step counter, zeroed ``exp_avg`` / ``exp_avg_sq`` /
    ``previous_grad``, and a zeroed ``max_exp_avg_sq`` when ``group["ams_bound"]``."""
    init_state(p, state, ams_state_names(STATE_NAMES, group is not None and bool(group.get("ams_bound", False))))


def diffgrad_reference(params, grads, states, *, lr, betas=(0.9, 0.999), weight_decay=0.0,
                       weight_decouple=True, fixed_decay=False, rectify=False, n_sma_threshold=5,
                       degenerated_to_sgd=True, ams_bound=False, eps=1e-8, adam_debias=False, adanorm=False,
                       maximize=False, grad_scale=None, found_inf=None):
    """One diffGrad step, in place (conventions: :mod:`fastopt.reference._common`).

    Per tensor, with b1, b2 = betas: ``(_, step_size, adaptive, sgd)`` from
    :func:`.adabelief.rectified_step_sizes` (``fold_bc2=True``: without rectify, ``step_size = lr
    sqrt(1 - b2^t) / (1 - b1^t)``; neither adaptive nor sgd: the states still update, p does not move),
    then, in this order::

        p, g = weight_decay_step(p, g, ...)  # decoupled p (1 - wd (fixed_decay ? 1 : lr)), or L2
        m   = m + (1 - b1)(g - m)                          # exp_avg
        v   = b2 v + (1 - b2) g g                          # exp_avg_sq
        vmax = max(vmax, v); v' = vmax     if ams_bound    # max_exp_avg_sq, else v' = v
        denom = sqrt(v' + 1e-15) + eps
        dfc = sigmoid(|previous_grad - g|)
        p   = p - step_size ((dfc m) / denom)   if adaptive
        p   = p - step_size m                   if sgd
        previous_grad = g
        step = t

    ``lr`` may be a 0-dim tensor.
    """
    def second_moment(g, m, st, beta2):
        return beta2 * st["exp_avg_sq"].float() + (1.0 - beta2) * g * g

    def direction(g, m, vd, st, c2):
        denom = (vd + EXP_AVG_SQ_EPS).sqrt() + eps
        dfc = torch.sigmoid((st["previous_grad"].float() - g).abs())
        return (dfc * m) / denom

    def after(st, g):
        st["previous_grad"].copy_(g)

    adaptive_reference("DiffGrad", params, grads, states, STATE_NAMES, second_moment, direction, lr=lr, betas=betas,
                       weight_decay=weight_decay, weight_decouple=weight_decouple, fixed_decay=fixed_decay,
                       rectify=rectify, n_sma_threshold=n_sma_threshold, degenerated_to_sgd=degenerated_to_sgd,
                       ams_bound=ams_bound, adam_debias=adam_debias, adanorm=adanorm, maximize=maximize,
                       grad_scale=grad_scale, found_inf=found_inf, fold_bc2=True, after=after)
