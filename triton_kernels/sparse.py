"""N:M and transposable 2:4 masks in Triton (the Triton side of ``csrc/include/fastopt/sparse.h``).

Every mask is bit-identical to the pure-PyTorch reference :mod:`fastopt.reference.sparse` (its module
docstring is the spec): the magnitude key is ``|w|`` in fp32 (fp16/bf16 converted exactly first) with
NaN counted as +inf, and equal keys go to the lowest index.

:func:`nm_mask` -- ``x`` viewed as ``[outer, length, inner]``, groups of ``m`` consecutive positions
along ``length``.  Each program takes ``G`` groups as a ``[G, MP2]`` tile (``MP2`` = ``m`` rounded up
to a power of two; lanes ``>= m`` are masked off) and ranks every element within its group::

    rank_i = #{j < m : key_j > key_i  or  (key_j == key_i and j < i)},    keep_i = rank_i < n

Under the interpreter the rank is one ``[G, MP2, MP2]`` broadcast compare (few, large operations); on
a GPU it is a loop of ``m`` steps (unrolled by 2 for m > 4, not fully: fully unrolled, the compiler issued all
``m`` loads first and m = 64 spilled; indices are int32 below ``INDEX32_MAX_NUMEL`` elements, which
keeps the tile's addresses in half the registers) that each re-read column ``j`` of the tile (``[G]``
loads the cache serves) and compare it with the whole ``[G, MP2]`` tile, so no value crosses threads
(no shuffles, no shared memory).  Both give the same integers; the launcher picks by ``TRITON_INTERPRET``.  A group
keeps exactly its ``n`` first elements of the (stable, descending) order.  Groups are numbered with
``inner`` fastest, so neighbouring lanes of a tile read neighbouring addresses; for ``inner == 1``
(``dim=-1``) the tile is simply ``G * m`` consecutive elements (the fast, vectorized path).

:func:`transposable_mask` -- ``x`` viewed as a ``[rows, cols]`` matrix cut into 4x4 tiles, numbered
row of tiles by row of tiles; each program takes ``T`` consecutive tiles.

* exact: the pair sums ``k[r, a] + k[r, b]`` of every row (24 fp32 adds per tile), then the 90 patterns
  of :func:`fastopt.reference.sparse.tile_patterns` are unrolled at compile time -- nested
  ``static_range`` loops over the pair indices ``q0, q1, q2`` in lexicographic order; row 3's pair is
  forced (the two columns used once so far) and combinations that leave none are skipped, which
  yields exactly the 90 patterns in the reference order.  Each pattern costs its fixed-order sum
  ``((s0 + s1) + s2) + s3`` (plain fp32 adds, no reassociation: s0 + s1 is shared by the patterns that
  start with the same two rows, which changes no value) and one strict ``>`` against the best so far,
  so ties keep the earliest pattern.  The winner's 16-bit mask is a compile-time constant per
  pattern; no table is read.
* greedy: the rank of each of the 16 entries in its tile (descending key, ties to the lowest
  ``4 * row + col``; each entry compared with the 16 re-read entries of its tile), then 16 sequential
  steps over the ``[T, 4, 4]`` block: step ``j`` keeps the entry of rank ``j`` iff its row and its
  column each hold fewer than 2 kept entries (per-entry row/column counters, updated from the
  taken entry's index).

Tile sizes: the interpreter pays per operation and program, not per element, so it gets large tiles;
a GPU gets tiles sized for registers.  Both functions return None and launch nothing for empty
tensors.
"""
import contextlib
import os

import torch
import triton
import triton.language as tl

MAX_M = 64
# N:M masks index in int32 up to this numel (int64 above it): every offset the kernel forms, masked lanes
# included, is below 3 * numel + G * MP2 (<= 2^15) < 2^31
INDEX32_MAX_NUMEL = 1 << 29
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The six pairs of columns (0,1) (0,2) (0,3) (1,2) (1,3) (2,3) of fastopt.reference.sparse._PAIRS as
# 4-bit column masks, pair p in bits 4p .. 4p + 3.
_PAIR_MASKS = tl.constexpr(3 | 5 << 4 | 9 << 8 | 6 << 12 | 10 << 16 | 12 << 20)


def _interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# -- device helpers ----------------------------------------------------------------------------------

