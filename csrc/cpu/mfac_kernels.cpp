// Dense M-FAC's two passes over the gradient window (csrc/cpu/mfac.h), compiled once per ISA (isa.h).
//
// The window G (rows x ld, fp32 or bf16) holds the params' gradients side by side.  Both passes walk
// the columns in blocks of kBlock (kBlockWide: a bf16 window on the AVX-512 loops) spread over OpenMP
// threads (dynamically; pass 1 keeps one partial sum per block and row and adds them in block order, so
// the result does not depend on the schedule); a block reads rows [0, nrows) of its columns once, several
// rows at a time.
//   pass 1 (mfac_dots_run): the block's g = grad (+ wd_l2 p) is written to row `slot` and kept in fp32
//     (and, for a bf16 window, its stored value back in fp32); then one walk over the rows gives the
//     block's dot products with both, in fp32 (independent vector accumulators per row), kept in fp64 per
//     block and added in block order at the end.
//   pass 2 (mfac_update_run): acc = sum_j coef[j] G_j over the block's columns (acc in L1), then per
//     column u = g / damp - acc, the momentum, the decay and the parameter update in one go.
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>
#if defined(__x86_64__) && defined(__AVX2__)
#include <immintrin.h>
#endif

#include "kernel.h"
#include "mfac.h"

namespace fastopt::cpu::FASTOPT_CPU_NS {
namespace {

// 16K columns: each row is read in runs of 32 KB (bf16) / 64 KB (fp32), long enough for the hardware
// prefetchers (runs of one 4 KB page per row left the passes at a third of the bandwidth torch's gemv got)
constexpr int64_t kBlock = 16384;
// A bf16 window on the AVX-512 loops: 64K columns (runs of 128 KB per row; the g parts 3 x 128 KB and
// pass 2's fp32 accumulator 256 KB stay in L2), twelve rows in flight in pass 1, eight in pass 2.  Both
// passes are bound by the memory system, not the arithmetic (Zen 4, 2 threads, m256 d4M bf16, a
// standalone copy of pass 1's loop, a quiet moment): 16K columns x 8 rows 56 ms, 64K x 12 rows 41 ms, a
// plain read of the window 37 ms (64K x 16 rows) / 49 ms (16K x 8 rows); widening the rows to fp32 and
// using fused multiply-adds with the fp32 g instead of the three-part vdpbf16ps was no faster (41-50 ms
// at 12 rows), and slower in cache (the split: 3 instructions per 32 columns and row, the FMAs 4 + 2).
constexpr int64_t kBlockWide = 65536;

#if defined(__x86_64__) && defined(__AVX2__)
// The AVX2 copy also carries AVX-512 versions of the inner loops, used when the CPU has AVX-512 F/BW/VL
// and BF16 (and FASTOPT_CPU_ISA is not "avx2"): a bf16 window's dot products run on vdpbf16ps (32
// products per instruction, exact, summed in fp32) with g split into three bf16 parts, g = hi + mid +
// lo to within fp32 rounding, where hi is exactly the stored value (so G . hi is the Gram row, and
// G . (hi + mid + lo) the product with g); pass 2 widens rows to fp32 (a bf16 window: 32 columns per
// load, split by column parity) and uses fused multiply-adds.  Tails are masked loads (no scalar
// remainder).
#define FASTOPT_MFAC_AVX512 1
// (GCC 12's avx512fintrin.h reads an "undefined" vector in _mm512_setzero_ps / the masked loads)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define MFAC_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

bool use_avx512_bf16() {
  static const bool ok = [] {
    const char* env = std::getenv("FASTOPT_CPU_ISA");
    if (env != nullptr && std::strcmp(env, "avx2") == 0) return false;
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bf16");
  }();
  return ok;
}

inline __mmask32 tail_mask32(int64_t k, int64_t len) {
  const int64_t left = len - k;
  return left >= 32 ? 0xFFFFFFFFu : ((1u << left) - 1u);
}

// fp32 -> bf16 bits of 16 lanes, round to nearest even, NaN kept quiet: bf16_from_float (common.h) exactly.
MFAC_AVX512 inline __m256i bf16_round16(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i bias = _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(_mm512_srli_epi32(u, 16),
                                                                                     _mm512_set1_epi32(1)));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
  return _mm512_cvtepi32_epi16(r);
}

MFAC_AVX512 inline __m512 bf16_widen16(__m256i h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// The block's g = grad (+ wd p) (computed as the scalar loop does: a product, then a sum), written to the
// window row as bf16 and split into hi (= that row) + mid + lo, zero-padded to a multiple of 32.
MFAC_AVX512 void split_block_bf16(const float* gr, const float* pr, bool has_wd, float wd, int64_t len,
                                  uint16_t* row, uint16_t* hi, uint16_t* mid, uint16_t* lo) {
  const __m512 wdv = _mm512_set1_ps(wd);
  const int64_t padded = (len + 31) / 32 * 32;
  for (int64_t k = 0; k < padded; k += 16) {
    const int64_t left = len - k;
    const __mmask16 m = left >= 16 ? static_cast<__mmask16>(0xFFFF)
                                   : (left > 0 ? static_cast<__mmask16>((1u << left) - 1u) : static_cast<__mmask16>(0));
    __m512 g = _mm512_maskz_loadu_ps(m, gr + k);
    if (has_wd) g = _mm512_add_ps(g, _mm512_mul_ps(wdv, _mm512_maskz_loadu_ps(m, pr + k)));
    const __m256i h = bf16_round16(g);
    const __m512 r1 = _mm512_sub_ps(g, bf16_widen16(h));
    const __m256i md = bf16_round16(r1);
    const __m256i l = bf16_round16(_mm512_sub_ps(r1, bf16_widen16(md)));
    _mm256_mask_storeu_epi16(row + k, m, h);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(hi + k), h);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(mid + k), md);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(lo + k), l);
  }
}

