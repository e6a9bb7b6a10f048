"""The hash mask of unstructured random sparsity (``fastopt.sparse.RandomSparsity``), bit-exact with the
kernels (``csrc/include/fastopt/elementwise.h`` ``prune_key`` / ``prune_keep``, ``triton_kernels/elementwise.py``).

The mask of a parameter is not stored: element ``j`` of the whole tensor (its flat index, low 32 bits) is
kept when ``fmix32(j * 0x9E3779B1 ^ key) < threshold`` with ``key = fmix32(seed ^ fmix32(index *
0x61C88647 ^ 0x5BD1E995))`` (32-bit wrap-around arithmetic; ``index`` is the parameter's position in the
optimizer's parameter order, as its ``state_dict`` numbers it) and ``threshold = floor(density * 2**32)``.
So each element is kept with probability ``threshold / 2**32`` (within ``2**-32`` of ``density``),
independently of the others for all practical purposes, and a contiguous piece of the tensor (an FSDP2
shard starting at element ``offset``) draws exactly its part of the whole tensor's mask.  The arithmetic
is uint32 emulated in int64 (no overflow: :func:`fastopt.reference.rounding._mul32`).
"""
import math

import torch

from .rounding import _M32, _mul32, check_offset, fmix32

__all__ = ["prune_key", "prune_threshold", "random_keep_mask"]


def prune_key(seed: int, index: int) -> int:
    """The uint32 mask key of parameter ``index`` (its position in the optimizer) under ``seed``."""
    return fmix32((int(seed) & _M32) ^ fmix32(((int(index) * 0x61C88647) & _M32) ^ 0x5BD1E995))


def prune_threshold(density: float) -> int:
    """``floor(density * 2**32)`` for a density in (0, 1): the kernels keep a hash below it."""
    density = float(density)
    if not (0.0 < density < 1.0):
        raise ValueError(f"prune_threshold: density must be in (0, 1), got {density!r}")
    return math.floor(density * 2.0 ** 32)  # exact: a power-of-two scaling of a double


def random_keep_mask(shape, seed: int, index: int, density: float, offset: int = 0, device=None) -> torch.Tensor:
    """Bool keep-mask of ``shape`` (row-major flat order) for the piece of parameter ``index`` whose first
    element is element ``offset`` of the whole tensor (0: the whole tensor)."""
    shape = torch.Size(shape)
    offset = check_offset(offset, "random_keep_mask: offset")
    j = torch.arange(shape.numel(), dtype=torch.int64, device=device)
    if offset:
        j = (j + (offset & _M32)) & _M32
    else:
        j = j & _M32
    bits = fmix32(_mul32(j, 0x9E3779B1) ^ prune_key(seed, index))
    return (bits < prune_threshold(density)).view(shape)
