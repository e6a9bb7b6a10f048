"""Reference EXAdam step (Adly, "EXAdam: The Power of Adaptive Cross-Moments", 2024, arXiv:2412.20302).

Matches ``pytorch_optimizer.EXAdam`` (4.1.0; per-parameter and foreach paths) on fp32 tensors,
including L2 / decoupled / fixed decoupled weight decay and ``maximize``.  The element math is that
of the author's code (github.com/AhmedMostafa16/EXAdam): cross-moment debiasing factors
``d1 = 1 + b2^t v/(v + eps)`` and ``d2 = 1 + b1^t m^2/(m^2 + eps)``, a bias-corrected "gradient
acceleration" term ``g d1 / (1 - b1^t)`` added to the first moment, and a constant step size ``lr``.

Note eps is used three times with different meanings, as upstream: inside ``d1`` (relative to
``v``), inside ``d2`` (relative to ``m^2``) and in the denominator.

State: ``exp_avg``, ``exp_avg_sq``.

Unsupported (``ValueError``): complex parameters and sparse gradients.  ``foreach`` is an upstream
implementation switch only.

Deliberate differences from upstream: math is always fp32 whatever the storage dtype; the step
counter is a per-tensor fp32 0-dim tensor (upstream: a per-group int); gradients are never written to
(upstream adds the L2 term to ``p.grad`` in place and negates it in place for ``maximize``).
"""
from ._common import check_inputs, decayed_inputs, init_state, skipped

STATE_NAMES = ("exp_avg", "exp_avg_sq")


def exadam_init_state(p, state, group=None):
    """Fill the empty state dict of ``p``: an fp32 step counter and zeroed ``STATE_NAMES`` tensors."""
    init_state(p, state, STATE_NAMES)


def _check(params, grads, states, *, betas):
    if len(betas) != 2:
        raise ValueError(f"EXAdam takes two betas, got {betas!r}")
    check_inputs("EXAdam", params, grads, states, ("step",) + STATE_NAMES, "call exadam_init_state first")


def exadam_reference(params, grads, states, *, lr, betas=(0.9, 0.999), weight_decay=0.0, weight_decouple=True,
                     fixed_decay=False, eps=1e-8, maximize=False, grad_scale=None, found_inf=None):
    """One EXAdam step, in place (conventions: :mod:`fastopt.reference._common`).

    Per tensor, with b1, b2 = betas, ``bc1 = 1 - b1^t``, ``bc2 = 1 - b2^t``, ``b1t = 1 - bc1``,
    ``b2t = 1 - bc2``, in this order::

        p, g = weight_decay_step(p, g, ...)                # decoupled p (1 - wd (fixed_decay ? 1 : lr)), or L2
        m  = m + (1 - b1)(g - m)                           # exp_avg
        v  = b2 v + (1 - b2) g g                           # exp_avg_sq
        d1 = 1 + b2t (v / (v + eps))
        m2 = m m
        d2 = 1 + b1t (m2 / (m2 + eps))
        u  = (m / bc1) d1 + d1 (g / bc1)                   # m~ + g~
        denom = sqrt(d2 (v / bc2)) + eps                   # sqrt(v~) + eps
        p  = p - lr (u / denom)
        step = t

    ``lr`` may be a 0-dim tensor.
    """
    _check(params, grads, states, betas=betas)
    if skipped(found_inf):
        return
    beta1, beta2 = (float(b) for b in betas)
    lr = float(lr)
    for p, grad, st in zip(params, grads, states):
        t = st["step"].item() + 1.0
        bc1 = 1.0 - beta1 ** t
        bc2 = 1.0 - beta2 ** t
        b1t = 1.0 - bc1
        b2t = 1.0 - bc2

        p32, g = decayed_inputs(p, grad, maximize=maximize, grad_scale=grad_scale, weight_decay=weight_decay,
                                weight_decouple=weight_decouple, fixed_decay=fixed_decay, lr=lr)
        m = st["exp_avg"].float()
        m = m + (1.0 - beta1) * (g - m)
        v = beta2 * st["exp_avg_sq"].float() + (1.0 - beta2) * g * g
        d1 = 1.0 + b2t * (v / (v + eps))
        m2 = m * m
        d2 = 1.0 + b1t * (m2 / (m2 + eps))
        u = (m / bc1) * d1 + d1 * (g / bc1)
        denom = (d2 * (v / bc2)).sqrt() + eps
        p32 = p32 - lr * (u / denom)

        p.copy_(p32)
        st["exp_avg"].copy_(m)
        st["exp_avg_sq"].copy_(v)
        st["step"].add_(1)
