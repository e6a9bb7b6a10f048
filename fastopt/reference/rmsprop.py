"""Reference RMSprop step (Hinton, Srivastava & Swersky, "Neural Networks for Machine Learning",
lecture 6e, 2012; centered: Graves, "Generating Sequences With Recurrent Neural Networks", 2013): the
semantics of ``torch.optim.RMSprop`` (torch 2.13; for-loop and foreach paths agree to fp32 rounding).

With g the gradient (negated for ``maximize``, unscaled for AMP)::

    g   <- g + wd p
    v   <- alpha v + (1 - alpha) g g                          (square_avg)
    m   <- m + (1 - alpha)(g - m)     [centered; torch.lerp]  (grad_avg)
    avg  = sqrt(centered ? v - m m : v) + eps
    buf <- momentum buf + g / avg     [momentum > 0]          (momentum_buffer)
    p   <- p - lr (momentum > 0 ? buf : g / avg)

State, torch's names: the fp32 0-dim ``step``, ``square_avg``, ``momentum_buffer`` (momentum > 0) and
``grad_avg`` (centered), zeros at first.  Math in fp32 whatever the storage dtype; gradients are never
written to; complex parameters and sparse gradients unsupported.
"""
import torch

from ._common import check_inputs, decayed_inputs, skipped

STATE_NAMES = ("square_avg", "momentum_buffer", "grad_avg")


def rmsprop_state_names(momentum=0.0, centered=False):
    """The state tensors of a group, in torch's order."""
    return ("square_avg",) + (("momentum_buffer",) if momentum > 0 else ()) + (("grad_avg",) if centered else ())


def rmsprop_init_state(p, state, momentum=0.0, centered=False):
    """Fill the empty state dict of ``p``: an fp32 step counter and zeroed states (as torch)."""
    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
    for name in rmsprop_state_names(momentum, centered):
        state[name] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _lerp(a, b, w):
    """torch.lerp(a, b, w) for a scalar weight: two formulas, picked by w < 0.5."""
    return a + w * (b - a) if w < 0.5 else b - (b - a) * (1.0 - w)


def rmsprop_reference(params, grads, states, *, lr, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
                      centered=False, maximize=False, grad_scale=None, found_inf=None):
    """One RMSprop step, in place (module docstring).  ``lr`` may be a float or a one-element tensor;
    a nonzero ``found_inf`` leaves everything unchanged."""
    alpha, eps, wd, momentum = float(alpha), float(eps), float(weight_decay), float(momentum)
    check_inputs("RMSprop", params, grads, states, ("step",) + rmsprop_state_names(momentum, centered),
                 "make it with rmsprop_init_state(p, state, momentum, centered)")
    if skipped(found_inf):
        return
    lr = float(lr)
    for p, grad, state in zip(params, grads, states):
        p32, g = decayed_inputs(p, grad, maximize=maximize, grad_scale=grad_scale, weight_decay=wd,
                                weight_decouple=False, fixed_decay=False, lr=lr)  # (L2, as torch)
        v = state["square_avg"].float() * alpha + ((1.0 - alpha) * g) * g
        state["square_avg"].copy_(v)
        var = v
        if centered:
            m = _lerp(state["grad_avg"].float(), g, 1.0 - alpha)
            state["grad_avg"].copy_(m)
            var = v - m * m
        avg = var.sqrt() + eps
        if momentum > 0:
            buf = state["momentum_buffer"].float() * momentum + g / avg
            state["momentum_buffer"].copy_(buf)
            p.copy_(p32 - lr * buf)
        else:
            p.copy_(p32 - (lr * g) / avg)
        state["step"] += 1
