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

from .lion import prepare_grad, skipped, weight_decay_step

STATE_NAMES = ("exp_avg", "exp_avg_var", "max_exp_avg_var")


def adabelief_init_state(p, state, group=None):
    """Fill the empty state dict of ``p``: an fp32 step counter, zeroed ``exp_avg`` / ``exp_avg_var``,
    and a zeroed ``max_exp_avg_var`` when ``group["ams_bound"]``."""
    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
    ams_bound = bool(group.get("ams_bound", False)) if group is not None else False
    for name in STATE_NAMES:
        if name == "max_exp_avg_var" and not ams_bound:
            continue
        state[name] = torch.zeros_like(p, memory_format=torch.preserve_format)


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


def _check(params, grads, states, *, betas, ams_bound, adanorm):
    if len(betas) != 2:
        raise ValueError(f"AdaBelief takes two betas, got {betas!r}")
    if adanorm:
        raise ValueError("AdaBelief reference: adanorm is not supported")
    if not (len(params) == len(grads) == len(states)):
        raise ValueError("params, grads and states must have the same length")
    needed = ("step", "exp_avg", "exp_avg_var") + (("max_exp_avg_var",) if ams_bound else ())
    for p, g, st in zip(params, grads, states):
        if torch.is_complex(p):
            raise ValueError("AdaBelief reference: complex parameters are not supported")
        if g.is_sparse:
            raise ValueError("AdaBelief reference: sparse gradients are not supported")
        missing = [n for n in needed if n not in st]
        if missing:
            raise ValueError(f"AdaBelief reference: state is missing {missing}; call adabelief_init_state "
                             "(with ams_bound in the group) first")


def adabelief_reference(params, grads, states, *, lr, betas=(0.9, 0.999), weight_decay=0.0,
                        weight_decouple=True, fixed_decay=False, rectify=False, n_sma_threshold=5,
                        degenerated_to_sgd=True, ams_bound=False, eps=1e-16, adam_debias=False,
                        adanorm=False, maximize=False, grad_scale=None, found_inf=None):
    """One AdaBelief step, in place.  ``states[i]`` is the state dict of ``params[i]``.

    Per tensor, with t = step + 1, b1, b2 = betas, g the gradient (negated if ``maximize``, divided
    by ``grad_scale`` if given).  Per-step scalars, fp64, rounded to fp32 where they meet tensors::

        if rectify:  step_size, n_sma = lr * rt(t), n_sma(t)   (see rectify_step_size)
                     c2 = 1                                   (rt already holds sqrt(1 - b2^t))
        else:        step_size = lr;  c2 = sqrt(1 - b2^t)
        step_size /= 1 - b1^t                                 unless adam_debias
        mode = adaptive  if not rectify or n_sma >= n_sma_threshold
               sgd       elif step_size > 0
               none      otherwise (states still update, p does not move)
        decay = 1 - wd * (1 if fixed_decay else lr)           (weight_decouple)

    element math, in this order::

        p  = p decay                       if weight_decouple and wd != 0
        g  = g + wd p                      if not weight_decouple and wd != 0
        m  = m + (1 - b1)(g - m)                           # exp_avg
        r  = g - m
        s  = b2 s + (1 - b2) r r + eps                     # exp_avg_var (eps stored, as upstream)
        smax = max(smax, s); s' = smax     if ams_bound    # max_exp_avg_var, else s' = s
        denom = sqrt(s') / c2 + eps
        p  = p - step_size (m / denom)     mode adaptive
        p  = p - step_size m               mode sgd
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
            c2 = 1.0
        else:
            step_size, n_sma = lr, 0.0
            c2 = math.sqrt(1.0 - beta2 ** t)
        if not adam_debias:
            step_size = step_size / (1.0 - beta1 ** t)
        adaptive = not rectify or n_sma >= n_sma_threshold
        sgd = not adaptive and step_size > 0
        coefs.append((c2, step_size, adaptive, sgd))
    for p, grad, st, (c2, step_size, adaptive, sgd) in zip(params, grads, states, coefs):
        p32 = p.float()
        g = prepare_grad(grad, maximize, grad_scale)
        p32, g = weight_decay_step(p32, g, weight_decay, weight_decouple, fixed_decay, lr)

        m = st["exp_avg"].float()
        m = m + (1.0 - beta1) * (g - m)
        r = g - m
        s = beta2 * st["exp_avg_var"].float() + (1.0 - beta2) * r * r + eps
        sd = s
        if ams_bound:
            sd = torch.maximum(st["max_exp_avg_var"].float(), s)
            st["max_exp_avg_var"].copy_(sd)
        if adaptive:
            denom = sd.sqrt() / c2 + eps
            p32 = p32 - step_size * (m / denom)
        elif sgd:
            p32 = p32 - step_size * m

        p.copy_(p32)
        st["exp_avg"].copy_(m)
        st["exp_avg_var"].copy_(s)
        st["step"].add_(1)
