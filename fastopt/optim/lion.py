"""Lion (Chen et al., "Symbolic Discovery of Optimization Algorithms", NeurIPS 2023), fused.

Drop-in for ``pytorch_optimizer.Lion`` and ``lion_pytorch.Lion``: same arguments and state name
(``exp_avg``).  Equations: :func:`fastopt.reference.lion.lion_reference`.
"""
from ..reference.lion import lion_reference
from . import functional as F
from .base import ElementwiseOptimizer


def check_betas(betas, name="betas", count=2):
    if len(betas) != count:
        raise ValueError(f"Invalid {name}: expected {count} values, got {betas!r}")
    for i, b in enumerate(betas):
        F.check_hyper(f"beta parameter at index {i}", b, high=1.0, high_open=True)


class Lion(ElementwiseOptimizer):
    r"""Lion: sign of an interpolated momentum, decoupled weight decay.

    ::

        p <- p (1 - wd (fixed_decay ? 1 : lr))     [weight_decouple]   or   g <- g + wd p
        p <- p - lr sign(m + (1 - b1)(g - m)) ;   m <- m + (1 - b2)(g - m)

    Args: ``lr`` (float or tensor), ``betas``, ``weight_decay``, ``weight_decouple``, ``fixed_decay``,
    ``maximize`` as pytorch_optimizer; ``stochastic_rounding`` / ``master_weights`` / ``seed`` for
    bf16 params (see :class:`~fastopt.optim.base.ElementwiseOptimizer`); ``backend`` as
    :class:`fastopt.AdamW`.
    """

    OP = "lion"
    STATE_NAMES = ("exp_avg",)
    HYPER_NAMES = ("betas", "weight_decay", "weight_decouple", "fixed_decay")
    REFERENCE = staticmethod(lion_reference)

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, weight_decouple=True,
                 fixed_decay=False, *, maximize=False, foreach=None, stochastic_rounding=False,
                 master_weights=False, seed=0, state_bits=None, min_quant_size=4096,
                 backend="auto"):
        defaults = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, weight_decouple=weight_decouple,
                        fixed_decay=fixed_decay, maximize=maximize, foreach=foreach,
                        stochastic_rounding=stochastic_rounding, master_weights=master_weights, seed=seed,
                        backend=backend, state_bits=state_bits, min_quant_size=min_quant_size)
        self._check_group(defaults)
        super().__init__(params, defaults)

    def _check_group(self, group):
        F.check_hyper("learning rate", group["lr"])
        check_betas(group["betas"])
        F.check_hyper("weight_decay value", group["weight_decay"])

    def _native_hyper(self, group):
        b1, b2 = group["betas"]
        flags = (1 if group["weight_decouple"] else 0) | (2 if group["fixed_decay"] else 0)
        return (float(b1), float(b2), float(group["weight_decay"])), flags
