// CPU-only vector codecs of the blockwise low-bit formats (fastopt/quant.h), for lowbit_kernels.cpp.
//
// Its functions live in namespace fastopt::cpu::FASTOPT_CPU_NS, in an unnamed namespace: each ISA copy
// gets its own, and no inline function is shared between copies compiled with different flags.  Where the copy is built
// with AVX2 (+FMA), the block codecs run 8 values per instruction, and where the CPU also has AVX-512
// F/BW/DQ/VL (isa.h use_avx512_codecs) their AVX-512 versions (target attributes) run 16; elsewhere
// FASTOPT_QUANT_VEC is 0 and lowbit_kernels.cpp keeps its scalar table path.  The codes are the scalar
// path's bit for bit (every fp32 pattern of [-1, 1] was compared, both widths, six formats):
//  - quantize, 8-bit formats: block maximum and poisoning by an integer max of |x|'s bits; normalize as
//    quant_normalize (a multiply and a min/max clamp; the full rule where 1 / absmax overflowed); then
//    FastBook's table (built once per call from the codebook's packed table): one gather per value,
//    and the code by an add and a shift (sorted maps) or a variable shift (fp8);
//  - quantize, 4-bit sorted maps (code == rank: dyn4s, lin4u): a 4-level binary search over the 15
//    fp32 midpoints held in registers, i.e. rank = #{midpoints < xn}, the definition the packed table
//    was built from (codebook.py checks the table against it); lin4u by arithmetic with AVX-512;
//  - dequantize: values[code] * absmax, one multiply; 16-code values from registers (vpermps), 256-code
//    values by byte permutes with AVX-512 VBMI (FastBook::planes), else lowbit_kernels.cpp's scalar reads.
// Block maxima are maxima (exact in any order); a block's poisoning (NaN / inf) is detected first.
#pragma once

#include <cstdint>
#include <vector>

#include "fastopt/quant.h"
#include "isa.h"

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

// GCC 12 warns -W(maybe-)uninitialized inside the AVX-512 intrinsics (their _mm512_undefined_* operand, GCC
// PR 105593): a false positive, silenced for this part of the file.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
// ---- AVX-512 copies (16 values per instruction), compiled with a target attribute inside this copy and
// taken where the CPU has AVX-512 F/BW/DQ/VL (FastBook::avx512): the same operations lane for lane.
#define FASTOPT_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))

inline bool cpu_has_avx512() { return use_avx512_codecs(); }  // isa.h

