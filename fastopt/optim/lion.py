"""Lion (Chen et al., "Symbolic Discovery of Optimization Algorithms", NeurIPS 2023), fused.

Drop-in for ``pytorch_optimizer.Lion`` and ``lion_pytorch.Lion``: same arguments and state name
(``exp_avg``).  Equations: :func:`fastopt.reference.lion.lion_reference`.

Also home of the kernel passes that pytorch_optimizer's per-tensor gradient options need on the fused
backends (used by Lion, Adan and AdamP): gradient centralization (``use_gc``) and the cautious mask
(``cautious``).  Both reuse the generic op's reduce pass (``csrc/include/fastopt/elementwise.h``): no
launcher of their own.
"""
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch

from .._opspec import OPS, native_args
from ..lowbit import state as lowbit_state
from ..reference.lion import lion_reference
from . import functional as F
from .base import ElementwiseOptimizer
from .functional import elementwise_unchecked

Params = Union[Iterable[torch.Tensor], Iterable[Dict[str, Any]]]


def check_betas(betas, name="betas", count=2):
    if len(betas) != count:
        raise ValueError(f"Invalid {name}: expected {count} values, got {betas!r}")
    for i, b in enumerate(betas):
        F.check_hyper(f"beta parameter at index {i}", b, high=1.0, high_open=True)


def check_unsupported(owner, group, **defaults):
    """Raise ValueError for an upstream option that fastopt does not implement when ``group`` sets it
    away from its (upstream) default.  ``defaults``: name -> (default, why)."""
    for key, (default, why) in defaults.items():
        value = group.get(key, default)
        if value != default:
            raise ValueError(f"{owner}: {key}={value!r} is not supported ({why}); leave it at its default "
                             f"{default!r}")


ADANORM_WHY = ("AdaNorm rescales each gradient by a running average of its norm: a per-tensor reduction and "
               "a state of its own that fastopt does not implement")


def check_adanorm(owner, group):
    check_unsupported(owner, group, adanorm=(False, ADANORM_WHY))


def gc_rows(params):
    """Rows of gradient centralization per tensor: ``p.shape[0]`` for 2+-dim tensors (upstream's
    ``centralize_gradient``: the mean over every dim but the first), else 1 (not centralized)."""
    return [p.shape[0] if p.dim() > 1 and p.numel() > 0 else 1 for p in params]


