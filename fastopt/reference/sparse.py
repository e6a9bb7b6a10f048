"""N:M and transposable 2:4 masks: the pure-PyTorch reference (the executable spec of the kernels in
``csrc/include/fastopt/sparse.h``, ``csrc/cpu/sparse.cpp``, ``csrc/cuda/sparse.cu`` and
``triton_kernels/sparse.py``).

Magnitude key.  Every element is ranked by ``key = |w|`` computed in fp32 (bf16/fp16 inputs are
converted first), with NaN counted as +inf.  Equal keys (including +0 / -0, and NaN vs inf) are
broken by the lowest index.

N:M mask (:func:`nm_mask_reference`).  Along dimension ``dim``, consecutive groups of ``m`` elements;
an element is kept iff fewer than ``n`` elements of its group rank before it, where j ranks before i
when ``key_j > key_i`` or (``key_j == key_i`` and ``j < i``).  So each group keeps exactly ``n``
elements: its ``n`` largest magnitudes, ties to the lowest index.

Transposable 2:4 mask (:func:`transposable_mask_reference`).  The weight is viewed as a matrix
``[shape[0], numel / shape[0]]`` cut into 4x4 tiles; each tile's mask keeps exactly 2 elements in
every row and every column of the tile (so both the matrix and its transpose are 2:4).

* ``exact``: of the 90 such 4x4 patterns (:func:`tile_patterns`, in their fixed order), the one with
  the largest kept sum ``((s0 + s1) + s2) + s3`` in fp32, ``s_r = key[r, a_r] + key[r, b_r]`` (a_r < b_r
  the two columns row r keeps); ties go to the earliest pattern.  The summation order is part of the
  spec so that every backend picks the same pattern.
* ``greedy``: visit the 16 entries by descending key (ties: lowest ``4 * row + col``) and keep an entry
  while its row and its column each hold fewer than 2 kept entries.  It keeps at most 2 per row and
  column -- sometimes fewer (then the tile is sparser than 2:4 needs) -- and its kept sum is at least
  half the exact one (the greedy 2-approximation of Hubara et al. 2021).
"""
import itertools

import torch

_PAIRS = list(itertools.combinations(range(4), 2))     # (0,1) (0,2) (0,3) (1,2) (1,3) (2,3)


def tile_patterns():
    """The 90 4x4 0/1 patterns with two ones per row and per column, as a list of four pair indices
    (into ``_PAIRS``, one per row), in lexicographic order of those indices."""
    out = []
    for q in itertools.product(range(6), repeat=4):
        cols = [0] * 4
        for p in q:
            for c in _PAIRS[p]:
                cols[c] += 1
        if cols == [2, 2, 2, 2]:
            out.append(q)
    assert len(out) == 90
    return out


def tile_pattern_masks():
    """The 90 patterns as 16-bit masks (bit ``4 * row + col``), in order."""
    return [sum(1 << (4 * r + c) for r in range(4) for c in _PAIRS[q[r]]) for q in tile_patterns()]


def magnitude_key(w):
    a = w.detach().float().abs()
    return torch.where(torch.isnan(a), torch.full_like(a, float("inf")), a)


def check_nm(shape, n, m, dim, who="nm_mask"):
    """The normalized ``dim``; raises ValueError for a bad pattern or a dimension that is not a
    multiple of ``m``."""
    for name, v in (("n", n), ("m", m)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise TypeError(f"{who}: {name} must be an int, got {v!r}")
    if not 0 <= n <= m or m < 1:
        raise ValueError(f"{who}: need 0 <= n <= m and m >= 1, got n={n}, m={m}")
    if len(shape) == 0:
        raise ValueError(f"{who}: needs a tensor with at least one dimension")
    if not -len(shape) <= dim < len(shape):
        raise IndexError(f"{who}: dim {dim} out of range for a {len(shape)}-d tensor")
    dim %= len(shape)
    if shape[dim] % m:
        raise ValueError(f"{who}: dimension {dim} has size {shape[dim]}, which is not a multiple of m={m} "
                         f"(pad it, or use pad=True)")
    return dim


def nm_mask_reference(w, n, m, dim=-1):
    """Bool mask of ``w``'s shape (see the module doc)."""
    dim = check_nm(tuple(w.shape), n, m, dim)
    x = magnitude_key(w).movedim(dim, -1).contiguous()
    groups = x.reshape(-1, m)
    order = torch.sort(groups, dim=1, descending=True, stable=True).indices
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, order[:, :n], True)
    return keep.reshape(x.shape).movedim(-1, dim)


def check_tiles(shape, who="transposable_mask"):
    if len(shape) < 2:
        raise ValueError(f"{who}: needs a tensor with at least 2 dimensions (viewed as [shape[0], -1]), got "
                         f"{len(shape)}")
    rows = shape[0]
    cols = 1
    for d in shape[1:]:
        cols *= d
    if rows % 4 or cols % 4:
        raise ValueError(f"{who}: the [shape[0], -1] view is {rows} x {cols}; both must be multiples of 4")
    return rows, cols


def _tiles(w):
    rows, cols = check_tiles(tuple(w.shape))
    k = magnitude_key(w).reshape(rows // 4, 4, cols // 4, 4).permute(0, 2, 1, 3).reshape(-1, 4, 4)
    return rows, cols, k


def _untile(keep, rows, cols, shape):
    return keep.reshape(rows // 4, cols // 4, 4, 4).permute(0, 2, 1, 3).reshape(shape)


def transposable_mask_reference(w, mode="exact"):
    """Bool mask of ``w``'s shape: 2 kept per row and column of every 4x4 tile (see the module doc)."""
    if mode not in ("exact", "greedy"):
        raise ValueError(f"transposable_mask: mode must be 'exact' or 'greedy', got {mode!r}")
    rows, cols, k = _tiles(w)
    t = k.shape[0]
    if mode == "exact":
        a = torch.tensor([p[0] for p in _PAIRS], device=k.device)
        b = torch.tensor([p[1] for p in _PAIRS], device=k.device)
        pair_sum = k[:, :, a] + k[:, :, b]                                     # [t, row, pair]
        q = torch.tensor(tile_patterns(), device=k.device)                     # [90, row]
        s = pair_sum[:, 0, q[:, 0]] + pair_sum[:, 1, q[:, 1]]
        s = s + pair_sum[:, 2, q[:, 2]]
        s = s + pair_sum[:, 3, q[:, 3]]                                        # [t, 90]
        best = torch.argmax(s, dim=1)                                          # first maximum
        bits = torch.tensor(tile_pattern_masks(), device=k.device)[best]
        keep = ((bits[:, None] >> torch.arange(16, device=k.device)) & 1).bool()
        return _untile(keep.reshape(t, 4, 4), rows, cols, w.shape)
    flat = k.reshape(t, 16)
    order = torch.sort(flat, dim=1, descending=True, stable=True).indices
    keep = torch.zeros(t, 16, dtype=torch.bool, device=k.device)
    row_cnt = torch.zeros(t, 4, dtype=torch.int64, device=k.device)
    col_cnt = torch.zeros(t, 4, dtype=torch.int64, device=k.device)
    ar = torch.arange(t, device=k.device)
    for j in range(16):
        idx = order[:, j]
        r, c = idx // 4, idx % 4
        ok = (row_cnt[ar, r] < 2) & (col_cnt[ar, c] < 2)
        keep[ar, idx] = ok
        row_cnt[ar, r] += ok
        col_cnt[ar, c] += ok
    return _untile(keep.reshape(t, 4, 4), rows, cols, w.shape)
