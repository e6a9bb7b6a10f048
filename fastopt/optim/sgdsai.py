"""SGD-SaI (Xu et al., 2024), fused: a drop-in for ``pytorch_optimizer.SGDSaI``; the g-SNR is a reduce pass."""
from typing import Optional, Union

import torch
from torch.utils.weak import WeakIdKeyDictionary

from ..reference._common import skipped
from .. import _sharded
from .._opspec import OPS, native_args
from ..reference.sgdsai import gsnr_of, sgdsai_reference
from . import functional as F
from .functional import Params, elementwise_unchecked
from ._pytorch_optimizer import _COMMON_DOC, _ZooOptimizer, _lr64, constructor_defaults


class SGDSaI(_ZooOptimizer):
    __doc__ = r"""SGD-SaI: SGD with momentum, each tensor's learning rate scaled by the gradient signal-to-noise
    ratio of its first step (state ``gsnr``, kept for the run).

    Update (per tensor, ``gsnr`` from the first step's gradient)::

        buf <- lerp(buf, g, 1 - momentum)   (buf = g without momentum; + wd p there without weight_decouple)
        p   <- p (1 - lr wd) [weight_decouple]  -  lr gsnr buf

    Paper: Xu et al., "No More Adam: Learning Rate Scaling at Initialization is All You Need" (2024).
    The first step computes the g-SNRs with torch ops (once per run); every step is one fused kernel.
    Equations: :func:`fastopt.reference.sgdsai.sgdsai_reference`.  State: ``momentum_buffer``, ``gsnr``.

    Args:
        params: parameters or param groups.
        lr: learning rate (float or one-element tensor).
        momentum: momentum factor (0: no buffer).
        weight_decay, weight_decouple: decoupled or L2 weight decay (L2 with momentum > 0 raises
            ValueError: upstream's L2 term has no effect there).
        eps: added to the g-SNR's standard deviation.
        maximize: maximize the objective.
        foreach: accepted and ignored.""" + _COMMON_DOC + "\n    "

    OP = "sgdsai"
    STATE_NAMES = OPS["sgdsai"].states
    HYPER_NAMES = ("momentum", "weight_decay", "weight_decouple", "eps")
    REFERENCE = staticmethod(sgdsai_reference)

    def __init__(self, params: Params, lr: Union[float, torch.Tensor] = 1e-2, momentum: float = 0.9,
                 weight_decay: float = 1e-2, weight_decouple: bool = True, eps: float = 1e-8, maximize: bool = False,
                 foreach: Optional[bool] = None, *, stochastic_rounding: bool = False, master_weights: bool = False,
                 seed: int = 0, backend: str = "auto") -> None:
        super().__init__(params, constructor_defaults(locals()))

    def _check_group(self, group):
        F.check_hyper("learning rate", group["lr"])
        F.check_hyper("momentum value", group["momentum"], high=1.0)
        F.check_hyper("weight_decay value", group["weight_decay"])
        F.check_hyper("epsilon value", group["eps"])
        if not group["weight_decouple"] and group["weight_decay"] != 0 and group["momentum"] > 0:
            raise ValueError("SGDSaI: weight_decouple=False with momentum > 0 is not supported (upstream adds "
                             "wd*p after the momentum buffer used the gradient, so the decay has no effect)")

    def _state_names(self, group):
        return self.STATE_NAMES if group["momentum"] > 0 else ()

    def _op_name(self, group):
        return "sgdsai" if group["momentum"] > 0 else "sgdsai_plain"

    def _init_state(self, group, p, state):
        super()._init_state(group, p, state)
        state["gsnr"] = torch.zeros((), dtype=torch.float32, device=p.device)

    def _native_hyper(self, group):
        return native_args(self._op_name(group), group, momentum=group["momentum"],
                           weight_decay=group["weight_decay"])

    def _run(self, group, params, grads, states, backend, grad_scale, found_inf):
        if backend == "torch":
            return super()._run(group, params, grads, states, backend, grad_scale, found_inf)
        device, eps = params[0].device, float(group["eps"])
        # The g-SNR of each tensor's first step: the step count is read on the host once per (step,
        # gsnr) pair of state tensors, so the steps after the first never sync.  `_gsnr_known` maps
        # each step tensor checked to the gsnr tensor it was checked with, weakly (by identity, never
        # by a recyclable id): a state made anew (opt.state.clear(), load_state_dict, a replaced step
        # or gsnr) is checked again.
        #
        # Under torch.compile neither the host read nor the weak dictionary can be traced: the g-SNR
        # of every tensor is computed at every step and kept only where the step count is 0 and AMP
        # did not skip the step (torch.where on the device; the same numbers, one more pass over
        # the gradients per compiled step).
        if torch.compiler.is_compiling():
            first = [s["step"] == 0 if found_inf is None else (s["step"] == 0) & (found_inf == 0) for s in states]
            new = [gsnr_of(g.float() if grad_scale is None else g.float() / grad_scale, eps) for g in grads]
            olds = [s["gsnr"] for s in states]
            torch._foreach_copy_(olds, [torch.where(f, n, o) for f, n, o in zip(first, new, olds)])
        else:
            known = self.__dict__.get("_gsnr_known")
            if not isinstance(known, WeakIdKeyDictionary):
                known = self._gsnr_known = WeakIdKeyDictionary()
            unknown = [(g, s) for g, s in zip(grads, states) if known.get(s["step"]) is not s["gsnr"]]
            if unknown and not skipped(found_inf):
                for g, s in unknown:
                    if float(s["step"]) == 0.0:
                        g32 = _sharded.whole(g).float()  # (FSDP2: the whole gradient, once per tensor)
                        g32 = g32 if grad_scale is None else g32 / grad_scale
                        s["gsnr"].copy_(gsnr_of(g32, eps))
                    known[s["step"]] = s["gsnr"]
        lr64 = _lr64(group["lr"], device)
        row = torch.zeros((len(params), 4), dtype=torch.float32, device=device)
        row[:, 0] = (lr64 * torch.stack([s["gsnr"] for s in states]).double()).float()
        hyper, flags = self._native_hyper(group)
        lists = [s[name] for name in self._state_names(group) for s in states]
        elementwise_unchecked(self._op_name(group), params, grads, lists, [s["step"] for s in states], hyper, flags,
                              lr=group["lr"], maximize=group["maximize"], grad_scale=grad_scale,
                              found_inf=found_inf, backend=backend, device=device, row_coef=row,
                              seed=group["seed"], stochastic=self._stochastic(group, params[0]))