// Rows [0, nr) of the block (columns col..col+len) dotted with hi and with mid + lo (zero-padded to a
// multiple of 32): pk[j] += G_j . hi, px[j] += G_j . hi + G_j . (mid + lo).  The fp32 accumulators are
// added to the fp64 sums every kFlush columns (a 64K block sums in fp32 no longer than a 16K one did).
constexpr int64_t kFlush = 16384;
template <int NR>
MFAC_AVX512 void dots_bf16_rows(const uint16_t* const* r, const uint16_t* hi, const uint16_t* mid,
                                const uint16_t* lo, int64_t len, double* px, double* pk) {
  for (int64_t c0 = 0; c0 < len; c0 += kFlush) {
    const int64_t c1 = std::min(len, c0 + kFlush);
    __m512 ah[NR], ar[NR];
    for (int i = 0; i < NR; ++i) {
      ah[i] = _mm512_setzero_ps();
      ar[i] = _mm512_setzero_ps();
    }
    for (int64_t k = c0; k < c1; k += 32) {
      const __mmask32 mk = tail_mask32(k, len);
      const __m512bh h = (__m512bh)_mm512_loadu_si512(hi + k);
      const __m512bh md = (__m512bh)_mm512_loadu_si512(mid + k);
      const __m512bh l = (__m512bh)_mm512_loadu_si512(lo + k);
      for (int i = 0; i < NR; ++i) {
        const __m512bh x = (__m512bh)_mm512_maskz_loadu_epi16(mk, r[i] + k);
        ah[i] = _mm512_dpbf16_ps(ah[i], x, h);
        ar[i] = _mm512_dpbf16_ps(ar[i], x, md);
        ar[i] = _mm512_dpbf16_ps(ar[i], x, l);
      }
    }
    for (int i = 0; i < NR; ++i) {
      const double sh = _mm512_reduce_add_ps(ah[i]);
      pk[i] += sh;
      px[i] += sh + static_cast<double>(_mm512_reduce_add_ps(ar[i]));
    }
  }
}

