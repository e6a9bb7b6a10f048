"""LAMB (You et al., 2020), fused: a drop-in for ``pytorch_optimizer.Lamb``; the trust ratio is a reduce pass."""
from typing import Optional, Tuple, Union

import torch

from .._opspec import OPS, native_args
from ..reference.lamb import SCALAR_STATE_NAMES as LAMB_SCALARS
from ..reference.lamb import lamb_reference
from . import functional as F
from .functional import Params, elementwise_unchecked
from ._pytorch_optimizer import (_COMMON_DOC, _ZooOptimizer, _lr64, check_adanorm, check_unsupported,
                                 constructor_defaults)


def _steps(states, device):
    return torch.stack([s["step"] for s in states]).to(device=device, dtype=torch.float64) + 1.0


def _keep_if_skipped(found_inf, new, old):
    """``new``, or ``old`` where AMP skipped the step (no host sync)."""
    return new if found_inf is None else torch.where(found_inf != 0, old, new)


class Lamb(_ZooOptimizer):
    __doc__ = r"""LAMB: Adam directions rescaled per tensor by the trust ratio ``min(|p|, clamp) / |u|``.

    Update (per tensor; ``b3 = 1 - b1`` with ``grad_averaging``, else 1)::

        g <- g min(1, max_grad_norm / (|g|_global + eps))          [pre_norm]
        m <- b1 m + b3 g      v <- b2 v + (1-b2) g^2
        p <- p (1 - wd (fixed_decay ? 1 : lr))                      [weight_decouple]
        u = m / (sqrt(v) + eps) (+ wd p without weight_decouple)
        p <- p - lr/(1-b1^t) trust u,  trust = min(|p|, clamp) / (|u| + eps)  (1 if a norm is 0 or adam)

    Paper: You et al., "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes"
    (ICLR 2020).  Fused as two kernel passes (the norms, then the step).  State: ``exp_avg``,
    ``exp_avg_sq`` and the per-tensor scalars ``weight_norm``, ``adam_norm``, ``trust_ratio``.

    Args:
        params: parameters or param groups.
        lr: learning rate (float or one-element tensor).
        betas: ``(b1, b2)``.
        weight_decay, weight_decouple, fixed_decay: decoupled or L2 weight decay.
        rectify: accepted; ``True`` raises ValueError (upstream's rectified LAMB is not implemented);
            ``degenerated_to_sgd`` and ``n_sma_threshold`` only matter with it and are accepted.
        grad_averaging: ``b3 = 1 - b1`` (else 1).
        max_grad_norm, pre_norm: global gradient-norm scaling before the step (with ``pre_norm``).
        adam: skip the trust ratio (plain Adam directions).
        eps: as upstream.
        foreach: accepted and ignored.
        maximize: maximize the objective.
        adam_debias: do not divide the step size by ``1 - b1^t``.
        adanorm, adanorm_r: accepted; ``adanorm=True`` raises ValueError (not implemented).
        clamp: the bound of the weight norm in the trust ratio (upstream: a class attribute, 10).""" + \
        _COMMON_DOC + """  ``pre_norm``'s global norm is over the params of one (device, dtype)
    bucket (upstream: over every group).
    """

    OP = "lamb"
    STATE_NAMES = OPS["lamb"].states
    HYPER_NAMES = ("betas", "weight_decay", "weight_decouple", "fixed_decay", "grad_averaging", "max_grad_norm",
                   "adam", "pre_norm", "eps", "adam_debias", "clamp")
    REFERENCE = staticmethod(lamb_reference)

    def __init__(self, params: Params, lr: Union[float, torch.Tensor] = 1e-3,
                 betas: Tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0, weight_decouple: bool = True,
                 fixed_decay: bool = False, rectify: bool = False, degenerated_to_sgd: bool = False,
                 n_sma_threshold: int = 5, grad_averaging: bool = True, max_grad_norm: float = 1.0,
                 adam: bool = False, pre_norm: bool = False, eps: float = 1e-6, foreach: Optional[bool] = None,
                 maximize: bool = False, *, adam_debias: bool = False, adanorm: bool = False,
                 adanorm_r: float = 0.95, clamp: float = 10.0, stochastic_rounding: bool = False,
                 master_weights: bool = False, seed: int = 0, backend: str = "auto") -> None:
        super().__init__(params, constructor_defaults(locals()))

    def _check_group(self, group):
        self._check_common(group)
        F.check_hyper("max_grad_norm", group["max_grad_norm"])
        F.check_hyper("clamp", group["clamp"])
        check_unsupported(type(self).__name__, group, rectify=(
            False, "upstream's rectified LAMB takes the trust ratio of a rectified update; not implemented"))
        check_adanorm(type(self).__name__, group)

    def _init_state(self, group, p, state):
        super()._init_state(group, p, state)
        for name in LAMB_SCALARS:
            state[name] = torch.zeros((), dtype=torch.float32, device=p.device)

    def _native_hyper(self, group):
        b1, b2 = (float(b) for b in group["betas"])
        b3 = 1.0 - b1 if group["grad_averaging"] else 1.0
        return native_args(self.OP, group, beta1=b1, beta2=b2, beta3=b3, weight_decay=group["weight_decay"],
                           eps=group["eps"])

    def _run(self, group, params, grads, states, backend, grad_scale, found_inf):
        if backend == "torch":
            return super()._run(group, params, grads, states, backend, grad_scale, found_inf)
        device, n, eps = params[0].device, len(params), float(group["eps"])
        call = dict(lr=group["lr"], maximize=group["maximize"], found_inf=found_inf, backend=backend, device=device)
        if group["pre_norm"] and float(group["max_grad_norm"]) != 0.0:
            # the global norm of the (unscaled) gradients, by the clip op's reduce pass
            sums = torch.zeros((n, 4), dtype=torch.float32, device=device)
            elementwise_unchecked("clip", grads, grads, [], [], (), 0, **{**call, "maximize": False},
                                  grad_scale=None, phase=1, reduce_out=sums)
            sq = sums[:, 0].sum()
            if grad_scale is not None:
                sq = sq / (grad_scale * grad_scale)
            gscale = torch.clamp(float(group["max_grad_norm"]) / (sq.sqrt() + eps), max=1.0)
            grad_scale = (grad_scale if grad_scale is not None else torch.ones((), device=device)) / gscale
        hyper, flags = self._native_hyper(group)
        lists = [s[name] for name in self.STATE_NAMES for s in states]
        steps = [s["step"] for s in states]
        sums = torch.zeros((n, 4), dtype=torch.float32, device=device)
        elementwise_unchecked(self.OP, params, grads, lists, steps, hyper, flags, grad_scale=grad_scale,
                              phase=1, reduce_out=sums, **call)
        b1 = float(group["betas"][0])
        lr64 = _lr64(group["lr"], device)
        step_size = lr64 if group["adam_debias"] else lr64 / (1.0 - b1 ** _steps(states, device))
        wn = sums[:, 0].sqrt().clamp(min=0.0, max=float(group["clamp"]))
        un = sums[:, 1].sqrt()
        trust = torch.where((wn != 0) & (un != 0), wn / (un + eps), torch.ones_like(wn))
        row = torch.zeros((n, 4), dtype=torch.float32, device=device)
        row[:, 0] = step_size.float() * (torch.ones_like(trust) if group["adam"] else trust)
        for name, value in zip(LAMB_SCALARS, (wn, un, trust)):
            olds = [s[name] for s in states]
            torch._foreach_copy_(olds, list(_keep_if_skipped(found_inf, value, torch.stack(olds)).unbind()))
        elementwise_unchecked(self.OP, params, grads, lists, steps, hyper, flags, grad_scale=grad_scale,
                              phase=0, row_coef=row, seed=group["seed"],
                              stochastic=self._stochastic(group, params[0]), **call)
