"""Stochastic rounding fp32 -> bf16, bit-exact with the kernels (``csrc/include/fastopt/elementwise.h``).

For tensor ``index`` of a call at step ``step`` (the count after the step) with seed ``seed``, element
``i`` gets 16 random bits ``fmix32(j * 0x9E3779B1 ^ key)`` with ``key = fmix32(seed ^ fmix32(index *
0x27D4EB2F + step * 0x165667B1))`` (32-bit wrap-around arithmetic; ``fmix32`` is the murmur3
finalizer), where ``j = offset + i`` (low 32 bits) is the element's index in the whole tensor: a piece
of a tensor (an FSDP2 shard) starting at element ``offset`` of it rounds exactly as that part of the
whole tensor would (the kernels' ``sr_offsets``; ``offset`` 0: the tensor itself).  The bits are added
below bf16's mantissa and the result truncated: the rounding is unbiased, ``E[round(x)] = x``.
Non-finite values round to nearest.
"""
import operator

import torch

_M32 = 0xFFFFFFFF


def fmix32(h):
    """murmur3's finalizer on int64 tensors holding uint32 values (or on Python ints)."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def sr_key(seed, index, step):
    """The stream key; ``step`` may be a 0-d tensor (then so is the key, on its device: no host sync)."""
    if torch.is_tensor(step):
        step = step.to(torch.int64)
    else:
        step = int(step)
    return fmix32((int(seed) & _M32) ^ fmix32((int(index) * 0x27D4EB2F + step * 0x165667B1) & _M32))


def check_offset(offset, who="sr_offset"):
    """``offset`` as a Python int: an element offset is a non-negative integer (not a bool)."""
    try:
        value = None if isinstance(offset, bool) or torch.is_tensor(offset) else operator.index(offset)
    except TypeError:
        value = None
    if value is None or value < 0:
        raise ValueError(f"{who}: an element offset must be a non-negative int, got {offset!r}")
    return value


def check_offsets(offsets, n, who="sr_offsets"):
    """Per-tensor element offsets as a list of ``n`` Python ints, or [] for None/empty (all 0): one
    non-negative int per tensor (ValueError otherwise).  The kernels' ``sr_offsets``."""
    if offsets is None or len(offsets) == 0:
        return []
    offsets = list(offsets)
    if len(offsets) != n:
        raise ValueError(f"{who}: {len(offsets)} stochastic-rounding element offsets for {n} tensors (one per "
                         "tensor, or none)")
    return [check_offset(o, who) for o in offsets]


def _mul32(i, c):
    """``(i * c) mod 2**32`` for int64 tensors ``i`` of uint32 values and a uint32 constant ``c``,
    without int64 overflow (the product is split at bit 16 of ``c``)."""
    return (i * (c & 0xFFFF) + (((i * (c >> 16)) & 0xFFFF) << 16)) & _M32


def sr_bits(numel, device, seed, index, step, offset=0):
    """The 32 random bits (int64 tensor) of elements ``offset..offset+numel-1`` of stream (seed, index,
    step): those of elements ``0..numel-1`` of a piece that starts at element ``offset`` of its tensor."""
    offset = check_offset(offset)
    if torch.is_tensor(step):
        step = step.to(device)
    i = torch.arange(numel, dtype=torch.int64, device=device)
    if offset:
        i = (i + (offset & _M32)) & _M32
    return fmix32(_mul32(i, 0x9E3779B1) ^ sr_key(seed, index, step))


def bf16_stochastic(x, seed, index, step, offset=0):
    """Round the fp32 tensor ``x`` to bf16 stochastically (see the module doc); ``offset``: the index
    of ``x``'s first element in the whole tensor it is a contiguous piece of (0: ``x`` is whole)."""
    x = x.float().contiguous()
    rnd = sr_bits(x.numel(), x.device, seed, index, step, offset)
    u = x.view(-1).view(torch.int32).to(torch.int64) & _M32
    r = ((u + (rnd & 0xFFFF)) >> 16) << 16
    out = (r & _M32).to(torch.int64)
    out = torch.where(out >= 2**31, out - 2**32, out).to(torch.int32).view(torch.float32).view(x.shape)
    finite = torch.isfinite(x)
    return torch.where(finite, out, x).to(torch.bfloat16)