MFAC_AVX512 inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
MFAC_AVX512 inline __m512 load16(const bf16_t* p, __mmask16 m) {
  const __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// acc[k] += sum_i c[i] r_i[k] over NR rows (acc read and written once per NR rows; the rows are added in
// order, one after the other, as the scalar loop does).
template <int NR, typename T>
MFAC_AVX512 void axpy_rows_avx512(const T* const* r, const float* coef, float* acc, int64_t len) {
  __m512 c[NR];
  for (int i = 0; i < NR; ++i) c[i] = _mm512_set1_ps(coef[i]);
  for (int64_t k = 0; k < len; k += 16) {
    const int64_t left = len - k;
    const __mmask16 m = left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1u);
    __m512 a = _mm512_maskz_loadu_ps(m, acc + k);
    for (int i = 0; i < NR; ++i) a = _mm512_fmadd_ps(c[i], load16(r[i] + k, m), a);
    _mm512_mask_storeu_ps(acc + k, m, a);
  }
}

// A bf16 window's pass 2: acc += sum_i c[i] r_i over NR rows, 32 columns per step, the accumulator kept
// split by column parity (acc[k .. k+16) the even columns of the step, acc[k+16 .. k+32) the odd ones): a
// row's 32 bf16 become fp32 with one shift (even) and one mask (odd), exact; the same fused multiply-adds
// in the same row order as the plain loop, so the sums are the same.  len is padded to a multiple of 32
// (the loads past it are masked to zero; acc has room).
template <int NR>
MFAC_AVX512 void axpy_rows_bf16_eo(const uint16_t* const* r, const float* coef, float* acc, int64_t len) {
  __m512 c[NR];
  for (int i = 0; i < NR; ++i) c[i] = _mm512_set1_ps(coef[i]);
  const __m512i odd = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int64_t k = 0; k < len; k += 32) {
    const __mmask32 mk = tail_mask32(k, len);
    __m512 ae = _mm512_loadu_ps(acc + k), ao = _mm512_loadu_ps(acc + k + 16);
    for (int i = 0; i < NR; ++i) {
      const __m512i x = _mm512_maskz_loadu_epi16(mk, r[i] + k);
      ae = _mm512_fmadd_ps(c[i], _mm512_castsi512_ps(_mm512_slli_epi32(x, 16)), ae);
      ao = _mm512_fmadd_ps(c[i], _mm512_castsi512_ps(_mm512_and_si512(x, odd)), ao);
    }
    _mm512_storeu_ps(acc + k, ae);
    _mm512_storeu_ps(acc + k + 16, ao);
  }
}

// The block's acc = sum_j<nr coef[j] G_j (bf16 window) in column order: zeroed over len rounded up to 32,
// eight rows per read of acc in the parity-split layout, then put back in column order.
MFAC_AVX512 void axpy_block_bf16(const bf16_t* G, int64_t ld, int64_t col, int64_t nr, const float* coef,
                                 float* acc, int64_t len) {
  const int64_t padded = (len + 31) / 32 * 32;
  for (int64_t k = 0; k < padded; k += 16) _mm512_storeu_ps(acc + k, _mm512_setzero_ps());
  const uint16_t* rows[8];
  auto row = [&](int64_t j) { return reinterpret_cast<const uint16_t*>(G + j * ld + col); };
  int64_t j = 0;
  for (; j + 8 <= nr; j += 8) {
    for (int i = 0; i < 8; ++i) rows[i] = row(j + i);
    axpy_rows_bf16_eo<8>(rows, coef + j, acc, len);
  }
  for (; j + 4 <= nr; j += 4) {
    for (int i = 0; i < 4; ++i) rows[i] = row(j + i);
    axpy_rows_bf16_eo<4>(rows, coef + j, acc, len);
  }
  for (; j < nr; ++j) {
    rows[0] = row(j);
    axpy_rows_bf16_eo<1>(rows, coef + j, acc, len);
  }
  const __m512i lo_idx = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi_idx = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  for (int64_t k = 0; k < padded; k += 32) {
    const __m512 e = _mm512_loadu_ps(acc + k), o = _mm512_loadu_ps(acc + k + 16);
    _mm512_storeu_ps(acc + k, _mm512_permutex2var_ps(e, lo_idx, o));
    _mm512_storeu_ps(acc + k + 16, _mm512_permutex2var_ps(e, hi_idx, o));
  }
}

