"""INT8 weights trained with stochastic rounding (the Q-GaLore recipe, Zhang et al. 2024).

The weight of a :class:`Int8Linear` is stored as uint8 codes with an fp32 scale and zero point per
group of ``group_size`` consecutive elements (asymmetric, as Q-GaLore):

    scale = max(max(w) - min(w), 1e-5) / 255,   zero = clamp(-round(min(w) / scale), 0, 255)
    code  = clamp(round(w / scale) + zero, 0, 255),   w = (code - zero) * scale

There is no full-precision copy of the weight.  The forward and backward dequantize it to the
activations' dtype; the weight's gradient (in that dtype) is accumulated into ``weight.float_grad``
(an int8 tensor cannot hold a float ``.grad``).  fastopt's elementwise optimizers
(:class:`~fastopt.optim.base.ElementwiseOptimizer`: AdamW/Adam through ``fastopt.lowbit``, Lion, Adan,
AdaBelief, DiffGrad, EXAdam, LAMB, AdamP, SGDP, SGD-SaI) step such a weight like any other: they
dequantize it to fp32, run their step (full-precision or low-bit states), and requantize it with new
group scales.  With ``stochastic_rounding=True`` (the default, as Q-GaLore) the requantization rounds
``w / scale`` up with probability equal to its fractional part, so updates far below one quantization
step still move the weight on average; the random bits come from the same counter-based hash as the
bf16 stochastic rounding (:mod:`fastopt.reference.rounding`), keyed by the optimizer's ``seed``, the
weight's index in its group and the step, so runs are reproducible.

Convert a model with :func:`int8_linear_`; read the weight back with :meth:`Int8Linear.dequantized_weight`.
"""
import weakref
from typing import Callable, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from ..reference.rounding import check_offset, sr_bits

__all__ = ["Int8Linear", "int8_linear_", "quantize_int8", "dequantize_int8", "is_int8_weight"]

_LEVELS = 255
# int8 weight -> weakref to its Int8Linear (kept outside the Parameter, so modules still pickle).
_OWNERS = WeakIdKeyDictionary()


def _check_groups(numel, group_size, who):
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise ValueError(f"{who}: group_size must be a positive int, got {group_size!r}")
    if numel % group_size:
        raise ValueError(f"{who}: numel {numel} is not a multiple of group_size {group_size}")


def _uniform(numel, device, seed, index, step, offset=0):
    """fp32 uniforms in [0, 1) for elements offset..offset+numel-1: the top 24 of the stream's 32 bits."""
    return (sr_bits(numel, device, seed, index, step, offset) >> 8).to(torch.float32) * (1.0 / (1 << 24))


