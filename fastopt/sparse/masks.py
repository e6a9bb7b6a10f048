"""The N:M and transposable 2:4 mask kernels and 2:4 compression (see :mod:`fastopt.sparse`).

DTensors (FSDP2's ``fully_shard``, NOTE: [DTensors] in fastopt/_ops.py): a mask is computed on each
local shard, which gives the whole tensor's mask exactly when every mask group lies in one shard
(:func:`check_shard_groups`); otherwise the mask functions raise.
"""
import itertools
import math

import torch

from .. import _backend, _ops, _sharded
from ..reference.sparse import check_nm, check_tiles, nm_mask_reference, transposable_mask_reference

MAX_KERNEL_M = 64   # larger groups run on the torch backend


# -- DTensors: masks of local shards -------------------------------------------------------------------
def like_sharded(ref, t):
    """``t`` (a local shard, shaped like ``ref``'s) as a DTensor with ``ref``'s mesh and placements
    when ``ref`` is a DTensor; else ``t``."""
    if not _sharded.is_dtensor(ref):
        return t
    cls = _sharded.dtensor_class()
    t = t.contiguous() if not t.is_contiguous() else t
    stride, acc = [], 1
    for size in reversed(tuple(ref.shape)):
        stride.append(acc)
        acc *= max(size, 1)
    return cls.from_local(t, ref.device_mesh, ref.placements, run_check=False, shape=ref.shape,
                          stride=tuple(reversed(stride)))


def _group_span(shape, d, m, dim, transposable):
    """How many consecutive indices of dim ``d`` hold whole mask groups: 1 when a group never spans two
    indices of ``d``; None when groups are not aligned to blocks of indices of ``d`` at all."""
    if transposable:  # 4 rows along dim 0, 4 consecutive columns of the [shape[0], -1] view
        if d == 0:
            return 4
        inner = math.prod(shape[d + 1:])
        span = math.lcm(4, inner) // inner if inner else 1
        return span if shape[d] % span == 0 else None
    return m if d == dim else 1


