"""Reference Lion step (Chen et al., "Symbolic Discovery of Optimization Algorithms", NeurIPS 2023).

Matches ``pytorch_optimizer.Lion`` (and ``lion_pytorch.Lion``, which is the ``weight_decouple=True,
fixed_decay=False`` case) on fp32 tensors.  Deliberate differences: math is fp32 whatever the storage
dtype, and the step count lives per parameter in ``state["step"]`` (pytorch_optimizer keeps it per
group; Lion does not use it).  ``lerp`` is written as ``m + w (g - m)``: torch's lerp switches to
``g - (1 - w)(g - m)`` for weights >= 0.5, which only matters for betas <= 0.5.
"""
import torch

from ._common import cautious_mask, centralize, prepare_grad, skipped

STATE_NAMES = ("exp_avg",)


def lion_reference(params, grads, states, *, lr, betas=(0.9, 0.99), weight_decay=0.0, weight_decouple=True,
                   fixed_decay=False, use_gc=False, cautious=False, maximize=False, grad_scale=None,
                   found_inf=None):
    """One Lion step, in place.  With g the gradient::

        g <- centralize(g)                        if use_gc (2+-dim tensors: minus the mean over dims 1..)
        p <- p (1 - wd (fixed_decay ? 1 : lr))    if weight_decouple, else g <- g + wd p
        u <- sign(m + (1 - b1)(g - m))
        u <- u * cautious_mask(u, g)              if cautious
        m <- m + (1 - b2)(g - m)
        p <- p - lr u
    """
    if skipped(found_inf):
        return
    beta1, beta2 = betas
    for p, grad, state in zip(params, grads, states):
        lr32 = float(lr)
        g = prepare_grad(grad, maximize, grad_scale)
        if use_gc:
            g = centralize(g)
        p32 = p.float()
        if weight_decouple:
            p32 = p32 * torch.tensor(1.0 - weight_decay * (1.0 if fixed_decay else lr32), dtype=torch.float32)
        else:
            g = g + weight_decay * p32
        m = state["exp_avg"].float()
        u = torch.sign(m + (1.0 - beta1) * (g - m))
        if cautious:
            u = u * cautious_mask(u, g)
        m = m + (1.0 - beta2) * (g - m)
        p32 = p32 - lr32 * u
        p.copy_(p32)
        state["exp_avg"].copy_(m)
        state["step"] += 1