// The encoder's own bucket table, built once per call from the codebook's packed table (same buckets,
// same codes; csrc/include/fastopt/quant.h), in a form that needs fewer operations per value:
//  - index: (u >> 15) & 0xFFFF is exponent << 8 | top 8 mantissa bits, so a bucket is that minus
//    (e_lo - 1) << 8, clamped below at 0 (row 0, which holds no midpoint), plus nr * 256 if negative;
//  - the midpoint test: with low' the low 15 bits of u, complemented for negative values, and t the
//    entry's 15-bit complement of the bucket's threshold, "across the midpoint" is bit 15 of t + low'
//    (quant_pick's low > thr for x >= 0, low < thr for x < 0);
//  - sorted maps whose two candidate codes are consecutive (dyn8s, dyn8u): the entry is
//    code << 15 + t, and the code is (entry + low') >> 15 -- an add and a shift;
//    other maps (fp8): t | code << 16 | next code << 24, and a variable shift picks the code;
//  - the unsigned formats' rule (quant_floor) is folded into the positive buckets' codes (zero_code ->
//    floor_code); +0 itself, the one positive-bucket value the rule spares, takes quantize_code(0).
struct FastBook {
  std::vector<uint32_t> tab;  // [2][nr][256]
  int32_t base = 0;           // (e_lo - 1) << 8
  int32_t neg_off = 0;        // nr * 256
  bool ident = false;         // entries code << 15 + t
  int32_t zero0 = -1;         // code of +0 where the unsigned rule is folded in, else -1
  bool search4 = false;       // 4-bit sorted map: binary search of the midpoints
  bool avx512 = false;        // this CPU runs the AVX-512 copies below
  bool lin16 = false;         // the map is k / 16, k = 1..16 (lin4u): rank by arithmetic
  bool vbmi = false;          // 8-bit decode by byte permutes (AVX-512 VBMI) from `planes`
  std::vector<uint8_t> planes;  // 256-code maps: byte k of values[c] at planes[k * 256 + c]
  int nc = 0;
  FastBook() = default;
  explicit FastBook(const CodebookView& b) {
    nc = b.nc;
    search4 = b.nc == 16 && b.identity;
    base = (b.e_lo - 1) << 8;
    neg_off = b.nr * 256;
    const bool fold = b.zero_code >= 0;
    zero0 = fold ? quantize_code(b, 0.0f) : -1;
    const size_t n = static_cast<size_t>(2) * b.nr * 256;
    std::vector<uint32_t> gen(n), id(n);
    bool ident_ok = true;
    for (size_t i = 0; i < n; ++i) {
      const uint32_t e = b.packed[i];
      const bool neg = i >= static_cast<size_t>(neg_off);
      uint32_t lo = e & 0xFFu, hi = (e >> 8) & 0xFFu, thr = (e >> 16) & 0x7FFFu;
      if (fold && !neg) {
        lo = static_cast<int32_t>(lo) == b.zero_code ? static_cast<uint32_t>(b.floor_code) : lo;
        hi = static_cast<int32_t>(hi) == b.zero_code ? static_cast<uint32_t>(b.floor_code) : hi;
      }
      uint32_t t = neg ? thr : 0x7FFFu - thr;
      if (hi == lo) t = 0;  // either side gives the same code
      ident_ok = ident_ok && (t == 0 || hi == lo + 1);
      gen[i] = t | (lo << 16) | (hi << 24);
      id[i] = (lo << 15) + t;
    }
    ident = ident_ok;
    tab = ident ? std::move(id) : std::move(gen);
    avx512 = cpu_has_avx512();
    vbmi = avx512 && b.nc == 256 && __builtin_cpu_supports("avx512vbmi");
    if (b.nc == 256) {
      planes.resize(4 * 256);
      for (int c = 0; c < 256; ++c) {
        const uint32_t v = float_bits(b.values[c]);
        for (int k = 0; k < 4; ++k) planes[k * 256 + c] = static_cast<uint8_t>(v >> (8 * k));
      }
    }
    // lin4u: values (k + 1) / 16 and midpoints (2k + 3) / 32 (exact in fp32), no code of 0.
    lin16 = search4 && b.zero_code < 0;
    for (int k = 0; lin16 && k < 16; ++k) {
      lin16 = b.values[k] == static_cast<float>(k + 1) / 16.0f &&
              (k == 15 ? !quant_finite(b.bounds[k]) : b.bounds[k] == static_cast<float>(2 * k + 3) / 32.0f);
    }
  }
};

namespace qvec {

// Code of 8 normalized values (bits u) through FastBook's table (see FastBook).
template <bool IDENT, bool FOLD>
inline __m256i code8_fast(const uint32_t* tab, __m256i base, __m256i neg_off, __m256i zero0, __m256i u) {
  const __m256i sgn = _mm256_srai_epi32(u, 31);
  const __m256i h = _mm256_and_si256(_mm256_srli_epi32(u, 15), _mm256_set1_epi32(0xFFFF));
  const __m256i idx = _mm256_add_epi32(_mm256_max_epi32(_mm256_sub_epi32(h, base), _mm256_setzero_si256()),
                                       _mm256_and_si256(sgn, neg_off));
  const __m256i ent = _mm256_i32gather_epi32(reinterpret_cast<const int*>(tab), idx, 4);
  const __m256i lowp = _mm256_and_si256(_mm256_xor_si256(u, sgn), _mm256_set1_epi32(0x7FFF));
  const __m256i s = _mm256_add_epi32(ent, lowp);
  __m256i code;
  if (IDENT) {
    code = _mm256_srli_epi32(s, 15);
  } else {
    const __m256i sh = _mm256_add_epi32(_mm256_set1_epi32(16), _mm256_and_si256(_mm256_srli_epi32(s, 12), _mm256_set1_epi32(8)));
    code = _mm256_and_si256(_mm256_srlv_epi32(ent, sh), _mm256_set1_epi32(0xFF));
  }
  if (FOLD) code = _mm256_blendv_epi8(code, zero0, _mm256_cmpeq_epi32(u, _mm256_setzero_si256()));
  return code;
}

}  // namespace qvec

