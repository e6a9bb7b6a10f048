"""Magnitude selection in Triton (the Triton side of ``csrc/cpu/select.cpp``; the spec and the tie rule are
:mod:`fastopt.reference.select`'s): the thresholds and keep-masks of magnitude pruning for many tensors
at once, per group (one tensor each, or all of them), without a host sync.

The key of ``x`` is ``|x|`` as fp32 bits with NaN as +inf: a 31-bit integer ordered like ``|x|``.  Every
tensor is cut into chunks of ``CHUNK`` elements, one program each, in a table shared by all launches
(programs of one dtype per launch; units numbered across the whole call in list order).

* 3 histogram passes (:func:`_select_pass_kernel`): bits 30..20 (2048 bins), then 19..10 and 9..0
  (1024 bins) of the keys whose higher bits equal the prefix fixed so far; each program builds its
  chunk's histogram with ``tl.histogram`` (non-matching keys and tail lanes go to bin 2047, which no key
  reaches: the largest key 0x7f800000 has bin 2040) and adds its nonzero bins into the group's int64
  histogram with atomics (integers: the result does not depend on the order).
* after each pass one program per group (:func:`_select_cut_kernel`) finds the bin of the rank still
  sought (``cumsum``), subtracts the count below it, extends the prefix, clears the histogram for the
  next pass and, after the last, stores the threshold (the key's bits as fp32).
* the mask pass (:func:`_select_mask_kernel`) writes ``key > t`` (``key >= t`` while some ties are kept
  and some pruned) and each chunk's tie count; an exclusive cumsum per group (torch, on the device)
  gives each chunk its first tie's flat rank, and :func:`_select_fix_kernel` clears, in the few chunks
  concerned, the ties of rank ``>= c - r`` (ties are kept by the lowest flat index).

Under the interpreter a chunk is one block (few, large operations); on a GPU blocks of 1024 elements.
"""
import math
import os

import torch
import triton
import triton.language as tl

NBINS = 2048
DUMMY_BIN = 2047
_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _sizes():
    """(CHUNK, BLOCK): whole-chunk blocks under the interpreter, register-sized blocks on a GPU."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return 65536, 65536
    return 16384, 1024


@triton.jit
def _key(x):
    """|x| of an fp32 block as int32 bits, NaN as +inf (fastopt/sparse.h mag_key_bits)."""
    b = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    return tl.minimum(b, 0x7F800000)


@triton.jit
def _base(table, t, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Tensor ``t``'s address in an address table as a ``DTYPE`` pointer, declared 16-byte aligned when
    ``ALIGNED`` (the launcher checked every address): with chunks starting at multiples of ``CHUNK`` and
    the lane hints of :func:`_lanes`, a whole (unmasked) block then loads and stores as vectors."""
    ptr = tl.load(table + t).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _lanes(off, BLOCK: tl.constexpr):
    """``off + arange(BLOCK)`` for a loop offset ``off`` (a multiple of BLOCK), with the hints that let a
    block load as vectors."""
    return tl.max_contiguous(tl.multiple_of(off + tl.arange(0, BLOCK), BLOCK), BLOCK)


@triton.jit
def _load_keys(x_ptr, lane, start, numel, full):
    """The keys of block ``lane`` of the chunk at ``start`` and its in-bounds lanes: an unmasked (vector)
    load when the whole chunk is in bounds (``full``), a masked one in a tensor's last chunk."""
    offs = start + lane
    if full:
        m = lane >= 0
        k = _key(tl.load(x_ptr + offs).to(tl.float32))
    else:
        m = offs < numel
        k = _key(tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32))
    return k, m


