"""Adan, AdaBelief, diffGrad and EXAdam, fused: drop-ins for the pytorch_optimizer classes of the same
names (same arguments, same state names).  Equations: ``fastopt/reference/<name>.py``.

Papers: Xie et al., "Adan: Adaptive Nesterov Momentum Algorithm for Faster Optimizing Deep Models"
(2022); Zhuang et al., "AdaBelief Optimizer: Adapting Stepsizes by the Belief in Observed Gradients"
(NeurIPS 2020); Dubey et al., "diffGrad: An Optimization Method for Convolutional Neural Networks"
(IEEE TNNLS 2019); Adly, "EXAdam: The Power of Adaptive Cross-Moments" (2024).
"""
from ..reference.adabelief import adabelief_reference
from ..reference.adan import adan_reference
from ..reference.diffgrad import diffgrad_reference
from ..reference.exadam import exadam_reference
from . import functional as F
from .base import ElementwiseOptimizer
from .lion import check_betas

DECOUPLE, FIXED_DECAY, RECTIFY, DEGENERATED_TO_SGD, ADAM_DEBIAS = 1, 2, 4, 8, 16

_COMMON_DOC = """
    ``maximize``; ``stochastic_rounding`` / ``master_weights`` / ``seed`` for bf16 params (see
    :class:`~fastopt.optim.base.ElementwiseOptimizer`); ``backend``: "auto", "cuda", "triton", "cpu" or
    "torch" (the reference).  ``foreach`` is accepted and ignored (every backend is fused)."""


def _flags(group):
    return ((DECOUPLE if group.get("weight_decouple") else 0) | (FIXED_DECAY if group.get("fixed_decay") else 0)
            | (RECTIFY if group.get("rectify") else 0) | (DEGENERATED_TO_SGD if group.get("degenerated_to_sgd") else 0)
            | (ADAM_DEBIAS if group.get("adam_debias") else 0))


class _ZooOptimizer(ElementwiseOptimizer):
    def __init__(self, params, defaults):
        self._check_group(defaults)
        super().__init__(params, defaults)

    def _check_common(self, group, nbetas=2):
        F.check_hyper("learning rate", group["lr"])
        check_betas(group["betas"], count=nbetas)
        F.check_hyper("weight_decay value", group["weight_decay"])
        F.check_hyper("epsilon value", group["eps"])


class Adan(_ZooOptimizer):
    r"""Adan: Nesterov momentum estimation with three moments and the previous gradient.

    ``weight_decouple=True`` is the official code's ``no_prox=True`` (``p <- p (1 - lr wd)`` before the
    step); ``False`` the proximal ``p <- p / (1 + lr wd)`` after it.  Betas as pytorch_optimizer
    ``(0.98, 0.92, 0.99)`` (one minus the paper's).  State: ``exp_avg``, ``exp_avg_sq``,
    ``exp_avg_diff``, ``previous_grad`` (the negated previous gradient, as upstream).
    """ + _COMMON_DOC

    OP = "adan"
    STATE_NAMES = ("exp_avg", "exp_avg_sq", "exp_avg_diff", "previous_grad")
    HYPER_NAMES = ("betas", "weight_decay", "weight_decouple", "eps")
    REFERENCE = staticmethod(adan_reference)

    def __init__(self, params, lr=1e-3, betas=(0.98, 0.92, 0.99), weight_decay=0.0, weight_decouple=False,
                 eps=1e-8, *, maximize=False, foreach=None, stochastic_rounding=False, master_weights=False,
                 seed=0, state_bits=None, min_quant_size=4096,
                 backend="auto"):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay,
                                      weight_decouple=weight_decouple, eps=eps, maximize=maximize, foreach=foreach,
                                      stochastic_rounding=stochastic_rounding, master_weights=master_weights,
                                      seed=seed, backend=backend, state_bits=state_bits,
                                      min_quant_size=min_quant_size))

    def _check_group(self, group):
        self._check_common(group, nbetas=3)

    def _native_hyper(self, group):
        b1, b2, b3 = (float(b) for b in group["betas"])
        return (b1, b2, b3, float(group["weight_decay"]), float(group["eps"])), _flags(group)


class _RectifiedAdam(_ZooOptimizer):
    """AdaBelief / diffGrad: RAdam rectification, ams_bound, adam_debias as pytorch_optimizer."""

    AMS_STATE = None

    def _check_group(self, group):
        self._check_common(group)
        if group["rectify"] and group["n_sma_threshold"] < 4:
            raise ValueError(f"Invalid n_sma_threshold: {group['n_sma_threshold']} (rectify needs >= 4: the "
                             "rectification term is undefined for 2 < n_sma < 4)")

    def _state_names(self, group):
        return self.STATE_NAMES + ((self.AMS_STATE,) if group["ams_bound"] else ())

    def _op_name(self, group):
        return self.OP + ("_ams" if group["ams_bound"] else "")

    def _native_hyper(self, group):
        b1, b2 = (float(b) for b in group["betas"])
        return (b1, b2, float(group["weight_decay"]), float(group["eps"]), float(group["n_sma_threshold"])), \
            _flags(group)

    @staticmethod
    def _defaults(lr, betas, weight_decay, weight_decouple, fixed_decay, rectify, n_sma_threshold,
                  degenerated_to_sgd, ams_bound, eps, adam_debias, maximize, foreach, stochastic_rounding,
                  master_weights, seed, backend):
        return dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, weight_decouple=weight_decouple,
                    fixed_decay=fixed_decay, rectify=rectify, n_sma_threshold=n_sma_threshold,
                    degenerated_to_sgd=degenerated_to_sgd, ams_bound=ams_bound, eps=eps, adam_debias=adam_debias,
                    maximize=maximize, foreach=foreach, stochastic_rounding=stochastic_rounding,
                    master_weights=master_weights, seed=seed, backend=backend)


