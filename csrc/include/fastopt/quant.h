// fastopt/quant.h -- blockwise low-bit codecs of optimizer states, shared by the CPU and CUDA kernels.
//
// A quantized state is, per block of `block` elements, one fp32 absmax and one code per element
// (a byte for 8-bit formats; two per byte for 4-bit ones, element 2j in the low nibble of byte j):
//   x_hat = values[code] * absmax,      code = nearest(values, x * (1 / absmax)), ties to the lower value.
// The formats and their maps are defined in Python (fastopt/lowbit/codebook.py), which also builds
// the int32 codebook read here; its bucket table turns nearest-code search into two table reads:
//   [0] nc  [1] nr  [2] e_lo  [3] identity  [4] offset of the packed table
//   [5] zero_code (-1: none)  [6] floor_code  [7] 0
//   [8 ...] values by code (fp32 bits) | sorted midpoints, +inf last (fp32 bits) | code of each rank |
//   buckets [2 signs][nr][256]: the rank at each bucket's lower end |
//   packed [2][nr][256]: code at the lower end | next code << 8 | low 15 mantissa bits of the
//   bucket's midpoint << 16 -- quantize_code reads one entry per value.
//
// Unsigned formats (the formats of non-negative states: dyn8u, fp8u, lin4u): a value with xn > 0 never
// takes the code of 0 (zero_code); where 0 is nearest it takes floor_code, the smallest positive map
// value, so a positive second moment never decodes to 0 (quant_floor; codebook.py explains why).
// zero_code is -1 for the other formats (and for maps without 0): the rule never fires.
//
// Non-finite values (one rule for every backend: cpu, cuda, triton and the torch reference): a block
// holding a NaN or an infinity is *poisoned* -- its absmax is stored as NaN, each of its codes is the
// code of 0, and so every element of the block dequantizes to NaN (values[code] * NaN).  Rank-1
// normalized states follow the same rule per row and column: a non-finite element makes its row max
// and its column max NaN, and every element scaled by a NaN maximum gets the code of 0 and
// dequantizes to NaN.
#pragma once

#include <cstdint>

#include "fastopt/common.h"

namespace fastopt {

constexpr int kCodebookHeader = 8;
constexpr int kMaxQuantBlock = 256;

struct CodebookView {
  int nc;              // number of codes: 256 (8-bit) or 16 (4-bit)
  int nr;              // exponent rows of the bucket table
  int e_lo;            // biased fp32 exponent of row 1
  bool identity;       // code == rank (a sorted map)
  int zero_code;       // the code a positive value must not take (unsigned formats), or -1
  int floor_code;      // the code it takes instead: the smallest positive map value
  const float* values;
  const float* bounds;
  const int32_t* rank_code;
  const int32_t* buckets;
  const uint32_t* packed;
};

FASTOPT_HOST_DEVICE CodebookView codebook_view(const int32_t* cb) {
  CodebookView v;
  v.nc = cb[0];
  v.nr = cb[1];
  v.e_lo = cb[2];
  v.identity = cb[3] != 0;
  v.zero_code = cb[5];
  v.floor_code = cb[6];
  v.values = reinterpret_cast<const float*>(cb + kCodebookHeader);
  v.bounds = reinterpret_cast<const float*>(cb + kCodebookHeader + v.nc);
  v.rank_code = cb + kCodebookHeader + 2 * v.nc;
  v.buckets = cb + kCodebookHeader + 3 * v.nc;
  v.packed = reinterpret_cast<const uint32_t*>(cb + cb[4]);
  return v;
}

// The bucket of xn (in [-1, 1]): sign, exponent row (row 0: |xn| < 2^(e_lo - 127)), top 8 mantissa bits.
FASTOPT_HOST_DEVICE int quant_bucket(const CodebookView& b, uint32_t u) {
  const int sign = static_cast<int>(u >> 31);
  int row = static_cast<int>((u >> 23) & 0xFFu) - b.e_lo + 1;
  int m = static_cast<int>((u >> 15) & 0xFFu);
  m = row < 1 ? 0 : m;
  row = row < 1 ? 0 : (row > b.nr - 1 ? b.nr - 1 : row);  // NaN/inf never index out of the table
  return (sign * b.nr + row) * 256 + m;
}

// The rank (position among the sorted map values) nearest to xn, which lies in [-1, 1] (before the
// unsigned formats' rule, which quantize_code applies).
FASTOPT_HOST_DEVICE int quantize_rank(const CodebookView& b, float xn) {
  const int r = b.buckets[quant_bucket(b, float_bits(xn))];
  return r + (b.bounds[r] < xn ? 1 : 0);
}

// The code of the value with bits `u`, given its bucket's packed entry `e`.
FASTOPT_HOST_DEVICE int quant_pick(uint32_t u, uint32_t e) {
  const int low = static_cast<int>(u & 0x7FFFu);
  const int thr = static_cast<int>(e >> 16);
  const bool up = (u >> 31) ? (low < thr) : (low > thr);
  return static_cast<int>(up ? ((e >> 8) & 0xFFu) : (e & 0xFFu));
}

// The unsigned formats' rule: `code` (nearest to the value with bits u) unless it is the code of 0 and
// the value is positive (u a positive int32: sign bit clear, not +0; NaN never reaches here), then
// floor_code.  Branch-free (a compare and a select), so that the quantizer loops vectorize.
FASTOPT_HOST_DEVICE int quant_floor(int zero_code, int floor_code, uint32_t u, int code) {
  return (code == zero_code && static_cast<int32_t>(u) > 0) ? floor_code : code;
}

// The code of xn: one packed-table read (the same code as rank_code[quantize_rank(xn)]), then the
// unsigned formats' rule.
FASTOPT_HOST_DEVICE int quantize_code(const CodebookView& b, float xn) {
  const uint32_t u = float_bits(xn);
  return quant_floor(b.zero_code, b.floor_code, u, quant_pick(u, b.packed[quant_bucket(b, u)]));
}

// The scale stored for a poisoned block (see the top of this file): the canonical quiet NaN.
FASTOPT_HOST_DEVICE float quant_poison() { return bits_float(0x7FC00000u); }
// Whether |x| is finite (false for NaN and +-inf); branch-free, so that reductions vectorize.
FASTOPT_HOST_DEVICE bool quant_finite(float x) { return (float_bits(x) & 0x7F800000u) != 0x7F800000u; }

// x * (1 / absmax), clamped to [-1, 1]; an all-zero block (absmax 0) quantizes every value as 0.
// A subnormal absmax (< 2^-126) makes 1 / absmax overflow to inf: its zeros (0 * inf = NaN) normalize
// to 0 and its other values clamp to +-1, on every backend (the fp32 values are finite here: a block
// with a non-finite value is poisoned before it is normalized).
FASTOPT_HOST_DEVICE float quant_inv_scale(float absmax) { return absmax > 0.0f ? 1.0f / absmax : 0.0f; }
FASTOPT_HOST_DEVICE float quant_normalize(float x, float inv) {
  const float xn = x * inv;
  return xn < -1.0f ? -1.0f : (xn > 1.0f ? 1.0f : (xn == xn ? xn : 0.0f));
}

// Code of element i of a block whose codes start at `codes` (4-bit: two per byte, low nibble first).
FASTOPT_HOST_DEVICE int load_code(const uint8_t* codes, int64_t i, bool four_bit) {
  if (!four_bit) return codes[i];
  const uint8_t byte = codes[i >> 1];
  return (i & 1) ? (byte >> 4) : (byte & 0xF);
}

}  // namespace fastopt
