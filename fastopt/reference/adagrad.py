"""Reference Adagrad step (Duchi, Hazan & Singer, "Adaptive Subgradient Methods for Online Learning and
Stochastic Optimization", JMLR 2011): the semantics of ``torch.optim.Adagrad`` (torch 2.13; for-loop,
foreach and fused paths agree to fp32 rounding).

With g the gradient (negated for ``maximize``, unscaled for AMP) and t = ``state["step"] + 1``::

    g   <- g + wd p
    clr  = lr / (1 + (t - 1) lr_decay)       (fp64, rounded to fp32 where it meets the tensors)
    sum <- sum + g g
    p   <- p - clr g / (sqrt(sum) + eps)

State: the fp32 0-dim ``step`` and ``sum`` (starting at ``initial_accumulator_value``), torch's names.
Math in fp32 whatever the storage dtype; gradients are never written to; sparse gradients and complex
parameters unsupported (torch supports both).
"""
import torch

from ._common import check_inputs, decayed_inputs, skipped

STATE_NAMES = ("sum",)


def adagrad_init_state(p, state, initial_accumulator_value=0.0):
    """Fill the empty state dict of ``p``: an fp32 step counter at 0 and ``sum`` filled with
    ``initial_accumulator_value`` (as torch.optim.Adagrad's constructor)."""
    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
    state["sum"] = torch.full_like(p, float(initial_accumulator_value), memory_format=torch.preserve_format)


def adagrad_reference(params, grads, states, *, lr, lr_decay=0.0, weight_decay=0.0, eps=1e-10,
                      initial_accumulator_value=0.0, maximize=False, grad_scale=None, found_inf=None):
    """One Adagrad step, in place (module docstring; ``initial_accumulator_value`` is only read by
    :func:`adagrad_init_state`).  ``lr`` may be a float or a one-element tensor; a nonzero
    ``found_inf`` leaves everything unchanged."""
    del initial_accumulator_value
    lr_decay, wd, eps = float(lr_decay), float(weight_decay), float(eps)
    check_inputs("Adagrad", params, grads, states, ("step",) + STATE_NAMES,
                 "make it with adagrad_init_state(p, state, initial_accumulator_value)")
    if skipped(found_inf):
        return
    lr = float(lr)
    for p, grad, state in zip(params, grads, states):
        p32, g = decayed_inputs(p, grad, maximize=maximize, grad_scale=grad_scale, weight_decay=wd,
                                weight_decouple=False, fixed_decay=False, lr=lr)  # (L2, as torch)
        t = float(state["step"]) + 1.0
        clr = lr / (1.0 + (t - 1.0) * lr_decay)
        s = state["sum"].float() + g * g
        state["sum"].copy_(s)
        p.copy_(p32 - clr * g / (s.sqrt() + eps))
        state["step"] += 1
