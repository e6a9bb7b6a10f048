"""Low-bit optimizer states in Triton: the blockwise codec and the fused dequantize -> update ->
requantize step of every registered elementwise op (the Triton side of ``csrc/include/fastopt/quant.h``
and ``csrc/cpu/lowbit_kernels.cpp``).

A quantized state stores, per block of ``block`` elements, one fp32 ``absmax`` and one code per element
(a byte for 8-bit formats; two per byte for 16-code books, element ``2j`` in the low nibble of byte
``j``); ``x_hat = values[code] * absmax``.  Quantizing reads the int32 codebook of
:mod:`fastopt.lowbit.codebook` exactly as ``quant.h`` does::

    absmax = max |x| over the block;  inv = absmax > 0 ? 1 / absmax : 0;  xn = clamp(x * inv, -1, 1)
    rank = bucket[sign][row][top 8 mantissa bits of xn] + (bounds[rank] < xn)
    code = identity ? rank : rank_code[rank]
    code = (code == zero_code && xn > 0) ? floor_code : code     (unsigned formats: header [5], [6])

and a block holding a NaN or an infinity is poisoned: absmax NaN, every code the code of 0 (so the
whole block dequantizes to NaN), as on every backend.

Each program handles ``G`` whole blocks as a ``[G, block]`` tile (``block`` rounded up to a power of two,
the lanes past it masked off), contiguous in memory; 4-bit codes are loaded as ``[G, block / 2]`` bytes
and split into their nibbles (``join`` + ``reshape``: element ``2j`` low, ``2j + 1`` high), and packed
back the other way (no atomics).  A program whose blocks all exist (every one but a tensor's last,
when ``block`` is a power of two) runs unmasked; when every tensor of the call is 16-byte aligned
(``ALIGNED``, checked by the launcher; else the scalar variant) its pointers are declared so, and params,
grads, plain states and 8-bit codes move as vectors (fp32 / bf16 params: 128-bit).  The step kernel
loads params, grads and states (plain states in the params' dtype, quantized ones dequantized), calls
the op's ``UPDATE`` (:mod:`.ops`) in fp32 with zero row coefficients, stores the params (bf16:
round to nearest even, or stochastic rounding with the same counter-based bits as
:mod:`.elementwise`) and requantizes each quantized state with its new block absmax.
"""
import functools
import os

import torch
import triton
import triton.language as tl

from . import multi_tensor as _mt
from .multi_tensor import (MAX_STATES, _TL_DTYPES, StepArgs, _aptr, _fold_step_increment, _load_block, _sr_offset,
                           _step_scalars, _step_skipped, _store_block, _store_param, aligned16, cached_on_device,
                           cached_table, dummy, pad_hyper, sr_offset_column, ticket_counter)
from .ops import OPS

HEADER = tl.constexpr(8)  # int32 words before the codebook's tables (constexpr: read by @triton.jit code)
MAX_BLOCK = 256     # as kMaxQuantBlock
# Elements per program (G = TILE // block whole blocks).  The interpreter pays ~1 ms of Python per
# nested @triton.jit call and program, whatever the tile size: it gets big tiles.
TILE = 8192 if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else 1024

PLAIN, Q8, Q4 = 0, 1, 2   # how a state is stored


# -- device helpers ----------------------------------------------------------------------------------

@triton.jit
def _tile(blk0, nblocks, BLOCK: tl.constexpr, G: tl.constexpr, HALF: tl.constexpr, WHOLE: tl.constexpr):
    """Blocks ``blk0 .. blk0 + G - 1`` (those below ``nblocks``) as a [G, 2 * HALF] tile (``2 * HALF``:
    the block rounded up to a power of two; lanes past ``BLOCK`` are masked off).

    Returns (block index [G], its mask, element offsets [G, 2 * HALF], their mask).  ``WHOLE``: the
    caller knows that every block exists and ``BLOCK == 2 * HALF``: both masks are constant all-true
    (unmasked, 128-bit accesses when the addresses are aligned)."""
    g = tl.arange(0, G)
    k = tl.arange(0, 2 * HALF)
    blk = blk0 + g
    offs = blk[:, None] * BLOCK + k[None, :]
    if WHOLE:
        gmask = tl.full([G], 1, tl.int1)
        mask = tl.full([G, 2 * HALF], 1, tl.int1)
    else:
        gmask = blk < nblocks
        mask = gmask[:, None] & (k < BLOCK)[None, :]
    return blk, gmask, offs, mask