def quantize_int8(w: torch.Tensor, group_size: int = 256, *, stochastic: bool = False, seed: int = 0, index: int = 0,
                  step: int = 0, offset: int = 0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``w`` per group of ``group_size`` consecutive elements (memory order of a contiguous
    ``w``): returns ``(codes, scales, zeros)`` -- uint8 codes shaped like ``w``, fp32 scales and zero
    points ``[numel / group_size]``.  Nearest rounding, or stochastic rounding with the counter-based
    bits of (``seed``, ``index``, ``step``) when ``stochastic``: element ``i`` of ``w`` draws the bits of
    element ``offset + i`` of the stream, ``offset`` being where ``w`` starts in the whole weight it is a
    contiguous piece of (an FSDP2 shard; 0: ``w`` is whole), so that quantizing whole groups piece by
    piece gives the codes of the whole."""
    _check_groups(w.numel(), group_size, "quantize_int8")
    offset = check_offset(offset, "quantize_int8")
    if not w.is_floating_point():
        raise TypeError(f"quantize_int8: expected a floating-point tensor, got {w.dtype}")
    x = w.detach().float().reshape(-1, group_size)
    lo = x.amin(dim=1, keepdim=True)
    scales = (x.amax(dim=1, keepdim=True) - lo).clamp_(min=1e-5) / _LEVELS
    zeros = (-torch.round(lo / scales)).clamp_(0, _LEVELS)
    y = x / scales
    if stochastic:
        y = torch.floor(y + _uniform(x.numel(), x.device, seed, index, step, offset).view_as(y))
    else:
        y = torch.round(y)
    codes = (y + zeros).clamp_(0, _LEVELS).to(torch.uint8)
    return codes.view(w.shape), scales.view(-1), zeros.view(-1)


def dequantize_int8(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int = 256,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(codes - zero) * scale`` per group, as ``dtype``, shaped like ``codes``."""
    _check_groups(codes.numel(), group_size, "dequantize_int8")
    groups = codes.numel() // group_size
    if codes.dtype != torch.uint8 or scales.numel() != groups or zeros.numel() != groups:
        raise ValueError(f"dequantize_int8: expected uint8 codes with {groups} scales and zero points, got "
                         f"{codes.dtype} codes, {scales.numel()} scales, {zeros.numel()} zero points")
    x = codes.reshape(-1, group_size).float()
    x = (x - zeros.float().view(-1, 1)) * scales.float().view(-1, 1)
    return x.to(dtype).view(codes.shape)


def is_int8_weight(p: object) -> bool:
    """Whether ``p`` is the weight of a live :class:`Int8Linear`.  A floating-point tensor never is
    (decided from its dtype alone, so that ``torch.compile`` traces the optimizers' step without
    looking into the weak dictionary of int8 weights)."""
    if not torch.is_tensor(p) or p.dtype != torch.uint8:
        return False
    ref = _OWNERS.get(p)
    owner = ref() if ref is not None else None
    return owner is not None and owner.weight is p


def int8_owner(p):
    return _OWNERS[p]()


class _Int8LinearFunction(torch.autograd.Function):
    """``F.linear`` with the int8 weight dequantized on the fly in the forward and again in the backward
    (nothing full-size is saved); the weight's gradient goes to ``weight.float_grad``."""

    @staticmethod
    def forward(ctx, x, bias, anchor, module):
        ctx.module = module
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x)
        return F.linear(x, module.dequantized_weight(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        module = ctx.module
        grad_x = grad_out @ module.dequantized_weight(grad_out.dtype) if ctx.needs_input_grad[0] else None
        go = grad_out.reshape(-1, grad_out.shape[-1])
        gw = go.t() @ x.reshape(-1, x.shape[-1]).to(go.dtype)
        weight = module.weight
        if getattr(weight, "float_grad", None) is None:
            weight.float_grad = gw
        else:
            weight.float_grad.add_(gw)
        grad_bias = go.sum(0) if ctx.has_bias and ctx.needs_input_grad[1] else None
        return grad_x, grad_bias, None, None


class Int8Linear(nn.Module):
    """``nn.Linear`` whose weight is kept as int8 codes (``weight``, uint8, not requiring grad) with
    per-group fp32 ``weight_scale`` / ``weight_zero`` buffers (see the module doc).  The bias stays a
    float parameter.  Train it with a fastopt elementwise optimizer and ``optimizer.zero_grad()``
    (``module.zero_grad()`` does not clear ``weight.float_grad``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, group_size: int = 256,
                 stochastic_rounding: bool = True, device: Optional[Union[torch.device, str, int]] = None,
                 dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        _check_groups(in_features * out_features, group_size, "Int8Linear")
        self.in_features, self.out_features = in_features, out_features
        self.group_size, self.stochastic_rounding = group_size, bool(stochastic_rounding)
        groups = in_features * out_features // group_size
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=torch.uint8, device=device),
                                   requires_grad=False)
        self.register_buffer("weight_scale", torch.ones(groups, dtype=torch.float32, device=device))
        self.register_buffer("weight_zero", torch.zeros(groups, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        self._attach()

    def _attach(self):
        # The optimizer finds the scales through the weight (_OWNERS); checked again on every forward
        # in case the weight Parameter was replaced.
        _OWNERS[self.weight] = weakref.ref(self)
        self._anchor = torch.empty(0, requires_grad=True)  # makes autograd call the backward for the weight

    def __setstate__(self, state):  # unpickling and copy.deepcopy
        super().__setstate__(state)
        self._attach()

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, group_size: int = 256, stochastic_rounding: bool = True) -> "Int8Linear":
        """An Int8Linear holding ``linear``'s weight rounded to nearest (and its bias, same dtype)."""
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size=group_size,
                  stochastic_rounding=stochastic_rounding, device=linear.weight.device)
        mod.load_float_weight(linear.weight)
        if linear.bias is not None:
            mod.bias = nn.Parameter(linear.bias.detach().clone())
        return mod

    @torch.no_grad()
    def load_float_weight(self, w: torch.Tensor) -> None:
        """Quantize the float tensor ``w`` (nearest) into this module's weight."""
        if tuple(w.shape) != tuple(self.weight.shape):
            raise ValueError(f"Int8Linear: weight of shape {tuple(w.shape)} for a {tuple(self.weight.shape)} layer")
        codes, scales, zeros = quantize_int8(w.contiguous(), self.group_size)
        self.weight.copy_(codes)
        self.weight_scale.copy_(scales)
        self.weight_zero.copy_(zeros)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_int8(self.weight, self.weight_scale, self.weight_zero, self.group_size, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not is_int8_weight(self.weight) or int8_owner(self.weight) is not self:
            self._attach()
        if not torch.is_grad_enabled():
            return F.linear(x, self.dequantized_weight(x.dtype), self.bias)
        return _Int8LinearFunction.apply(x, self.bias, self._anchor, self)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"group_size={self.group_size}, stochastic_rounding={self.stochastic_rounding}")


def int8_linear_(module: nn.Module, *, group_size: int = 256, stochastic_rounding: bool = True,
                 filter: Optional[Callable[[str, nn.Linear], bool]] = None) -> nn.Module:
    """Replace (in place) every ``nn.Linear`` in ``module`` whose weight numel is a multiple of
    ``group_size`` -- and for which ``filter(name, linear)`` is true, when given -- by an
    :class:`Int8Linear`; returns ``module`` (or the new layer when ``module`` itself is a Linear)."""
    if isinstance(module, nn.Linear):
        return Int8Linear.from_linear(module, group_size=group_size, stochastic_rounding=stochastic_rounding)
    for name, child in list(module.named_modules()):
        for cname, sub in list(child.named_children()):
            full = f"{name}.{cname}" if name else cname
            if (isinstance(sub, nn.Linear) and sub.weight.numel() % group_size == 0
                    and (filter is None or filter(full, sub))):
                setattr(child, cname, Int8Linear.from_linear(sub, group_size=group_size,
                                                             stochastic_rounding=stochastic_rounding))
    return module
