"""EXAdam (Adly, 2024), fused: a drop-in for ``pytorch_optimizer.EXAdam``."""
from typing import Optional, Tuple, Union

import torch

from .._opspec import OPS, native_args
from ..reference.exadam import exadam_reference
from .functional import Params
from ._pytorch_optimizer import _COMMON_DOC, _LOWBIT_DOC, _ZooOptimizer, constructor_defaults


class EXAdam(_ZooOptimizer):
    __doc__ = r"""EXAdam: Adam with cross-moment debiasing and a gradient-accelerated numerator.

    Update (per element, ``c1 = 1 - b1^t``, ``c2 = 1 - b2^t``)::

        m <- m + (1-b1)(g - m)         v <- b2 v + (1-b2) g^2
        d1 = 1 + b2^t v / (v + eps)    d2 = 1 + b1^t m^2 / (m^2 + eps)
        p <- p - lr ((m/c1) d1 + d1 g/c1) / (sqrt(d2 v / c2) + eps)

    Paper: Adly, "EXAdam: The Power of Adaptive Cross-Moments" (2024).  State: ``exp_avg``,
    ``exp_avg_sq``.

    Args:
        params: parameters or param groups.
        lr: learning rate (float or one-element tensor).
        betas: ``(b1, b2)``.
        weight_decay, weight_decouple, fixed_decay: decoupled or L2 weight decay.
        eps: as upstream.
        maximize: maximize the objective.
        foreach: accepted and ignored.""" + _LOWBIT_DOC + _COMMON_DOC + "\n    "

    OP = "exadam"
    STATE_NAMES = OPS["exadam"].states
    HYPER_NAMES = ("betas", "weight_decay", "weight_decouple", "fixed_decay", "eps")
    REFERENCE = staticmethod(exadam_reference)

    def __init__(self, params: Params, lr: Union[float, torch.Tensor] = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 weight_decay: float = 0.0, weight_decouple: bool = True, fixed_decay: bool = False,
                 eps: float = 1e-8, maximize: bool = False, foreach: Optional[bool] = False, *,
                 stochastic_rounding: bool = False, master_weights: bool = False, seed: int = 0,
                 state_bits: Optional[Union[int, str]] = None, min_quant_size: int = 4096,
                 backend: str = "auto") -> None:
        super().__init__(params, constructor_defaults(locals()))

    def _check_group(self, group):
        self._check_common(group)

    def _native_hyper(self, group):
        b1, b2 = group["betas"]
        return native_args(self.OP, group, beta1=b1, beta2=b2, weight_decay=group["weight_decay"], eps=group["eps"])
