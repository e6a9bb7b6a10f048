"""Reference AdaBelief step (Zhuang et al., "AdaBelief Optimizer: Adapting Stepsizes by the Belief in
Observed Gradients", NeurIPS 2020).

Matches ``pytorch_optimizer.AdaBelief`` (4.1.0; per-parameter and foreach paths) on fp32 tensors,
including ``rectify`` (RAdam-style, with ``n_sma_threshold`` and ``degenerated_to_sgd``),
``ams_bound`` (AMSGrad on the belief term), L2 / decoupled / fixed decoupled weight decay,
``adam_debias`` (an upstream group option passed through ``**kwargs``) and ``maximize``.

``adabelief_pytorch.AdaBelief`` (0.2.x) is the same algorithm with ``amsgrad`` for ``ams_bound``, a
fixed threshold of 5, and different defaults (``rectify=True``); it agrees with this reference except
for ``rectify=True`` together with ``amsgrad=True``: in its rectified branch it divides by
``sqrt(exp_avg_var)``, ignoring ``max_exp_avg_var`` (pytorch_optimizer and this reference use the
maximum there too).

As in the paper's Algorithm 2 (and both upstreams), ``eps`` enters twice: it is added to the stored
``exp_avg_var`` every step (before bias correction) and again to the denominator.

State: ``exp_avg``, ``exp_avg_var`` and, only when ``ams_bound``, ``max_exp_avg_var`` (as upstream;
:func:`adabelief_init_state` reads ``group["ams_bound"]``).

Unsupported (``ValueError``): ``adanorm`` (a per-tensor norm EMA), complex parameters, sparse
gradients.  ``foreach`` is an upstream implementation switch only.

Deliberate differences from upstream: math is always fp32 whatever the storage dtype; the step
counter is a per-tensor fp32 0-dim tensor (upstream: a per-group int); gradients are never written to
(upstream adds the L2 term to ``p.grad`` in place and negates it in place for ``maximize``).
"""
import math

import torch

from ._common import check_inputs, decayed_inputs, init_state, skipped

STATE_NAMES = ("exp_avg", "exp_avg_var", "max_exp_avg_var")


def adabelief_init_state(p, state, group=None):
    """Fill the empty state dict of ``p``: an fp32 step counter, zeroed ``exp_avg`` / ``exp_avg_var``,
    and a zeroed ``max_exp_avg_var`` when ``group["ams_bound"]``."""
    init_state(p, state, ams_state_names(STATE_NAMES, group is not None and bool(group.get("ams_bound", False))))


def ams_state_names(names, ams_bound):
    """``names`` with its last entry (the AMSGrad maximum, as pytorch_optimizer keeps it) only when
    ``ams_bound``."""
    return names if ams_bound else names[:-1]


def rectify_step_size(step, lr, beta2, n_sma_threshold, degenerated_to_sgd):
    """RAdam rectification as pytorch_optimizer computes it (fp64): returns ``(lr * rt, n_sma)``.

    ``rt`` is the variance rectification term (which already contains ``sqrt(1 - beta2^t)``) when
    ``n_sma >= n_sma_threshold``, else 1 (``degenerated_to_sgd``) or -1 (no parameter update).
    """
    n_sma_max = 2.0 / (1.0 - beta2) - 1.0
    beta2_t = beta2 ** step
    n_sma = n_sma_max - 2 * step * beta2_t / (1.0 - beta2_t)
    if n_sma >= n_sma_threshold:
        rt2 = (1.0 - beta2_t) * (n_sma - 4) / (n_sma_max - 4) * (n_sma - 2) / n_sma * n_sma_max / (n_sma_max - 2)
        if rt2 < 0.0:
            # Upstream dies here with "math domain error" (n_sma_threshold < 4 and 2 < n_sma < 4).
            raise ValueError(f"rectify: n_sma = {n_sma:.4g} >= n_sma_threshold = {n_sma_threshold} but < 4 at "
                             f"step {step:g}, so the rectification term is undefined; use n_sma_threshold >= 4")
        rt = math.sqrt(rt2)
    elif degenerated_to_sgd:
        rt = 1.0
    else:
        rt = -1.0
    return lr * rt, n_sma


def check_adaptive(name, params, grads, states, state_names, *, betas, ams_bound, adanorm):
    """The argument checks of AdaBelief and diffGrad (``name``; its init function is
    ``<name lowercased>_init_state``)."""
    if len(betas) != 2:
        raise ValueError(f"{name} takes two betas, got {betas!r}")
    if adanorm:
        raise ValueError(f"{name} reference: adanorm is not supported")
    check_inputs(name, params, grads, states, ("step",) + ams_state_names(state_names, ams_bound),
                 f"call {name.lower()}_init_state (with ams_bound in the group) first")


