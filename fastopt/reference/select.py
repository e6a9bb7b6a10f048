"""Magnitude selection (the thresholds and masks of magnitude pruning): the pure-PyTorch reference, the
executable spec of ``csrc/cpu/select.cpp`` and ``triton_kernels/select.py`` (public entry points:
:mod:`fastopt.sparse.select`).

Groups.  ``scope="layer"``: every tensor is its own group.  ``scope="global"``: all tensors form one
group, their elements laid end to end in list order (``torch.nn.utils.parameters_to_vector``'s order).
An element's *flat index* is its row-major index in that order.

Count.  A group of ``n`` elements at density ``d`` prunes ``p = round((1 - d) * n)`` elements (Python's
``round`` of a Python float: exactly ``torch.nn.utils.prune._compute_nparams_toprune(1 - d, n)``).

Key.  Every element is ranked by ``key = |w|`` computed in fp32 (bf16/fp16 are converted exactly
first; fp64 stays fp64), with NaN counted as +inf (so NaN and inf tie; ``-0.0`` ties with ``0.0``), as
in :mod:`fastopt.reference.sparse`.

Order and tie rule.  The ``p`` pruned elements are the first ``p`` in the order (key ascending, flat
index *descending*): the smallest magnitudes are pruned, and among equal keys the highest flat index
is pruned first -- equivalently, of the elements ranked by (key descending, flat index ascending), the
first ``n - p`` are kept: ties are kept by the lowest index, the rule of the N:M masks.

Threshold.  ``t`` = the key of the last pruned element (the p-th smallest key); ``-inf`` when ``p == 0``.
So ``key > t`` is kept, ``key < t`` pruned, and of the ``c`` elements with ``key == t`` the first
``c - r`` in flat order are kept, ``r = p - #(key < t)``.
"""
import math
from typing import List, Sequence

import torch


def magnitude_keys(x: torch.Tensor) -> torch.Tensor:
    """``|x|`` flattened, in fp32 (fp64 for fp64 ``x``), NaN replaced by +inf."""
    k = x.detach().reshape(-1)
    k = (k.double() if k.dtype == torch.float64 else k.float()).abs()
    return torch.where(torch.isnan(k), torch.full_like(k, math.inf), k)


def prune_count(density: float, n: int) -> int:
    """How many of ``n`` elements density ``density`` prunes: ``round((1 - density) * n)`` (torch prune's
    ``_compute_nparams_toprune`` with ``amount = 1 - density``)."""
    amount = 1 - density
    return int(amount) if isinstance(amount, int) else round(amount * n)


def select_group_reference(keys: torch.Tensor, p: int):
    """(threshold, keep mask) of one group's flat ``keys`` pruning ``p`` of them (module docstring)."""
    n = keys.numel()
    if not 0 <= p <= n:
        raise ValueError(f"select_group_reference: p must be in [0, {n}], got {p}")
    if p == 0:
        return keys.new_tensor(-math.inf), torch.ones(n, dtype=torch.bool, device=keys.device)
    t = torch.kthvalue(keys, p).values
    less = keys < t
    eq = keys == t
    r = p - less.sum()
    c = eq.sum()
    rank = torch.cumsum(eq, 0)  # 1-based rank of each tied element in flat order
    pruned = less | (eq & (rank > c - r))
    return t, ~pruned


def magnitude_select_reference(tensors: Sequence[torch.Tensor], densities: Sequence[float], scope: str):
    """(thresholds, masks): ``densities`` one per tensor (layer) or one (global); masks shaped like the
    tensors, thresholds fp32 (fp64 when some tensor is fp64) on the tensors' device."""
    tensors = list(tensors)
    wide = any(t.dtype == torch.float64 for t in tensors)
    tdtype = torch.float64 if wide else torch.float32
    if scope == "layer":
        thr, masks = [], []
        for t, d in zip(tensors, densities):
            k = magnitude_keys(t).to(tdtype)
            th, m = select_group_reference(k, prune_count(d, k.numel()))
            thr.append(th.to(tdtype))
            masks.append(m.view(t.shape))
        return torch.stack(thr), masks
    keys = torch.cat([magnitude_keys(t).to(tdtype) for t in tensors])
    th, m = select_group_reference(keys, prune_count(densities[0], keys.numel()))
    masks: List[torch.Tensor] = []
    start = 0
    for t in tensors:
        masks.append(m[start:start + t.numel()].view(t.shape))
        start += t.numel()
    return th.to(tdtype).reshape(1), masks
