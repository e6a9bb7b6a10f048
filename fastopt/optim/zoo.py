"""Adan, AdaBelief, diffGrad and EXAdam, fused: drop-ins for the pytorch_optimizer (4.1.0) classes of the
same names (the same constructor arguments with the same defaults and positions, the same state
names).  Equations: ``fastopt/reference/<name>.py``.

Papers: Xie et al., "Adan: Adaptive Nesterov Momentum Algorithm for Faster Optimizing Deep Models"
(2022); Zhuang et al., "AdaBelief Optimizer: Adapting Stepsizes by the Belief in Observed Gradients"
(NeurIPS 2020); Dubey et al., "diffGrad: An Optimization Method for Convolutional Neural Networks"
(IEEE TNNLS 2019); Adly, "EXAdam: The Power of Adaptive Cross-Moments" (2024).
"""
from typing import Optional, Tuple, Union

import torch

from ..reference.adabelief import adabelief_reference
from ..reference.adan import adan_reference
from ..reference.diffgrad import diffgrad_reference
from ..reference.exadam import exadam_reference
from .._opspec import OPS, native_args
from . import functional as F
from .base import ElementwiseOptimizer
from .lion import GradOptionsMixin, Params, check_adanorm, check_betas, check_unsupported

_COMMON_DOC = """
        stochastic_rounding, master_weights, seed: bf16 parameters (see
            :class:`~fastopt.optim.base.ElementwiseOptimizer`).
        backend: "auto", "cuda", "triton", "cpu" or "torch" (the reference).

    ``foreach`` is accepted and ignored (every backend is fused).  Common differences from
    pytorch_optimizer: math in fp32 whatever the storage dtype; ``step`` per parameter (upstream: per
    group); gradients are never written to (upstream negates ``p.grad`` for ``maximize``)."""

_LOWBIT_DOC = """
        state_bits, min_quant_size: low-bit states (see :mod:`fastopt.lowbit`)."""


class _ZooOptimizer(ElementwiseOptimizer):
    """Shared checks of the zoo's classes."""

    def __init__(self, params, defaults):
        self._check_group(defaults)
        super().__init__(params, defaults)

    def _check_common(self, group, nbetas=2):
        F.check_hyper("learning rate", group["lr"])
        check_betas(group["betas"], count=nbetas)
        F.check_hyper("weight_decay value", group["weight_decay"])
        F.check_hyper("epsilon value", group["eps"])


def _extras(stochastic_rounding, master_weights, seed, backend, **more):
    return dict(stochastic_rounding=stochastic_rounding, master_weights=master_weights, seed=seed, backend=backend,
                **more)


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
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay,
                                      weight_decouple=weight_decouple, max_grad_norm=max_grad_norm, foreach=foreach,
                                      eps=eps, maximize=maximize, use_gc=use_gc, adanorm=adanorm,
                                      adanorm_r=adanorm_r, state_bits=state_bits, min_quant_size=min_quant_size,
                                      **_extras(stochastic_rounding, master_weights, seed, backend)))

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


class _RectifiedAdam(_ZooOptimizer):
    """AdaBelief / diffGrad: RAdam rectification, ams_bound, adam_debias as pytorch_optimizer."""


    def _check_group(self, group):
        self._check_common(group)
        if group["rectify"] and group["n_sma_threshold"] < 4:
            raise ValueError(f"Invalid n_sma_threshold: {group['n_sma_threshold']} (rectify needs >= 4: the "
                             "rectification term is undefined for 2 < n_sma < 4)")
        check_adanorm(type(self).__name__, group)

    def _state_names(self, group):
        return OPS[self._op_name(group)].states

    def _op_name(self, group):
        return self.OP + ("_ams" if group["ams_bound"] else "")

    def _native_hyper(self, group):
        b1, b2 = group["betas"]
        return native_args(self._op_name(group), group, beta1=b1, beta2=b2, weight_decay=group["weight_decay"],
                           eps=group["eps"], n_sma_threshold=group["n_sma_threshold"])