// Block maximum of |x| and whether the block holds a NaN or an infinity, by the integer maximum of
// the bits of |x| (the order of non-negative floats; NaN and inf are the bit patterns >= 0x7F800000).
inline float block_absmax8(const float* x, int64_t len, bool* bad) {
  const int64_t len8 = len & ~int64_t{7};
  __m256i vmax = _mm256_setzero_si256();
  const __m256i absmask = _mm256_set1_epi32(0x7FFFFFFF);
  for (int64_t j = 0; j < len8; j += 8) {
    vmax = _mm256_max_epu32(vmax, _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + j)), absmask));
  }
  alignas(32) uint32_t mx[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(mx), vmax);
  uint32_t m = 0;
  for (int i = 0; i < 8; ++i) m = mx[i] > m ? mx[i] : m;
  for (int64_t j = len8; j < len; ++j) {
    const uint32_t a = float_bits(x[j]) & 0x7FFFFFFFu;
    m = a > m ? a : m;
  }
  *bad = m >= 0x7F800000u;
  return bits_float(m);
}

// Fills a poisoned block's codes (the code of 0) and returns its scale.
inline float poison_block(const CodebookView& b, int64_t len, uint8_t* codes) {
  const bool four = b.nc == 16;
  const uint32_t zero = static_cast<uint32_t>(quantize_code(b, 0.0f));
  const uint8_t fill = static_cast<uint8_t>(four ? zero | (zero << 4) : zero);
  for (int64_t j = 0; j < (four ? len / 2 : len); ++j) codes[j] = fill;
  return quant_poison();
}

template <bool IDENT, bool FOLD>
inline void encode8_fast(const FastBook& fb, const float* x, int64_t len8, float inv, bool careful, uint8_t* codes) {
  const __m256i base = _mm256_set1_epi32(fb.base), neg_off = _mm256_set1_epi32(fb.neg_off), zero0 = _mm256_set1_epi32(fb.zero0);
  const __m256 vinv = _mm256_set1_ps(inv), one = _mm256_set1_ps(1.0f), mone = _mm256_set1_ps(-1.0f);
  for (int64_t j = 0; j < len8; j += 8) {
    const __m256 v = _mm256_loadu_ps(x + j);
    // quant_normalize: min/max clamp; a NaN (0 * inf, only where 1 / absmax overflowed) needs the careful path.
    const __m256 xn = careful ? qvec::normalize8(v, vinv) : _mm256_max_ps(_mm256_min_ps(_mm256_mul_ps(v, vinv), one), mone);
    qvec::store8(codes + j, qvec::code8_fast<IDENT, FOLD>(fb.tab.data(), base, neg_off, zero0, _mm256_castps_si256(xn)));
  }
}

// Vector quantize_block (see lowbit_kernels.cpp): len even, <= kMaxQuantBlock.
__attribute__((noinline)) float quantize_block_vec(const CodebookView& b, const FastBook& fb, const float* x, int64_t len,
                                                   uint8_t* codes) {
  const int64_t len8 = len & ~int64_t{7};
  bool bad = false;
  const float amax = block_absmax8(x, len, &bad);
  if (bad) return poison_block(b, len, codes);
  const float inv = quant_inv_scale(amax);
  const bool careful = !quant_finite(inv);
  if (b.nc == 16) {
    const __m256 vinv = _mm256_set1_ps(inv);
    const qvec::Enc e = qvec::make_enc(b);
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
    if (fb.ident) {
      if (fb.zero0 >= 0) encode8_fast<true, true>(fb, x, len8, inv, careful, codes);
      else encode8_fast<true, false>(fb, x, len8, inv, careful, codes);
    } else {
      if (fb.zero0 >= 0) encode8_fast<false, true>(fb, x, len8, inv, careful, codes);
      else encode8_fast<false, false>(fb, x, len8, inv, careful, codes);
    }
    for (int64_t j = len8; j < len; ++j) codes[j] = static_cast<uint8_t>(quantize_code(b, quant_normalize(x[j], inv)));
  }
  return amax;
}

FASTOPT_AVX512 inline __m512 normalize16_careful(__m512 x, __m512 inv) {
  const __m512 xn = _mm512_mul_ps(x, inv);
  __m512 r = _mm512_mask_mov_ps(xn, _mm512_cmp_ps_mask(xn, _mm512_set1_ps(-1.0f), _CMP_LT_OQ), _mm512_set1_ps(-1.0f));
  r = _mm512_mask_mov_ps(r, _mm512_cmp_ps_mask(xn, _mm512_set1_ps(1.0f), _CMP_GT_OQ), _mm512_set1_ps(1.0f));
  return _mm512_mask_mov_ps(r, _mm512_cmp_ps_mask(xn, xn, _CMP_UNORD_Q), _mm512_setzero_ps());
}

