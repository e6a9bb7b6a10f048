"""Adagrad, a drop-in for ``torch.optim.Adagrad`` on fastopt's fused elementwise kernels."""
from typing import Optional, Union

import torch

from .._opspec import OPS, native_args
from ..lowbit.layouts import MasterWeights, init_weights
from ..reference.adagrad import adagrad_reference
from . import functional as F
from ._classic import check_lr, check_path_args, path_args_doc
from .base import ElementwiseOptimizer
from .functional import Params


class Adagrad(ElementwiseOptimizer):
    r"""Adagrad: ``torch.optim.Adagrad``'s arguments, defaults, errors, state names and checkpoints, on
    fastopt's fused kernels.

    Update (per element; ``g`` the gradient, negated for ``maximize``; ``sum`` the state of that name;
    t the step after this one)::

        g   <- g + wd p
        clr  = lr / (1 + (t - 1) lr_decay)
        sum <- sum + g g
        p   <- p - clr g / (sqrt(sum) + eps)

    Paper: Duchi, Hazan & Singer, "Adaptive Subgradient Methods for Online Learning and Stochastic
    Optimization" (JMLR 2011).

    Args:
        params: parameters or param groups.
        lr: learning rate (float or one-element tensor).
        lr_decay, weight_decay, initial_accumulator_value, eps, maximize: as ``torch.optim.Adagrad``.
        {path_args}
        stochastic_rounding, master_weights, seed: bf16 parameters (see
            :class:`~fastopt.optim.base.ElementwiseOptimizer`).
        backend: "auto", "cuda", "triton", "cpu" or "torch" (the reference, fastopt/reference/adagrad.py).

    State: ``step`` and ``sum`` (= initial_accumulator_value), made in the constructor for every
    parameter, as torch does (a group added later gets them at its first step), so a fresh torch.optim
    checkpoint loads either way.  :meth:`share_memory` as torch's.
    Differences from torch.optim.Adagrad: math in fp32 whatever the storage dtype; ``step`` is on the
    parameter's device (torch's for-loop/foreach paths keep it on the CPU; loading moves it); sparse
    gradients and complex parameters raise (torch supports both); no low-bit states (``state_bits`` is
    not an argument); AMP's grad_scale / found_inf are consumed in the kernel on every backend.
    """

    OP = "adagrad"
    STATE_NAMES = OPS["adagrad"].states
    HYPER_NAMES = ("lr_decay", "weight_decay", "eps", "initial_accumulator_value")
    REFERENCE = staticmethod(adagrad_reference)
    _supports_lowbit_states = False

    def __init__(self, params: Params, lr: Union[float, torch.Tensor] = 1e-2, lr_decay: float = 0,
                 weight_decay: float = 0, initial_accumulator_value: float = 0, eps: float = 1e-10,
                 foreach: Optional[bool] = None, *, maximize: bool = False, differentiable: bool = False,
                 fused: Optional[bool] = None, stochastic_rounding: bool = False, master_weights: bool = False,
                 seed: int = 0, backend: str = "auto") -> None:
        defaults = dict(lr=lr, lr_decay=lr_decay, eps=eps, weight_decay=weight_decay,
                        initial_accumulator_value=initial_accumulator_value, foreach=foreach, maximize=maximize,
                        differentiable=differentiable, fused=fused, stochastic_rounding=stochastic_rounding,
                        master_weights=master_weights, seed=seed, backend=backend)
        self._check_group(defaults)
        super().__init__(params, defaults)
        for group in self.param_groups:  # torch makes every state here
            for p in group["params"]:
                if not self.state[p]:
                    self._init_state(group, p, self.state[p])

    def _check_group(self, group):
        check_lr(group["lr"])
        F.check_hyper("lr_decay value", group["lr_decay"])
        F.check_hyper("weight_decay value", group["weight_decay"])
        F.check_hyper("initial_accumulator_value value", group["initial_accumulator_value"])
        F.check_hyper("epsilon value", group["eps"])
        check_path_args("Adagrad", group)

    def _init_state(self, group, p, state):
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        like = init_weights(group, p, state)
        state["sum"] = torch.full_like(like, float(group["initial_accumulator_value"]),
                                       memory_format=torch.preserve_format)

    def _add_missing_states(self, group, params, states):
        for p, s in zip(params, states):
            if "sum" not in s:
                s["sum"] = torch.full_like(s.get(MasterWeights.KEY, p), float(group["initial_accumulator_value"]),
                                           memory_format=torch.preserve_format)

    def _native_hyper(self, group):
        return native_args("adagrad", group, lr_decay=group["lr_decay"], weight_decay=group["weight_decay"],
                           eps=group["eps"])

    def share_memory(self) -> None:
        """Calls ``tensor.share_memory_()`` on the state ``sum`` tensors (as torch.optim.Adagrad)."""
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if "sum" in state:
                    state["sum"].share_memory_()


Adagrad.__doc__ = Adagrad.__doc__.replace("{path_args}", path_args_doc(True))
