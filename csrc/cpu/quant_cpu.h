// CPU-only vector codecs of the blockwise low-bit formats (fastopt/quant.h), for lowbit_kernels.cpp.
//
// Its functions live in namespace fastopt::cpu::FASTOPT_CPU_NS, in an unnamed namespace: each ISA copy
// gets its own, and no inline function is shared between copies compiled with different flags.  Where the copy is built
// with AVX2 (+FMA), the block codecs run 8 values per instruction; elsewhere FASTOPT_QUANT_VEC is 0
// and lowbit_kernels.cpp keeps its scalar table path.  The codes are the scalar path's bit for bit:
//  - quantize (any format): normalize as quant_normalize (a multiply, a clamp, NaN -> +0), bucket as
//    quant_bucket (integer ops on the fp32 bits), one AVX2 gather of the packed bucket entry, then
//    quant_pick and quant_floor as compares and selects -- the same operations on the same table;
//  - quantize 4-bit sorted maps (code == rank: dyn4s, lin4u): a 4-level binary search over the 15
//    fp32 midpoints held in two registers (vpermps), i.e. rank = #{midpoints < xn}, which is the
//    definition the packed table was built from (codebook.py checks the table against it);
//  - dequantize: values[code] * absmax, one multiply; the values come from a gather (256 codes) or
//    from two registers (16 codes, vpermps + a select on bit 3).
// Block maxima are maxima (exact in any order); a block's poisoning (NaN / inf) is detected first.
#pragma once

#include <cstdint>

#include "fastopt/quant.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define FASTOPT_QUANT_VEC 1
#else
#define FASTOPT_QUANT_VEC 0
#endif

#ifndef FASTOPT_CPU_NS
#error "quant_cpu.h is for the CPU kernel bodies (kernel.h): compile with -DFASTOPT_CPU_NS=<isa namespace>"
#endif

