"""Lion (Chen et al., \"Symbolic Discovery of Optimization Algorithms\", NeurIPS 2023), fused: a drop-in
for ``pytorch_optimizer.Lion`` and ``lion_pytorch.Lion`` (same arguments, state ``exp_avg``).
"""
from typing import Optional, Tuple, Union

import torch

from .._opspec import OPS, native_args
from ..reference.lion import lion_reference
from . import functional as F
from .base import ElementwiseOptimizer
from .functional import Params
from ._pytorch_optimizer import GradOptionsMixin, check_adanorm, check_betas, constructor_defaults


class Lion(GradOptionsMixin, ElementwiseOptimizer):
    r"""Lion: the sign of an interpolated momentum, with decoupled weight decay.

    Update (per element; ``g`` the gradient, ``m`` the state ``exp_avg``)::

        g <- g - mean_row(g)                        [use_gc: 2+-dim tensors, mean over dims 1..]
        p <- p (1 - wd (fixed_decay ? 1 : lr))      [weight_decouple]   or   g <- g + wd p
        u <- sign(m + (1 - b1)(g - m))
        u <- u [u g > 0] numel / (count + 1)        [cautious: count = #(u g > 0) in the tensor]
        m <- m + (1 - b2)(g - m)
        p <- p - lr u

    Paper: Chen et al., "Symbolic Discovery of Optimization Algorithms" (NeurIPS 2023); cautious:
    Liang et al., "Cautious Optimizers: Improving Training with One Line of Code" (2024); gradient
    centralization: Yong et al. (ECCV 2020).

    Args:
        params: parameters or param groups.
        lr: learning rate (float or one-element tensor).
        betas: ``(b1, b2)``: interpolation for the sign, momentum decay.
        weight_decay, weight_decouple, fixed_decay: pytorch_optimizer's weight decay modes.
        foreach: accepted and ignored (every backend is fused).
        maximize: maximize the objective.
        use_gc: gradient centralization (fused: one extra reduce pass over the gradients).
        adanorm, adanorm_r: accepted; ``adanorm=True`` raises ValueError (not implemented).
        cautious: the cautious mask (fused: one extra reduce pass that counts the mask).
        stochastic_rounding, master_weights, seed: bf16 parameters (see
            :class:`~fastopt.optim.base.ElementwiseOptimizer`).
        state_bits, min_quant_size: low-bit ``exp_avg`` (see :mod:`fastopt.lowbit`; with ``use_gc`` or
            ``cautious`` only on the torch backend).
        backend: "auto", "cuda", "triton", "cpu" or "torch" (the reference).

    Differences from pytorch_optimizer 4.1.0: math in fp32 whatever the storage dtype; ``step`` per
    parameter (upstream: per group); gradients are never written to (upstream centralizes and negates
    ``p.grad`` in place); the gradient-centralization mean and the cautious count are sums in a
    backend-dependent order (equal up to fp32 rounding).
    """

    OP = "lion"
    STATE_NAMES = OPS["lion"].states
    HYPER_NAMES = ("betas", "weight_decay", "weight_decouple", "fixed_decay", "use_gc", "cautious")
    REFERENCE = staticmethod(lion_reference)

    def __init__(self, params: Params, lr: Union[float, torch.Tensor] = 1e-4,
                 betas: Tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0, weight_decouple: bool = True,
                 fixed_decay: bool = False, foreach: Optional[bool] = None, maximize: bool = False, *,
                 use_gc: bool = False, adanorm: bool = False, adanorm_r: float = 0.95, cautious: bool = False,
                 stochastic_rounding: bool = False, master_weights: bool = False, seed: int = 0,
                 state_bits: Optional[Union[int, str]] = None, min_quant_size: int = 4096,
                 backend: str = "auto") -> None:
        defaults = constructor_defaults(locals())
        self._check_group(defaults)
        super().__init__(params, defaults)

    def _check_group(self, group):
        F.check_hyper("learning rate", group["lr"])
        check_betas(group["betas"])
        F.check_hyper("weight_decay value", group["weight_decay"])
        check_adanorm(type(self).__name__, group)

    def _op_name(self, group):
        return "lion_cautious" if group.get("cautious") else "lion"

    def _native_hyper(self, group):
        b1, b2 = group["betas"]
        return native_args(self._op_name(group), group, beta1=b1, beta2=b2, weight_decay=group["weight_decay"])
