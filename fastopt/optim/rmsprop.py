"""RMSprop, a drop-in for ``torch.optim.RMSprop`` on fastopt's fused elementwise kernels."""
from typing import Optional, Union

import torch

from .._opspec import OPS, native_args
from ..reference.rmsprop import rmsprop_reference, rmsprop_state_names
from . import functional as F
from ._classic import check_lr, check_path_args, path_args_doc
from .base import ElementwiseOptimizer
from .functional import Params


class RMSprop(ElementwiseOptimizer):
    r"""RMSprop (plain, centered, with momentum): ``torch.optim.RMSprop``'s arguments, defaults, errors,
    state names and checkpoints, on fastopt's fused kernels.

    Update (per element; ``g`` the gradient, negated for ``maximize``; states ``square_avg`` v,
    ``grad_avg`` m (centered), ``momentum_buffer`` buf (momentum > 0))::

        g   <- g + wd p
        v   <- alpha v + (1 - alpha) g g
        m   <- m + (1 - alpha)(g - m)                      [centered]
        avg  = sqrt(centered ? v - m m : v) + eps
        buf <- momentum buf + g / avg                      [momentum > 0]
        p   <- p - lr (momentum > 0 ? buf : g / avg)

    Paper: Hinton, Srivastava & Swersky, "Neural Networks for Machine Learning", lecture 6e (2012);
    centered: Graves, "Generating Sequences With Recurrent Neural Networks" (2013).

    Args:
        params: parameters or param groups.
        lr: learning rate (float or one-element tensor).
        alpha, eps, weight_decay, momentum, centered, maximize: as ``torch.optim.RMSprop``.
        capturable: accepted: fastopt's steps never read device values on the host (step counters on
            the parameter's device), so they are CUDA-graph capturable either way.
        {path_args}
        stochastic_rounding, master_weights, seed: bf16 parameters (see
            :class:`~fastopt.optim.base.ElementwiseOptimizer`).
        state_bits, min_quant_size: low-bit ``square_avg`` / ``momentum_buffer`` (8: bitsandbytes'
            RMSprop8bit formats, blockwise; see :mod:`fastopt.lowbit`); not with ``centered=True`` (as
            bitsandbytes: v - m m of two quantized states can go negative).
        backend: "auto", "cuda", "triton", "cpu" or "torch" (the reference, fastopt/reference/rmsprop.py).

    Differences from torch.optim.RMSprop: math in fp32 whatever the storage dtype; sparse gradients and
    complex parameters raise; AMP's grad_scale / found_inf are consumed in the kernel (torch's RMSprop
    has no fused path: GradScaler unscales for it); turning momentum or centered on after the first
    step starts the new state at zeros (torch raises KeyError).
    """

    OP = "rmsprop"
    STATE_NAMES = OPS["rmsprop"].states
    HYPER_NAMES = ("alpha", "eps", "weight_decay", "momentum", "centered")
    REFERENCE = staticmethod(rmsprop_reference)

    def __init__(self, params: Params, lr: Union[float, torch.Tensor] = 1e-2, alpha: float = 0.99,
                 eps: float = 1e-8, weight_decay: float = 0, momentum: float = 0, centered: bool = False,
                 capturable: bool = False, foreach: Optional[bool] = None, maximize: bool = False,
                 differentiable: bool = False, *, stochastic_rounding: bool = False, master_weights: bool = False,
                 seed: int = 0, state_bits: Optional[Union[int, str]] = None, min_quant_size: int = 4096,
                 backend: str = "auto") -> None:
        defaults = dict(lr=lr, momentum=momentum, alpha=alpha, eps=eps, centered=centered, weight_decay=weight_decay,
                        capturable=capturable, foreach=foreach, maximize=maximize, differentiable=differentiable,
                        stochastic_rounding=stochastic_rounding, master_weights=master_weights, seed=seed,
                        state_bits=state_bits, min_quant_size=min_quant_size, backend=backend)
        self._check_group(defaults)
        super().__init__(params, defaults)

    def _check_group(self, group):
        check_lr(group["lr"])
        F.check_hyper("epsilon value", group["eps"])
        F.check_hyper("momentum value", group["momentum"])
        F.check_hyper("weight_decay value", group["weight_decay"])
        F.check_hyper("alpha value", group["alpha"])
        check_path_args("RMSprop", group, has_fused=False)
        if group["centered"] and group.get("state_bits") is not None:
            raise ValueError("RMSprop: centered=True with low-bit states (state_bits) is not supported (as "
                             "bitsandbytes' RMSprop8bit): square_avg - grad_avg^2 of quantized states can go "
                             "negative; use full-precision states")

    def _state_names(self, group):
        return rmsprop_state_names(group["momentum"], group["centered"])

    def _op_name(self, group):
        return "rmsprop" + ("_centered" if group["centered"] else "") + ("_momentum" if group["momentum"] > 0 else "")

    def _native_hyper(self, group):
        return native_args(self._op_name(group), group, alpha=group["alpha"], eps=group["eps"],
                           weight_decay=group["weight_decay"], momentum=group["momentum"])


RMSprop.__doc__ = RMSprop.__doc__.replace("{path_args}", path_args_doc(False))