namespace fastopt::cpu::FASTOPT_CPU_NS {
namespace {

#if FASTOPT_QUANT_VEC
namespace qvec {

// The per-codebook constants of the vector encoder, broadcast once per call.
struct Enc {
  __m256i e_lo1;      // e_lo - 1: row = exponent - (e_lo - 1)
  __m256i nr;         // rows per sign
  __m256i nr1;        // nr - 1
  __m256i zero_code;  // -1: the unsigned rule never fires
  __m256i floor_code;
  const int* packed;
  // 4-bit sorted maps: the 16 sorted midpoints (the 16th is +inf) in two registers.
  bool search4;
  __m256 mid_lo, mid_hi;
};

inline Enc make_enc(const CodebookView& b) {
  Enc e;
  e.e_lo1 = _mm256_set1_epi32(b.e_lo - 1);
  e.nr = _mm256_set1_epi32(b.nr);
  e.nr1 = _mm256_set1_epi32(b.nr - 1);
  e.zero_code = _mm256_set1_epi32(b.zero_code);
  e.floor_code = _mm256_set1_epi32(b.floor_code);
  e.packed = reinterpret_cast<const int*>(b.packed);
  e.search4 = b.nc == 16 && b.identity;
  if (e.search4) {
    e.mid_lo = _mm256_loadu_ps(b.bounds);
    e.mid_hi = _mm256_loadu_ps(b.bounds + 8);
  } else {
    e.mid_lo = e.mid_hi = _mm256_setzero_ps();
  }
  return e;
}

// quant_normalize of 8 values: x * inv clamped to [-1, 1], NaN -> +0.
inline __m256 normalize8(__m256 x, __m256 inv) {
  const __m256 xn = _mm256_mul_ps(x, inv);
  const __m256 lo = _mm256_cmp_ps(xn, _mm256_set1_ps(-1.0f), _CMP_LT_OQ);
  const __m256 hi = _mm256_cmp_ps(xn, _mm256_set1_ps(1.0f), _CMP_GT_OQ);
  const __m256 nan = _mm256_cmp_ps(xn, xn, _CMP_UNORD_Q);
  __m256 r = _mm256_blendv_ps(xn, _mm256_set1_ps(-1.0f), lo);
  r = _mm256_blendv_ps(r, _mm256_set1_ps(1.0f), hi);
  return _mm256_andnot_ps(nan, r);
}

// The unsigned formats' rule (quant_floor) on 8 codes of values with bits u.
inline __m256i floor8(const Enc& e, __m256i u, __m256i code) {
  const __m256i fire = _mm256_and_si256(_mm256_cmpeq_epi32(code, e.zero_code), _mm256_cmpgt_epi32(u, _mm256_setzero_si256()));
  return _mm256_blendv_epi8(code, e.floor_code, fire);
}

// quantize_code of 8 normalized values through the packed bucket table (every format).
inline __m256i code8_table(const Enc& e, __m256 xn) {
  const __m256i u = _mm256_castps_si256(xn);
  const __m256i ff = _mm256_set1_epi32(0xFF);
  const __m256i sgn = _mm256_srai_epi32(u, 31);  // all ones where negative
  __m256i row = _mm256_sub_epi32(_mm256_and_si256(_mm256_srli_epi32(u, 23), ff), e.e_lo1);
  __m256i m = _mm256_and_si256(_mm256_srli_epi32(u, 15), ff);
  m = _mm256_andnot_si256(_mm256_cmpgt_epi32(_mm256_set1_epi32(1), row), m);  // row < 1: m = 0
  row = _mm256_min_epi32(_mm256_max_epi32(row, _mm256_setzero_si256()), e.nr1);
  const __m256i idx = _mm256_or_si256(_mm256_slli_epi32(_mm256_add_epi32(_mm256_and_si256(sgn, e.nr), row), 8), m);
  const __m256i ent = _mm256_i32gather_epi32(e.packed, idx, 4);
  // quant_pick: across the bucket's midpoint (compared on the low 15 bits), the next code.
  const __m256i low = _mm256_and_si256(u, _mm256_set1_epi32(0x7FFF));
  const __m256i thr = _mm256_srli_epi32(ent, 16);
  const __m256i up = _mm256_blendv_epi8(_mm256_cmpgt_epi32(low, thr), _mm256_cmpgt_epi32(thr, low), sgn);
  const __m256i code = _mm256_blendv_epi8(_mm256_and_si256(ent, ff), _mm256_and_si256(_mm256_srli_epi32(ent, 8), ff), up);
  return floor8(e, u, code);
}

// 16 sorted values (two registers) at indices idx (0..15).
inline __m256 lookup16(__m256 lo, __m256 hi, __m256i idx) {
  const __m256 a = _mm256_permutevar8x32_ps(lo, idx);
  const __m256 b = _mm256_permutevar8x32_ps(hi, idx);
  return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));  // bit 3 -> sign bit
}

// Code of 8 normalized values in a sorted 16-code map: the number of midpoints below xn (ties stay
// low), found by a binary search in registers.
inline __m256i code8_search4(const Enc& e, __m256 xn) {
  __m256i r = _mm256_setzero_si256();
  for (int step = 8; step >= 1; step >>= 1) {
    const __m256i probe = _mm256_add_epi32(r, _mm256_set1_epi32(step - 1));
    const __m256 mid = lookup16(e.mid_lo, e.mid_hi, probe);
    const __m256i below = _mm256_castps_si256(_mm256_cmp_ps(mid, xn, _CMP_LT_OQ));
    r = _mm256_add_epi32(r, _mm256_and_si256(below, _mm256_set1_epi32(step)));
  }
  return floor8(e, _mm256_castps_si256(xn), r);
}

// 8 int32 codes (0..255) to 8 bytes at out.
inline void store8(uint8_t* out, __m256i c) {
  const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(out), _mm_packus_epi16(w, w));
}

// 8 int32 codes (0..15) to 4 bytes at out, element 2j in the low nibble of byte j.
inline void store8_4bit(uint8_t* out, __m256i c) {
  const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));  // 8 x u16
  const __m128i pair = _mm_or_si128(w, _mm_srli_epi32(w, 12));  // low u16 of each u32: c0 | c1 << 4
  const __m128i b = _mm_packus_epi32(_mm_and_si128(pair, _mm_set1_epi32(0xFF)), _mm_setzero_si128());
  const int32_t v = _mm_cvtsi128_si32(_mm_packus_epi16(b, b));
  __builtin_memcpy(out, &v, 4);
}

// 8 codes (int32) of a 4-bit state from the 4 bytes at in.
inline __m256i load8_4bit(const uint8_t* in) {
  int32_t v;
  __builtin_memcpy(&v, in, 4);
  const __m128i b = _mm_cvtsi32_si128(v);
  const __m128i nib = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(b, nib);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), nib);
  return _mm256_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi));
}

}  // namespace qvec

