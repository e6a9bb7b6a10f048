"""The N:M and transposable 2:4 mask kernels and 2:4 compression (see :mod:`fastopt.sparse`)."""
import torch

from .. import _backend, _ops
from ..reference.sparse import check_nm, check_tiles, nm_mask_reference, transposable_mask_reference

MAX_KERNEL_M = 64   # larger groups run on the torch backend


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