// acc[k] += sum_j<nr coef[j] G_j[k] over the block, eight rows per read of acc.
template <typename T>
MFAC_AVX512 void axpy_block_avx512(const T* G, int64_t ld, int64_t col, int64_t nr, const float* coef, float* acc,
                                   int64_t len) {
  const T* rows[8];
  int64_t j = 0;
  for (; j + 8 <= nr; j += 8) {
    for (int i = 0; i < 8; ++i) rows[i] = G + (j + i) * ld + col;
    axpy_rows_avx512<8>(rows, coef + j, acc, len);
  }
  for (; j + 4 <= nr; j += 4) {
    for (int i = 0; i < 4; ++i) rows[i] = G + (j + i) * ld + col;
    axpy_rows_avx512<4>(rows, coef + j, acc, len);
  }
  for (; j < nr; ++j) {
    rows[0] = G + j * ld + col;
    axpy_rows_avx512<1>(rows, coef + j, acc, len);
  }
}
#endif
// Below this many window elements one thread runs the pass.
constexpr int64_t kParallelWork = 1 << 18;

struct Blk {
  int64_t t, start, len, col;  // tensor, first element in it, length, first column in the window
};

std::vector<Blk> make_blocks(const MfacArgs& a, int64_t block) {
  std::vector<Blk> out;
  int64_t col = 0;
  for (size_t t = 0; t < a.numels.size(); ++t) {
    for (int64_t s = 0; s < a.numels[t]; s += block)
      out.push_back({static_cast<int64_t>(t), s, std::min(block, a.numels[t] - s), col + s});
    col += a.numels[t];
  }
  return out;
}

int threads_for(const MfacArgs& a, size_t nblocks) {
  if (a.nrows * a.ld < kParallelWork) return 1;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(omp_get_max_threads(), nblocks)));
}

// Dot products of NR rows with gb (and kb) over len columns: NR x L independent fp32 accumulators per
// product (a single vector accumulator would make the loop wait on the add latency), written out so
// that the lane loop vectorizes under -ffp-contract=off without -ffast-math.
template <typename T, bool TWO, int NR>
inline void dots_rows(const T* const* r, const float* __restrict__ gb, const float* __restrict__ kb, int64_t len,
                      double* px, double* pk) {
  constexpr int L = TWO ? 8 : 16;
  float ax[NR][L] = {}, ak[NR][L] = {};
  int64_t k = 0;
  for (; k + L <= len; k += L) {
    for (int i = 0; i < NR; ++i) {
      const T* __restrict__ ri = r[i] + k;
#pragma omp simd
      for (int l = 0; l < L; ++l) {
        const float x = to_float(ri[l]);
        ax[i][l] += x * gb[k + l];
        if (TWO) ak[i][l] += x * kb[k + l];
      }
    }
  }
  for (int i = 0; i < NR; ++i) {
    float sx = 0.0f, sk = 0.0f;
    for (int l = 0; l < L; ++l) {
      sx += ax[i][l];
      if (TWO) sk += ak[i][l];
    }
    for (int64_t q = k; q < len; ++q) {
      const float x = to_float(r[i][q]);
      sx += x * gb[q];
      if (TWO) sk += x * kb[q];
    }
    px[i] += sx;
    if (TWO) pk[i] += sk;
  }
}

// acc[k] += sum_i c[i] r_i[k] over NR rows at once (acc read and written once per NR rows).
template <typename T, int NR>
inline void axpy_rows(const T* const* r, const float* c, float* __restrict__ acc, int64_t len) {
  const T* __restrict__ r0 = r[0];
  const T* __restrict__ r1 = r[NR > 1 ? 1 : 0];
  const T* __restrict__ r2 = r[NR > 2 ? 2 : 0];
  const T* __restrict__ r3 = r[NR > 3 ? 3 : 0];
#pragma omp simd
  for (int64_t k = 0; k < len; ++k) {
    float s = acc[k] + c[0] * to_float(r0[k]);
    if (NR > 1) s += c[1] * to_float(r1[k]);
    if (NR > 2) s += c[2] * to_float(r2[k]);
    if (NR > 3) s += c[3] * to_float(r3[k]);
    acc[k] = s;
  }
}

