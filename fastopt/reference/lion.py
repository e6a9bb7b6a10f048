"""Reference Lion step (Chen et al., "Symbolic Discovery of Optimization Algorithms", NeurIPS 2023).

Matches ``pytorch_optimizer.Lion`` (and ``lion_pytorch.Lion``, which is the ``weight_decouple=True,
fixed_decay=False`` case) on fp32 tensors.  Deliberate differences: math is fp32 whatever the storage
dtype, and the step count lives per parameter in ``state["step"]`` (pytorch_optimizer keeps it per
group; Lion does not use it).  ``lerp`` is written as ``m + w (g - m)``: torch's lerp switches to
``g - (1 - w)(g - m)`` for weights >= 0.5, which only matters for betas <= 0.5.
"""
import torch

STATE_NAMES = ("exp_avg",)


def lion_init_state(p, state, group=None):
    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def prepare_grad(g, maximize, grad_scale):
    """The gradient every reference steps with: fp32, negated for ``maximize``, unscaled for AMP."""
    g = g.float()
    if maximize:
        g = -g
    if grad_scale is not None:
        g = g / grad_scale.to(device=g.device, dtype=torch.float32)
    return g


def skipped(found_inf):
    return found_inf is not None and float(found_inf) != 0.0


def weight_decay_step(p32, g, weight_decay, weight_decouple, fixed_decay, lr):
    """pytorch_optimizer's weight decay: decoupled ``p (1 - wd (fixed_decay ? 1 : lr))`` or L2
    ``g + wd p``; returns ``(p32, g)``."""
    if weight_decay != 0.0:
        if weight_decouple:
            p32 = p32 * (1.0 - weight_decay * (1.0 if fixed_decay else lr))
        else:
            g = g + weight_decay * p32
    return p32, g


def centralize(g):
    """Gradient centralization as pytorch_optimizer's ``centralize_gradient(g, gc_conv_only=False)``:
    for a tensor of 2+ dims, ``g - g.mean(dims 1.., keepdim)`` (each slice ``g[i]`` loses its mean);
    other tensors unchanged."""
    if g.dim() > 1:
        return g - g.mean(dim=tuple(range(1, g.dim())), keepdim=True)
    return g


def cautious_mask(update, g):
    """The cautious optimizer's mask as pytorch_optimizer's ``apply_cautious``: ``[update * g > 0]``
    scaled by ``numel / (count + 1)`` (count = the number of ones; fp32), so the masked update keeps
    about its overall magnitude.  Multiply the update by it."""
    mask = (update * g > 0).to(torch.float32)
    return mask * (mask.numel() / (mask.sum() + 1))


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
