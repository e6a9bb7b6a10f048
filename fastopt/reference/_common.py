"""What the optimizer references share.

Conventions of every reference step: ``states[i]`` is the state dict of ``params[i]`` (filled by the
module's ``*_init_state``: an fp32 0-dim ``step`` counter and the state tensors); math is fp32 whatever
the storage dtype; ``g`` is the gradient as :func:`prepare_grad` makes it (fp32, negated for
``maximize``, divided by ``grad_scale``); ``t = step + 1``; per-step scalars are fp64 and rounded to
fp32 where they meet tensors; a nonzero ``found_inf`` (AMP) skips the whole step (:func:`skipped`);
gradients are never written to.
"""
import torch


def as_plain(t):
    """A statistic of a whole tensor as a plain tensor: a DTensor's (FSDP2: the reduction's result,
    replicated on every rank) value, anything else as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def init_state(p, state, names):
    """Fill the empty state dict of ``p``: an fp32 step counter and a zeroed tensor like ``p`` for each
    of ``names`` (in that order)."""
    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
    for name in names:
        state[name] = torch.zeros_like(p, memory_format=torch.preserve_format)


def check_inputs(name, params, grads, states, needed=(), init_hint=""):
    """What every reference checks before it writes anything: one gradient and one state dict per
    parameter, no complex parameters, no sparse gradients, and the state entries ``needed`` present
    (``init_hint`` says how to create them)."""
    if not (len(params) == len(grads) == len(states)):
        raise ValueError("params, grads and states must have the same length")
    for p, g, st in zip(params, grads, states):
        if torch.is_complex(p):
            raise ValueError(f"{name} reference: complex parameters are not supported")
        if g.is_sparse:
            raise ValueError(f"{name} reference: sparse gradients are not supported")
        missing = [n for n in needed if n not in st]
        if missing:
            raise ValueError(f"{name} reference: state is missing {missing}; {init_hint}")


def prepare_grad(g, maximize, grad_scale):
    """The gradient every reference steps with: fp32, negated for ``maximize``, unscaled for AMP."""
    g = g.float()
    if maximize:
        g = -g
    if grad_scale is not None:
        g = g / grad_scale.to(device=g.device, dtype=torch.float32)
    return g


def decayed_inputs(p, grad, *, maximize, grad_scale, weight_decay, weight_decouple, fixed_decay, lr):
    """``(p32, g)``: the fp32 parameter and the gradient of :func:`prepare_grad` after
    :func:`weight_decay_step`."""
    g = prepare_grad(grad, maximize, grad_scale)
    return weight_decay_step(p.float(), g, weight_decay, weight_decouple, fixed_decay, lr)


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
