"""DTensors (FSDP2's sharded parameters) at the kernel seam: what a kernel call over local shards needs
to give the single-process result.

NOTE: [DTensors]
FSDP2 (``fully_shard``) makes parameters, gradients and the states created from them DTensors, whose
own ``data_ptr()`` is 0.  The kernels step their local shards (``to_local()``: the shard's own memory,
updated in place), and what an element's update needs beyond its own element is supplied here, so that
the result equals the single-process one:

- reduce passes (phase 1: LAMB's norms, AdamP/SGDP's cosines, OrthoGrad's dot products,
  ``clip_grad_norm_``, use_gc's row means, cautious masks): the kernel sums its shard's part of each
  row into a buffer in the call's *global* row numbering, and the buffer is all-reduced over the mesh
  dimensions that shard the parameters (``torch.distributed.all_reduce``: on a GPU it is enqueued on
  the stream, no host sync).  A row split across shards is summed whole; a row held whole by one shard
  gets zeros from the others.  Row coefficients (phase 0) are picked for the shard's own rows.
- stochastic rounding: the kernels key the random bits on the element's index in the whole tensor
  (``sr_offsets``: where the shard starts), so the bits do not depend on the mesh.  That needs shards
  that are contiguous ranges of the flat tensor (``Shard(0)`` / ``Replicate`` placements).
- low-bit states: see :func:`fastopt.lowbit.layouts.LowbitStates` (blocks never straddle a shard).

A call's parameters are all DTensors on one mesh with one placement, or all plain tensors; a call that
needs the above over a mix is refused (``ValueError``) before the kernel runs.
"""
import math
import sys
from typing import Any, Callable, List, NamedTuple, Optional, Sequence, Tuple

import torch

# (mesh, placements, global shape) -> (local shape, global offset)
_OFFSETS = {}
# call layout -> _RowLayout
_LAYOUTS = {}
_CACHE_LIMIT = 4096


def dtensor_type():
    """DTensor's class once torch.distributed.tensor is imported (no DTensor exists before), else None."""
    return getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)


def dtensor_class():
    """:func:`dtensor_type`, but None while dynamo traces (a compiled step does not localize)."""
    if torch.compiler.is_compiling():
        return None
    return dtensor_type()


def is_dtensor(t: Any) -> bool:
    cls = dtensor_class()
    return cls is not None and isinstance(t, cls)


def local(t):
    """The tensor whose memory a kernel reads and writes: a DTensor's local shard, any other tensor itself."""
    return t.to_local() if is_dtensor(t) else t


def whole(t):
    """``t`` whole on this rank: a DTensor gathered (``full_tensor()``), any other tensor itself."""
    return t.full_tensor() if is_dtensor(t) else t


def local_shape_and_offset(t) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """(local shape, global offset of its first element per dim) of DTensor ``t``'s shard on this rank."""
    key = (t.device_mesh, tuple(t.placements), tuple(t.shape))
    hit = _OFFSETS.get(key)
    if hit is None:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        hit = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        hit = (tuple(int(s) for s in hit[0]), tuple(int(o) for o in hit[1]))
        if len(_OFFSETS) > _CACHE_LIMIT:
            _OFFSETS.clear()
        _OFFSETS[key] = hit
    return hit


def row_sharded(t) -> bool:
    """Whether DTensor ``t``'s shards are contiguous ranges of its flat elements (placements Shard(0)
    or Replicate only)."""
    return all(p.is_replicate() or (p.is_shard() and p.dim == 0) for p in t.placements)


def flat_offset(t) -> int:
    """Index, in the whole tensor's flat elements, of the first element of DTensor ``t``'s shard
    (``row_sharded(t)`` must hold)."""
    shape, offset = local_shape_and_offset(t)
    return offset[0] * math.prod(t.shape[1:]) if t.dim() else 0


def describe_placement(t) -> str:
    return f"{tuple(t.shape)} with placements {tuple(t.placements)} on a mesh of shape {tuple(t.device_mesh.shape)}"


def shard_groups(t) -> List[Any]:
    """The process groups of the mesh dimensions that shard DTensor ``t``: partial sums over a shard
    are summed over these."""
    mesh = t.device_mesh
    if any(p.is_partial() for p in t.placements):
        raise ValueError(f"fastopt: a DTensor {describe_placement(t)} holds partial values; the optimizers step "
                         "Shard or Replicate placements (FSDP2's parameters and gradients)")
    if mesh.ndim == 1:
        return [mesh.get_group()] if t.placements[0].is_shard() else []
    return [mesh.get_group(d) for d, p in enumerate(t.placements) if p.is_shard()]