@triton.jit
def _pairs(blk, gmask, BLOCK: tl.constexpr, G: tl.constexpr, HALF: tl.constexpr, WHOLE: tl.constexpr):
    """Byte offsets [G, HALF] of 4-bit codes (byte ``j`` of a block: elements ``2j`` low nibble, ``2j + 1``
    high nibble) and their mask."""
    j = tl.arange(0, HALF)
    pair = blk[:, None] * (BLOCK // 2) + j[None, :]
    if WHOLE:
        pmask = tl.full([G, HALF], 1, tl.int1)
    else:
        pmask = gmask[:, None] & (j < BLOCK // 2)[None, :]
    return pair, pmask


@triton.jit
def _load_codes(cptr, blk, gmask, offs, mask, BLOCK: tl.constexpr, G: tl.constexpr, HALF: tl.constexpr,
                FOUR: tl.constexpr, WHOLE: tl.constexpr):
    """int32 codes [G, 2 * HALF] (``quant.h`` load_code)."""
    if FOUR:
        pair, pmask = _pairs(blk, gmask, BLOCK, G, HALF, WHOLE)
        byte = tl.load(cptr + pair, mask=pmask, other=0).to(tl.int32)
        code = tl.reshape(tl.join(byte & 0xF, byte >> 4), [G, 2 * HALF])  # element 2j, 2j + 1
    else:
        code = tl.load(cptr + offs, mask=mask, other=0).to(tl.int32)
    return code


@triton.jit
def _store_codes(cptr, code, blk, gmask, offs, mask, BLOCK: tl.constexpr, G: tl.constexpr, HALF: tl.constexpr,
                 FOUR: tl.constexpr, WHOLE: tl.constexpr):
    if FOUR:
        pair, pmask = _pairs(blk, gmask, BLOCK, G, HALF, WHOLE)
        lo, hi = tl.split(tl.reshape(code, [G, HALF, 2]))
        tl.store(cptr + pair, (lo | (hi << 4)).to(tl.uint8), mask=pmask)  # codes < 16: disjoint nibbles
    else:
        tl.store(cptr + offs, code.to(tl.uint8), mask=mask)


@triton.jit
def _dequantize(book, code, amax):
    """values[code] * absmax, with absmax per block ([G])."""
    vals = tl.load(book + HEADER + code).to(tl.float32, bitcast=True)
    return vals * amax[:, None]


@triton.jit
def _quantize(book, x, mask):
    """(absmax [G], codes [G, 2 * HALF]) of the fp32 tile ``x``: quant.h quantize_code(quant_normalize(x,
    quant_inv_scale(absmax))).  A block holding a NaN or an infinity is poisoned (quant.h): its absmax
    is NaN and every code is the code of 0, so the whole block dequantizes to NaN."""
    ax = tl.abs(x)
    bad_el = mask & ~(ax <= 3.4028234663852886e38)  # NaN or +-inf
    bad = tl.max(bad_el.to(tl.int32), axis=1) > 0
    a = tl.where(mask & ~bad_el, ax, 0.0)
    amax = tl.max(a, axis=1)
    pos = amax > 0.0
    inv = tl.where(pos, tl.math.div_rn(tl.full(amax.shape, 1.0, tl.float32), tl.where(pos, amax, 1.0)), 0.0)
    xn = x * inv[:, None]
    xn = tl.where(xn < -1.0, -1.0, tl.where(xn > 1.0, 1.0, xn))
    xn = tl.where(bad[:, None] | (xn != xn), 0.0, xn)  # poisoned block; 0 * inf (subnormal absmax)
    amax = tl.where(bad, tl.full(amax.shape, 0x7FC00000, tl.int32).to(tl.float32, bitcast=True), amax)  # quiet NaN
    nc = tl.load(book)
    nr = tl.load(book + 1)
    e_lo = tl.load(book + 2)
    identity = tl.load(book + 3)
    u = xn.to(tl.uint32, bitcast=True)
    sign = (u >> 31).to(tl.int32)
    row = ((u >> 23) & 0xFF).to(tl.int32) - e_lo + 1
    m = ((u >> 15) & 0xFF).to(tl.int32)
    m = tl.where(row < 1, 0, m)
    row = tl.where(row < 1, 0, tl.where(row > nr - 1, nr - 1, row))
    r = tl.load(book + HEADER + 3 * nc + (sign * nr + row) * 256 + m)
    bound = tl.load(book + HEADER + nc + r).to(tl.float32, bitcast=True)
    r = r + (bound < xn).to(tl.int32)
    code = tl.where(identity != 0, r, tl.load(book + HEADER + 2 * nc + r))
    # Unsigned formats: a positive value never takes the code of 0 (zero_code -1 elsewhere: never fires).
    zero_code = tl.load(book + 5)
    floor_code = tl.load(book + 6)
    code = tl.where((code == zero_code) & (xn > 0.0), floor_code, code)
    return amax, code


@triton.jit
def _codec_tile(x, codes, absmax, book, blk0, nblocks, DEQUANTIZE: tl.constexpr, FOUR: tl.constexpr,
                BLOCK: tl.constexpr, G: tl.constexpr, HALF: tl.constexpr, WHOLE: tl.constexpr):
    blk, gmask, offs, mask = _tile(blk0, nblocks, BLOCK, G, HALF, WHOLE)
    if DEQUANTIZE:
        amax = tl.load(absmax + blk, mask=gmask, other=0.0)
        code = _load_codes(codes, blk, gmask, offs, mask, BLOCK, G, HALF, FOUR, WHOLE)
        tl.store(x + offs, _dequantize(book, code, amax), mask=mask)
    else:
        v = tl.load(x + offs, mask=mask, other=0.0)
        amax, code = _quantize(book, v, mask)
        tl.store(absmax + blk, amax, mask=gmask)
        _store_codes(codes, code, blk, gmask, offs, mask, BLOCK, G, HALF, FOUR, WHOLE)


@triton.jit
def _codec_kernel(x, codes, absmax, book, nblocks, DEQUANTIZE: tl.constexpr, FOUR: tl.constexpr,
                  BLOCK: tl.constexpr, G: tl.constexpr, HALF: tl.constexpr):
    blk0 = tl.program_id(0).to(tl.int64) * G
    if BLOCK == 2 * HALF:  # whole tiles unmasked, the last (partly filled) one masked
        if blk0 + G <= nblocks:
            _codec_tile(x, codes, absmax, book, blk0, nblocks, DEQUANTIZE, FOUR, BLOCK, G, HALF, True)
        else:
            _codec_tile(x, codes, absmax, book, blk0, nblocks, DEQUANTIZE, FOUR, BLOCK, G, HALF, False)
    else:
        _codec_tile(x, codes, absmax, book, blk0, nblocks, DEQUANTIZE, FOUR, BLOCK, G, HALF, False)


@triton.jit
def _load_state(addr_table, row, COL: tl.constexpr, ACOL: tl.constexpr, NCOL: tl.constexpr, book, blk, gmask,
                offs, mask, Q: tl.constexpr, DTYPE: tl.constexpr, BLOCK: tl.constexpr, G: tl.constexpr,
                HALF: tl.constexpr, WHOLE: tl.constexpr, ALIGNED: tl.constexpr):
    if Q == 0:
        v = _load_block(addr_table, row, COL, NCOL, offs, mask, DTYPE, ALIGNED)
    else:
        amax = tl.load(_aptr(addr_table, row, ACOL, NCOL, tl.float32, ALIGNED) + blk, mask=gmask, other=0.0)
        code = _load_codes(_aptr(addr_table, row, COL, NCOL, tl.uint8, ALIGNED), blk, gmask, offs, mask,
                           BLOCK, G, HALF, Q == 2, WHOLE)
        v = _dequantize(book, code, amax)
    return v


@triton.jit
def _store_state(addr_table, row, COL: tl.constexpr, ACOL: tl.constexpr, NCOL: tl.constexpr, book, v, blk, gmask,
                 offs, mask, Q: tl.constexpr, DTYPE: tl.constexpr, BLOCK: tl.constexpr, G: tl.constexpr,
                 HALF: tl.constexpr, WHOLE: tl.constexpr, ALIGNED: tl.constexpr):
    if Q == 0:
        _store_block(addr_table, row, COL, NCOL, offs, mask, v, DTYPE, ALIGNED)
    else:
        amax, code = _quantize(book, v, mask)
        tl.store(_aptr(addr_table, row, ACOL, NCOL, tl.float32, ALIGNED) + blk, amax, mask=gmask)
        _store_codes(_aptr(addr_table, row, COL, NCOL, tl.uint8, ALIGNED), code, blk, gmask, offs, mask,
                     BLOCK, G, HALF, Q == 2, WHOLE)


@triton.jit
def _lowbit_tile(addr_table, row, blk0, nblocks, lr, grad_mul, step, seed, sr_offset, B0, B1, B2, B3,
                 H0, H1, H2, H3, H4, H5, H6, H7, H8, H9, H10, H11, H12, H13, H14, H15,
                 UPDATE: tl.constexpr, NSTATE: tl.constexpr, Q0: tl.constexpr, Q1: tl.constexpr, Q2: tl.constexpr,
                 Q3: tl.constexpr, FLAGS: tl.constexpr, DTYPE: tl.constexpr, STOCHASTIC: tl.constexpr,
                 NCOL: tl.constexpr, BLOCK: tl.constexpr, G: tl.constexpr, HALF: tl.constexpr, WHOLE: tl.constexpr,
                 ALIGNED: tl.constexpr):
    """One program's G blocks: load, update, store (``WHOLE``: all of them exist, no masks)."""
    blk, gmask, offs, mask = _tile(blk0, nblocks, BLOCK, G, HALF, WHOLE)
    p = _load_block(addr_table, row, 0, NCOL, offs, mask, DTYPE, ALIGNED)
    g = _load_block(addr_table, row, 1, NCOL, offs, mask, DTYPE, ALIGNED) * grad_mul
    zero = tl.zeros([G, 2 * HALF], dtype=tl.float32)
    s0 = zero
    s1 = zero
    s2 = zero
    s3 = zero
    if NSTATE >= 1:
        s0 = _load_state(addr_table, row, 2, 2 + NSTATE, NCOL, B0, blk, gmask, offs, mask, Q0, DTYPE,
                         BLOCK, G, HALF, WHOLE, ALIGNED)
    if NSTATE >= 2:
        s1 = _load_state(addr_table, row, 3, 3 + NSTATE, NCOL, B1, blk, gmask, offs, mask, Q1, DTYPE,
                         BLOCK, G, HALF, WHOLE, ALIGNED)
    if NSTATE >= 3:
        s2 = _load_state(addr_table, row, 4, 4 + NSTATE, NCOL, B2, blk, gmask, offs, mask, Q2, DTYPE,
                         BLOCK, G, HALF, WHOLE, ALIGNED)
    if NSTATE >= 4:
        s3 = _load_state(addr_table, row, 5, 5 + NSTATE, NCOL, B3, blk, gmask, offs, mask, Q3, DTYPE,
                         BLOCK, G, HALF, WHOLE, ALIGNED)
    p, s0, s1, s2, s3 = UPDATE(p, g, s0, s1, s2, s3, step, lr, zero, zero, zero, zero,
                               H0, H1, H2, H3, H4, H5, H6, H7, H8, H9, H10, H11, H12, H13, H14, H15, FLAGS)
    _store_param(_aptr(addr_table, row, 0, NCOL, DTYPE, ALIGNED), offs, mask, p, seed, row, step, sr_offset,
                 STOCHASTIC, DTYPE)
    if NSTATE >= 1:
        _store_state(addr_table, row, 2, 2 + NSTATE, NCOL, B0, s0, blk, gmask, offs, mask, Q0, DTYPE,
                     BLOCK, G, HALF, WHOLE, ALIGNED)
    if NSTATE >= 2:
        _store_state(addr_table, row, 3, 3 + NSTATE, NCOL, B1, s1, blk, gmask, offs, mask, Q1, DTYPE,
                     BLOCK, G, HALF, WHOLE, ALIGNED)
    if NSTATE >= 3:
        _store_state(addr_table, row, 4, 4 + NSTATE, NCOL, B2, s2, blk, gmask, offs, mask, Q2, DTYPE,
                     BLOCK, G, HALF, WHOLE, ALIGNED)
    if NSTATE >= 4:
        _store_state(addr_table, row, 5, 5 + NSTATE, NCOL, B3, s3, blk, gmask, offs, mask, Q3, DTYPE,
                     BLOCK, G, HALF, WHOLE, ALIGNED)


# seed == 1 must not become a constexpr (seed.to in _store_param); n_tensors: no variant per count
@triton.jit(do_not_specialize=["seed", "n_tensors"])
def _lowbit_kernel(
    addr_table, nblocks_ptr, prog_tensor, prog_block,
    lr_value, lr_ptr, grad_scale_ptr, found_inf_ptr, sign, seed, B0, B1, B2, B3,
    H0, H1, H2, H3, H4, H5, H6, H7, H8, H9, H10, H11, H12, H13, H14, H15,
    UPDATE: tl.constexpr, NSTATE: tl.constexpr, Q0: tl.constexpr, Q1: tl.constexpr, Q2: tl.constexpr,
    Q3: tl.constexpr, FLAGS: tl.constexpr, DTYPE: tl.constexpr,
    HAS_LR_PTR: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    STOCHASTIC: tl.constexpr, HAS_STEPS: tl.constexpr,
    BLOCK: tl.constexpr, G: tl.constexpr, HALF: tl.constexpr,
    ticket, n_tensors, FOLD_STEPS: tl.constexpr = False, ALIGNED: tl.constexpr = False,
):
    # Table columns: param, grad, the state slots (codes or values), each slot's absmax (0: plain), the
    # stochastic-rounding element offset (an integer), step.
    NCOL: tl.constexpr = 2 * NSTATE + 4
    pid = tl.program_id(0)
    if _step_skipped(found_inf_ptr, HAS_FOUND_INF) == 0.0:
        row = tl.load(prog_tensor + pid).to(tl.int64)
        blk0 = tl.multiple_of(tl.load(prog_block + pid), G)  # programs start at multiples of G blocks
        nblocks = tl.load(nblocks_ptr + row)
        lr, grad_mul, step = _step_scalars(addr_table, row, NCOL, lr_value, lr_ptr, grad_scale_ptr, sign,
                                           HAS_LR_PTR, HAS_GRAD_SCALE, HAS_STEPS)
        sr_offset = _sr_offset(addr_table, row, 2 + 2 * NSTATE, NCOL, STOCHASTIC)
        if BLOCK == 2 * HALF and blk0 + G <= nblocks:  # a whole tile: no masks (128-bit accesses when ALIGNED)
            _lowbit_tile(addr_table, row, blk0, nblocks, lr, grad_mul, step, seed, sr_offset, B0, B1, B2, B3,
                         H0, H1, H2, H3, H4, H5, H6, H7, H8, H9, H10, H11, H12, H13, H14, H15,
                         UPDATE, NSTATE, Q0, Q1, Q2, Q3, FLAGS, DTYPE, STOCHASTIC, NCOL, BLOCK, G, HALF, True,
                         ALIGNED)
        else:  # a tensor's last, partly filled tile (or a block that is not a power of two)
            _lowbit_tile(addr_table, row, blk0, nblocks, lr, grad_mul, step, seed, sr_offset, B0, B1, B2, B3,
                         H0, H1, H2, H3, H4, H5, H6, H7, H8, H9, H10, H11, H12, H13, H14, H15,
                         UPDATE, NSTATE, Q0, Q1, Q2, Q3, FLAGS, DTYPE, STOCHASTIC, NCOL, BLOCK, G, HALF, False,
                         ALIGNED)
        if FOLD_STEPS:  # the last program increments every step counter (multi_tensor._fold_step_increment)
            _fold_step_increment(ticket, addr_table, n_tensors, NCOL)


# -- host side ---------------------------------------------------------------------------------------

def _tile_shape(block):
    """(G blocks per program, HALF = the pair axis padded to a power of two)."""
    half = triton.next_power_of_2(block // 2)
    return max(1, TILE // (2 * half)), half


def _check_block(block):
    block = int(block)
    if not (2 <= block <= MAX_BLOCK and block % 2 == 0):
        raise ValueError(f"block must be even and at most {MAX_BLOCK}, got {block}")
    return block


def _book_codes(book):
    """Number of codes of an int32 codebook, from its size alone (8 + 3 nc + 512 nr words; no device sync)."""
    if book.dtype != torch.int32 or book.dim() != 1:
        raise ValueError("a codebook is a 1-D int32 tensor (fastopt.lowbit.codebook.codebook)")
    n = book.numel()
    for nc in (16, 256):
        if n > HEADER.value + 3 * nc and (n - HEADER.value - 3 * nc) % 512 == 0:
            return nc
    raise ValueError(f"not a codebook of 16 or 256 codes ({n} words)")


def _code_kind(codes, numel, nc):
    """Q8 or Q4 from the codes' size, checked against the codebook."""
    kind = Q4 if nc == 16 else Q8
    want = numel // 2 if kind == Q4 else numel
    if codes.dtype != torch.uint8 or codes.numel() != want or not codes.is_contiguous():
        raise ValueError(f"codes of {numel} values with a {nc}-code book: contiguous uint8 of {want} bytes, got "
                         f"{codes.dtype} of {codes.numel()}")
    return kind


@functools.lru_cache(maxsize=64)
def _program_tables_host(nblocks, g):
    counts = torch.tensor([-(-nb // g) for nb in nblocks], dtype=torch.int64)
    tensor = torch.repeat_interleave(torch.arange(len(nblocks), dtype=torch.int64), counts)
    first = torch.cumsum(counts, 0) - counts
    start = (torch.arange(tensor.numel(), dtype=torch.int64) - first[tensor]) * g
    return tensor.to(torch.int32), start, torch.tensor(nblocks, dtype=torch.int64)


def _program_tables(nblocks, g, device):
    """(tensor of each program int32, its first block int64, blocks per tensor int64), cached on the device
    (:func:`.multi_tensor.cached_on_device`: a bounded LRU)."""
    return cached_on_device(None, ("lowbit_programs", nblocks, g), device, lambda: _program_tables_host(nblocks, g))


def quantize_blockwise(x, codes, absmax, book, block, dequantize=False):
    """Blockwise codec of one fp32 buffer (``quant.h``; the C++ ``quantize_cpu``), in place.

    Quantize: ``x`` (fp32, contiguous, numel a multiple of ``block``) -> ``codes`` (uint8, numel bytes,
    or numel / 2 for a 16-code book) and ``absmax`` (fp32 ``[numel / block]``); returns ``(codes,
    absmax)``.  ``dequantize=True``: ``x <- values[codes] * absmax``; returns ``x``.  ``book``: the
    int32 codebook (:func:`fastopt.lowbit.codebook.codebook`) on ``x``'s device.
    """
    block = _check_block(block)
    numel = x.numel()
    if x.dtype != torch.float32 or not x.is_contiguous():
        raise ValueError("x must be a contiguous fp32 tensor")
    if numel % block:
        raise ValueError(f"numel {numel} is not a multiple of the block {block}")
    nc = _book_codes(book)
    kind = _code_kind(codes, numel, nc)
    nblocks = numel // block
    if absmax.dtype != torch.float32 or absmax.numel() != nblocks or not absmax.is_contiguous():
        raise ValueError(f"absmax must be a contiguous fp32 tensor of {nblocks} values")
    for t in (codes, absmax, book):
        if t.device != x.device:
            raise ValueError("x, codes, absmax and the codebook must be on one device")
    if nblocks:
        g, half = _tile_shape(block)
        _codec_kernel[(triton.cdiv(nblocks, g),)](
            x, codes, absmax, book, nblocks,
            DEQUANTIZE=bool(dequantize), FOUR=kind == Q4, BLOCK=block, G=g, HALF=half, enable_fp_fusion=False,
        )
    return x if dequantize else (codes, absmax)


def lowbit_step(op, lists, steps, *, books, absmax, block, hyper, flags, lr, grad_scale=None, found_inf=None,
                sign=1.0, seed=0, stochastic=False, sr_offsets=None):
    """One step of the registered op ``op`` (:data:`.ops.OPS`) with low-bit states, in one launch.

    ``lists`` = [params, grads, state_1, ...]; state ``k`` is quantized when ``books[k]`` (its int32
    codebook) is given: ``lists[2 + k]`` then holds uint8 codes and ``absmax[k]`` the fp32 absmax
    tensors ``[numel / block]``; a plain state (``books[k]``, ``absmax[k]`` None) has the params'
    dtype.  Every numel is a multiple of ``block``.  ``hyper``/``flags``: the native op's (as
    :func:`.ops.elementwise_step`); ``lr``: float or fp32 1-element tensor; ``grad_scale``,
    ``found_inf``: fp32 tensors (``found_inf`` nonzero: nothing is written, the steps stay);
    ``sign``: -1 for maximize; ``steps``: fp32 counters (read as ``step + 1``, then incremented;
    empty: the op sees step 1); ``seed``/``stochastic``: stochastic rounding of bf16 params, element ``i``
    of tensor ``t`` with the bits of element ``sr_offsets[t] + i`` (None or empty: all offsets 0; one
    non-negative int per tensor otherwise: where a shard starts in its whole tensor).
    Semantics of ``csrc/cpu/lowbit_kernels.cpp`` (run_lowbit).
    """
    spec = OPS[op]
    if spec.nreduce:
        raise ValueError(f"op {op!r} has a reduce phase; low-bit states are for single-pass ops")
    params = lists[0]
    if not params:
        return
    n = len(params)
    nstate = len(lists) - 2
    if not 0 <= nstate <= MAX_STATES:
        raise ValueError(f"lowbit_step takes 0 to {MAX_STATES} state lists, got {nstate}")
    if any(len(lst) != n for lst in lists):
        raise ValueError("every list needs one tensor per param")
    books = list(books) if books is not None else [None] * nstate
    absmax = list(absmax) if absmax is not None else [None] * nstate
    if len(books) != nstate or len(absmax) != nstate:
        raise ValueError("one codebook (or None) and one absmax list (or None) per state")
    if steps and len(steps) != n:
        raise ValueError("one step counter per param (or none)")
    block = _check_block(block)
    device, dtype = params[0].device, params[0].dtype
    if dtype not in _TL_DTYPES:
        raise ValueError(f"unsupported param dtype {dtype}")
    numels = tuple(p.numel() for p in params)
    sr_column = sr_offset_column(sr_offsets, n)
    for t, nel in enumerate(numels):
        if nel % block:
            raise ValueError(f"tensor {t}: numel {nel} is not a multiple of the block {block}")

    def check_like_params(x, t, what):
        if x.dtype != dtype or x.numel() != numels[t] or not x.is_contiguous() or x.device != device:
            raise ValueError(f"{what}, tensor {t}: expected a contiguous {dtype} tensor of {numels[t]} values on "
                             f"{device}")

    for i, lst in enumerate(lists[:2]):
        for t, x in enumerate(lst):
            check_like_params(x, t, f"list {i}")
    kinds = []
    for k in range(nstate):
        states, book, amax = lists[2 + k], books[k], absmax[k]
        if book is None:
            if amax is not None:
                raise ValueError(f"state {k} is plain (no codebook) but has absmax tensors")
            for t, x in enumerate(states):
                check_like_params(x, t, f"plain state {k}")
            kinds.append(PLAIN)
            continue
        nc = _book_codes(book)
        if book.device != device:
            raise ValueError(f"state {k}: the codebook is not on {device}")
        if amax is None or len(amax) != n:
            raise ValueError(f"quantized state {k} needs one absmax tensor per param")
        for t in range(n):
            _code_kind(states[t], numels[t], nc)
            a = amax[t]
            if (a.dtype != torch.float32 or a.numel() != numels[t] // block or not a.is_contiguous()
                    or a.device != device or states[t].device != device):
                raise ValueError(f"state {k}, tensor {t}: absmax must be a contiguous fp32 tensor of "
                                 f"{numels[t] // block} values on {device}")
        kinds.append(Q4 if nc == 16 else Q8)
    kinds += [PLAIN] * (MAX_STATES - nstate)

    thyper, tflags = spec.pack(tuple(hyper), int(flags))
    thyper = pad_hyper(thyper)
    has_steps = bool(steps)
    # the address table, cached on the device, keyed on every value it holds (no copy in the steady state)
    cols = [[t.data_ptr() for t in lst] for lst in lists]
    cols += [[a.data_ptr() for a in absmax[k]] if kinds[k] != PLAIN else [0] * n for k in range(nstate)]
    cols += [list(sr_column), [s.data_ptr() for s in steps] if has_steps else [0] * n]
    ncol = len(cols)
    addr_table, = cached_table(("lowbit", n, tuple(v for c in cols for v in c)), device,
                               lambda: ([c[t] for t in range(n) for c in cols], [n * ncol]))
    g, half = _tile_shape(block)
    prog_tensor, prog_block, nblocks = _program_tables(tuple(nel // block for nel in numels), g, device)
    scalars = StepArgs(device, lr, grad_scale, found_inf, sign)
    dummy_book = dummy(device, torch.int32)
    bk = [books[k] if k < nstate and kinds[k] != PLAIN else dummy_book for k in range(MAX_STATES)]
    programs = prog_tensor.numel()
    fold = has_steps and programs > 0 and _mt.FOLD_STEPS
    if programs > 0:
        _lowbit_kernel[(programs,)](
            addr_table, nblocks, prog_tensor, prog_block, *scalars.args, int(seed) & 0xFFFFFFFF, *bk, *thyper,
            UPDATE=spec.update, NSTATE=nstate, Q0=kinds[0], Q1=kinds[1], Q2=kinds[2], Q3=kinds[3],
            FLAGS=int(tflags), DTYPE=_TL_DTYPES[dtype], **scalars.constexprs,
            STOCHASTIC=bool(stochastic) and dtype == torch.bfloat16, HAS_STEPS=has_steps,
            BLOCK=block, G=g, HALF=half, ticket=ticket_counter(device) if fold else scalars.dummy, n_tensors=n,
            FOLD_STEPS=fold, enable_fp_fusion=False,
            ALIGNED=aligned16(*lists, *(a for a in absmax if a is not None)),  # else the scalar variant
        )
    if has_steps and not fold:
        scalars.increment_steps(addr_table, n, 2 * nstate + 4)
