"""Magnitude selection: the thresholds and keep-masks of magnitude pruning, per layer or global, for many
tensors in one fused call (the selection behind ``MagnitudeSparsity``).

    masks = fastopt.sparse.magnitude_masks(weights, 0.1)                    # keep 10 % of each tensor
    masks = fastopt.sparse.magnitude_masks(weights, 0.1, scope="global")    # keep 10 % of all of them
    thr = fastopt.sparse.magnitude_thresholds(weights, [0.5, 0.2, 0.1])    # one threshold per tensor

The masks are ``torch.nn.utils.prune``'s: ``scope="layer"`` gives each tensor the mask of
``prune.l1_unstructured(amount=1 - density)``, ``scope="global"`` the masks of
``prune.global_unstructured(..., pruning_method=prune.L1Unstructured, amount=1 - density)``: the same
number pruned (``round((1 - density) * n)``), the pruned ones the smallest ``|w|``.  Where torch leaves
the choice among equal ``|w|`` unspecified (``torch.topk``), fastopt fixes it: ties are kept by the
lowest flat index (in global scope: the index in the tensors laid end to end in list order), so the
highest-index tied elements are pruned first; NaN counts as +inf (never pruned before a number).  The
full spec, and the threshold's definition (the largest pruned ``|w|`` in fp32, ``-inf`` when nothing is
pruned), are in :mod:`fastopt.reference.select`.  Every backend gives the same masks and thresholds bit
for bit.

Backends: ``cpu`` (``csrc/cpu/select.cpp``: an OpenMP radix select, 3 histogram passes of 11/10/10 bits
over the 31-bit key of ``|x|``, then one mask pass), ``triton`` (``triton_kernels/select.py``: the same
passes with atomic histograms; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``) and ``torch``
(the reference: ``torch.kthvalue`` on ``|x|``).  ``auto`` picks the kernel for the tensors' device and
dtypes (fp32, bf16, fp16, mixed allowed); fp64 tensors run on ``torch`` (keys and thresholds in fp64).
"""
import math
import numbers
from typing import List, Sequence, Union

import torch

from .. import _backend, _ops, _sharded
from ..reference.select import magnitude_select_reference, prune_count

__all__ = ["magnitude_thresholds", "magnitude_masks"]

_SCOPES = ("layer", "global")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_density(d, who, what):
    if isinstance(d, bool) or not isinstance(d, numbers.Real):
        raise TypeError(f"{who}: {what} must be a real number in (0, 1], got {type(d).__name__}")
    d = float(d) if not isinstance(d, int) else d
    if not (0 < d <= 1):  # (NaN fails too)
        raise ValueError(f"{who}: {what} must be in (0, 1], got {d}")
    return d


def _validate(tensors, density, scope, backend, who):
    """(tensors as a list, densities one per group, resolved backend); raises before anything runs."""
    if scope not in _SCOPES:
        raise ValueError(f"{who}: scope must be 'layer' or 'global', got {scope!r}")
    _backend.check_backend_name(backend)
    if torch.is_tensor(tensors) or not isinstance(tensors, (list, tuple)):
        raise TypeError(f"{who}: tensors must be a list or tuple of tensors, got {type(tensors).__name__}")
    tensors = list(tensors)
    if not tensors:
        raise ValueError(f"{who}: tensors is empty")
    for i, t in enumerate(tensors):
        if not torch.is_tensor(t):
            raise TypeError(f"{who}: tensors[{i}] is a {type(t).__name__}, not a tensor")
        if _sharded.is_dtensor(t):
            raise NotImplementedError(f"{who}: tensors[{i}] is a DTensor; a magnitude threshold needs the whole "
                                      "tensor (select on full_tensor(), or per local shard explicitly)")
        if t.layout != torch.strided:
            raise TypeError(f"{who}: tensors[{i}] is a {t.layout} tensor; expected strided tensors")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{who}: tensors[{i}] is {t.dtype}; expected float32, bfloat16, float16 or float64")
        if t.device != tensors[0].device:
            raise ValueError(f"{who}: tensors[{i}] is on {t.device}, tensors[0] on {tensors[0].device}; all tensors "
                             "must be on one device")
    if scope == "global":
        densities = [_check_density(density, who, "density")]
    elif isinstance(density, (list, tuple)):
        if len(density) != len(tensors):
            raise ValueError(f"{who}: {len(density)} densities for {len(tensors)} tensors")
        densities = [_check_density(d, who, f"density[{i}]") for i, d in enumerate(density)]
    else:
        d = _check_density(density, who, "density")
        densities = [d] * len(tensors)
    dtypes = {t.dtype for t in tensors}
    reason = "float64 tensors" if torch.float64 in dtypes else None
    backend = _backend.resolve(backend, tensors[0].device, tensors[0].dtype, True, op="select", reason=reason,
                               name=who)
    return tensors, densities, backend