@triton.jit
def _key(v):
    """|v| in fp32, NaN -> +inf.  bf16 widens by its bits (exact everywhere; the interpreter's bf16 ->
    fp32 conversion flushes subnormals)."""
    if v.dtype == tl.bfloat16:
        f = (v.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        f = v.to(tl.float32)
    a = tl.abs(f)
    return tl.where(a != a, float("inf"), a)


@triton.jit
def _pick(q: tl.constexpr, v0, v1, v2, v3, v4, v5):
    """``(v0, ..., v5)[q]`` for a compile-time q."""
    r = v0
    if q == 1:
        r = v1
    if q == 2:
        r = v2
    if q == 3:
        r = v3
    if q == 4:
        r = v4
    if q == 5:
        r = v5
    return r


@triton.jit
def _row_pairs(x, base, tmask, R: tl.constexpr, cols):
    """The six pair sums ``k[R, a] + k[R, b]`` ([T] each) of row R of every tile, in _PAIRS order."""
    p = x + base + R * cols
    k0 = _key(tl.load(p, mask=tmask, other=0.0))
    k1 = _key(tl.load(p + 1, mask=tmask, other=0.0))
    k2 = _key(tl.load(p + 2, mask=tmask, other=0.0))
    k3 = _key(tl.load(p + 3, mask=tmask, other=0.0))
    return k0 + k1, k0 + k2, k0 + k3, k1 + k2, k1 + k3, k2 + k3


@triton.jit
def _try_pattern(best, bits, s01, p20, p21, p22, p23, p24, p25, p30, p31, p32, p33, p34, p35,
                 Q0: tl.constexpr, Q1: tl.constexpr, Q2: tl.constexpr):
    """Rows 0..2 take the pairs Q0, Q1, Q2 (``s01`` = their first two pair sums, added).  If row 3 can
    complete a pattern (two columns used once so far: its pair is forced), score it as
    ``((s0 + s1) + s2) + s3`` and keep it over (best, bits) iff strictly better."""
    M0: tl.constexpr = (_PAIR_MASKS >> (4 * Q0)) & 15
    M1: tl.constexpr = (_PAIR_MASKS >> (4 * Q1)) & 15
    M2: tl.constexpr = (_PAIR_MASKS >> (4 * Q2)) & 15
    C0: tl.constexpr = (M0 & 1) + (M1 & 1) + (M2 & 1)                  # column counts after row 2
    C1: tl.constexpr = ((M0 >> 1) & 1) + ((M1 >> 1) & 1) + ((M2 >> 1) & 1)
    C2: tl.constexpr = ((M0 >> 2) & 1) + ((M1 >> 2) & 1) + ((M2 >> 2) & 1)
    C3: tl.constexpr = ((M0 >> 3) & 1) + ((M1 >> 3) & 1) + ((M2 >> 3) & 1)
    M3: tl.constexpr = (C0 == 1) * 1 + (C1 == 1) * 2 + (C2 == 1) * 4 + (C3 == 1) * 8
    # row 3's pair index (_PAIRS order) from its column mask 3, 5, 9, 6, 10, 12
    Q3: tl.constexpr = (M3 == 5) * 1 + (M3 == 9) * 2 + (M3 == 6) * 3 + (M3 == 10) * 4 + (M3 == 12) * 5
    OVER: tl.constexpr = (C0 > 2) + (C1 > 2) + (C2 > 2) + (C3 > 2)
    if OVER == 0:
        if M3 != 0:     # no column over 2 and two columns at 1: M3 has two bits, a valid pattern
            s = (s01 + _pick(Q2, p20, p21, p22, p23, p24, p25)) + _pick(Q3, p30, p31, p32, p33, p34, p35)
            better = s > best                                        # strict: ties keep the earlier
            best = tl.where(better, s, best)
            bits = tl.where(better, M0 | (M1 << 4) | (M2 << 8) | (M3 << 12), bits)
    return best, bits


# -- kernels -----------------------------------------------------------------------------------------

@triton.jit
def _rank_step(x, base, j, step, gmask, key, i, rank):
    """``rank`` plus, per element of the tile, whether element ``j`` of its group comes before it."""
    kj = _key(tl.load(x + base + j * step, mask=gmask, other=0.0))[:, None]
    return rank + ((kj > key) | ((kj == key) & (j < i)[None, :])).to(tl.int32)


@triton.jit
def _nm_mask_kernel(x, out, ngroups, inner, n, M: tl.constexpr, MP2: tl.constexpr, G: tl.constexpr,
                    BROADCAST: tl.constexpr, INNER1: tl.constexpr, IDX64: tl.constexpr):
    pid = tl.program_id(0)
    if IDX64:
        pid = pid.to(tl.int64)
    q = pid * G + tl.arange(0, G)      # group index, inner fastest; int32 unless IDX64 (fewer registers)
    gmask = q < ngroups
    i = tl.arange(0, MP2)
    if INNER1:
        base = q * M
        step = 1
    else:
        step = inner
        if IDX64:
            step = inner.to(tl.int64)
        og = q // step
        base = og * (M * step) + (q - og * step)
    offs = base[:, None] + i[None, :] * step
    mask = gmask[:, None] & (i < M)[None, :]
    key = _key(tl.load(x + offs, mask=mask, other=0.0))          # [G, MP2]
    if BROADCAST:   # one [G, MP2, MP2] compare: few, large operations (the interpreter)
        a = key[:, :, None]
        b = key[:, None, :]
        before = (b > a) | ((b == a) & (i[None, None, :] < i[None, :, None]))
        before = before & (i < M)[None, None, :]
        rank = tl.sum(before.to(tl.int32), axis=2)
    else:           # column by column, re-read (cached): no cross-thread traffic (a GPU)
        rank = tl.zeros([G, MP2], dtype=tl.int32)
        # m > 4: a loop unrolled by 2, not m times (all m loads hoisted: m = 64 spilled).  Both forms were
        # measured spill-free for every m, dtype, layout and index width (sm_90, Triton 3.9)
        if M <= 4:
            for j in tl.static_range(M):
                rank = _rank_step(x, base, j, step, gmask, key, i, rank)
        else:
            for j in tl.range(0, M, loop_unroll_factor=2):
                rank = _rank_step(x, base, j, step, gmask, key, i, rank)
    tl.store(out + offs, (rank < n).to(tl.uint8), mask=mask)


@triton.jit
def _transposable_mask_kernel(x, out, ntiles, tcols, cols, EXACT: tl.constexpr, T: tl.constexpr):
    t = tl.program_id(0).to(tl.int64) * T + tl.arange(0, T)     # tile index, tile column fastest
    cols = cols.to(tl.int64)
    tmask = t < ntiles
    tr = t // tcols
    base = tr * (4 * cols) + (t - tr * tcols) * 4                  # element (0, 0) of the tile
    r = tl.arange(0, 4)[None, :, None]
    c = tl.arange(0, 4)[None, None, :]
    e = 4 * r + c                                                  # [1, 4, 4] entry index
    offs = base[:, None, None] + (r * cols + c)                    # [T, 4, 4]; a row is 4 bytes
    tmask3 = tmask[:, None, None]
    if EXACT:
        p00, p01, p02, p03, p04, p05 = _row_pairs(x, base, tmask, 0, cols)
        p10, p11, p12, p13, p14, p15 = _row_pairs(x, base, tmask, 1, cols)
        p20, p21, p22, p23, p24, p25 = _row_pairs(x, base, tmask, 2, cols)
        p30, p31, p32, p33, p34, p35 = _row_pairs(x, base, tmask, 3, cols)
        best = tl.full([T], -1.0, tl.float32)                      # every sum is >= 0
        bits = tl.zeros([T], dtype=tl.int32)
        for q0 in tl.static_range(6):
            s0 = _pick(q0, p00, p01, p02, p03, p04, p05)
            for q1 in tl.static_range(6):
                s01 = s0 + _pick(q1, p10, p11, p12, p13, p14, p15)
                for q2 in tl.static_range(6):
                    best, bits = _try_pattern(best, bits, s01, p20, p21, p22, p23, p24, p25,
                                              p30, p31, p32, p33, p34, p35, q0, q1, q2)
        keep = ((bits[:, None, None] >> e) & 1) != 0
    else:
        k = _key(tl.load(x + offs, mask=tmask3, other=0.0))       # [T, 4, 4]
        rank = tl.zeros([T, 4, 4], dtype=tl.int32)
        for f in tl.static_range(16):
            kf = _key(tl.load(x + base + ((f // 4) * cols + f % 4), mask=tmask, other=0.0))[:, None, None]
            rank += ((kf > k) | ((kf == k) & (f < e))).to(tl.int32)
        row_cnt = tl.zeros([T, 4, 4], dtype=tl.int32)              # kept entries in each entry's row
        col_cnt = tl.zeros([T, 4, 4], dtype=tl.int32)              # ... and column
        keep = tl.zeros([T, 4, 4], dtype=tl.int1)
        for j in tl.static_range(16):
            sel = rank == j                                        # one entry per tile
            ok = sel & (row_cnt < 2) & (col_cnt < 2)
            took = tl.max(tl.max(ok.to(tl.int32), axis=2), axis=1)[:, None, None] != 0
            ej = tl.sum(tl.sum(tl.where(sel, e, 0), axis=2), axis=1)[:, None, None]
            keep = keep | ok
            row_cnt += (took & (r == ej // 4)).to(tl.int32)
            col_cnt += (took & (c == ej % 4)).to(tl.int32)
    tl.store(out + offs, keep.to(tl.uint8), mask=tmask3)


# -- launchers ---------------------------------------------------------------------------------------

def _check(x, out, numel_expected, who):
    if not torch.is_tensor(x) or x.dtype not in _DTYPES:
        raise ValueError(f"{who}: x must be an fp32, fp16 or bf16 tensor, got "
                         f"{x.dtype if torch.is_tensor(x) else type(x).__name__}")
    if not x.is_contiguous():
        raise ValueError(f"{who}: x must be contiguous")
    if not torch.is_tensor(out) or out.dtype != torch.uint8 or not out.is_contiguous() \
            or out.numel() != x.numel():
        raise ValueError(f"{who}: out must be a contiguous uint8 tensor of {x.numel()} elements")
    if out.device != x.device:
        raise ValueError(f"{who}: x and out must be on one device")
    if x.numel() != numel_expected:
        raise ValueError(f"{who}: x has {x.numel()} elements, the view needs {numel_expected}")


def _pow2_floor(v):
    return 1 << (max(int(v), 1).bit_length() - 1)


def _nm_tile(m, ngroups):
    """(MP2, G, BROADCAST) for groups of m."""
    mp2 = triton.next_power_of_2(m)
    if _interpreting():
        g, broadcast = min(_pow2_floor((1 << 17) // (mp2 * mp2)), _pow2_floor((1 << 15) // mp2)), True
    else:
        g, broadcast = max(1, 2048 // mp2), False
    return mp2, max(1, min(g, triton.next_power_of_2(ngroups))), broadcast


def nm_mask(x, out, outer, length, inner, n, m):
    """N:M mask of ``x`` (contiguous fp32/fp16/bf16) viewed as ``[outer, length, inner]``, along
    ``length``, into ``out`` (contiguous uint8, x's numel): 1 keeps, 0 prunes.

    Groups are the ``m`` consecutive positions ``g*m .. g*m + m - 1`` of ``length``; each keeps its
    ``n`` largest ``|x|`` (NaN as +inf, ties to the lowest position).  ``0 <= n <= m``,
    ``1 <= m <= 64``, ``length % m == 0``.  Returns None.
    """
    outer, length, inner, n, m = int(outer), int(length), int(inner), int(n), int(m)
    if not 1 <= m <= MAX_M or not 0 <= n <= m:
        raise ValueError(f"nm_mask: need 0 <= n <= m and 1 <= m <= {MAX_M}, got n={n}, m={m}")
    if outer < 0 or length < 0 or inner < 0 or length % m:
        raise ValueError(f"nm_mask: bad view [{outer}, {length}, {inner}] for groups of {m}")
    _check(x, out, outer * length * inner, "nm_mask")
    numel = x.numel()
    if numel == 0:
        return None
    ngroups = numel // m
    mp2, g, broadcast = _nm_tile(m, ngroups)
    with _device_guard(x):
        _nm_mask_kernel[(triton.cdiv(ngroups, g),)](
            x, out, ngroups, inner, n, M=m, MP2=mp2, G=g, BROADCAST=broadcast, INNER1=inner == 1,
            IDX64=numel > INDEX32_MAX_NUMEL,
            enable_fp_fusion=False,  # pinned, not Triton's default (which 3.10 changes)
        )
    return None


def transposable_mask(x, out, rows, cols, exact):
    """Transposable 2:4 mask of ``x`` (contiguous fp32/fp16/bf16) viewed as a ``[rows, cols]`` matrix
    (both multiples of 4) into ``out`` (contiguous uint8, x's numel): per 4x4 tile, ``exact=True``
    keeps the best of the 90 patterns with two entries per row and column, ``exact=False`` the greedy
    choice (see the module doc).  Returns None.
    """
    rows, cols = int(rows), int(cols)
    if rows < 0 or cols < 0 or rows % 4 or cols % 4:
        raise ValueError(f"transposable_mask: the view is {rows} x {cols}; both must be multiples of 4")
    _check(x, out, rows * cols, "transposable_mask")
    if x.numel() == 0:
        return None
    ntiles = (rows // 4) * (cols // 4)
    if _interpreting():
        t = 1024
    else:
        t = 256 if exact else 64
    t = max(1, min(t, triton.next_power_of_2(ntiles)))
    with _device_guard(x):
        _transposable_mask_kernel[(triton.cdiv(ntiles, t),)](
            x, out, ntiles, cols // 4, cols, EXACT=bool(exact), T=t,
            enable_fp_fusion=False,  # pinned: the exact mode's pattern sums are fp32 adds
        )
    return None


def _device_guard(x):
    """Launch on x's GPU (triton launches on the current device)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
