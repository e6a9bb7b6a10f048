"""AdaBelief (Zhuang et al., NeurIPS 2020), fused: a drop-in for ``pytorch_optimizer.AdaBelief``."""
from typing import Optional, Tuple, Union

import torch

from .._opspec import OPS
from ..reference.adabelief import adabelief_reference
from .functional import Params
from ._pytorch_optimizer import _COMMON_DOC, _LOWBIT_DOC, _RECTIFIED_ARGS, _RectifiedAdam, constructor_defaults


class AdaBelief(_RectifiedAdam):
    __doc__ = r"""AdaBelief: the second moment tracks the belief ``(g - m)^2 (+ eps)`` instead of ``g^2``.

    Update (per element; RAdam's rectified step size with ``rectify``)::

        m <- m + (1-b1)(g - m)         s <- b2 s + (1-b2)(g - m)^2 + eps       [s_max <- max(s_max, s): ams_bound]
        p <- p - lr/(1-b1^t) m / (sqrt(s) / sqrt(1-b2^t) + eps)

    Paper: Zhuang et al., "AdaBelief Optimizer: Adapting Stepsizes by the Belief in Observed
    Gradients" (NeurIPS 2020).  State: ``exp_avg``, ``exp_avg_var`` (+ ``max_exp_avg_var``).
    """ + _RECTIFIED_ARGS + _LOWBIT_DOC + _COMMON_DOC + "\n    "

    OP = "adabelief"
    STATE_NAMES = OPS["adabelief"].states
    REFERENCE = staticmethod(adabelief_reference)

    def __init__(self, params: Params, lr: Union[float, torch.Tensor] = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 weight_decay: float = 0.0, weight_decouple: bool = True, fixed_decay: bool = False,
                 rectify: bool = False, n_sma_threshold: int = 5, degenerated_to_sgd: bool = True,
                 ams_bound: bool = False, foreach: Optional[bool] = None, eps: float = 1e-16, maximize: bool = False,
                 *, adam_debias: bool = False, adanorm: bool = False, adanorm_r: float = 0.95,
                 stochastic_rounding: bool = False, master_weights: bool = False, seed: int = 0,
                 state_bits: Optional[Union[int, str]] = None, min_quant_size: int = 4096,
                 backend: str = "auto") -> None:
        super().__init__(params, constructor_defaults(locals()))