_RECTIFIED_ARGS = """
    Args:
        params: parameters or param groups.
        lr: learning rate (float or one-element tensor).
        betas: ``(b1, b2)``.
        weight_decay, weight_decouple, fixed_decay: decoupled ``p (1 - wd (fixed_decay ? 1 : lr))`` or L2.
        rectify, n_sma_threshold, degenerated_to_sgd: RAdam rectification (below the threshold a
            momentum-SGD step, or none without ``degenerated_to_sgd``).
        ams_bound: use the running maximum of the second moment.
        foreach: accepted and ignored.
        eps: as upstream.
        maximize: maximize the objective.
        adam_debias: do not divide the step size by ``1 - b1^t``.
        adanorm, adanorm_r: accepted; ``adanorm=True`` raises ValueError (not implemented)."""


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
    HYPER_NAMES = ("betas", "weight_decay", "weight_decouple", "fixed_decay", "rectify", "n_sma_threshold",
                   "degenerated_to_sgd", "ams_bound", "eps", "adam_debias")
    REFERENCE = staticmethod(adabelief_reference)

    def __init__(self, params: Params, lr: Union[float, torch.Tensor] = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 weight_decay: float = 0.0, weight_decouple: bool = True, fixed_decay: bool = False,
                 rectify: bool = False, n_sma_threshold: int = 5, degenerated_to_sgd: bool = True,
                 ams_bound: bool = False, foreach: Optional[bool] = None, eps: float = 1e-16, maximize: bool = False,
                 *, adam_debias: bool = False, adanorm: bool = False, adanorm_r: float = 0.95,
                 stochastic_rounding: bool = False, master_weights: bool = False, seed: int = 0,
                 state_bits: Optional[Union[int, str]] = None, min_quant_size: int = 4096,
                 backend: str = "auto") -> None:
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay,
                                      weight_decouple=weight_decouple, fixed_decay=fixed_decay, rectify=rectify,
                                      n_sma_threshold=n_sma_threshold, degenerated_to_sgd=degenerated_to_sgd,
                                      ams_bound=ams_bound, foreach=foreach, eps=eps, maximize=maximize,
                                      adam_debias=adam_debias, adanorm=adanorm, adanorm_r=adanorm_r,
                                      state_bits=state_bits, min_quant_size=min_quant_size,
                                      **_extras(stochastic_rounding, master_weights, seed, backend)))


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
    HYPER_NAMES = AdaBelief.HYPER_NAMES
    REFERENCE = staticmethod(diffgrad_reference)

    def __init__(self, params: Params, lr: Union[float, torch.Tensor] = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 weight_decay: float = 0.0, weight_decouple: bool = True, fixed_decay: bool = False,
                 rectify: bool = False, n_sma_threshold: int = 5, degenerated_to_sgd: bool = True,
                 ams_bound: bool = False, eps: float = 1e-8, maximize: bool = False, foreach: Optional[bool] = None,
                 *, adam_debias: bool = False, adanorm: bool = False, adanorm_r: float = 0.95,
                 stochastic_rounding: bool = False, master_weights: bool = False, seed: int = 0,
                 state_bits: Optional[Union[int, str]] = None, min_quant_size: int = 4096,
                 backend: str = "auto") -> None:
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay,
                                      weight_decouple=weight_decouple, fixed_decay=fixed_decay, rectify=rectify,
                                      n_sma_threshold=n_sma_threshold, degenerated_to_sgd=degenerated_to_sgd,
                                      ams_bound=ams_bound, eps=eps, maximize=maximize, foreach=foreach,
                                      adam_debias=adam_debias, adanorm=adanorm, adanorm_r=adanorm_r,
                                      state_bits=state_bits, min_quant_size=min_quant_size,
                                      **_extras(stochastic_rounding, master_weights, seed, backend)))


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
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay,
                                      weight_decouple=weight_decouple, fixed_decay=fixed_decay, eps=eps,
                                      maximize=maximize, foreach=foreach, state_bits=state_bits,
                                      min_quant_size=min_quant_size,
                                      **_extras(stochastic_rounding, master_weights, seed, backend)))

    def _check_group(self, group):
        self._check_common(group)

    def _native_hyper(self, group):
        b1, b2 = group["betas"]
        return native_args(self.OP, group, beta1=b1, beta2=b2, weight_decay=group["weight_decay"], eps=group["eps"])
