"""Quantization formats of low-bit optimizer states, and the codebook every backend quantizes with.

A format maps a block of ``block`` fp32 values to ``bits``-bit codes plus one fp32 ``absmax`` per
block: ``x_hat = values[code] * absmax``, where ``values`` (the *map*) lies in [-1, 1] and ``absmax``
is the block's largest ``|x|``.  Quantizing picks the **nearest** map value to ``x / absmax``, ties
toward the lower value (``torch.bucketize`` on the midpoints between sorted map values); an all-zero
block has ``absmax = 0`` and every code at the map value 0 (or the smallest one when the map has no 0).

One exception, in the *unsigned* formats (``signed=False``: ``dyn8u``, ``fp8u``, ``lin4u``,
``lin4u-r1``, the formats of the non-negative states -- second moments, AdaBelief's variance): a
value with ``x / absmax > 0`` never takes the code of 0; where 0 would be nearest it takes the
smallest positive map value instead (``floor_code``).  So a positive second moment never decodes to 0:
it decodes to at least ``values[floor_code] * absmax``, positive for every normal fp32 absmax (the one
exception: a ratio ``x / absmax`` below fp32's smallest subnormal, ``2**-149``, normalizes to 0).  With
nearest rounding a second moment far below its block's maximum (``v / absmax < 1.6e-7`` in ``dyn8u``,
``< 2.2e-6`` in fp8) would decode to exactly 0 while its first moment does not, and Adam's step would
become ``m / eps`` (on a small ReLU MLP, 5 steps of lr 1e-2 then move a weight by 0.8 with 8-bit and
7.7 with fp8 states, where torch.optim.AdamW moves it by 0.05).  Rounding those
values up to the smallest code only ever overestimates ``v`` there, so the step is smaller, never
larger, than with the exact ``v``.  Signed formats (first moments) stay nearest: a first moment that
rounds to 0 only makes the step 0.  Exactly 0 (and -0.0) keeps the code of 0, and so does every
element of a poisoned block (below).

Formats (``FORMATS``):

==========  =====  =====  ==========================================================================
name        bits   block  map
==========  =====  =====  ==========================================================================
``dyn8s``   8      256    bitsandbytes' signed dynamic map (``create_dynamic_map(signed=True)``);
                          the first moment of the 8-bit optimizers (same format as bitsandbytes >= 0.44)
``dyn8u``   8      256    bitsandbytes' unsigned dynamic map; the second moment
``dyn4s``   4      128    the signed dynamic 4-bit map (3 exponent bits; Li et al. 2023, torchao);
                          the first moment of the 4-bit optimizers
``lin4u``   4      128    the linear map without zero, ``k / 16`` for k = 1..16 (Li et al. 2023);
                          the second moment of the 4-bit optimizers
``fp8``     8      256    float8 e4m3fn: the code is the e4m3 bit pattern, the value ``e4m3 / 448``
                          (so ``x_hat = e4m3(code) * absmax / 448``, as torchao's fp8 states)
``fp8u``    8      256    ``fp8`` for non-negative states: the same codes and values (stored, tagged
                          and dequantized as ``fp8``), quantized with the unsigned formats' rule below
``lin4u-r1`` 4     --     ``lin4u`` codes with rank-1 normalization (Li et al. 2023): the tensor viewed
                          as ``[rows, cols]``, ``x_hat = map[code] * min(row_max[i], col_max[j])``
==========  =====  =====  ==========================================================================

4-bit codes are packed two per byte: element ``2j`` in the low nibble of byte ``j``, ``2j + 1`` in the
high nibble.

Non-finite values (one rule on every backend -- cpu, cuda, triton and this reference -- for the fused
optimizer steps and the standalone codec alike): a block that holds a NaN or an infinity is
*poisoned*.  Its ``absmax`` is stored as NaN and each of its codes is the code of 0, so every element
of the block dequantizes to NaN, and stays NaN in later steps -- what a full-precision state would do
with the bad element, spread over its block (an unquantized NaN can only be represented by the scale
it shares).  The other blocks are untouched.  Rank-1 normalized states (``lin4u-r1``) apply the rule
per row and column: a non-finite element makes its row maximum and its column maximum NaN, so its
whole row and column dequantize to NaN (codes: the code of 0).

The codebook (:func:`codebook`) is one int32 tensor that the C++ (``fastopt/quant.h``), CUDA and
Triton quantizers read; it makes nearest-code search two table reads.  Layout, with ``nc`` the number
of codes and ``nr`` the number of exponent rows::

    [0] nc    [1] nr    [2] e_lo    [3] 1 if code == rank (sorted map) else 0
    [4] offset of the packed table
    [5] zero_code: the code of 0 that a positive value must not take (unsigned formats), else -1
    [6] floor_code: the code it takes instead (the smallest positive map value), else 0    [7] 0
    [8 + 0*nc ...]  values by code (fp32 bits)             -- the dequantization table
    [8 + 1*nc ...]  sorted midpoints, rank order, +inf last (fp32 bits)
    [8 + 2*nc ...]  the code of each rank
    [8 + 3*nc ...]  bucket table [2 signs][nr rows][256]: the rank at the bucket's lower end
    [[4] ...]       packed bucket table [2][nr][256]: code at the lower end | next code << 8 |
                    the low 15 mantissa bits of the bucket's midpoint << 16 (one read per value)

A value ``x`` in [-1, 1] falls in the bucket (sign bit, row, top 8 mantissa bits) where
``row = max(exponent - e_lo + 1, 0)`` (row 0 gathers every ``|x| < 2**(e_lo - 127)``, mantissa bits
ignored).  :func:`codebook` checks that each bucket holds at most one midpoint, so
``rank = bucket[...] + (midpoint[bucket[...]] < x)`` is exact: the same code as ``torch.bucketize``.
The packed table folds the midpoint test into the entry (the midpoint shares the bucket's sign,
exponent and top mantissa bits, so comparing the low 15 bits decides it): the C++/CUDA quantizer
reads one int32 per value; the Triton one uses the rank/midpoint tables (same codes; tested).
Every quantizer then applies the unsigned formats' rule: ``code = floor_code if code == zero_code and
xn > 0`` (``xn`` the normalized value; one compare and select per value).
"""
import functools
import math
from typing import Optional, Tuple, Union