template <typename T, bool TWO>
void dots_body(const MfacArgs& a) {
  T* G = reinterpret_cast<T*>(a.window);
  const int64_t nr = a.nrows, ld = a.ld;
  const float wd = static_cast<float>(a.wd_l2);
  const bool has_wd = a.wd_l2 != 0.0;
#ifdef FASTOPT_MFAC_AVX512
  const bool avx512 = use_avx512_bf16();
  const bool wide = avx512 && TWO && std::is_same_v<T, bf16_t>;
#else
  const bool wide = false;
#endif
  const int64_t block = wide ? kBlockWide : kBlock;
  const std::vector<Blk> blocks = make_blocks(a, block);
  const int nthreads = threads_for(a, blocks.size());
  const int64_t per = TWO ? 2 * nr : nr;
  const int64_t nb = static_cast<int64_t>(blocks.size());
  // one partial sum per (block, row), added in block order at the end: the result does not depend on
  // which thread ran which block, so the blocks can be scheduled dynamically (a busy machine)
  std::vector<double> part(static_cast<size_t>(nb) * per, 0.0);
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<float> gbv(wide ? 0 : kBlock), kbv(wide ? 0 : kBlock);
    float* gb = gbv.data();
    float* kb = kbv.data();
#ifdef FASTOPT_MFAC_AVX512
    std::vector<uint16_t> hmlv(wide ? 3 * kBlockWide : 0);
    uint16_t* hi = hmlv.data();
    uint16_t* mid = hi + (wide ? kBlockWide : 0);
    uint16_t* lo = mid + (wide ? kBlockWide : 0);
#endif
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < nb; ++b) {
      const Blk& bl = blocks[b];
      double* px = part.data() + b * per;
      double* pk = px + (TWO ? nr : 0);  // (unused without TWO)
      const float* __restrict__ gr = reinterpret_cast<const float*>(a.grads[bl.t]) + bl.start;
      const float* __restrict__ pr = reinterpret_cast<const float*>(a.params[bl.t]) + bl.start;
      T* __restrict__ gs = G + a.slot * ld + bl.col;
      const int64_t len = bl.len;
#ifdef FASTOPT_MFAC_AVX512
      if constexpr (TWO && std::is_same_v<T, bf16_t>) {
        if (wide) {
          split_block_bf16(gr, pr, has_wd, wd, len, reinterpret_cast<uint16_t*>(gs), hi, mid, lo);
          const uint16_t* rows[12];
          int64_t j = 0;
          for (; j + 12 <= nr; j += 12) {  // twelve rows in flight: more memory-level parallelism
            for (int i = 0; i < 12; ++i) rows[i] = reinterpret_cast<const uint16_t*>(G + (j + i) * ld + bl.col);
            dots_bf16_rows<12>(rows, hi, mid, lo, len, px + j, pk + j);
          }
          for (; j + 4 <= nr; j += 4) {
            for (int i = 0; i < 4; ++i) rows[i] = reinterpret_cast<const uint16_t*>(G + (j + i) * ld + bl.col);
            dots_bf16_rows<4>(rows, hi, mid, lo, len, px + j, pk + j);
          }
          for (; j < nr; ++j) {
            rows[0] = reinterpret_cast<const uint16_t*>(G + j * ld + bl.col);
            dots_bf16_rows<1>(rows, hi, mid, lo, len, px + j, pk + j);
          }
          continue;
        }
      }
#endif
      for (int64_t k = 0; k < len; ++k) {
        const float g = has_wd ? gr[k] + wd * pr[k] : gr[k];
        gb[k] = g;
        const T s = from_float<T>(g);
        gs[k] = s;
        if (TWO) kb[k] = to_float(s);
      }
      const T* rows[4];
      int64_t j = 0;
      for (; j + 4 <= nr; j += 4) {
        for (int i = 0; i < 4; ++i) rows[i] = G + (j + i) * ld + bl.col;
        dots_rows<T, TWO, 4>(rows, gb, kb, len, px + j, pk + j);
      }
      for (; j < nr; ++j) {
        rows[0] = G + j * ld + bl.col;
        dots_rows<T, TWO, 1>(rows, gb, kb, len, px + j, pk + j);
      }
    }
  }
  double* dx = reinterpret_cast<double*>(a.dots_x);
  double* dk = TWO ? reinterpret_cast<double*>(a.dots_k) : nullptr;
  for (int64_t j = 0; j < a.rows; ++j) {
    dx[j] = 0.0;
    if (TWO) dk[j] = 0.0;
  }
  for (int64_t b = 0; b < nb; ++b) {
    const double* px = part.data() + b * per;
    for (int64_t j = 0; j < nr; ++j) {
      dx[j] += px[j];
      if (TWO) dk[j] += px[nr + j];
    }
  }
}

