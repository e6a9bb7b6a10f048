"""Optimizers with low-bit states preset: ``<Optimizer><8bit|4bit|Fp8>``, and the Adam/AdamW classes on
the generic elementwise op (``ElementwiseAdam`` / ``ElementwiseAdamW``).

Users import them from :mod:`fastopt.lowbit` (``fastopt.lowbit.AdamW8bit``): the top-level package
attaches every name of ``__all__`` there, so that :mod:`fastopt.lowbit` itself, which the optimizers
build on, does not import the optimizers.

``AdamW8bit(params, lr=...)`` is ``AdamW``'s arguments with ``state_bits=8`` (and ``min_quant_size``);
likewise Adam, Lion, Adan, AdaBelief, DiffGrad, EXAdam, SGD and RMSprop, each in 8bit, 4bit and Fp8.  AdamW/Adam here
run the generic elementwise op with the Adam functor (``csrc/include/fastopt/functors/adam.h``), so
they take the same options as :class:`fastopt.AdamW` plus those of
:class:`~fastopt.optim.base.ElementwiseOptimizer` (stochastic rounding, master weights, state_bits).
"""
import inspect
from typing import Optional, Tuple, Union

import torch

from ..reference import adam_reference
from .._opspec import OPS, native_args
from . import functional as F
from .base import ElementwiseOptimizer
from .adabelief import AdaBelief
from .adan import Adan
from .diffgrad import DiffGrad
from .exadam import EXAdam
from .functional import Params
from .lion import Lion
from .rmsprop import RMSprop
from .sgd import SGD


def _adam_reference(params, grads, states, *, lr, maximize, grad_scale, found_inf, betas, eps, weight_decay,
                    amsgrad, decoupled_weight_decay):
    adam_reference(params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                   [s["max_exp_avg_sq"] for s in states] if amsgrad else [], [s["step"] for s in states],
                   lr=lr, beta1=float(betas[0]), beta2=float(betas[1]), eps=eps, weight_decay=weight_decay,
                   decoupled=decoupled_weight_decay, amsgrad=amsgrad, maximize=maximize, grad_scale=grad_scale,
                   found_inf=found_inf)


class ElementwiseAdam(ElementwiseOptimizer):
    r"""Adam / AdamW on the generic elementwise op (same math, arguments and state names as
    :class:`fastopt.Adam`), which adds bf16 stochastic rounding, master weights and low-bit states.

    Update (t the step after this one)::

        p <- p (1 - lr wd)   [decoupled_weight_decay]   or   g <- g + wd p
        m <- b1 m + (1 - b1) g ;  v <- b2 v + (1 - b2) g^2 ;  vmax <- max(vmax, v)  [amsgrad]
        p <- p - lr / (1 - b1^t) * m / (sqrt(v or vmax) / sqrt(1 - b2^t) + eps)

    Paper: Kingma & Ba, "Adam: A Method for Stochastic Optimization" (ICLR 2015); Loshchilov & Hutter,
    "Decoupled Weight Decay Regularization" (ICLR 2019).

    Args:
        params: parameters or param groups.
        lr, betas, eps, weight_decay, amsgrad, decoupled_weight_decay, maximize: as ``torch.optim.Adam``.
        foreach: accepted and ignored (every backend is fused).
        stochastic_rounding, master_weights, seed: bf16 parameters (see
            :class:`~fastopt.optim.base.ElementwiseOptimizer`).
        state_bits: ``None`` (full-precision states), ``8``, ``4``, ``"fp8"`` or ``"4-rank1"``:
            blockwise-quantized ``exp_avg`` / ``exp_avg_sq`` (see :mod:`fastopt.lowbit`).
        min_quant_size: parameters with fewer elements keep full-precision states.
        backend: "auto", "cuda", "triton", "cpu" or "torch" (the reference).

    Differs from ``torch.optim.Adam``: math in fp32 whatever the storage dtype; no ``capturable`` /
    ``differentiable`` / ``fused`` arguments (use :class:`fastopt.Adam` for those); quantized states
    are an approximation (bitsandbytes' 8-bit optimizers are the model).
    """

    STATE_NAMES = OPS["adam"].states
    HYPER_NAMES = ("betas", "eps", "weight_decay", "amsgrad", "decoupled_weight_decay")
    REFERENCE = staticmethod(_adam_reference)

    def __init__(self, params: Params, lr: Union[float, torch.Tensor] = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False, *,
                 decoupled_weight_decay: bool = False, maximize: bool = False, foreach: Optional[bool] = None,
                 stochastic_rounding: bool = False, master_weights: bool = False, seed: int = 0,
                 state_bits: Optional[Union[int, str]] = None, min_quant_size: int = 4096,
                 backend: str = "auto") -> None:
        F.check_adam_hyper(lr, betas, eps, weight_decay)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        decoupled_weight_decay=decoupled_weight_decay, maximize=maximize, foreach=foreach,
                        stochastic_rounding=stochastic_rounding, master_weights=master_weights, seed=seed,
                        state_bits=state_bits, min_quant_size=min_quant_size, backend=backend)
        super().__init__(params, defaults)

    def _check_group(self, group):
        F.check_adam_hyper(group["lr"], group["betas"], group["eps"], group["weight_decay"])

    def _state_names(self, group):
        return OPS[self._op_name(group)].states

    def _op_name(self, group):
        return ("adamw" if group["decoupled_weight_decay"] else "adam") + ("_ams" if group["amsgrad"] else "")

    def _native_hyper(self, group):
        b1, b2 = group["betas"]
        return native_args(self._op_name(group), group, beta1=b1, beta2=b2, eps=group["eps"],
                           weight_decay=group["weight_decay"])


