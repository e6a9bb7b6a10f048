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

Data parallel training (DDP, FSDP2): ``float_grad`` is not a parameter's ``.grad``, so neither
DistributedDataParallel nor ``fully_shard`` reduces it.  Call :func:`reduce_float_grads` after the
backward and before ``optimizer.step()``: it averages every Int8Linear ``float_grad`` across the ranks
in one collective.  While torch.distributed runs more than one rank, the optimizers refuse a
``float_grad`` that was not reduced since the backward last wrote it.  Under FSDP2 the int8 weights stay
whole on every rank (1 byte per element; their scales are buffers): pass them to ``fully_shard`` as
``ignored_params=set(int8_weights(model))``; an Int8Linear whose weight ``fully_shard`` would shard
refuses it (the codes' quantization groups and scales would be split from each other, and the
gradient would never reach the sharded weight).
"""
import weakref
from typing import Any, Callable, Iterable, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from ..reference.rounding import check_offset, sr_bits

__all__ = ["Int8Linear", "int8_linear_", "quantize_int8", "dequantize_int8", "is_int8_weight", "int8_weights",
           "reduce_float_grads"]

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

    def __setattr__(self, name, value):
        # fully_shard (FSDP2) registers a module's sharded parameters through setattr when the module
        # defines __setattr__: the earliest point at which a sharded int8 weight can be refused.
        if name == "weight" and _is_dtensor(value):
            raise NotImplementedError(_SHARDED_WEIGHT)
        super().__setattr__(name, value)

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
            if _is_dtensor(self.weight):  # (a weight put in _parameters directly, past __setattr__)
                raise NotImplementedError(_SHARDED_WEIGHT)
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


# -- data parallel training ----------------------------------------------------------------------------
_SHARDED_WEIGHT = (
    "Int8Linear: its int8 weight cannot be sharded (FSDP2's fully_shard, or another DTensor placement): its "
    "quantization groups and their scales would be split, and the gradient (float_grad) would never reach the "
    "sharded weight.  Keep the int8 weights whole on every rank: fully_shard(module, ..., "
    "ignored_params=set(fastopt.lowbit.int8_weights(model))), and average their gradients with "
    "fastopt.lowbit.reduce_float_grads(model) after each backward.  (When fully_shard raises this, it has "
    "stopped part way: build the model again.)")

# The attribute of a float_grad that reduce_float_grads averaged: its version counter then (any in-place
# write since -- the backward accumulating into it, zero_grad -- changes the counter).
_REDUCED = "_fastopt_reduced_version"


def _is_dtensor(t):
    import sys

    cls = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    return cls is not None and isinstance(t, cls)


def _distributed_world():
    """The default process group's world size (1 when torch.distributed is not running)."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


_ModulesOrParams = Union[nn.Module, Iterable[Union[nn.Module, torch.Tensor]]]


def int8_weights(module_or_params: _ModulesOrParams) -> List[torch.Tensor]:
    """The int8 weights of the Int8Linear layers in ``module_or_params`` (a module, or an iterable of
    modules and tensors: the int8 weights among them), each once, in module order; e.g. FSDP2's
    ``fully_shard(model, ignored_params=set(int8_weights(model)))``."""
    items = [module_or_params] if isinstance(module_or_params, nn.Module) else list(module_or_params)
    found, seen = [], set()
    for item in items:
        if isinstance(item, nn.Module):
            cands = [m.weight for m in item.modules() if isinstance(m, Int8Linear)]
        elif torch.is_tensor(item):
            cands = [item]
        else:
            raise TypeError(f"int8_weights: expected a module or an iterable of modules and tensors, got an item of "
                            f"type {type(item).__name__}")
        for p in cands:
            if is_int8_weight(p) and id(p) not in seen:
                seen.add(id(p))
                found.append(p)
    return found


def float_grad_reduced(g: torch.Tensor) -> bool:
    """Whether ``g`` (a ``float_grad``) holds what :func:`reduce_float_grads` wrote (unchanged since)."""
    return getattr(g, _REDUCED, None) == g._version