def _row_layout(opt, params, rows, device):
    """(positions of the centralized rows among all rows, their row lengths (fp32), tensor id per row),
    cached per bucket layout on ``opt``."""
    key = ("gc", tuple(tuple(p.shape) for p in params), tuple(rows), str(device))
    cache = opt.__dict__.setdefault("_gc_layouts", {})
    hit = cache.get(key)
    if hit is None:
        pos, lens, start = [], [], 0
        for p, r in zip(params, rows):
            if p.dim() > 1 and p.numel() > 0:
                pos.extend(range(start, start + r))
                lens.extend([p.numel() // r] * r)
            start += r
        tid = torch.repeat_interleave(torch.arange(len(params)), torch.tensor(rows))
        hit = (torch.tensor(pos, dtype=torch.int64).to(device), torch.tensor(lens, dtype=torch.float32).to(device),
               tid.to(device), torch.tensor([float(p.numel()) for p in params], dtype=torch.float32).to(device))
        if len(cache) > 32:
            cache.clear()
        cache[key] = hit
    return hit


def gradient_row_means(opt, params, grads, rows, *, maximize, grad_scale, found_inf, backend, device):
    """fp32 ``[sum(rows)]``: the mean of each row of the (signed, unscaled) gradients over every dim but
    the first for 2+-dim tensors, 0 for the others -- the ``grad_rowsum`` op's reduce pass, one kernel
    call for the whole bucket, then a division on the device (no host sync)."""
    mean = torch.zeros(sum(rows), dtype=torch.float32, device=device)
    idx = [i for i, p in enumerate(params) if p.dim() > 1 and p.numel() > 0]
    if not idx:
        return mean
    pos, lens, _, _ = _row_layout(opt, params, rows, device)
    sub_rows = [rows[i] for i in idx]
    sums = torch.zeros((sum(sub_rows), 4), dtype=torch.float32, device=device)
    elementwise_unchecked("grad_rowsum", [params[i] for i in idx], [grads[i] for i in idx], [], [], (), 0, lr=0.0,
                          maximize=maximize, grad_scale=grad_scale, found_inf=found_inf, backend=backend,
                          device=device, phase=1, rows=sub_rows, reduce_out=sums)
    mean[pos] = sums[:, 0] / lens
    return mean


class GradOptionsMixin:
    """``use_gc`` (and, where the op has it, ``cautious``) on the kernel backends: the row means come
    from one ``grad_rowsum`` reduce pass and reach the op as row coefficient ``rc[0]``.  The op's
    ``_run`` gets ``rows`` / ``row_coef``; low-bit states and the fused sparse epilogue run only
    without these options (the torch backend runs everything)."""

    def _grad_options(self, group):
        return bool(group.get("use_gc")) or bool(group.get("cautious"))

    def _fused_sparse_ok(self, group, params, states, backend):
        return (backend != "torch" and not self._grad_options(group)
                and not any("state_format" in s or "master_param" in s for s in states))

    def _check_bucket(self, group, params, backend):
        super()._check_bucket(group, params, backend)
        if backend == "torch" or not self._grad_options(group):
            return
        bits, size = group.get("state_bits"), group.get("min_quant_size", 4096)
        for p in params:
            state = self.state.get(p) or {}
            if "state_format" in state or (not state and lowbit_state.is_quantizable(p, bits, size)):
                on = [k for k in ("use_gc", "cautious") if group.get(k)]
                raise ValueError(f"{type(self).__name__}: {' and '.join(on)} with low-bit states (state_bits="
                                 f"{bits!r}) run on backend='torch' only, not {backend!r}")

    def _centralize(self, group, params, grads, backend, grad_scale, found_inf):
        """(rows, row_coef [sum(rows), 4] fp32 with the row means in column 0)."""
        device = params[0].device
        rows = gc_rows(params) if group.get("use_gc") else [1] * len(params)
        row = torch.zeros((sum(rows), 4), dtype=torch.float32, device=device)
        if group.get("use_gc"):
            row[:, 0] = gradient_row_means(self, params, grads, rows, maximize=group["maximize"],
                                           grad_scale=grad_scale, found_inf=found_inf, backend=backend,
                                           device=device)
        return rows, row

    def _run(self, group, params, grads, states, backend, grad_scale, found_inf, phase=0, rows=None,
             row_coef=None, reduce_out=None, sparse=None):
        if backend == "torch" or not self._grad_options(group):
            return super()._run(group, params, grads, states, backend, grad_scale, found_inf, phase=phase, rows=rows,
                                row_coef=row_coef, reduce_out=reduce_out, sparse=sparse)
        rows, row = self._centralize(group, params, grads, backend, grad_scale, found_inf)
        if group.get("cautious"):
            # the cautious mask's count per tensor (a reduce pass that writes nothing), then the scale
            # fp32(numel) / (count + 1) as upstream's apply_cautious, in column 1 of every row
            device = params[0].device
            hyper, flags = self._native_hyper(group)
            lists = [s[name] for name in self._state_names(group) for s in states]
            sums = torch.zeros((sum(rows), 4), dtype=torch.float32, device=device)
            elementwise_unchecked(self._op_name(group), params, grads, lists, [s["step"] for s in states], hyper, flags,
                                  lr=group["lr"], maximize=group["maximize"], grad_scale=grad_scale,
                                  found_inf=found_inf, backend=backend, device=device, phase=1, rows=rows,
                                  row_coef=row, reduce_out=sums)
            _, _, tid, numels = _row_layout(self, params, rows, device)
            count = torch.zeros(len(params), dtype=torch.float32, device=device).index_add_(0, tid, sums[:, 0])
            row[:, 1] = (numels / (count + 1.0))[tid]
        return super()._run(group, params, grads, states, backend, grad_scale, found_inf, rows=rows, row_coef=row)


class Lion(GradOptionsMixin, ElementwiseOptimizer):
    r"""Lion: the sign of an interpolated momentum, with decoupled weight decay.

    Update (per element; ``g`` the gradient, ``m`` the state ``exp_avg``)::

        g <- g - mean_row(g)                        [use_gc: 2+-dim tensors, mean over dims 1..]
        p <- p (1 - wd (fixed_decay ? 1 : lr))      [weight_decouple]   or   g <- g + wd p
        u <- sign(m + (1 - b1)(g - m))
        u <- u [u g > 0] numel / (count + 1)        [cautious: count = #(u g > 0) in the tensor]
        m <- m + (1 - b2)(g - m)
        p <- p - lr u

    Paper: Chen et al., "Symbolic Discovery of Optimization Algorithms" (NeurIPS 2023); cautious:
    Liang et al., "Cautious Optimizers: Improving Training with One Line of Code" (2024); gradient
    centralization: Yong et al. (ECCV 2020).

    Args:
        params: parameters or param groups.
        lr: learning rate (float or one-element tensor).
        betas: ``(b1, b2)``: interpolation for the sign, momentum decay.
        weight_decay, weight_decouple, fixed_decay: pytorch_optimizer's weight decay modes.
        foreach: accepted and ignored (every backend is fused).
        maximize: maximize the objective.
        use_gc: gradient centralization (fused: one extra reduce pass over the gradients).
        adanorm, adanorm_r: accepted; ``adanorm=True`` raises ValueError (not implemented).
        cautious: the cautious mask (fused: one extra reduce pass that counts the mask).
        stochastic_rounding, master_weights, seed: bf16 parameters (see
            :class:`~fastopt.optim.base.ElementwiseOptimizer`).
        state_bits, min_quant_size: low-bit ``exp_avg`` (see :mod:`fastopt.lowbit`; with ``use_gc`` or
            ``cautious`` only on the torch backend).
        backend: "auto", "cuda", "triton", "cpu" or "torch" (the reference).

    Differences from pytorch_optimizer 4.1.0: math in fp32 whatever the storage dtype; ``step`` per
    parameter (upstream: per group); gradients are never written to (upstream centralizes and negates
    ``p.grad`` in place); the gradient-centralization mean and the cautious count are sums in a
    backend-dependent order (equal up to fp32 rounding).
    """

    OP = "lion"
    STATE_NAMES = OPS["lion"].states
    HYPER_NAMES = ("betas", "weight_decay", "weight_decouple", "fixed_decay", "use_gc", "cautious")
    REFERENCE = staticmethod(lion_reference)

    def __init__(self, params: Params, lr: Union[float, torch.Tensor] = 1e-4,
                 betas: Tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0, weight_decouple: bool = True,
                 fixed_decay: bool = False, foreach: Optional[bool] = None, maximize: bool = False, *,
                 use_gc: bool = False, adanorm: bool = False, adanorm_r: float = 0.95, cautious: bool = False,
                 stochastic_rounding: bool = False, master_weights: bool = False, seed: int = 0,
                 state_bits: Optional[Union[int, str]] = None, min_quant_size: int = 4096,
                 backend: str = "auto") -> None:
        defaults = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, weight_decouple=weight_decouple,
                        fixed_decay=fixed_decay, foreach=foreach, maximize=maximize, use_gc=use_gc, adanorm=adanorm,
                        adanorm_r=adanorm_r, cautious=cautious, stochastic_rounding=stochastic_rounding,
                        master_weights=master_weights, seed=seed, backend=backend, state_bits=state_bits,
                        min_quant_size=min_quant_size)
        self._check_group(defaults)
        super().__init__(params, defaults)

    def _check_group(self, group):
        F.check_hyper("learning rate", group["lr"])
        check_betas(group["betas"])
        F.check_hyper("weight_decay value", group["weight_decay"])
        check_adanorm(type(self).__name__, group)

    def _op_name(self, group):
        return "lion_cautious" if group.get("cautious") else "lion"

    def _native_hyper(self, group):
        b1, b2 = group["betas"]
        return native_args(self._op_name(group), group, beta1=b1, beta2=b2, weight_decay=group["weight_decay"])
