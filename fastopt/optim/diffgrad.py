"""diffGrad (Dubey et al., IEEE TNNLS 2019), fused: a drop-in for ``pytorch_optimizer.DiffGrad``."""
from typing import Optional, Tuple, Union

import torch

from .._opspec import OPS
from ..reference.diffgrad import diffgrad_reference
from .functional import Params
from ._pytorch_optimizer import _COMMON_DOC, _LOWBIT_DOC, _RECTIFIED_ARGS, _RectifiedAdam, constructor_defaults


class DiffGrad(_RectifiedAdam):
    __doc__ = r"""diffGrad: Adam whose momentum is scaled by the friction ``sigmoid(|g_{t-1} - g_t|)``.

    Update (per element; RAdam's rectified step size with ``rectify``)::

        m <- m + (1-b1)(g - m)         v <- b2 v + (1-b2) g^2                  [v_max: ams_bound]
        p <- p - lr sqrt(1-b2^t)/(1-b1^t) sigmoid(|prev - g|) m / (sqrt(v + 1e-15) + eps) ;  prev <- g

    Paper: Dubey et al., "diffGrad: An Optimization Method for Convolutional Neural Networks" (IEEE
    TNNLS 2019).  State: ``exp_avg``, ``exp_avg_sq``, ``previous_grad`` (+ ``max_exp_avg_sq``).
    """ + _RECTIFIED_ARGS + _LOWBIT_DOC + _COMMON_DOC + "\n    "

    OP = "diffgrad"
    STATE_NAMES = OPS["diffgrad"].states
    REFERENCE = staticmethod(diffgrad_reference)

    def __init__(self, params: Params, lr: Union[float, torch.Tensor] = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 weight_decay: float = 0.0, weight_decouple: bool = True, fixed_decay: bool = False,
                 rectify: bool = False, n_sma_threshold: int = 5, degenerated_to_sgd: bool = True,
                 ams_bound: bool = False, eps: float = 1e-8, maximize: bool = False, foreach: Optional[bool] = None,
                 *, adam_debias: bool = False, adanorm: bool = False, adanorm_r: float = 0.95,
                 stochastic_rounding: bool = False, master_weights: bool = False, seed: int = 0,
                 state_bits: Optional[Union[int, str]] = None, min_quant_size: int = 4096,
                 backend: str = "auto") -> None:
        super().__init__(params, constructor_defaults(locals()))