def check_float_grad_reduced(owner: str, p: torch.Tensor, g: torch.Tensor) -> None:
    """Raise RuntimeError when torch.distributed runs more than one rank and the ``float_grad`` ``g`` of
    int8 weight ``p`` was not averaged by :func:`reduce_float_grads` since the backward last wrote it."""
    if float_grad_reduced(g):
        return
    world = _distributed_world()
    if world > 1:
        raise RuntimeError(
            f"{owner}: the float_grad of an Int8Linear weight {tuple(p.shape)} was not reduced across the {world} "
            "ranks since the backward wrote it (DistributedDataParallel and fully_shard reduce parameters' .grad "
            "only), so each rank would step its own gradient.  Call fastopt.lowbit.reduce_float_grads(model) after "
            "the backward and before optimizer.step(); ranks that train different Int8Linear layers on purpose "
            "pass a one-rank group: reduce_float_grads(model, group=torch.distributed.new_subgroups(1)[0])")


@torch.no_grad()
def reduce_float_grads(module_or_params: _ModulesOrParams, group: Optional[Any] = None) -> None:
    """Average the ``float_grad`` of every Int8Linear weight in ``module_or_params`` (a module, or an
    iterable of modules and tensors, e.g. ``model.parameters()``) across the ranks of ``group`` (a
    ``torch.distributed.ProcessGroup``; default: the world), as DistributedDataParallel averages
    ``.grad``: one ``all_reduce`` of one fp32 buffer holding them all, then each ``float_grad`` gets
    the mean in its own dtype and is marked reduced (see :func:`check_float_grad_reduced`).  Every
    rank must call it with the same layers.  A weight without a ``float_grad`` counts as zeros; it gets
    one when some rank had one (a layer no rank used keeps none).  Call it after the backward (after the
    last micro-batch under ``no_sync``)."""
    dist = torch.distributed
    weights = int8_weights(module_or_params)
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("reduce_float_grads: torch.distributed is not initialized (init_process_group first)")
    grads = []
    for p in weights:
        g = getattr(p, "float_grad", None)
        if g is not None and (not torch.is_tensor(g) or g.shape != p.shape or g.device != p.device
                              or not g.is_floating_point() or g.layout != torch.strided):
            what = f"{g.dtype}{tuple(g.shape)} on {g.device}" if torch.is_tensor(g) else type(g).__name__
            raise ValueError(f"reduce_float_grads: the float_grad of an int8 weight {tuple(p.shape)} on {p.device} "
                             f"is {what}")
        grads.append(g)
    if not weights:
        return
    devices = {p.device for p in weights}
    if len(devices) > 1:
        raise ValueError(f"reduce_float_grads: the int8 weights are on several devices {sorted(map(str, devices))}; "
                         "reduce each device's layers separately")
    world = dist.get_world_size(group)
    if world == 1:
        for g in grads:
            if g is not None:
                setattr(g, _REDUCED, g._version)
        return
    sizes = [p.numel() for p in weights]
    total = sum(sizes)
    flat = torch.zeros(total + len(weights), dtype=torch.float32, device=weights[0].device)
    parts = flat[:total].split(sizes)
    for part, g in zip(parts, grads):
        if g is not None:
            part.copy_(g.reshape(-1))
    flat[total:].copy_(torch.tensor([float(g is not None) for g in grads]))  # how many ranks have each
    dist.all_reduce(flat, group=group)
    flat[:total].div_(world)
    # ranks without some float_grad read how many ranks had it (those with all of them never sync)
    counts = flat[total:].tolist() if any(g is None for g in grads) else None
    for i, (p, part, g) in enumerate(zip(weights, parts, grads)):
        if g is None:
            if counts[i] == 0:
                continue
            g = p.float_grad = part.view(p.shape).clone()
        else:
            g.copy_(part.view(p.shape))
        setattr(g, _REDUCED, g._version)