// quant_normalize of 16 values: the min/max clamp, or (careful: 1 / absmax overflowed, so 0 * inf can
// give NaN) the full rule.
template <bool CAREFUL>
FASTOPT_AVX512 inline __m512 normalize16(__m512 x, __m512 inv) {
  if (CAREFUL) return normalize16_careful(x, inv);
  return _mm512_max_ps(_mm512_min_ps(_mm512_mul_ps(x, inv), _mm512_set1_ps(1.0f)), _mm512_set1_ps(-1.0f));
}

FASTOPT_AVX512 inline float block_absmax16(const float* x, int64_t len, bool* bad) {
  const int64_t len16 = len & ~int64_t{15};
  __m512i vmax = _mm512_setzero_si512();
  const __m512i absmask = _mm512_set1_epi32(0x7FFFFFFF);
  for (int64_t j = 0; j < len16; j += 16) {
    vmax = _mm512_max_epu32(vmax, _mm512_and_si512(_mm512_loadu_si512(x + j), absmask));
  }
  uint32_t m = _mm512_reduce_max_epu32(vmax);
  for (int64_t j = len16; j < len; ++j) {
    const uint32_t a = float_bits(x[j]) & 0x7FFFFFFFu;
    m = a > m ? a : m;
  }
  *bad = m >= 0x7F800000u;
  return bits_float(m);
}

// 8-bit codes through FastBook's table (see FastBook), 16 values per instruction.  (The table reads
// stay a gather: a vector pass of indices, scalar loads, then a vector pass of codes measured slower
// on Zen 4, 0.82 against 0.63 ns per value.)
template <bool IDENT, bool FOLD, bool CAREFUL>
FASTOPT_AVX512 __attribute__((noinline)) void encode16_fast(const FastBook& fb, const float* x, int64_t len16, float inv,
                                                            uint8_t* codes) {
  const __m512i base = _mm512_set1_epi32(fb.base), neg_off = _mm512_set1_epi32(fb.neg_off);
  const __m512i zero0 = _mm512_set1_epi32(fb.zero0);
  const __m512i m15 = _mm512_set1_epi32(0x7FFF), m16 = _mm512_set1_epi32(0xFFFF);
  const __m512 vinv = _mm512_set1_ps(inv);
  const int* tab = reinterpret_cast<const int*>(fb.tab.data());
  for (int64_t j = 0; j < len16; j += 16) {
    const __m512i u = _mm512_castps_si512(normalize16<CAREFUL>(_mm512_loadu_ps(x + j), vinv));
    const __m512i sgn = _mm512_srai_epi32(u, 31);
    const __m512i h = _mm512_and_si512(_mm512_srli_epi32(u, 15), m16);
    const __m512i idx = _mm512_add_epi32(_mm512_max_epi32(_mm512_sub_epi32(h, base), _mm512_setzero_si512()),
                                         _mm512_and_si512(sgn, neg_off));
    const __m512i ent = _mm512_i32gather_epi32(idx, tab, 4);
    const __m512i s = _mm512_add_epi32(ent, _mm512_and_si512(_mm512_xor_si512(u, sgn), m15));
    __m512i code;
    if (IDENT) {
      code = _mm512_srli_epi32(s, 15);
    } else {
      const __m512i sh = _mm512_add_epi32(_mm512_set1_epi32(16), _mm512_and_si512(_mm512_srli_epi32(s, 12), _mm512_set1_epi32(8)));
      code = _mm512_srlv_epi32(ent, sh);  // vpmovdb keeps the low byte
    }
    if (FOLD) code = _mm512_mask_mov_epi32(code, _mm512_cmpeq_epi32_mask(u, _mm512_setzero_si512()), zero0);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + j), _mm512_cvtepi32_epi8(code));
  }
}