template <typename T, bool MOM>
void update_body(const MfacArgs& a) {
  const T* G = reinterpret_cast<const T*>(a.window);
  const int64_t nr = a.nrows, ld = a.ld;
  const float* coef = reinterpret_cast<const float*>(a.coef);
  const float wd = static_cast<float>(a.wd_l2);
  const bool has_wd = a.wd_l2 != 0.0;
  const float damp = static_cast<float>(a.damp);
  const float mom = static_cast<float>(a.momentum_coef), one_minus = static_cast<float>(1.0 - a.momentum_coef);
  const float keep = static_cast<float>(1.0 - a.wd_decoupled), lr = static_cast<float>(a.lr);
#ifdef FASTOPT_MFAC_AVX512
  const bool avx512 = use_avx512_bf16();
  const bool wide = avx512 && std::is_same_v<T, bf16_t>;
#else
  const bool wide = false;
#endif
  const int64_t block = wide ? kBlockWide : kBlock;
  const std::vector<Blk> blocks = make_blocks(a, block);
  const int nthreads = threads_for(a, blocks.size());
  const int64_t nb = static_cast<int64_t>(blocks.size());
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<float> accv(block);
    float* acc = accv.data();
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < nb; ++b) {
      const Blk& bl = blocks[b];
      const int64_t len = bl.len;
#ifdef FASTOPT_MFAC_AVX512
      if (wide) {
        if constexpr (std::is_same_v<T, bf16_t>) axpy_block_bf16(G, ld, bl.col, nr, coef, acc, len);
      } else if (avx512) {
        for (int64_t k = 0; k < len; ++k) acc[k] = 0.0f;
        axpy_block_avx512<T>(G, ld, bl.col, nr, coef, acc, len);
      } else
#endif
      {
        for (int64_t k = 0; k < len; ++k) acc[k] = 0.0f;
        const T* rows[4];
        int64_t j = 0;
        for (; j + 4 <= nr; j += 4) {
          for (int i = 0; i < 4; ++i) rows[i] = G + (j + i) * ld + bl.col;
          axpy_rows<T, 4>(rows, coef + j, acc, len);
        }
        for (; j < nr; ++j) {
          rows[0] = G + j * ld + bl.col;
          axpy_rows<T, 1>(rows, coef + j, acc, len);
        }
      }
      const float* __restrict__ gr = reinterpret_cast<const float*>(a.grads[bl.t]) + bl.start;
      float* __restrict__ pr = reinterpret_cast<float*>(a.params[bl.t]) + bl.start;
      float* __restrict__ vr = MOM ? reinterpret_cast<float*>(a.momentum[bl.t]) + bl.start : nullptr;
#pragma omp simd
      for (int64_t k = 0; k < len; ++k) {
        const float p = pr[k];
        const float g = has_wd ? gr[k] + wd * p : gr[k];
        float u = g / damp - acc[k];
        if (MOM) {
          u = mom * vr[k] + one_minus * u;
          vr[k] = u;
        }
        pr[k] = p * keep - lr * u;
      }
    }
  }
}

}  // namespace

void mfac_dots_run(const MfacArgs& a) {
  const bool two = a.dots_k != 0;
  if (a.gdtype == kBFloat16) {
    if (two) dots_body<bf16_t, true>(a); else dots_body<bf16_t, false>(a);
  } else {
    if (two) dots_body<float, true>(a); else dots_body<float, false>(a);
  }
}

void mfac_update_run(const MfacArgs& a) {
  const bool mom = !a.momentum.empty();
  if (a.gdtype == kBFloat16) {
    if (mom) update_body<bf16_t, true>(a); else update_body<bf16_t, false>(a);
  } else {
    if (mom) update_body<float, true>(a); else update_body<float, false>(a);
  }
}

}  // namespace fastopt::cpu::FASTOPT_CPU_NS