def _select(tensors, densities, scope, backend, want_masks):
    """(thresholds, masks or None) on the resolved backend."""
    if backend == "torch":
        thr, masks = magnitude_select_reference(tensors, densities, scope)
        return thr, masks
    xs = [t.detach().contiguous() for t in tensors]
    numels = [x.numel() for x in xs]
    if scope == "layer":
        groups = list(range(len(xs)))
        counts = [prune_count(d, n) for d, n in zip(densities, numels)]
    else:
        groups = [0] * len(xs)
        counts = [prune_count(densities[0], sum(numels))]
    device = xs[0].device
    thresholds = torch.empty(len(counts), dtype=torch.float32, device=device)
    outs = [torch.empty(x.shape, dtype=torch.uint8, device=device) for x in xs] if want_masks else []
    _ops.magnitude_select(xs, groups, counts, thresholds, outs, backend)
    return thresholds, ([o.view(torch.bool) for o in outs] if want_masks else None)


def magnitude_thresholds(tensors: Sequence[torch.Tensor], density: Union[float, Sequence[float]], *,
                         scope: str = "layer", backend: str = "auto") -> torch.Tensor:
    """The magnitude-pruning thresholds of ``tensors`` at ``density`` (the kept fraction, in (0, 1]).

    ``scope="layer"``: one threshold per tensor (``density`` a float, or one per tensor);
    ``scope="global"``: one threshold for all tensors together (``density`` a float).  A threshold is the
    largest pruned ``|w|`` (the ``p``-th smallest, ``p = round((1 - density) * n)``; NaN counts as +inf),
    or ``-inf`` when ``p == 0``: elements with ``|w|`` above it are kept, below it pruned; equal ones are
    split by the tie rule (:mod:`fastopt.sparse.select`).  Returns a float32 tensor on the tensors'
    device (float64 when a tensor is float64).  Raises before any kernel runs: TypeError for a non-list,
    a non-tensor, another dtype or layout; ValueError for an empty list, mixed devices, an unknown scope,
    a density outside (0, 1] (or NaN) or the wrong number of densities; NotImplementedError for DTensors.
    """
    tensors, densities, backend = _validate(tensors, density, scope, backend, "magnitude_thresholds")
    return _select(tensors, densities, scope, backend, want_masks=False)[0]


def magnitude_masks(tensors: Sequence[torch.Tensor], density: Union[float, Sequence[float]], *,
                    scope: str = "layer", backend: str = "auto") -> List[torch.Tensor]:
    """Bool keep-masks (one per tensor, its shape, its device) of magnitude pruning at ``density``.

    ``scope="layer"``: each tensor keeps ``n - round((1 - density) * n)`` of its ``n`` elements, the
    largest ``|w|``: ``torch.nn.utils.prune.l1_unstructured(amount=1 - density)``'s mask.
    ``scope="global"``: all tensors together keep that many of their total, the mask of
    ``prune.global_unstructured(..., prune.L1Unstructured, amount=1 - density)``.  Among equal ``|w|``
    the lowest flat index is kept (torch leaves it unspecified); NaN counts as +inf.  Same arguments
    and errors as :func:`magnitude_thresholds`.
    """
    tensors, densities, backend = _validate(tensors, density, scope, backend, "magnitude_masks")
    return _select(tensors, densities, scope, backend, want_masks=True)[1]
