"""Optimizers with low-bit states preset: ``<Optimizer><8bit|4bit|Fp8>``.

``AdamW8bit(params, lr=...)`` is ``AdamW``'s arguments with ``state_bits=8`` (and ``min_quant_size``);
likewise Adam, Lion, Adan, AdaBelief, DiffGrad and EXAdam, each in 8bit, 4bit and Fp8.  AdamW/Adam here
run the generic elementwise op with the Adam functor (``csrc/include/fastopt/functors/adam.h``), so
they take the same options as :class:`fastopt.AdamW` plus those of
:class:`~fastopt.optim.base.ElementwiseOptimizer` (stochastic rounding, master weights, state_bits).
"""
from ..optim import functional as F
from ..optim.base import ElementwiseOptimizer
from ..optim.lion import Lion
from ..optim.zoo import AdaBelief, Adan, DiffGrad, EXAdam
from ..reference import adam_reference


def _adam_reference(params, grads, states, *, lr, maximize, grad_scale, found_inf, betas, eps, weight_decay,
                    amsgrad, decoupled_weight_decay):
    adam_reference(params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                   [s["max_exp_avg_sq"] for s in states] if amsgrad else [], [s["step"] for s in states],
                   lr=lr, beta1=float(betas[0]), beta2=float(betas[1]), eps=eps, weight_decay=weight_decay,
                   decoupled=decoupled_weight_decay, amsgrad=amsgrad, maximize=maximize, grad_scale=grad_scale,
                   found_inf=found_inf)


class ElementwiseAdam(ElementwiseOptimizer):
    r"""Adam / AdamW on the generic elementwise op (same math and state names as :class:`fastopt.Adam`),
    which adds bf16 stochastic rounding, master weights and low-bit states to it."""

    STATE_NAMES = ("exp_avg", "exp_avg_sq")
    HYPER_NAMES = ("betas", "eps", "weight_decay", "amsgrad", "decoupled_weight_decay")
    REFERENCE = staticmethod(_adam_reference)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, *,
                 decoupled_weight_decay=False, maximize=False, foreach=None, stochastic_rounding=False,
                 master_weights=False, seed=0, state_bits=None, min_quant_size=4096, backend="auto"):
        F.check_adam_hyper(lr, betas, eps, weight_decay)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        decoupled_weight_decay=decoupled_weight_decay, maximize=maximize, foreach=foreach,
                        stochastic_rounding=stochastic_rounding, master_weights=master_weights, seed=seed,
                        state_bits=state_bits, min_quant_size=min_quant_size, backend=backend)
        super().__init__(params, defaults)

    def _check_group(self, group):
        F.check_adam_hyper(group["lr"], group["betas"], group["eps"], group["weight_decay"])

    def _state_names(self, group):
        return self.STATE_NAMES + (("max_exp_avg_sq",) if group["amsgrad"] else ())

    def _op_name(self, group):
        return ("adamw" if group["decoupled_weight_decay"] else "adam") + ("_ams" if group["amsgrad"] else "")

    def _native_hyper(self, group):
        b1, b2 = (float(b) for b in group["betas"])
        return (b1, b2, float(group["eps"]), float(group["weight_decay"])), 0


class ElementwiseAdamW(ElementwiseAdam):
    """:class:`ElementwiseAdam` with decoupled weight decay (default ``weight_decay=1e-2``)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, **kwargs):
        kwargs["decoupled_weight_decay"] = True
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, **kwargs)


_BASES = {"AdamW": ElementwiseAdamW, "Adam": ElementwiseAdam, "Lion": Lion, "Adan": Adan,
          "AdaBelief": AdaBelief, "DiffGrad": DiffGrad, "EXAdam": EXAdam}
_SUFFIX = {8: "8bit", 4: "4bit", "fp8": "Fp8"}


def _preset(base, bits):
    name = base.__name__.replace("Elementwise", "") + _SUFFIX[bits]

    def __init__(self, params, *args, **kwargs):
        kwargs.setdefault("state_bits", bits)
        base.__init__(self, params, *args, **kwargs)

    doc = (f"``{base.__name__}`` with ``state_bits={bits!r}`` preset (see :mod:`fastopt.lowbit`): "
           f"same arguments.\n\n" + (base.__doc__ or ""))
    return type(name, (base,), {"__init__": __init__, "__doc__": doc, "__module__": __name__})


__all__ = ["ElementwiseAdam", "ElementwiseAdamW"]
for _base in _BASES.values():
    for _bits in _SUFFIX:
        _cls = _preset(_base, _bits)
        globals()[_cls.__name__] = _cls
        __all__.append(_cls.__name__)