@triton.jit
def _select_pass_kernel(addrs, numels, tensor_group, group_count, prefix, hist, prog_tensor, prog_start,
                        PASS: tl.constexpr, DTYPE: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                        ALIGNED: tl.constexpr, NB: tl.constexpr, DUMMY: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(prog_tensor + pid)
    g = tl.load(tensor_group + t)
    if tl.load(group_count + g) > 0:
        numel = tl.load(numels + t)
        start = tl.multiple_of(tl.load(prog_start + pid), CHUNK)  # chunks start at multiples of CHUNK
        x_ptr = _base(addrs, t, DTYPE, ALIGNED)
        pfx = tl.load(prefix + g).to(tl.int32)
        full = start + CHUNK <= numel
        acc = tl.zeros([NB], dtype=tl.int32)
        for off in range(0, CHUNK, BLOCK):
            k, m = _load_keys(x_ptr, _lanes(off, BLOCK), start, numel, full)
            if PASS == 0:
                b = k >> 20
                ok = m
            elif PASS == 1:
                b = (k >> 10) & 1023
                ok = m & ((k >> 20) == pfx)
            else:
                b = k & 1023
                ok = m & ((k >> 10) == pfx)
            acc += tl.histogram(tl.where(ok, b, DUMMY), NB)
        idx = tl.arange(0, NB)
        tl.atomic_add(hist + g * NB + idx, acc.to(tl.int64), mask=(acc != 0) & (idx != DUMMY))


@triton.jit
def _select_cut_kernel(hist, group_count, prefix, rank, ties, thresholds, PASS: tl.constexpr, NB: tl.constexpr):
    g = tl.program_id(0)
    idx = tl.arange(0, NB)
    if tl.load(group_count + g) > 0:
        h = tl.load(hist + g * NB + idx)
        r = tl.load(rank + g)
        cum = tl.cumsum(h, 0)
        b = tl.sum((cum < r).to(tl.int32), 0)  # bins wholly below the sought rank
        below = tl.sum(tl.where(idx < b, h, 0), 0)
        hb = tl.sum(tl.where(idx == b, h, 0), 0)
        if PASS == 0:
            p = b.to(tl.int64)
        else:
            p = (tl.load(prefix + g) << 10) | b.to(tl.int64)
        tl.store(rank + g, r - below)
        tl.store(prefix + g, p)
        tl.store(ties + g, hb)
        if PASS == 2:
            tl.store(thresholds + g, p.to(tl.int32).to(tl.float32, bitcast=True))
        tl.store(hist + g * NB + idx, tl.zeros([NB], dtype=tl.int64))


@triton.jit
def _select_mask_kernel(addrs, outs, numels, tensor_group, group_count, prefix, rank, ties, unit_ties, prog_tensor,
                        prog_start, prog_unit, DTYPE: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                       ALIGNED: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(prog_tensor + pid)
    g = tl.load(tensor_group + t)
    numel = tl.load(numels + t)
    start = tl.multiple_of(tl.load(prog_start + pid), CHUNK)  # chunks start at multiples of CHUNK
    x_ptr = _base(addrs, t, DTYPE, ALIGNED)
    o_ptr = _base(outs, t, tl.uint8, ALIGNED)
    inactive = tl.load(group_count + g) == 0
    tk = tl.load(prefix + g).to(tl.int32)
    partial = (tl.load(rank + g) < tl.load(ties + g)) & (inactive == 0)
    full = start + CHUNK <= numel
    n_ties = tl.zeros([BLOCK], dtype=tl.int32)
    for off in range(0, CHUNK, BLOCK):
        lane = _lanes(off, BLOCK)
        k, m = _load_keys(x_ptr, lane, start, numel, full)
        tie = (k == tk) & partial
        keep = (inactive | (k > tk) | tie).to(tl.uint8)
        if full:
            tl.store(o_ptr + start + lane, keep)
        else:
            tl.store(o_ptr + start + lane, keep, mask=m)
        n_ties += (tie & m).to(tl.int32)
    tl.store(unit_ties + tl.load(prog_unit + pid), tl.sum(n_ties, 0).to(tl.int64))


@triton.jit
def _select_fix_kernel(addrs, outs, numels, tensor_group, prefix, rank, ties, unit_ties, unit_first, prog_tensor,
                       prog_start, prog_unit, DTYPE: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                       ALIGNED: tl.constexpr):
    pid = tl.program_id(0)
    u = tl.load(prog_unit + pid)
    t = tl.load(prog_tensor + pid)
    g = tl.load(tensor_group + t)
    n_ties = tl.load(unit_ties + u)
    first = tl.load(unit_first + u)
    keep_n = tl.load(ties + g) - tl.load(rank + g)  # ties kept: those of flat rank < keep_n
    if (n_ties > 0) & (first + n_ties > keep_n):
        numel = tl.load(numels + t)
        start = tl.multiple_of(tl.load(prog_start + pid), CHUNK)  # chunks start at multiples of CHUNK
        x_ptr = _base(addrs, t, DTYPE, ALIGNED)
        o_ptr = _base(outs, t, tl.uint8, ALIGNED)
        tk = tl.load(prefix + g).to(tl.int32)
        run = first
        for off in range(0, CHUNK, BLOCK):
            lane = _lanes(off, BLOCK)
            m = start + lane < numel
            k = _key(tl.load(x_ptr + start + lane, mask=m, other=0.0).to(tl.float32))
            tie = m & (k == tk)
            r = run + tl.cumsum(tie.to(tl.int64), 0) - 1
            tl.store(o_ptr + start + lane, tl.zeros([BLOCK], dtype=tl.uint8), mask=tie & (r >= keep_n))
            run += tl.sum(tie.to(tl.int64), 0)


def magnitude_select(tensors, groups, counts, thresholds, masks):
    """The launcher (arguments validated by ``fastopt._ops.magnitude_select_``): group ``g`` of the tensors
    prunes ``counts[g]``; ``thresholds`` (fp32 (groups,)) and the uint8 ``masks`` (or []) are written."""
    device = tensors[0].device
    chunk, block = _sizes()
    n, ngroups = len(tensors), len(counts)
    numels = [t.numel() for t in tensors]
    # units (chunks) in list order, their programs grouped by dtype
    unit_group, unit_group_first, group_first = [], [], {}
    progs = {}  # dtype -> ([tensor], [start], [unit])
    for i, t in enumerate(tensors):
        for s in range(0, numels[i], chunk):
            u = len(unit_group)
            group_first.setdefault(groups[i], u)
            unit_group.append(groups[i])
            unit_group_first.append(group_first[groups[i]])
            p = progs.setdefault(t.dtype, ([], [], []))
            p[0].append(i)
            p[1].append(s)
            p[2].append(u)
    nunits = len(unit_group)
    head = ([t.data_ptr() for t in tensors] + [m.data_ptr() for m in masks] + numels + list(groups) + list(counts)
            + list(counts) + unit_group_first)
    order = list(progs)
    for dt in order:
        for col in progs[dt]:
            head += col
    table = torch.tensor(head, dtype=torch.int64).to(device, non_blocking=True)
    pos = 0

    def take(k):
        nonlocal pos
        v = table[pos:pos + k]
        pos += k
        return v

    addrs = take(n)
    outs = take(n) if masks else addrs
    numels_t, tensor_group, group_count, rank, unit_group_first_t = take(n), take(n), take(ngroups), take(ngroups), \
        take(nunits)
    rank = rank.clone()
    tabs = {}
    for dt in order:
        k = len(progs[dt][0])
        tabs[dt] = (take(k), take(k), take(k), k)
    prefix = torch.zeros(ngroups, dtype=torch.int64, device=device)
    ties = torch.zeros(ngroups, dtype=torch.int64, device=device)
    hist = torch.zeros(ngroups * NBINS, dtype=torch.int64, device=device)
    aligned = all(t.data_ptr() % 16 == 0 for t in list(tensors) + list(masks))
    thresholds.fill_(-math.inf)
    for pas in range(3):
        for dt in order:
            p_tensor, p_start, _, k = tabs[dt]
            _select_pass_kernel[(k,)](addrs, numels_t, tensor_group, group_count, prefix, hist, p_tensor, p_start,
                                      PASS=pas, DTYPE=_DTYPES[dt], CHUNK=chunk, BLOCK=block, NB=NBINS,
                                      DUMMY=DUMMY_BIN, ALIGNED=aligned, enable_fp_fusion=False)
        _select_cut_kernel[(ngroups,)](hist, group_count, prefix, rank, ties, thresholds, PASS=pas, NB=NBINS,
                                       enable_fp_fusion=False)
    if not masks or nunits == 0:
        return
    unit_ties = torch.zeros(nunits, dtype=torch.int64, device=device)
    for dt in order:
        p_tensor, p_start, p_unit, k = tabs[dt]
        _select_mask_kernel[(k,)](addrs, outs, numels_t, tensor_group, group_count, prefix, rank, ties, unit_ties,
                                  p_tensor, p_start, p_unit, DTYPE=_DTYPES[dt], CHUNK=chunk, BLOCK=block,
                                  ALIGNED=aligned, enable_fp_fusion=False)
    excl = torch.cumsum(unit_ties, 0) - unit_ties
    unit_first = excl - excl[unit_group_first_t]
    for dt in order:
        p_tensor, p_start, p_unit, k = tabs[dt]
        _select_fix_kernel[(k,)](addrs, outs, numels_t, tensor_group, prefix, rank, ties, unit_ties, unit_first,
                                 p_tensor, p_start, p_unit, DTYPE=_DTYPES[dt], CHUNK=chunk, BLOCK=block,
                                 ALIGNED=aligned, enable_fp_fusion=False)
