"""Adam and AdamW (Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015;
Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019), fused over all tensors.

Drop-in replacements for ``torch.optim.Adam`` / ``torch.optim.AdamW``: same arguments, same state
names (``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``), and state dicts that load into
each other both ways.
"""
from typing import Optional, Tuple, Union

import torch

from . import functional as F
from .base import FusedOptimizer
from .functional import Params


class Adam(FusedOptimizer):
    r"""Adam with optional L2 (``decoupled_weight_decay=False``) or decoupled weight decay.

    With t the step after this one and g the gradient::

        p <- p (1 - lr wd)   [decoupled]   or   g <- g + wd p   [L2]
        m <- b1 m + (1 - b1) g ;  v <- b2 v + (1 - b2) g^2 ;  vmax <- max(vmax, v)  [amsgrad]
        p <- p - lr / (1 - b1^t) * m / (sqrt(v or vmax) / sqrt(1 - b2^t) + eps)

    Args are those of ``torch.optim.Adam``, plus ``backend``: "auto" (cuda > triton on GPUs, cpu >
    torch on CPUs), "cuda", "triton", "cpu" or "torch".  ``foreach``, ``fused`` and ``capturable`` are
    accepted for compatibility: every fastopt kernel is fused, reads ``lr``/``step`` on the device and
    never syncs with the host, so CUDA graphs work whatever ``capturable`` says (pass ``lr`` as a
    tensor if it changes between graph replays).  ``differentiable=True`` is not supported.
    Parameters may be fp32, fp16 or bf16 (math in fp32); other dtypes run the torch backend under
    "auto".
    """

    def __init__(self, params: Params, lr: Union[float, torch.Tensor] = 1e-3,
                 betas: Tuple[Union[float, torch.Tensor], Union[float, torch.Tensor]] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False, *,
                 foreach: Optional[bool] = None, maximize: bool = False, capturable: bool = False,
                 differentiable: bool = False, fused: Optional[bool] = None, decoupled_weight_decay: bool = False,
                 backend: str = "auto") -> None:
        F.check_adam_hyper(lr, betas, eps, weight_decay)
        if differentiable:
            raise NotImplementedError(f"{type(self).__name__} does not support differentiable=True")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, foreach=foreach, capturable=capturable, differentiable=False,
                        fused=fused, decoupled_weight_decay=decoupled_weight_decay, backend=backend)
        super().__init__(params, defaults)

    def _check_group(self, group):
        F.check_adam_hyper(group["lr"], group["betas"], group["eps"], group["weight_decay"])

    def _init_state(self, group, p, state):
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _elementwise_states(self, group, p, state):
        return dict.fromkeys(("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), p.dtype)

    def _step_bucket(self, group, params, grads, backend, grad_scale, found_inf):
        states = [self.state[p] for p in params]
        if group["amsgrad"]:
            for p, s in zip(params, states):  # a checkpoint saved without amsgrad
                if "max_exp_avg_sq" not in s:
                    s["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        beta1, beta2 = (float(b) for b in group["betas"])
        F.adam_unchecked(
            params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
            [s["max_exp_avg_sq"] for s in states] if group["amsgrad"] else [], [s["step"] for s in states],
            lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
            decoupled=group["decoupled_weight_decay"], amsgrad=group["amsgrad"], maximize=group["maximize"],
            grad_scale=grad_scale, found_inf=found_inf, backend=backend, device=params[0].device)


class AdamW(Adam):
    r"""AdamW: Adam with decoupled weight decay (default ``weight_decay=1e-2``, as torch.optim.AdamW).

    Update: ``p <- p (1 - lr wd)``, then the Adam step of :class:`Adam`.  Paper: Loshchilov & Hutter,
    "Decoupled Weight Decay Regularization" (ICLR 2019).  Arguments: those of ``torch.optim.AdamW``
    (``decoupled_weight_decay`` is always True) plus ``backend``; see :class:`Adam` for what differs
    from torch (``differentiable=True`` raises NotImplementedError; math in fp32).
    """

    def __init__(self, params: Params, lr: Union[float, torch.Tensor] = 1e-3,
                 betas: Tuple[Union[float, torch.Tensor], Union[float, torch.Tensor]] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 foreach: Optional[bool] = None, capturable: bool = False, differentiable: bool = False,
                 fused: Optional[bool] = None, backend: str = "auto") -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         foreach=foreach, maximize=maximize, capturable=capturable,
                         differentiable=differentiable, fused=fused, decoupled_weight_decay=True,
                         backend=backend)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True
