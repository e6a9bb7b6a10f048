"""Reference Adan step (Xie et al. 2022, "Adan: Adaptive Nesterov Momentum Algorithm for Faster Optimizing
Deep Models", arXiv:2208.06677).

Matches ``pytorch_optimizer.Adan`` (4.1.0; its per-parameter and foreach paths) on fp32 tensors,
including both weight-decay modes of the paper's reference code:

* ``weight_decouple=True``  is the official code's ``no_prox=True``: ``p <- p (1 - lr wd)`` before the
  update;
* ``weight_decouple=False`` is ``no_prox=False`` (the proximal step of the paper's Algorithm 1):
  ``p <- p / (1 + lr wd)`` after the update.

Betas follow pytorch_optimizer / the official code, ``(0.98, 0.92, 0.99)`` = one minus the paper's
``(0.02, 0.08, 0.01)`` (``adan_pytorch.Adan`` takes the paper's convention).

State: ``previous_grad`` holds the *negated* previous gradient ``-g_{t-1}``, as upstream stores it
(so ``g + previous_grad`` is the gradient difference).  Upstream initialises it to ``-g_1`` on the
first step; here :func:`adan_init_state` allocates zeros and the step treats ``previous_grad`` as
``-g`` when ``t == 1``, so the first gradient difference is exactly 0.

``use_gc=True`` centralizes the gradient first (:func:`fastopt.reference._common.centralize`: for 2+-dim
tensors minus the mean over every dim but the first), as upstream, before everything else, so
``previous_grad`` holds the negated *centralized* gradient; as upstream, the first step's difference
is then ``g_c - g`` (minus the row mean), since upstream initializes ``previous_grad`` from the raw
gradient.

Unsupported (``ValueError``): ``max_grad_norm > 0`` (global gradient-norm clipping needs a norm over
all parameters, not elementwise), ``adanorm`` (per-tensor norm EMA), complex parameters and sparse
gradients.  ``foreach`` is an
upstream implementation switch only and has no counterpart here.

Deliberate differences from upstream:

* math is always fp32 whatever the storage dtype (upstream computes bf16/fp16 in the storage dtype);
* the step counter is a per-tensor fp32 0-dim tensor (upstream: a per-group int);
* gradients are never written to (upstream's per-parameter path leaves ``p.grad`` negated and, with
  clipping, scaled);
* ``maximize=True`` on the first step: upstream initialises ``previous_grad = -g`` from the
  *un-negated* gradient and negates the gradient afterwards, so its first gradient difference is
  ``-2 g`` instead of 0.  Here maximize is exactly "step with ``-g``" on every step (from step 2 on
  upstream agrees).
"""
import math

from ._common import centralize, check_inputs, init_state, prepare_grad, skipped

STATE_NAMES = ("exp_avg", "exp_avg_sq", "exp_avg_diff", "previous_grad")


def adan_init_state(p, state, group=None):
    """Fill the empty state dict of ``p``: an fp32 step counter and zeroed ``STATE_NAMES`` tensors."""
    init_state(p, state, STATE_NAMES)


def _check(params, grads, states, *, betas, max_grad_norm, adanorm):
    if len(betas) != 3:
        raise ValueError(f"Adan takes three betas (beta1, beta2, beta3), got {betas!r}")
    if max_grad_norm != 0.0:
        raise ValueError("Adan reference: max_grad_norm (global gradient-norm clipping) is not supported; "
                         "clip the gradients beforehand")
    if adanorm:
        raise ValueError("Adan reference: adanorm is not supported")
    check_inputs("Adan", params, grads, states, ("step",) + STATE_NAMES, "call adan_init_state first")


def adan_reference(params, grads, states, *, lr, betas=(0.98, 0.92, 0.99), weight_decay=0.0,
                   weight_decouple=False, eps=1e-8, max_grad_norm=0.0, use_gc=False, adanorm=False,
                   maximize=False, grad_scale=None, found_inf=None):
    """One Adan step, in place.  ``states[i]`` is the state dict of ``params[i]``.

    Per tensor, with t = step + 1, b1, b2, b3 = betas and g the gradient (negated if ``maximize``,
    divided by ``grad_scale`` if given); per-step scalars in fp64, rounded to fp32::

        step_size      = lr / (1 - b1^t)
        diff_step_size = lr * b2 / (1 - b2^t)
        bc3_sqrt       = sqrt(1 - b3^t)
        decay          = 1 - lr wd          (weight_decouple, i.e. no_prox=True)
        prox           = 1 + lr wd          (not weight_decouple, i.e. no_prox=False)

    element math, in this order (``previous_grad`` = -g_{t-1}; taken as -g when t == 1)::

        diff  = g + previous_grad                        # g_t - g_{t-1}
        m     = m + (1 - b1)(g - m)                      # exp_avg
        d     = d + (1 - b2)(diff - d)                   # exp_avg_diff
        u     = g + b2 diff
        n     = b3 n + (1 - b3) u u                      # exp_avg_sq
        denom = sqrt(n) / bc3_sqrt + eps
        p     = p decay                                  if weight_decouple and wd != 0
        p     = p - step_size (m / denom)
        p     = p - diff_step_size (d / denom)
        p     = p / prox                                 if not weight_decouple and wd != 0
        previous_grad = -g
        step  = t

    If ``found_inf`` is nonzero nothing changes (AMP skipped step).  ``lr`` may be a 0-dim tensor.
    """
    _check(params, grads, states, betas=betas, max_grad_norm=max_grad_norm, adanorm=adanorm)
    if skipped(found_inf):
        return
    beta1, beta2, beta3 = (float(b) for b in betas)
    lr = float(lr)
    for p, grad, st in zip(params, grads, states):
        t = st["step"].item() + 1.0
        step_size = lr / (1.0 - beta1 ** t)
        diff_step_size = lr * beta2 / (1.0 - beta2 ** t)
        bc3_sqrt = math.sqrt(1.0 - beta3 ** t)

        p32 = p.float()
        g = prepare_grad(grad, maximize, grad_scale)
        g_raw = g
        if use_gc:
            g = centralize(g)

        # upstream starts previous_grad at minus the first gradient *before* centralization, so with
        # use_gc the first difference is g_c - g = -mean (0 without it)
        prev = -g_raw if t == 1.0 else st["previous_grad"].float()
        diff = g + prev
        m = st["exp_avg"].float()
        m = m + (1.0 - beta1) * (g - m)
        d = st["exp_avg_diff"].float()
        d = d + (1.0 - beta2) * (diff - d)
        u = g + beta2 * diff
        n = beta3 * st["exp_avg_sq"].float() + (1.0 - beta3) * u * u
        denom = n.sqrt() / bc3_sqrt + eps
        if weight_decay != 0.0 and weight_decouple:
            p32 = p32 * (1.0 - lr * weight_decay)
        p32 = p32 - step_size * (m / denom)
        p32 = p32 - diff_step_size * (d / denom)
        if weight_decay != 0.0 and not weight_decouple:
            p32 = p32 / (1.0 + lr * weight_decay)

        p.copy_(p32)
        st["exp_avg"].copy_(m)
        st["exp_avg_diff"].copy_(d)
        st["exp_avg_sq"].copy_(n)
        st["previous_grad"].copy_(-g)
        st["step"].add_(1)
