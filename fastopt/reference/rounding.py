"""Stochastic rounding fp32 -> bf16, bit-exact with the kernels (``csrc/include/fastopt/elementwise.h``).

For tensor ``index`` of a call at step ``step`` (the count after the step) with seed ``seed``, element
``i`` gets 16 random bits ``fmix32(i * 0x9E3779B1 ^ key)`` with ``key = fmix32(seed ^ fmix32(index *
0x27D4EB2F + step * 0x165667B1))`` (32-bit wrap-around arithmetic; ``fmix32`` is the murmur3
finalizer).  The bits are added below bf16's mantissa and the result truncated: the rounding is
unbiased, ``E[round(x)] = x``.  Non-finite values round to nearest.
"""
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


def sr_bits(numel, device, seed, index, step):
    """The 32 random bits (int64 tensor) of elements ``0..numel-1`` of stream (seed, index, step)."""
    if torch.is_tensor(step):
        step = step.to(device)
    i = torch.arange(numel, dtype=torch.int64, device=device)
    return fmix32(((i * 0x9E3779B1) & _M32) ^ sr_key(seed, index, step))


def bf16_stochastic(x, seed, index, step):
    """Round the fp32 tensor ``x`` to bf16 stochastically (see the module doc)."""
    x = x.float().contiguous()
    rnd = sr_bits(x.numel(), x.device, seed, index, step)
    u = x.view(-1).view(torch.int32).to(torch.int64) & _M32
    r = ((u + (rnd & 0xFFFF)) >> 16) << 16
    out = (r & _M32).to(torch.int64)
    out = torch.where(out >= 2**31, out - 2**32, out).to(torch.int32).view(torch.float32).view(x.shape)
    finite = torch.isfinite(x)
    return torch.where(finite, out, x).to(torch.bfloat16)