class _RowLayout(NamedTuple):
    local_rows: Optional[List[int]]  # rows per local shard for the kernel (None: one row per tensor)
    index: Optional[torch.Tensor]    # int64 [sum(local_rows)]: the global row of each local row, or None
    total: int                       # global rows
    groups: List[Any]                # process groups to sum partial row sums over


def _row_layout(params, rows, device) -> _RowLayout:
    first = params[0]
    mesh, placements = first.device_mesh, tuple(first.placements)
    key = (mesh, placements, str(device), tuple(tuple(p.shape) for p in params), tuple(rows) if rows else None)
    hit = _LAYOUTS.get(key)
    if hit is not None:
        return hit
    for p in params:
        if p.device_mesh != mesh or tuple(p.placements) != placements:
            raise ValueError(f"fastopt: a reduce pass over DTensors on different meshes or placements "
                             f"({describe_placement(first)} and {describe_placement(p)}); put them in separate "
                             "param groups")
    groups = shard_groups(first)
    if not rows:
        hit = _RowLayout(None, None, len(params), groups)
    else:
        local_rows, index, base = [], [], 0
        for p, r in zip(params, rows):
            r = int(r)
            shape, offset = local_shape_and_offset(p)
            if r == 1 or math.prod(shape) == 0:  # one row (or nothing here): summed whole / adds zeros
                local_rows.append(1)
                index.append(torch.full((1,), base, dtype=torch.int64))
            else:
                if p.dim() < 1 or r != p.shape[0]:
                    raise ValueError(f"fastopt: a per-row reduce pass over a DTensor {describe_placement(p)} with "
                                     f"{r} rows; rows must be the tensor's first dimension")
                local_rows.append(shape[0])
                index.append(base + offset[0] + torch.arange(shape[0], dtype=torch.int64))
            base += r
        hit = _RowLayout(local_rows, torch.cat(index).to(device), base, groups)
    if len(_LAYOUTS) > _CACHE_LIMIT:
        _LAYOUTS.clear()
    _LAYOUTS[key] = hit
    return hit


def _all_dtensors(tensors, what):
    cls = dtensor_class()
    if not all(isinstance(t, cls) for t in tensors):
        raise ValueError(f"fastopt: {what} over DTensors (FSDP2) and plain tensors in one call; put the sharded and "
                         "the unsharded parameters in separate param groups")


def sr_offsets(params) -> List[int]:
    """Per DTensor of ``params``: where its shard starts in its flat elements (the stochastic-rounding
    stream's element index)."""
    out = []
    for p in params:
        if not row_sharded(p):
            raise ValueError(f"fastopt: stochastic rounding of a DTensor {describe_placement(p)}: the kernels key the "
                             "rounding on the element's index in the whole tensor, which needs shards that are "
                             "contiguous ranges of it (Shard(0) or Replicate placements, as fully_shard makes)")
        out.append(flat_offset(p))
    return out


def localize(call, fields: Sequence[str], *, rows_field: bool = False) -> Tuple[Any, Optional[Callable[[], None]]]:
    """``call`` (an ``ElementwiseCall``/``LowbitCall``/``AdamCall`` of fastopt._ops) for its kernel over
    local shards, and a function to run after the kernel (the all-reduce of phase-1 sums), or None.

    ``fields``: the tensor-list fields whose DTensors become local shards; ``rows_field``: the call has
    ``phase``/``rows``/``row_coef``/``reduce_out`` (an ElementwiseCall)."""
    cls = dtensor_class()
    if cls is None or not any(isinstance(t, cls) for t in call.params):
        return call, None
    changes = {f: [t.to_local() if isinstance(t, cls) else t for t in getattr(call, f)] for f in fields}
    if getattr(call, "stochastic", False):
        _all_dtensors(call.params, "stochastic rounding")
        changes["sr_offsets"] = sr_offsets(call.params)
    finish = None
    if rows_field and (call.phase == 1 or call.row_coef is not None or call.rows):
        _all_dtensors(call.params, "a reduce pass")
        layout = _row_layout(call.params, call.rows, call.device)
        changes["rows"] = layout.local_rows
        if call.row_coef is not None and layout.index is not None:
            changes["row_coef"] = call.row_coef.index_select(0, layout.index)
        if call.phase == 1 and call.reduce_out is not None:
            out = call.reduce_out
            n_local = len(layout.index) if layout.index is not None else layout.total
            part = torch.zeros((n_local,) + tuple(out.shape[1:]), dtype=out.dtype, device=out.device)
            changes["reduce_out"] = part

            def finish():
                total = part
                if layout.index is not None:
                    total = torch.zeros_like(out).index_add_(0, layout.index, part)
                import torch.distributed as dist

                for group in layout.groups:
                    dist.all_reduce(total, group=group)
                out.add_(total)
    return call._replace(**changes), finish