class AdaBelief(_RectifiedAdam):
    r"""AdaBelief: the second moment tracks the belief ``(g - m)^2 (+ eps)`` instead of ``g^2``.

    Options as pytorch_optimizer: ``weight_decouple`` / ``fixed_decay``, ``rectify`` (RAdam, with
    ``n_sma_threshold`` and ``degenerated_to_sgd``), ``ams_bound`` (state ``max_exp_avg_var``),
    ``adam_debias``.  State: ``exp_avg``, ``exp_avg_var``.
    """ + _COMMON_DOC

    OP = "adabelief"
    STATE_NAMES = ("exp_avg", "exp_avg_var")
    AMS_STATE = "max_exp_avg_var"
    HYPER_NAMES = ("betas", "weight_decay", "weight_decouple", "fixed_decay", "rectify", "n_sma_threshold",
                   "degenerated_to_sgd", "ams_bound", "eps", "adam_debias")
    REFERENCE = staticmethod(adabelief_reference)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0, weight_decouple=True,
                 fixed_decay=False, rectify=False, n_sma_threshold=5, degenerated_to_sgd=True, ams_bound=False,
                 eps=1e-16, adam_debias=False, *, maximize=False, foreach=None, stochastic_rounding=False,
                 master_weights=False, seed=0, state_bits=None, min_quant_size=4096,
                 backend="auto"):
        super().__init__(params, self._defaults(lr, betas, weight_decay, weight_decouple, fixed_decay, rectify,
                                                n_sma_threshold, degenerated_to_sgd, ams_bound, eps, adam_debias,
                                                maximize, foreach, stochastic_rounding, master_weights, seed,
                                                backend) | dict(state_bits=state_bits, min_quant_size=min_quant_size))


class DiffGrad(_RectifiedAdam):
    r"""diffGrad: Adam whose momentum is scaled by the friction ``sigmoid(|g_{t-1} - g_t|)``.

    Options as pytorch_optimizer (``rectify``, ``ams_bound``, ``adam_debias``, weight decay modes).
    State: ``exp_avg``, ``exp_avg_sq``, ``previous_grad`` (+ ``max_exp_avg_sq`` with ams_bound).
    """ + _COMMON_DOC

    OP = "diffgrad"
    STATE_NAMES = ("exp_avg", "exp_avg_sq", "previous_grad")
    AMS_STATE = "max_exp_avg_sq"
    HYPER_NAMES = AdaBelief.HYPER_NAMES
    REFERENCE = staticmethod(diffgrad_reference)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0, weight_decouple=True,
                 fixed_decay=False, rectify=False, n_sma_threshold=5, degenerated_to_sgd=True, ams_bound=False,
                 eps=1e-8, adam_debias=False, *, maximize=False, foreach=None, stochastic_rounding=False,
                 master_weights=False, seed=0, state_bits=None, min_quant_size=4096,
                 backend="auto"):
        super().__init__(params, self._defaults(lr, betas, weight_decay, weight_decouple, fixed_decay, rectify,
                                                n_sma_threshold, degenerated_to_sgd, ams_bound, eps, adam_debias,
                                                maximize, foreach, stochastic_rounding, master_weights, seed,
                                                backend) | dict(state_bits=state_bits, min_quant_size=min_quant_size))


class EXAdam(_ZooOptimizer):
    r"""EXAdam: Adam with cross-moment debiasing and a gradient-accelerated numerator.

    State: ``exp_avg``, ``exp_avg_sq``.
    """ + _COMMON_DOC

    OP = "exadam"
    STATE_NAMES = ("exp_avg", "exp_avg_sq")
    HYPER_NAMES = ("betas", "weight_decay", "weight_decouple", "fixed_decay", "eps")
    REFERENCE = staticmethod(exadam_reference)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0, weight_decouple=True,
                 fixed_decay=False, eps=1e-8, *, maximize=False, foreach=None, stochastic_rounding=False,
                 master_weights=False, seed=0, state_bits=None, min_quant_size=4096,
                 backend="auto"):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay,
                                      weight_decouple=weight_decouple, fixed_decay=fixed_decay, eps=eps,
                                      maximize=maximize, foreach=foreach, stochastic_rounding=stochastic_rounding,
                                      master_weights=master_weights, seed=seed, backend=backend,
                                      state_bits=state_bits, min_quant_size=min_quant_size))

    def _check_group(self, group):
        self._check_common(group)

    def _native_hyper(self, group):
        b1, b2 = (float(b) for b in group["betas"])
        return (b1, b2, float(group["weight_decay"]), float(group["eps"]), 0.0), _flags(group)
