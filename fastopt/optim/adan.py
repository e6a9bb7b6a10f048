"""Adan (Xie et al., 2022), fused: a drop-in for ``pytorch_optimizer.Adan``."""
from typing import Optional, Tuple, Union

import torch

from .._opspec import OPS, native_args
from ..reference.adan import adan_reference
from . import functional as F
from .functional import Params
from ._pytorch_optimizer import (GradOptionsMixin, _COMMON_DOC, _LOWBIT_DOC, _ZooOptimizer, check_adanorm,
                                 check_unsupported, constructor_defaults)


class Adan(GradOptionsMixin, _ZooOptimizer):
    __doc__ = r"""Adan: Nesterov momentum estimation with three moments and the previous gradient.

    Update (per element, t the step, ``prev`` = -g_{t-1} the state ``previous_grad``)::

        g     <- g - mean_row(g)                      [use_gc: 2+-dim tensors, mean over dims 1..]
        diff  = g + prev (0 at t = 1; with use_gc minus the row mean, as upstream)
        m     <- m + (1-b1)(g - m)       d <- d + (1-b2)(diff - d)
        n     <- b3 n + (1-b3)(g + b2 diff)^2
        denom = sqrt(n) / sqrt(1 - b3^t) + eps
        p     <- p (1 - lr wd)                        [weight_decouple]
        p     <- p - lr/(1-b1^t) m/denom - lr b2/(1-b2^t) d/denom
        p     <- p / (1 + lr wd)                      [not weight_decouple: the proximal step]

    Paper: Xie et al., "Adan: Adaptive Nesterov Momentum Algorithm for Faster Optimizing Deep Models"
    (2022).  ``weight_decouple=True`` is the official code's ``no_prox=True``.  Betas as
    pytorch_optimizer ``(0.98, 0.92, 0.99)`` (one minus the paper's).  State: ``exp_avg``,
    ``exp_avg_sq``, ``exp_avg_diff``, ``previous_grad`` (the negated previous gradient, as upstream).

    Args:
        params: parameters or param groups.
        lr: learning rate (float or one-element tensor).
        betas: ``(b1, b2, b3)``.
        weight_decay, weight_decouple: see above.
        max_grad_norm: accepted; a value other than 0 raises ValueError (global gradient clipping
            needs a norm over all parameters: call :func:`fastopt.clip_grad_norm_` first).
        foreach: accepted and ignored.
        eps: added to the denominator.
        maximize: maximize the objective.
        use_gc: gradient centralization (fused: one extra reduce pass over the gradients).
        adanorm, adanorm_r: accepted; ``adanorm=True`` raises ValueError (not implemented).""" + _LOWBIT_DOC + \
        _COMMON_DOC + """  With ``maximize``, the first step's gradient difference is 0 (upstream:
    ``-2 g``, see :mod:`fastopt.reference.adan`).
    """

    OP = "adan"
    STATE_NAMES = OPS["adan"].states
    HYPER_NAMES = ("betas", "weight_decay", "weight_decouple", "eps", "use_gc")
    REFERENCE = staticmethod(adan_reference)

    def __init__(self, params: Params, lr: Union[float, torch.Tensor] = 1e-3,
                 betas: Tuple[float, float, float] = (0.98, 0.92, 0.99), weight_decay: float = 0.0,
                 weight_decouple: bool = False, max_grad_norm: float = 0.0, foreach: Optional[bool] = None,
                 eps: float = 1e-8, maximize: bool = False, *, use_gc: bool = False, adanorm: bool = False,
                 adanorm_r: float = 0.95, stochastic_rounding: bool = False, master_weights: bool = False,
                 seed: int = 0, state_bits: Optional[Union[int, str]] = None, min_quant_size: int = 4096,
                 backend: str = "auto") -> None:
        super().__init__(params, constructor_defaults(locals()))

    def _check_group(self, group):
        self._check_common(group, nbetas=3)
        F.check_hyper("max_grad_norm", group.get("max_grad_norm", 0.0))
        check_unsupported(type(self).__name__, group, max_grad_norm=(
            0.0, "global gradient-norm clipping needs a norm over every parameter; call fastopt.clip_grad_norm_ "
            "before the step"))
        check_adanorm(type(self).__name__, group)

    def _native_hyper(self, group):
        b1, b2, b3 = group["betas"]
        return native_args(self.OP, group, beta1=b1, beta2=b2, beta3=b3, weight_decay=group["weight_decay"],
                           eps=group["eps"])