import torch

HEADER = 8
MANTISSA_BITS = 8  # top mantissa bits that index a bucket


def dynamic_map(signed=True, max_exponent_bits=7, total_bits=8):
    """The dynamic map of Dettmers (2016, "8-Bit Approximations for Parallelism in Deep Learning") as
    bitsandbytes builds it: per decade ``10**-k`` (k = max_exponent_bits-1 .. 0), the midpoints of a
    linear split of [0.1, 1] into ``2**i`` (signed, mirrored) or ``2**(i+1)`` parts, then 0 and 1."""
    data = []
    non_sign_bits = total_bits - 1
    extra = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        parts = 2 ** (i + non_sign_bits - max_exponent_bits) if signed else 2 ** (i + non_sign_bits - max_exponent_bits + 1)
        edges = torch.linspace(0.1, 1, parts + 1)
        means = (edges[:-1] + edges[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + i)
        data += (scale * means).tolist()  # fp32 products, as bitsandbytes rounds them
        if signed:
            data += (-scale * means).tolist()
    if extra > 0:
        edges = torch.linspace(0.1, 1, extra + 1)
        means = (edges[:-1] + edges[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1)
        data += (scale * means).tolist()
        if signed:
            data += (-scale * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (2 ** total_bits - len(data))
    return torch.tensor(sorted(data), dtype=torch.float32)


def linear_map_no_zero(total_bits=4):
    """``k / 2**bits`` for k = 1 .. 2**bits: the 4-bit second-moment map of Li et al. (2023)."""
    return torch.linspace(0, 1, 2 ** total_bits + 1, dtype=torch.float32)[1:].clone()


def fp8_e4m3_map():
    """Value of each e4m3fn bit pattern divided by 448 (its largest finite value); NaN codes map to NaN."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)
    return codes.float() / 448.0


def _sorted_finite(values):
    """(sorted finite values, the code of each) -- NaN codes are never chosen."""
    finite = torch.isfinite(values)
    codes = torch.arange(values.numel())[finite]
    vals = values[finite].double()
    order = torch.argsort(vals, stable=True)
    vals, codes = vals[order], codes[order]
    # Equal values (fp8's +0/-0): keep the first code of each value.
    keep = torch.ones_like(vals, dtype=torch.bool)
    keep[1:] = vals[1:] != vals[:-1]
    return vals[keep], codes[keep]


class Format:
    """A blockwise quantization format (see the module doc).  ``rank1``: scaled per element by
    min(row max, column max) of the tensor viewed as ``[shape[0], -1]`` instead of per block.
    ``signed=False``: a format of non-negative states, whose positive values never take the code of 0
    (``zero_code`` -> ``floor_code``; ``zero_code`` is -1 when the rule does not apply: a signed format,
    or a map without 0).  ``storage``: the name its codes are stored and tagged under (``fp8u`` is
    stored as ``fp8``), by default ``name``."""

    def __init__(self, name: str, bits: int, block: int, values: torch.Tensor, signed: bool, rank1: bool = False,
                 storage: Optional[str] = None) -> None:
        self.name, self.bits, self.block, self.signed, self.rank1 = name, bits, block, signed, rank1
        self.values = values  # fp32 [2**bits], by code
        self.storage = storage or name
        self.zero_code, self.floor_code = _positive_floor(values, signed)

    def __repr__(self):
        return f"Format({self.name!r}, bits={self.bits}, block={self.block})"

    def codes_numel(self, numel: int) -> int:
        """Bytes of codes for ``numel`` values."""
        return numel * self.bits // 8


def _positive_floor(values, signed):
    """(zero_code, floor_code) of the unsigned formats' rule: the code of 0 that nearest rounding picks
    (the first code of value 0) and the code of the smallest positive value; (-1, 0) for a signed
    format or a map without 0.  Python ints, computed once per format (no data-dependent code at
    quantization time)."""
    if signed:
        return -1, 0
    svals, scodes = _sorted_finite(values)
    zero = (svals == 0).nonzero().flatten()
    if zero.numel() == 0:
        return -1, 0
    return int(scodes[zero[0]]), int(scodes[(svals > 0).nonzero().flatten()[0]])


FORMATS = {
    "dyn8s": Format("dyn8s", 8, 256, dynamic_map(True), True),
    "dyn8u": Format("dyn8u", 8, 256, dynamic_map(False), False),
    "dyn4s": Format("dyn4s", 4, 128, dynamic_map(True, 3, 4), True),
    "lin4u": Format("lin4u", 4, 128, linear_map_no_zero(4), False),
    "fp8": Format("fp8", 8, 256, fp8_e4m3_map(), True),
    # fp8 for non-negative states: same codes and values, positive values never take the code of 0.
    "fp8u": Format("fp8u", 8, 256, fp8_e4m3_map(), False, storage="fp8"),
    # lin4u with rank-1 normalization (Li et al. 2023): codes as lin4u, scales min(row max, col max).
    "lin4u-r1": Format("lin4u-r1", 4, 128, linear_map_no_zero(4), False, rank1=True),
}


def get_format(fmt: Union[str, Format]) -> Format:
    if isinstance(fmt, Format):
        return fmt
    try:
        return FORMATS[fmt]
    except KeyError:
        raise ValueError(f"unknown low-bit format {fmt!r}; expected one of {sorted(FORMATS)}") from None


@functools.lru_cache(maxsize=None)
def _codebook_cpu(name):
    fmt = FORMATS[name]
    values = fmt.values
    nc = values.numel()
    svals, scodes = _sorted_finite(values)
    nsorted = svals.numel()
    mids32 = ((svals[:-1] + svals[1:]) / 2).float()  # midpoints as the quantizer compares them: fp32
    mids = mids32.double()
    smallest = mids.abs()[mids != 0].min().item()
    e_lo = max(1, min(127, math.floor(math.log2(smallest)) + 127))
    nr = 127 - e_lo + 2
    # Bucket edges, as doubles: row r >= 1 has exponent e_lo + r - 1, bucket m covers
    # [2**(e-127) * (1 + m/256), 2**(e-127) * (1 + (m+1)/256)); row 0 covers [0, 2**(e_lo-127)).
    m = torch.arange(256, dtype=torch.float64)
    lo = torch.zeros(nr, 256, dtype=torch.float64)
    hi = torch.zeros(nr, 256, dtype=torch.float64)
    hi[0] = 2.0 ** (e_lo - 127)
    for r in range(1, nr):
        base = 2.0 ** (e_lo + r - 1 - 127)
        lo[r] = base * (1 + m / 256)
        hi[r] = base * (1 + (m + 1) / 256)
    # Positive buckets [lo, hi): rank at lo = #mids < lo; one midpoint at most in [lo, hi).
    pos = torch.searchsorted(mids, lo.flatten(), right=False).view(nr, 256)
    pos_hi = torch.searchsorted(mids, hi.flatten(), right=False).view(nr, 256)
    # Negative buckets (-hi, -lo]: rank at the infimum = #mids <= -hi; one midpoint at most in (-hi, -lo].
    neg = torch.searchsorted(mids, (-hi).flatten(), right=True).view(nr, 256)
    neg_hi = torch.searchsorted(mids, (-lo).flatten(), right=True).view(nr, 256)
    if int((pos_hi - pos).max()) > 1 or int((neg_hi - neg).max()) > 1:
        raise AssertionError(f"codebook {name}: a bucket holds more than one midpoint")
    bounds = torch.full((nc,), math.inf, dtype=torch.float32)
    bounds[:nsorted - 1] = mids32
    rank_code = torch.zeros(nc, dtype=torch.int32)
    rank_code[:nsorted] = scodes.to(torch.int32)
    identity = int(nsorted == nc and torch.equal(scodes, torch.arange(nc)))
    buckets = torch.stack([pos, neg]).to(torch.int32).flatten()
    # Packed entries (one read): code at the bucket's lower end | next code << 8 | the low 15 mantissa
    # bits of the midpoint inside the bucket << 16 (sentinel 0x7FFF for positive buckets, 0 for
    # negative ones: never crossed).  x > midpoint <=> low15(x) > thr (x >= 0) or low15(x) < thr (x < 0).
    low15 = (mids32.view(torch.int32) & 0x7FFF).to(torch.int64)
    base = torch.stack([pos, neg])
    has = torch.stack([pos_hi - pos, neg_hi - neg]) > 0
    thr = torch.where(has, low15[base.clamp(max=nsorted - 2)],
                      torch.tensor([[[0x7FFF]], [[0]]], dtype=torch.int64).expand_as(base))
    code_base = scodes[base]
    code_next = scodes[(base + 1).clamp(max=nsorted - 1)]
    packed = (code_base | (code_next << 8) | (thr << 16)).to(torch.int64)
    packed = torch.where(packed >= 2 ** 31, packed - 2 ** 32, packed).to(torch.int32).flatten()
    head = torch.tensor([nc, nr, e_lo, identity, 0, fmt.zero_code, fmt.floor_code, 0], dtype=torch.int32)
    head[4] = HEADER + 3 * nc + buckets.numel()  # where the packed table starts
    return torch.cat([head, values.view(torch.int32), bounds.view(torch.int32), rank_code, buckets, packed])


def codebook(fmt: Union[str, Format], device: Union[torch.device, str, int] = "cpu") -> torch.Tensor:
    """The int32 codebook of ``fmt`` on ``device`` (cached per device)."""
    return _codebook_on(get_format(fmt).name, torch.device(device))


@functools.lru_cache(maxsize=None)
def _codebook_on(name, device):
    return _codebook_cpu(name).to(device)


# -- the reference codec (pure PyTorch; the executable spec of every kernel) -----------------------

def reference_codes(xn, fmt):
    """Nearest-code search of normalized values ``xn`` (fp32, in [-1, 1]): ``torch.bucketize`` on the
    fp32 midpoints between sorted map values, ties toward the lower value; then, in unsigned formats,
    ``xn > 0`` never keeps the code of 0 (``floor_code`` instead).  Returns int64 codes."""
    fmt = get_format(fmt)
    svals, scodes = _sorted_finite(fmt.values)
    mids = ((svals[:-1] + svals[1:]) / 2).float().to(xn.device)
    rank = torch.bucketize(xn.float(), mids, right=False)
    codes = scodes.to(xn.device)[rank]
    if fmt.zero_code >= 0:
        codes = torch.where((codes == fmt.zero_code) & (xn > 0), fmt.floor_code, codes)
    return codes


def pack4(codes):
    """Pack 4-bit codes (uint8/int64, even count) two per byte, low nibble first."""
    c = codes.reshape(-1, 2).to(torch.uint8)
    return (c[:, 0] | (c[:, 1] << 4)).contiguous()


def unpack4(packed):
    p = packed.reshape(-1).to(torch.int64)
    return torch.stack([p & 0xF, p >> 4], dim=1).reshape(-1)


def _poison(amax):
    """Block (or row / column) maxima with every non-finite one -- the group held a NaN or an
    infinity -- replaced by NaN: the group is poisoned (see the module doc)."""
    return torch.where(torch.isfinite(amax), amax, torch.full_like(amax, math.nan))


def quantize_reference(x: torch.Tensor, fmt: Union[str, Format]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Blockwise quantization of ``x`` (numel a multiple of the block): returns ``(codes, absmax)``,
    codes uint8 (packed for 4-bit), absmax fp32 ``[numel / block]``."""
    fmt = get_format(fmt)
    xb = x.detach().float().reshape(-1, fmt.block)
    absmax = _poison(xb.abs().amax(dim=1))
    inv = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    xn = (xb * inv[:, None]).clamp(-1.0, 1.0)
    # A poisoned block: every code is the code of 0.  A subnormal absmax makes inv inf: its zeros
    # (0 * inf = NaN) normalize to 0 too (quant.h quant_normalize).
    xn = torch.where(torch.isnan(absmax)[:, None] | torch.isnan(xn), 0.0, xn)
    codes = reference_codes(xn.reshape(-1), fmt)
    codes = pack4(codes) if fmt.bits == 4 else codes.to(torch.uint8)
    return codes, absmax


def dequantize_reference(codes: torch.Tensor, absmax: torch.Tensor, fmt: Union[str, Format]) -> torch.Tensor:
    """fp32 values of ``codes`` with per-block ``absmax`` (flat)."""
    fmt = get_format(fmt)
    idx = unpack4(codes) if fmt.bits == 4 else codes.reshape(-1).to(torch.int64)
    vals = fmt.values.to(codes.device)[idx].reshape(-1, fmt.block)
    return (vals * absmax.reshape(-1, 1)).reshape(-1)


def rank1_quantize_reference(x, rows, fmt="lin4u-r1"):
    """Rank-1 normalized quantization of ``x`` viewed as ``[rows, -1]``: returns ``(codes, row_max,
    col_max)``; each value is normalized by ``min(row_max[i], col_max[j])`` (>= |x|, so within [-1, 1])."""
    fmt = get_format(fmt)
    x2 = x.detach().float().reshape(rows, -1)
    rmax, cmax = _poison(x2.abs().amax(dim=1)), _poison(x2.abs().amax(dim=0))
    scale = torch.minimum(rmax[:, None], cmax[None, :])  # NaN where the row or the column is poisoned
    xn = (x2 * torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))).clamp(-1.0, 1.0)
    xn = torch.where(torch.isnan(scale) | torch.isnan(xn), 0.0, xn)
    return pack4(reference_codes(xn.reshape(-1), fmt)), rmax, cmax


def rank1_dequantize_reference(codes, row_max, col_max, fmt="lin4u-r1"):
    fmt = get_format(fmt)
    vals = fmt.values.to(codes.device)[unpack4(codes)].reshape(row_max.numel(), col_max.numel())
    return (vals * torch.minimum(row_max[:, None], col_max[None, :])).reshape(-1)