// 4-bit sorted maps: rank = #midpoints < xn by a 4-level binary search, the 16 midpoints in one
// register (vpermps); then the unsigned formats' rule.  Two codes per byte, low nibble first.
// LIN16 (lin4u, midpoints (2k + 3) / 32): #{k in 0..14 : (2k + 3) / 32 < xn} = clamp(ceil(16 xn - 1.5), 0, 15),
// where 16 xn is exact, and so is 16 xn - 1.5 wherever 16 xn >= 0.75 (Sterbenz up to 3, multiples of
// 16 xn's ulp above); below, the count is 0 and the rounded difference stays < 0.  The format has no
// code of 0, so the unsigned rule never fires.
template <bool CAREFUL, bool LIN16>
FASTOPT_AVX512 __attribute__((noinline)) void encode16_search4(const CodebookView& b, const float* x, int64_t len16,
                                                               float inv, uint8_t* codes) {
  const __m512 mids = _mm512_loadu_ps(b.bounds);
  const __m512 vinv = _mm512_set1_ps(inv);
  const __m512i zc = _mm512_set1_epi32(b.zero_code), fc = _mm512_set1_epi32(b.floor_code);
  for (int64_t j = 0; j < len16; j += 16) {
    const __m512 xn = normalize16<CAREFUL>(_mm512_loadu_ps(x + j), vinv);
    __m512i r;
    if (LIN16) {
      const __m512 y = _mm512_sub_ps(_mm512_mul_ps(xn, _mm512_set1_ps(16.0f)), _mm512_set1_ps(1.5f));
      r = _mm512_cvt_roundps_epi32(y, _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC);
      r = _mm512_min_epi32(_mm512_max_epi32(r, _mm512_setzero_si512()), _mm512_set1_epi32(15));
    } else {
      r = _mm512_setzero_si512();
      for (int step = 8; step >= 1; step >>= 1) {
        const __m512 mid = _mm512_permutexvar_ps(_mm512_add_epi32(r, _mm512_set1_epi32(step - 1)), mids);
        r = _mm512_mask_add_epi32(r, _mm512_cmp_ps_mask(mid, xn, _CMP_LT_OQ), r, _mm512_set1_epi32(step));
      }
      const __mmask16 fire = _mm512_cmpeq_epi32_mask(r, zc) & _mm512_cmpgt_epi32_mask(_mm512_castps_si512(xn), _mm512_setzero_si512());
      r = _mm512_mask_mov_epi32(r, fire, fc);
    }
    const __m512i pair = _mm512_or_si512(r, _mm512_srli_epi64(r, 28));  // low u32 of each u64: c0 | c1 << 4
    _mm_storel_epi64(reinterpret_cast<__m128i*>(codes + j / 2), _mm512_cvtepi64_epi8(pair));
  }
}

// quantize_block_vec with 16 lanes; the tail (len % 16) by the 8-lane code.
FASTOPT_AVX512 __attribute__((noinline)) float quantize_block_512(const CodebookView& b, const FastBook& fb, const float* x,
                                                                  int64_t len, uint8_t* codes) {
  bool bad = false;
  const float amax = block_absmax16(x, len, &bad);
  if (bad) return poison_block(b, len, codes);
  const int64_t len16 = len & ~int64_t{15};
  const float inv = quant_inv_scale(amax);
  const bool careful = !quant_finite(inv);
  if (b.nc == 16) {
    if (!fb.search4) return quantize_block_vec(b, fb, x, len, codes);
    if (careful) encode16_search4<true, false>(b, x, len16, inv, codes);
    else if (fb.lin16) encode16_search4<false, true>(b, x, len16, inv, codes);
    else encode16_search4<false, false>(b, x, len16, inv, codes);
    for (int64_t j = len16; j < len; j += 2) {
      const int c0 = quantize_code(b, quant_normalize(x[j], inv));
      const int c1 = quantize_code(b, quant_normalize(x[j + 1], inv));
      codes[j / 2] = static_cast<uint8_t>(c0 | (c1 << 4));
    }
    return amax;
  }
#define FASTOPT_ENC16(I, F) (careful ? encode16_fast<I, F, true>(fb, x, len16, inv, codes) : encode16_fast<I, F, false>(fb, x, len16, inv, codes))
  if (fb.ident) {
    if (fb.zero0 >= 0) FASTOPT_ENC16(true, true);
    else FASTOPT_ENC16(true, false);
  } else {
    if (fb.zero0 >= 0) FASTOPT_ENC16(false, true);
    else FASTOPT_ENC16(false, false);
  }
#undef FASTOPT_ENC16
  for (int64_t j = len16; j < len; ++j) codes[j] = static_cast<uint8_t>(quantize_code(b, quant_normalize(x[j], inv)));
  return amax;
}