class ElementwiseAdamW(ElementwiseAdam):
    """:class:`ElementwiseAdam` with decoupled weight decay (default ``weight_decay=1e-2``, as
    ``torch.optim.AdamW``)::

        p <- p (1 - lr wd) ;  then the Adam step of :class:`ElementwiseAdam`

    Paper: Loshchilov & Hutter, "Decoupled Weight Decay Regularization" (ICLR 2019).

    Args: those of :class:`ElementwiseAdam` without ``decoupled_weight_decay`` (always True).  Differs
    from ``torch.optim.AdamW`` as :class:`ElementwiseAdam` does."""

    def __init__(self, params: Params, lr: Union[float, torch.Tensor] = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 foreach: Optional[bool] = None, stochastic_rounding: bool = False, master_weights: bool = False,
                 seed: int = 0, state_bits: Optional[Union[int, str]] = None, min_quant_size: int = 4096,
                 backend: str = "auto") -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, decoupled_weight_decay=True,
                         maximize=maximize, foreach=foreach, stochastic_rounding=stochastic_rounding,
                         master_weights=master_weights, seed=seed, state_bits=state_bits,
                         min_quant_size=min_quant_size, backend=backend)


PUBLIC_MODULE = "fastopt.lowbit"
_BASES = {"AdamW": ElementwiseAdamW, "Adam": ElementwiseAdam, "Lion": Lion, "Adan": Adan,
          "AdaBelief": AdaBelief, "DiffGrad": DiffGrad, "EXAdam": EXAdam,
          # bitsandbytes' SGD8bit / RMSprop8bit (momentum_buffer signed, square_avg in the family's formats)
          "SGD": SGD, "RMSprop": RMSprop}
_SUFFIX = {8: "8bit", 4: "4bit", "fp8": "Fp8"}
_FORMAT = {8: "blockwise 8-bit (dynamic-tree codes, as bitsandbytes)", 4: "blockwise 4-bit",
           "fp8": "blockwise fp8 (e4m3)"}


def _preset_init(base, bits, name):
    """An ``__init__`` with ``base.__init__``'s real signature (every argument by name, its defaults),
    except that ``state_bits`` defaults to ``bits``: generated, so that ``inspect.signature`` and
    ``help()`` show the arguments and a wrong keyword raises TypeError as for the base class."""
    sig = inspect.signature(base.__init__)
    params = [p.replace(default=bits) if p.name == "state_bits" else p for p in sig.parameters.values()]
    sig = sig.replace(parameters=params)
    env = {"_base": base}
    header, call = [], []
    star = False
    for p in params:
        if p.kind is p.KEYWORD_ONLY and not star:
            header.append("*")
            star = True
        if p.default is p.empty:
            header.append(p.name)
        else:
            env[f"_d_{p.name}"] = p.default
            header.append(f"{p.name}=_d_{p.name}")
        if p.name != "self":
            call.append(f"{p.name}={p.name}" if p.kind is p.KEYWORD_ONLY else p.name)
    src = f"def __init__({', '.join(header)}):\n    _base.__init__(self, {', '.join(call)})\n"
    exec(src, env)  # noqa: S102  (generated from the base class's own signature only)
    init = env["__init__"]
    init.__signature__ = sig
    init.__annotations__ = dict(getattr(base.__init__, "__annotations__", {}))
    init.__qualname__ = f"{name}.__init__"
    return init


def _preset(base, bits):
    name = base.__name__.replace("Elementwise", "") + _SUFFIX[bits]
    doc = (f"{name}: :class:`{base.__module__}.{base.__name__}` with ``state_bits={bits!r}`` preset -- "
           f"{_FORMAT[bits]} optimizer states for every parameter with at least ``min_quant_size`` elements "
           f"(see :mod:`fastopt.lowbit`).  Same arguments and defaults as the base class otherwise.\n\n"
           + (base.__doc__ or ""))
    # (module: the public home, where pickle and help() find it)
    return type(name, (base,), {"__init__": _preset_init(base, bits, name), "__doc__": doc,
                                "__module__": PUBLIC_MODULE, "_preset_of": base})


__all__ = ["ElementwiseAdam", "ElementwiseAdamW"]
for _base in _BASES.values():
    for _bits in _SUFFIX:
        _cls = _preset(_base, _bits)
        globals()[_cls.__name__] = _cls
        __all__.append(_cls.__name__)