def rectified_step_sizes(states, lr, beta1, beta2, *, rectify, n_sma_threshold, degenerated_to_sgd, adam_debias,
                         fold_bc2):
    """Per tensor (t = its step + 1), computed before anything is written so that an invalid
    rectification raises first: ``(c2, step_size, adaptive, sgd)``::

        if rectify:  step_size, n_sma = lr * rt(t), n_sma(t)   (rectify_step_size; rt holds sqrt(1 - b2^t))
                     c2 = 1
        elif fold_bc2:  step_size = lr sqrt(1 - b2^t);  c2 = 1
        else:        step_size = lr;  c2 = sqrt(1 - b2^t)
        step_size /= 1 - b1^t                                 unless adam_debias
        adaptive = not rectify or n_sma >= n_sma_threshold;  sgd = not adaptive and step_size > 0
    """
    coefs = []
    for st in states:
        t = st["step"].item() + 1.0
        c2 = 1.0
        if rectify:
            step_size, n_sma = rectify_step_size(t, lr, beta2, n_sma_threshold, degenerated_to_sgd)
        elif fold_bc2:
            step_size, n_sma = lr * math.sqrt(1.0 - beta2 ** t), 0.0
        else:
            step_size, n_sma = lr, 0.0
            c2 = math.sqrt(1.0 - beta2 ** t)
        if not adam_debias:
            step_size = step_size / (1.0 - beta1 ** t)
        adaptive = not rectify or n_sma >= n_sma_threshold
        sgd = not adaptive and step_size > 0
        coefs.append((c2, step_size, adaptive, sgd))
    return coefs


def adabelief_reference(params, grads, states, *, lr, betas=(0.9, 0.999), weight_decay=0.0,
                        weight_decouple=True, fixed_decay=False, rectify=False, n_sma_threshold=5,
                        degenerated_to_sgd=True, ams_bound=False, eps=1e-16, adam_debias=False,
                        adanorm=False, maximize=False, grad_scale=None, found_inf=None):
    """One AdaBelief step, in place (conventions: :mod:`fastopt.reference._common`).

    Per tensor, with b1, b2 = betas: ``(c2, step_size, adaptive, sgd)`` from
    :func:`rectified_step_sizes` (``fold_bc2=False``; neither adaptive nor sgd: the states still update,
    p does not move), then, in this order::

        p, g = weight_decay_step(p, g, ...)                # decoupled p (1 - wd (fixed_decay ? 1 : lr)), or L2
        m  = m + (1 - b1)(g - m)                           # exp_avg
        r  = g - m
        s  = b2 s + (1 - b2) r r + eps                     # exp_avg_var (eps stored, as upstream)
        smax = max(smax, s); s' = smax     if ams_bound    # max_exp_avg_var, else s' = s
        denom = sqrt(s') / c2 + eps
        p  = p - step_size (m / denom)     if adaptive
        p  = p - step_size m               if sgd
        step = t

    ``lr`` may be a 0-dim tensor.
    """
    def second_moment(g, m, st, beta2):
        r = g - m
        return beta2 * st["exp_avg_var"].float() + (1.0 - beta2) * r * r + eps

    def direction(g, m, sd, st, c2):
        return m / (sd.sqrt() / c2 + eps)

    adaptive_reference("AdaBelief", params, grads, states, STATE_NAMES, second_moment, direction, lr=lr, betas=betas,
                       weight_decay=weight_decay, weight_decouple=weight_decouple, fixed_decay=fixed_decay,
                       rectify=rectify, n_sma_threshold=n_sma_threshold, degenerated_to_sgd=degenerated_to_sgd,
                       ams_bound=ams_bound, adam_debias=adam_debias, adanorm=adanorm, maximize=maximize,
                       grad_scale=grad_scale, found_inf=found_inf, fold_bc2=False)


def adaptive_reference(name, params, grads, states, state_names, second_moment, direction, *, lr, betas,
                       weight_decay, weight_decouple, fixed_decay, rectify, n_sma_threshold, degenerated_to_sgd,
                       ams_bound, adam_debias, adanorm, maximize, grad_scale, found_inf, fold_bc2, after=None):
    """The step AdaBelief and diffGrad share (pytorch_optimizer's structure of both), per tensor::

        (c2, step_size, adaptive, sgd) = rectified_step_sizes(..., fold_bc2)
        p, g = weight_decay_step(p, g, ...)
        m  = m + (1 - b1)(g - m)                           # state_names[0]
        s  = second_moment(g, m, state, b2)                # state_names[1]
        smax = max(smax, s); s' = smax     if ams_bound    # state_names[-1], else s' = s
        p  = p - step_size direction(g, m, s', state, c2)  if adaptive
        p  = p - step_size m               if sgd
        after(state, g)                                    (then the writes; step = t)
    """
    check_adaptive(name, params, grads, states, state_names, betas=betas, ams_bound=ams_bound, adanorm=adanorm)
    if skipped(found_inf):
        return
    beta1, beta2 = (float(b) for b in betas)
    lr = float(lr)
    coefs = rectified_step_sizes(states, lr, beta1, beta2, rectify=rectify, n_sma_threshold=n_sma_threshold,
                                 degenerated_to_sgd=degenerated_to_sgd, adam_debias=adam_debias, fold_bc2=fold_bc2)
    first, second, ams = state_names[0], state_names[1], state_names[-1]
    for p, grad, st, (c2, step_size, adaptive, sgd) in zip(params, grads, states, coefs):
        p32, g = decayed_inputs(p, grad, maximize=maximize, grad_scale=grad_scale, weight_decay=weight_decay,
                                weight_decouple=weight_decouple, fixed_decay=fixed_decay, lr=lr)
        m = st[first].float()
        m = m + (1.0 - beta1) * (g - m)
        s = second_moment(g, m, st, beta2)
        sd = s
        if ams_bound:
            sd = torch.maximum(st[ams].float(), s)
            st[ams].copy_(sd)
        if adaptive:
            p32 = p32 - step_size * direction(g, m, sd, st, c2)
        elif sgd:
            p32 = p32 - step_size * m

        p.copy_(p32)
        st[first].copy_(m)
        st[second].copy_(s)
        if after is not None:
            after(st, g)
        st["step"].add_(1)
