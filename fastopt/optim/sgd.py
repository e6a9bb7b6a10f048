"""SGD with momentum, a drop-in for ``torch.optim.SGD`` on fastopt's fused elementwise kernels."""
from typing import Optional, Union

import torch

from .._opspec import OPS, native_args
from ..lowbit.layouts import LowbitStates, init_weights
from ..reference.sgd import sgd_reference
from . import functional as F
from ._classic import check_lr, check_path_args, hyper_value, path_args_doc
from .base import ElementwiseOptimizer
from .functional import Params

# NOTE: [SGD's step]
# torch.optim.SGD keeps no step count: its momentum buffer is created (buf = clone(g)) at the first step
# with momentum, and "no buffer yet" is that condition.  fastopt's elementwise optimizers keep
# state["step"] (the stochastic-rounding stream and the kernels' first-step test read it), so here it
# counts the steps since the momentum buffer was made and the kernels set buf = g when step == 0:
# - a new parameter: step 0 and a buffer, made together;
# - a buffer missing beside a step (momentum switched on after steps with momentum 0, or a checkpoint
#   saved with momentum 0): the buffer is made and step restarts at 0, so the next step sets buf = g;
# - a torch.optim.SGD checkpoint (momentum_buffer, no step): step 1 is added, so the loaded buffer is
#   continued, not replaced;
# - a fastopt checkpoint loaded into torch.optim.SGD: torch reads momentum_buffer and ignores step.


class SGD(ElementwiseOptimizer):
    r"""Stochastic gradient descent with (Nesterov) momentum: ``torch.optim.SGD``'s arguments, defaults,
    errors, state names and checkpoints, on fastopt's fused kernels.

    Update (per element; ``g`` the gradient, negated for ``maximize``; ``buf`` the state
    ``momentum_buffer``, kept only when ``momentum != 0``)::

        g   <- g + wd p
        buf <- g                                   at the buffer's first step (torch: buf is None)
        buf <- momentum buf + (1 - dampening) g    after it
        g   <- nesterov ? g + momentum buf : buf   [momentum != 0]
        p   <- p - lr g

    Paper: Robbins & Monro (1951); momentum: Polyak (1964); Nesterov: Sutskever et al., "On the
    importance of initialization and momentum in deep learning" (ICML 2013), torch's formulation.

    Args:
        params: parameters or param groups.
        lr: learning rate (float or one-element tensor).
        momentum, dampening, weight_decay, nesterov, maximize: as ``torch.optim.SGD`` (``weight_decay``
            may be a one-element tensor without grad, as torch 2.13 allows; read as a float).
        {path_args}
        stochastic_rounding, master_weights, seed: bf16 parameters (see
            :class:`~fastopt.optim.base.ElementwiseOptimizer`).
        state_bits, min_quant_size: low-bit ``momentum_buffer`` (8: bitsandbytes' SGD8bit format, the
            signed dynamic map, blockwise; see :mod:`fastopt.lowbit`).
        backend: "auto", "cuda", "triton", "cpu" or "torch" (the reference, fastopt/reference/sgd.py).

    State: ``momentum_buffer`` (momentum != 0) and ``step`` (NOTE: [SGD's step] in this module: torch's
    SGD keeps none; a torch checkpoint loads and continues, a fastopt checkpoint loads into torch).
    Differences from torch.optim.SGD: math in fp32 whatever the storage dtype (torch steps bf16 in
    bf16); the buffer of a parameter exists (zeros) from its first step on; sparse gradients and complex
    parameters raise; AMP's grad_scale / found_inf are consumed in the kernel on every backend (torch:
    fused only), and a skipped step leaves the buffer unstarted (torch's fused path leaves it
    uninitialized memory).
    """

    OP = "sgd"
    STATE_NAMES = OPS["sgd"].states
    HYPER_NAMES = ("momentum", "dampening", "weight_decay", "nesterov")
    REFERENCE = staticmethod(sgd_reference)

    def __init__(self, params: Params, lr: Union[float, torch.Tensor] = 1e-3, momentum: float = 0,
                 dampening: float = 0, weight_decay: Union[float, torch.Tensor] = 0, nesterov: bool = False, *,
                 maximize: bool = False, foreach: Optional[bool] = None, differentiable: bool = False,
                 fused: Optional[bool] = None, stochastic_rounding: bool = False, master_weights: bool = False,
                 seed: int = 0, state_bits: Optional[Union[int, str]] = None, min_quant_size: int = 4096,
                 backend: str = "auto") -> None:
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                        maximize=maximize, foreach=foreach, differentiable=differentiable, fused=fused,
                        stochastic_rounding=stochastic_rounding, master_weights=master_weights, seed=seed,
                        state_bits=state_bits, min_quant_size=min_quant_size, backend=backend)
        self._check_group(defaults)
        super().__init__(params, defaults)

    def _check_group(self, group):
        check_lr(group["lr"])
        F.check_hyper("momentum value", group["momentum"])
        hyper_value("weight_decay value", group["weight_decay"])
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        check_path_args("SGD", group)

    def _state_names(self, group):
        return self.STATE_NAMES if group["momentum"] != 0 else ()

    def _op_name(self, group):
        return "sgd" if group["momentum"] != 0 else "sgd_plain"

    def _native_hyper(self, group):
        return native_args(self._op_name(group), group, momentum=group["momentum"], dampening=group["dampening"],
                           weight_decay=float(group["weight_decay"]))

    def _reference_step(self, group, params, grads, states, grad_scale, found_inf):
        super()._reference_step({**group, "weight_decay": float(group["weight_decay"])}, params, grads, states,
                                grad_scale, found_inf)

    def _init_state(self, group, p, state):
        if self._state_names(group):
            super()._init_state(group, p, state)
            return
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        init_weights(group, p, state)  # (the master copy with master weights; no state tensor)

    def _ensure_state(self, group, p):
        state = self.state[p]
        if state and "step" not in state:  # a torch.optim.SGD checkpoint (NOTE: [SGD's step])
            started = 1.0 if "momentum_buffer" in state else 0.0
            state["step"] = torch.full((), started, dtype=torch.float32, device=p.device)
        super()._ensure_state(group, p)

    def _add_missing_states(self, group, params, states):
        for s in states:  # a buffer made now starts now (NOTE: [SGD's step])
            if self._state_names(group) and "momentum_buffer" not in s and not LowbitStates.holds(s):
                s["step"].zero_()
        super()._add_missing_states(group, params, states)


SGD.__doc__ = SGD.__doc__.replace("{path_args}", path_args_doc(True))
