"""Reference SGD step: the semantics of ``torch.optim.SGD`` (torch 2.13; for-loop, foreach and fused
paths agree to fp32 rounding).

With g the gradient (negated for ``maximize``, unscaled for AMP) and t = ``state["step"] + 1``::

    g   <- g + wd p
    buf <- g                                     if t == 1   (torch: momentum_buffer is None)
    buf <- momentum buf + (1 - dampening) g      otherwise   [momentum != 0]
    d    = g + momentum buf  if nesterov  else  buf          [momentum != 0]; else d = g
    p   <- p - lr d

State: ``momentum_buffer`` (only when ``momentum != 0``, as torch) and the fp32 0-dim ``step``, which
torch's SGD does not keep: here it counts the steps since the momentum buffer was made, so ``step == 0``
is torch's "no buffer yet" (fastopt/optim/sgd.py, NOTE: [SGD's step]).  Math in fp32 whatever the
storage dtype; gradients are never written to; complex parameters and sparse gradients unsupported.
"""
import torch

from ._common import check_inputs, decayed_inputs, skipped

STATE_NAMES = ("momentum_buffer",)


def sgd_init_state(p, state, momentum=0.9):
    """Fill the empty state dict of ``p``: an fp32 step counter at 0 and, when ``momentum != 0``, a
    zeroed ``momentum_buffer`` (overwritten by the first step's gradient)."""
    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
    if momentum != 0:
        state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def sgd_reference(params, grads, states, *, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                  maximize=False, grad_scale=None, found_inf=None):
    """One SGD step, in place (module docstring).  ``lr`` may be a float or a one-element tensor; a
    nonzero ``found_inf`` leaves everything unchanged."""
    momentum, dampening, wd = float(momentum), float(dampening), float(weight_decay)
    check_inputs("SGD", params, grads, states, ("step",) + (STATE_NAMES if momentum != 0 else ()),
                 "make it with sgd_init_state(p, state, momentum)")
    if skipped(found_inf):
        return
    lr = float(lr)
    for p, grad, state in zip(params, grads, states):
        p32, g = decayed_inputs(p, grad, maximize=maximize, grad_scale=grad_scale, weight_decay=wd,
                                weight_decouple=False, fixed_decay=False, lr=lr)  # (L2, as torch)
        if momentum != 0.0:
            buf = state["momentum_buffer"]
            if float(state["step"]) == 0.0:
                b = g.clone()
            else:
                b = buf.float() * momentum + (1.0 - dampening) * g
            buf.copy_(b)
            g = g + momentum * b if nesterov else b
        p.copy_(p32 - lr * g)
        state["step"] += 1