def check_shard_groups(w, m, dim=-1, transposable=False, *, who="nm_mask", pad=False):
    """Raise when a mask group of DTensor ``w`` (``m`` consecutive elements along ``dim``, or the 4x4
    tiles of the transposable mask) would straddle a shard boundary: the local shards' masks would not
    be the whole tensor's.  Every shard of every mesh coordinate is checked (from the placements, with
    torch's chunking rule), so all ranks agree.  ValueError for a boundary inside a group (naming it and
    the fix); NotImplementedError for placements other than Shard and Replicate on a grouped dim.  A
    plain tensor passes."""
    if not _sharded.is_dtensor(w):
        return
    from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset
    from torch.distributed.tensor.placement_types import Shard

    shape, placements, mesh_shape = tuple(w.shape), tuple(w.placements), tuple(w.device_mesh.shape)
    if not transposable:
        dim %= len(shape)
    what = ("the transposable mask's 4x4 tiles (4 rows, 4 columns of the [shape[0], -1] view)" if transposable
            else f"the groups of {m} consecutive elements along dim {dim}")
    spans = {}
    for placement in placements:
        if placement.is_replicate():
            continue
        d = getattr(placement, "dim", None)
        if d is None:
            raise NotImplementedError(f"{who}: a DTensor with placements {placements}: masks are computed on "
                                      f"Shard and Replicate placements, not {placement}")
        d %= len(shape)
        span = _group_span(shape, d, m, dim, transposable)
        if span == 1:
            continue
        if span is None or not isinstance(placement, Shard):
            raise NotImplementedError(
                f"{who}: a DTensor of shape {shape} with placements {placements}: {what} do not stay whole under "
                f"{placement} (dim {d}); shard it along dim 0 with Shard(0), or keep it out of N:M sparsity")
        spans[d] = span
    if not spans:
        return
    for coord in itertools.product(*(range(s) for s in mesh_shape)):
        sizes, offsets = _compute_local_shape_and_global_offset(shape, mesh_shape, list(coord), placements)
        for d, span in spans.items():
            size, start = sizes[d], offsets[d]
            end = start + size
            if size and (start % span or end % span and not (pad and end == shape[d])):
                ways = math.prod(k for k, pl in zip(mesh_shape, placements)
                                 if getattr(pl, "dim", None) is not None and pl.dim % len(shape) == d)
                chunk = -(-shape[d] // ways)
                raise ValueError(
                    f"{who}: a DTensor of shape {shape} sharded {placements} over a mesh of shape {mesh_shape}: "
                    f"{what} need every shard to hold whole blocks of {span} indices of dim {d}, but the shard at "
                    f"mesh coordinate {coord} holds indices {start}..{end - 1} ({size}), so a group would straddle "
                    f"the shard boundary at index {start if start % span else end}.  Fix: make dim {d}'s shards "
                    f"multiples of {span} (torch.chunk's rule cuts {shape[d]} into shards of ceil({shape[d]} / "
                    f"{ways}) = {chunk}: choose a size or a number of shards for which that is a multiple of {span}), "
                    f"shard another dim (fully_shard(..., shard_placement_fn=...)), group along a dim that is not "
                    f"sharded, or keep this parameter out of the sparse group or out of fully_shard")


def _resolve(backend, w, name, reason=None):
    return _backend.resolve(backend, w.device, w.dtype, True, reason=reason, name=name)


def nm_mask(w: torch.Tensor, n: int, m: int, dim: int = -1, *, pad: bool = False,
            backend: str = "auto") -> torch.Tensor:
    """Bool mask of ``w``'s shape keeping the ``n`` largest ``|w|`` of every ``m`` consecutive elements
    along ``dim`` (``0 <= n <= m``).

    Ties go to the lowest index; NaN counts as larger than any number (+inf, tied with inf); ``-0.0``
    ties with ``0.0``.  bf16/fp16 are compared after an exact conversion to fp32.  A dimension that is
    not a multiple of ``m`` is a ValueError, unless ``pad=True``: then the last, partial group keeps
    ``min(n, size)`` of its elements (as if padded with zeros that lose every tie).  Groups larger
    than ``MAX_KERNEL_M`` run on the torch backend.
    """
    if not torch.is_tensor(w):
        raise TypeError(f"nm_mask: expected a tensor, got {type(w).__name__}")
    if w.is_complex() or not w.is_floating_point():
        raise TypeError(f"nm_mask: expected a real floating-point tensor, got {w.dtype}")
    shape = tuple(w.shape)
    if _sharded.is_dtensor(w):  # each shard's mask (its groups checked to be whole first)
        d = check_nm(shape if not pad else (m,) * len(shape), n, m, dim)  # (pad: any size along dim)
        check_shard_groups(w, m, d, who="nm_mask", pad=pad)
        return like_sharded(w, nm_mask(w.to_local(), n, m, d, pad=pad, backend=backend))
    if (pad and isinstance(dim, int) and -w.dim() <= dim < w.dim() and isinstance(m, int) and m >= 1
            and shape[dim % w.dim()] % m):
        d = dim % w.dim()
        extra = -shape[d] % m
        padded = torch.cat([w.detach(), w.new_zeros(shape[:d] + (extra,) + shape[d + 1:])], dim=d)
        return nm_mask(padded, n, m, d, backend=backend).narrow(d, 0, shape[d])
    dim = check_nm(shape, n, m, dim)
    backend = _resolve(backend, w, "nm_mask",
                       None if m <= MAX_KERNEL_M else f"groups of {m} (the kernels take at most {MAX_KERNEL_M})")
    if backend == "torch":
        return nm_mask_reference(w, n, m, dim)
    x = w.detach().contiguous()
    out = torch.empty(shape, dtype=torch.uint8, device=w.device)
    outer = 1
    for s in shape[:dim]:
        outer *= s
    inner = 1
    for s in shape[dim + 1:]:
        inner *= s
    _ops.nm_mask(x, out, outer, shape[dim], inner, n, m, backend)
    return out.view(torch.bool)


def transposable_mask(w: torch.Tensor, mode: str = "exact", *, backend: str = "auto") -> torch.Tensor:
    """Transposable 2:4 mask: ``w`` viewed as ``[shape[0], -1]`` (both multiples of 4) is cut into 4x4
    tiles, and each tile keeps 2 elements in every row and column, so ``w * mask`` is 2:4 along rows
    and ``(w * mask).T`` too.

    ``mode="exact"`` picks, per tile, the pattern of the 90 possible with the largest kept ``sum |w|``
    (ties: the first in :func:`fastopt.reference.sparse.tile_patterns` order).  ``mode="greedy"`` keeps
    entries by descending ``|w|`` while their row and column have room: at least half the exact kept
    sum, sometimes fewer than 2 per row/column.
    """
    if mode not in ("exact", "greedy"):
        raise ValueError(f"transposable_mask: mode must be 'exact' or 'greedy', got {mode!r}")
    if not torch.is_tensor(w) or w.is_complex() or not w.is_floating_point():
        raise TypeError(f"transposable_mask: expected a real floating-point tensor, got "
                        f"{w.dtype if torch.is_tensor(w) else type(w).__name__}")
    rows, cols = check_tiles(tuple(w.shape))
    if _sharded.is_dtensor(w):  # each shard's mask (its tiles checked to be whole first)
        check_shard_groups(w, 4, transposable=True, who="transposable_mask")
        return like_sharded(w, transposable_mask(w.to_local(), mode, backend=backend))
    backend = _resolve(backend, w, "transposable_mask")
    if backend == "torch":
        return transposable_mask_reference(w, mode)
    x = w.detach().contiguous()
    out = torch.empty(w.shape, dtype=torch.uint8, device=w.device)
    _ops.transposable_mask(x, out, rows, cols, mode == "exact", backend)
    return out.view(torch.bool)


def is_nm_sparse(w: torch.Tensor, n: int, m: int, dim: int = -1) -> bool:
    """Whether every group of ``m`` consecutive elements of ``w`` along ``dim`` has at most ``n``
    nonzeros (a host sync; for checks, not for the training loop)."""
    dim = check_nm(tuple(w.shape), n, m, dim)
    nz = (w.detach() != 0).movedim(dim, -1).reshape(-1, m).sum(1)
    return bool((nz <= n).all())


def compress_2to4(w: torch.Tensor) -> torch.Tensor:
    """``torch.sparse.to_sparse_semi_structured(w)`` after checking that ``w`` is 2:4 along its rows:
    the compressed form the GPU's sparse tensor cores multiply (CUDA, compute capability >= 8.0; the
    shape and dtype limits are torch's).  Raises BackendUnavailableError without such a GPU and
    ValueError when a group of 4 holds more than 2 nonzeros."""
    if w.dim() != 2:
        raise ValueError(f"compress_2to4: expected a 2-d weight, got {w.dim()} dimensions")
    if w.device.type != "cuda" or torch.cuda.get_device_capability(w.device)[0] < 8:
        raise _backend.BackendUnavailableError(
            f"compress_2to4: semi-structured (2:4) sparse tensors need a CUDA GPU with compute capability >= 8.0; "
            f"got a tensor on {w.device}")
    if not is_nm_sparse(w, 2, 4):
        raise ValueError("compress_2to4: some group of 4 along the rows has more than 2 nonzeros; "
                         "apply an nm_mask(w, 2, 4) first")
    return torch.sparse.to_sparse_semi_structured(w)