// 8-bit dequantize without a gather (AVX-512 VBMI): 64 codes per step.  Each byte of values[code] is a
// 256-entry byte table (FastBook::planes, four registers per byte): two vpermt2b and a select on the
// code's bit 7 give that byte of 64 values; byte unpacks then assemble the fp32 values.  The unpacks
// work inside 128-bit lanes, so the codes are first permuted (a 4 x 4 transpose of 4-byte groups) for
// the values to come out in order.  The product with absmax is the table path's.
#define FASTOPT_AVX512VBMI __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi")))
FASTOPT_AVX512VBMI __attribute__((noinline)) void dequantize8_vbmi(const FastBook& fb, const uint8_t* codes, float absmax,
                                                                   int64_t len64, float* out) {
  __m512i pl[4][4];
  for (int k = 0; k < 4; ++k) {
    for (int q = 0; q < 4; ++q) pl[k][q] = _mm512_loadu_si512(fb.planes.data() + k * 256 + q * 64);
  }
  alignas(64) uint8_t perm[64];
  for (int lane = 0; lane < 4; ++lane) {
    for (int k = 0; k < 4; ++k) {
      for (int s = 0; s < 4; ++s) perm[lane * 16 + 4 * k + s] = static_cast<uint8_t>(16 * k + 4 * lane + s);
    }
  }
  const __m512i vperm = _mm512_load_si512(perm);
  const __m512 sc = _mm512_set1_ps(absmax);
  for (int64_t j = 0; j < len64; j += 64) {
    const __m512i c = _mm512_permutexvar_epi8(vperm, _mm512_loadu_si512(codes + j));
    const __mmask64 top = _mm512_movepi8_mask(c);
    __m512i by[4];
    for (int k = 0; k < 4; ++k) {
      by[k] = _mm512_mask_blend_epi8(top, _mm512_permutex2var_epi8(pl[k][0], c, pl[k][1]),
                                     _mm512_permutex2var_epi8(pl[k][2], c, pl[k][3]));
    }
    const __m512i w01lo = _mm512_unpacklo_epi8(by[0], by[1]), w01hi = _mm512_unpackhi_epi8(by[0], by[1]);
    const __m512i w23lo = _mm512_unpacklo_epi8(by[2], by[3]), w23hi = _mm512_unpackhi_epi8(by[2], by[3]);
    _mm512_storeu_ps(out + j, _mm512_mul_ps(_mm512_castsi512_ps(_mm512_unpacklo_epi16(w01lo, w23lo)), sc));
    _mm512_storeu_ps(out + j + 16, _mm512_mul_ps(_mm512_castsi512_ps(_mm512_unpackhi_epi16(w01lo, w23lo)), sc));
    _mm512_storeu_ps(out + j + 32, _mm512_mul_ps(_mm512_castsi512_ps(_mm512_unpacklo_epi16(w01hi, w23hi)), sc));
    _mm512_storeu_ps(out + j + 48, _mm512_mul_ps(_mm512_castsi512_ps(_mm512_unpackhi_epi16(w01hi, w23hi)), sc));
  }
}

// dequantize_block of a 16-code map with 16 lanes: the values from one register (vpermps).
FASTOPT_AVX512 __attribute__((noinline)) void dequantize_block_512(const CodebookView& b, const uint8_t* codes, float absmax,
                                                                   int64_t len, float* out) {
  const int64_t len16 = len & ~int64_t{15};
  const __m512 s = _mm512_set1_ps(absmax);
  const __m512 vals = _mm512_loadu_ps(b.values);
  const __m128i nib = _mm_set1_epi8(0x0F);
  for (int64_t j = 0; j < len16; j += 16) {
    const __m128i by = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + j / 2));
    const __m128i c = _mm_unpacklo_epi8(_mm_and_si128(by, nib), _mm_and_si128(_mm_srli_epi16(by, 4), nib));
    _mm512_storeu_ps(out + j, _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_cvtepu8_epi32(c), vals), s));
  }
  for (int64_t j = len16; j < len; ++j) out[j] = b.values[load_code(codes, j, true)] * absmax;
}

#pragma GCC diagnostic pop

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