// Vector quantize_block (see lowbit_kernels.cpp): len even, <= kMaxQuantBlock.
__attribute__((noinline)) float quantize_block_vec(const CodebookView& b, const float* x, int64_t len,
                                                          uint8_t* codes) {
  const int64_t len8 = len & ~int64_t{7};
  __m256 vmax = _mm256_setzero_ps();
  __m256i vbad = _mm256_setzero_si256();
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256i expmask = _mm256_set1_epi32(0x7F800000);
  for (int64_t j = 0; j < len8; j += 8) {
    const __m256 v = _mm256_loadu_ps(x + j);
    vmax = _mm256_max_ps(vmax, _mm256_and_ps(v, absmask));
    vbad = _mm256_or_si256(vbad, _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_castps_si256(v), expmask), expmask));
  }
  alignas(32) float mx[8];
  _mm256_store_ps(mx, vmax);
  float amax = 0.0f;
  for (int i = 0; i < 8; ++i) amax = mx[i] > amax ? mx[i] : amax;
  bool bad = !_mm256_testz_si256(vbad, vbad);
  for (int64_t j = len8; j < len; ++j) {
    const float a = x[j] < 0.0f ? -x[j] : x[j];
    amax = a > amax ? a : amax;
    bad = bad || !quant_finite(x[j]);
  }
  const bool four = b.nc == 16;
  if (bad) {
    const uint32_t zero = static_cast<uint32_t>(quantize_code(b, 0.0f));
    const uint8_t fill = static_cast<uint8_t>(four ? zero | (zero << 4) : zero);
    for (int64_t j = 0; j < (four ? len / 2 : len); ++j) codes[j] = fill;
    return quant_poison();
  }
  const float inv = quant_inv_scale(amax);
  const __m256 vinv = _mm256_set1_ps(inv);
  const qvec::Enc e = qvec::make_enc(b);
  if (four) {
    for (int64_t j = 0; j < len8; j += 8) {
      const __m256 xn = qvec::normalize8(_mm256_loadu_ps(x + j), vinv);
      qvec::store8_4bit(codes + j / 2, e.search4 ? qvec::code8_search4(e, xn) : qvec::code8_table(e, xn));
    }
    for (int64_t j = len8; j < len; j += 2) {
      const int c0 = quantize_code(b, quant_normalize(x[j], inv));
      const int c1 = quantize_code(b, quant_normalize(x[j + 1], inv));
      codes[j / 2] = static_cast<uint8_t>(c0 | (c1 << 4));
    }
  } else {
    for (int64_t j = 0; j < len8; j += 8) {
      qvec::store8(codes + j, qvec::code8_table(e, qvec::normalize8(_mm256_loadu_ps(x + j), vinv)));
    }
    for (int64_t j = len8; j < len; ++j) codes[j] = static_cast<uint8_t>(quantize_code(b, quant_normalize(x[j], inv)));
  }
  return amax;
}

// Vector dequantize_block: out[j] = values[code j] * absmax.
__attribute__((noinline)) void dequantize_block_vec(const CodebookView& b, const uint8_t* codes, float absmax,
                                                           int64_t len, float* out) {
  const int64_t len8 = len & ~int64_t{7};
  const __m256 s = _mm256_set1_ps(absmax);
  if (b.nc == 16) {
    const __m256 lo = _mm256_loadu_ps(b.values), hi = _mm256_loadu_ps(b.values + 8);
    for (int64_t j = 0; j < len8; j += 8) {
      _mm256_storeu_ps(out + j, _mm256_mul_ps(qvec::lookup16(lo, hi, qvec::load8_4bit(codes + j / 2)), s));
    }
  } else {
    for (int64_t j = 0; j < len8; j += 8) {
      const __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + j)));
      _mm256_storeu_ps(out + j, _mm256_mul_ps(_mm256_i32gather_ps(b.values, c, 4), s));
    }
  }
  for (int64_t j = len8; j < len; ++j) out[j] = b.values[load_code(codes, j, b.nc == 16)] * absmax;
}
#endif  // FASTOPT_QUANT_VEC

}  // namespace
}  // namespace fastopt::cpu::FASTOPT_CPU_NS
