// The low-bit-state CPU kernels (fastopt/quant.h), compiled once per ISA (see isa.h): the fused
// dequantize -> Op::update in fp32 -> requantize step of every op in fastopt/ops.h, and the plain
// blockwise codec.  Work is split in whole blocks; one block's states live in fp32 on the stack.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include <omp.h>

#include "fastopt/elementwise.h"
#include "fastopt/ops.h"
#include "fastopt/quant.h"
#include "kernel.h"
#include "quant_cpu.h"

namespace fastopt::cpu::FASTOPT_CPU_NS {
namespace {

// Dequantize `len` values of one block (codes start at the block's first element).
// (Not inlined: compiled once, vectorized, whatever the caller; inlined into the ~60 op kernels
// GCC vectorized some copies and left others scalar with branches.)
// (The table path: the baseline copy's, the reference of quant_cpu.h's vector codecs.)
__attribute__((noinline)) void dequantize_block_table(const CodebookView& b, const uint8_t* codes, float absmax, int64_t len,
                                                      float* out) {
  const float* __restrict__ values = b.values;
  if (b.nc == 16) {
    alignas(64) uint8_t idx[kMaxQuantBlock];
    for (int64_t j = 0; j < len / 2; ++j) {
      idx[2 * j] = codes[j] & 0xF;
      idx[2 * j + 1] = codes[j] >> 4;
    }
#pragma GCC ivdep
    for (int64_t j = 0; j < len; ++j) out[j] = values[idx[j]] * absmax;
  } else {
#pragma GCC ivdep
    for (int64_t j = 0; j < len; ++j) out[j] = values[codes[j]] * absmax;
  }
}

// Quantize `len` (<= kMaxQuantBlock) values of one block: writes the codes and returns the block's
// absmax.  The loops are branch-free so that they vectorize (table reads become gathers).
// A block holding a NaN or an infinity is poisoned (quant.h): absmax NaN, every code the code of 0.
__attribute__((noinline, unused)) float quantize_block_table(const CodebookView& b, const float* x, int64_t len, uint8_t* codes) {
  float amax = 0.0f;
  uint32_t bad = 0;
#pragma omp simd reduction(max : amax) reduction(| : bad)
  for (int64_t j = 0; j < len; ++j) {
    amax = std::max(amax, std::fabs(x[j]));
    bad |= quant_finite(x[j]) ? 0u : 1u;
  }
  if (bad != 0) {
    const uint32_t zero = static_cast<uint32_t>(quantize_code(b, 0.0f));
    std::fill(codes, codes + (b.nc == 16 ? len / 2 : len), static_cast<uint8_t>(b.nc == 16 ? zero | (zero << 4) : zero));
    return quant_poison();
  }
  const float inv = quant_inv_scale(amax);
  // Three loops: bucket indices (vector), table reads, then the midpoint test and code choice
  // (vector).  GCC's default tuning leaves the table reads to scalar loads, which measured faster for
  // the 8-bit AdamW step than forcing AVX2 gathers (-mtune-ctrl=use_gather...).
  alignas(64) int32_t rank[kMaxQuantBlock];
  alignas(64) uint32_t bits[kMaxQuantBlock];
  alignas(64) uint32_t entry[kMaxQuantBlock];
#pragma GCC ivdep
  for (int64_t j = 0; j < len; ++j) {
    bits[j] = float_bits(quant_normalize(x[j], inv));
    rank[j] = quant_bucket(b, bits[j]);
  }
  const uint32_t* __restrict__ packed = b.packed;
  for (int64_t j = 0; j < len; ++j) entry[j] = packed[rank[j]];
  // Nearest code, then the unsigned formats' rule (a positive value never takes the code of 0).
  const int zero_code = b.zero_code, floor_code = b.floor_code;
#pragma GCC ivdep
  for (int64_t j = 0; j < len; ++j) rank[j] = quant_floor(zero_code, floor_code, bits[j], quant_pick(bits[j], entry[j]));
  if (b.nc == 16) {
    for (int64_t j = 0; j < len / 2; ++j) codes[j] = static_cast<uint8_t>(rank[2 * j] | (rank[2 * j + 1] << 4));
  } else {
    for (int64_t j = 0; j < len; ++j) codes[j] = static_cast<uint8_t>(rank[j]);
  }
  return amax;
}

// The codecs the kernels use: quant_cpu.h's vector ones where this copy has AVX2 (same codes and values,
// tests/test_lowbit_codec_cpu.py), with their AVX-512 versions where the CPU has AVX-512 (isa.h
// use_avx512_codecs); else the table path.  8-bit codes decode by byte permutes where the CPU has
// AVX-512 VBMI, else by GCC's scalar table reads, which measured faster than AVX2 and AVX-512 gathers
// (Zen 4, ns per value: 0.13 byte permutes, 0.23 scalar reads, 0.37 a 16-lane gather).
#if FASTOPT_QUANT_VEC
using EncBook = FastBook;  // the codecs' tables, built once per call
#else
struct EncBook {
  EncBook() = default;
  explicit EncBook(const CodebookView&) {}
};
#endif

// `fb`: the codebook's EncBook, or null (4-bit rank-1 states).
inline void dequantize_block(const CodebookView& b, const EncBook* fb, const uint8_t* codes, float absmax, int64_t len,
                             float* out) {
#if FASTOPT_QUANT_VEC
  if (b.nc == 16) {
    if (cpu_has_avx512()) return dequantize_block_512(b, codes, absmax, len, out);
    return dequantize_block_vec(b, codes, absmax, len, out);
  }
  if (fb != nullptr && fb->vbmi) {
    const int64_t len64 = len & ~int64_t{63};
    dequantize8_vbmi(*fb, codes, absmax, len64, out);
    if (len64 == len) return;
    return dequantize_block_table(b, codes + len64, absmax, len - len64, out + len64);
  }
#endif
  dequantize_block_table(b, codes, absmax, len, out);
}

inline float quantize_block(const CodebookView& b, const EncBook& fb, const float* x, int64_t len, uint8_t* codes) {
#if FASTOPT_QUANT_VEC
  return fb.avx512 ? quantize_block_512(b, fb, x, len, codes) : quantize_block_vec(b, fb, x, len, codes);
#else
  return quantize_block_table(b, x, len, codes);
#endif
}

// Rank-1 scales of elements [base, base + len) of a [rows, cols] tensor: min(row max, column max),
// NaN where either maximum is NaN (a poisoned row or column, quant.h).
inline void rank1_scales(const float* row, const float* col, int64_t cols, int64_t base, int64_t len, float* out) {
  for (int64_t j = 0; j < len; ++j) {
    const int64_t idx = base + j;
    const float r = row[idx / cols], c = col[idx % cols];
    out[j] = (r != r || c != c) ? quant_poison() : std::min(r, c);
  }
}

// max(m, |v|) for the rank-1 maxima, where a NaN or infinite value (or a NaN m) gives NaN: poisoned.
inline float rank1_max(float m, float v) {
  const float a = std::fabs(v);
  return (m != m || !quant_finite(a)) ? quant_poison() : (a > m ? a : m);
}

__attribute__((noinline)) void dequantize_rank1(const CodebookView& b, const uint8_t* codes, const float* scale,
                                                int64_t len, float* out) {
  dequantize_block(b, nullptr, codes, 1.0f, len, out);
  for (int64_t j = 0; j < len; ++j) out[j] *= scale[j];
}

__attribute__((noinline)) void quantize_rank1(const CodebookView& b, const float* x, const float* scale, int64_t len,
                                              uint8_t* codes) {
  alignas(64) int32_t code[kMaxQuantBlock];
  // A NaN scale (poisoned row or column): the code of 0.  A finite scale bounds |x|, so x is finite.
  for (int64_t j = 0; j < len; ++j) {
    code[j] = quantize_code(b, quant_finite(scale[j]) ? quant_normalize(x[j], quant_inv_scale(scale[j])) : 0.0f);
  }
  for (int64_t j = 0; j < len / 2; ++j) codes[j] = static_cast<uint8_t>(code[2 * j] | (code[2 * j + 1] << 4));
}

// Op::update over one block whose states were dequantized into s0..s3 (fp32, updated in place).
template <typename Op, typename T, bool STOCHASTIC>
void update_block(T* __restrict__ p, const T* __restrict__ g, float* __restrict__ s0, float* __restrict__ s1,
                  float* __restrict__ s2, float* __restrict__ s3, int64_t len, float grad_mul,
                  const typename Op::Coeffs c, uint32_t key, uint32_t first) {
  const float no_row[kMaxRowCoefs] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma GCC ivdep
  for (int64_t j = 0; j < len; ++j) {
    float s[kMaxStates] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (Op::kStates > 0) s[0] = s0[j];
    if (Op::kStates > 1) s[1] = s1[j];
    if (Op::kStates > 2) s[2] = s2[j];
    if (Op::kStates > 3) s[3] = s3[j];
    float pf = to_float(p[j]);
    Op::update(pf, to_float(g[j]) * grad_mul, s, c, no_row);
    p[j] = store_param<T>(pf, STOCHASTIC, key, first + static_cast<uint32_t>(j));
    if (Op::kStates > 0) s0[j] = s[0];
    if (Op::kStates > 1) s1[j] = s[1];
    if (Op::kStates > 2) s2[j] = s[2];
    if (Op::kStates > 3) s3[j] = s[3];
  }
}

template <typename Op, typename T>
void run_lowbit(const LowbitArgs& la, const ElementwiseArgs& a, double lr, float grad_mul, const double* steps) {
  const TensorLists& l = a.lists;
  const int64_t block = la.block;
  const int64_t n = l.n;
  CodebookView books[kMaxStates];
  EncBook enc[kMaxStates];
  bool quant[kMaxStates] = {false, false, false, false};
  for (int k = 0; k < Op::kStates; ++k) {
    quant[k] = la.books[k] != 0;
    if (quant[k]) books[k] = codebook_view(as_ptr<const int32_t>(la.books[k]));
    if (quant[k]) enc[k] = EncBook(books[k]);
  }
  std::vector<typename Op::Coeffs> coeffs(n);
  for (int64_t t = 0; t < n; ++t) coeffs[t] = Op::coeffs(OpScalars{a.hyper.data(), a.flags, lr, steps[t]});
  std::vector<int64_t> nblocks(n);
  for (int64_t t = 0; t < n; ++t) nblocks[t] = l.numels[t] / block;

  // Rank-1 states: pass 1 recomputes every step's new states (writing nothing) to find the new row
  // and column maxima; the step (pass 2) then quantizes with them.  Old maxima dequantize.
  auto r1 = [&](int k, int64_t t) { return !la.colmax.empty() && la.colmax[k * n + t] != 0; };
  bool any_r1 = false;
  std::vector<int64_t> r1_off(kMaxStates * n + 1, 0);  // offsets into the new-maxima buffer
  for (int k = 0; k < kMaxStates; ++k) {
    for (int64_t t = 0; t < n; ++t) {
      const int64_t i = k * n + t;
      int64_t len = 0;
      if (k < Op::kStates && r1(k, t)) {
        any_r1 = true;
        len = la.rank1_rows[t] + l.numels[t] / la.rank1_rows[t];
      }
      r1_off[i + 1] = r1_off[i] + len;
    }
  }
  std::vector<float> fresh(r1_off.back(), 0.0f);  // new [row maxima, column maxima] per rank-1 state
  if (any_r1) {
    // One accumulator per thread the team can have (multi_tensor_apply's team never exceeds
    // omp_get_max_threads(); with OMP_DYNAMIC it may be smaller -- unused accumulators stay 0).
    const int nthreads = omp_get_max_threads();
    std::vector<float> local(static_cast<size_t>(nthreads) * fresh.size(), 0.0f);
    multi_tensor_apply(nblocks.data(), n, [&](int64_t t, int64_t b0, int64_t nb) {
      bool here = false;
      for (int k = 0; k < Op::kStates; ++k) here = here || r1(k, t);
      if (!here) return;
      float* acc = local.data() + static_cast<size_t>(omp_get_thread_num()) * fresh.size();
      const T* p = l.get<T>(0, t);
      const T* g = l.get<T>(1, t);
      const int64_t rows = la.rank1_rows[t], cols = l.numels[t] / rows;
      alignas(64) float st[kMaxStates][kMaxQuantBlock];
      alignas(64) float scale[kMaxQuantBlock];
      const float no_row[kMaxRowCoefs] = {0.0f, 0.0f, 0.0f, 0.0f};
      for (int64_t blk = b0; blk < b0 + nb; ++blk) {
        const int64_t base = blk * block;
        for (int k = 0; k < Op::kStates; ++k) {
          const uint8_t* codes = quant[k] ? l.get<uint8_t>(2 + k, t) + (books[k].nc == 16 ? base / 2 : base) : nullptr;
          if (r1(k, t)) {
            rank1_scales(as_ptr<float>(la.absmax[k * n + t]), as_ptr<float>(la.colmax[k * n + t]), cols, base, block, scale);
            dequantize_rank1(books[k], codes, scale, block, st[k]);
          } else if (quant[k]) {
            dequantize_block(books[k], &enc[k], codes, as_ptr<float>(la.absmax[k * n + t])[blk], block, st[k]);
          } else {
            const T* s = l.get<T>(2 + k, t) + base;
            for (int64_t j = 0; j < block; ++j) st[k][j] = to_float(s[j]);
          }
        }
        for (int64_t j = 0; j < block; ++j) {
          float s[kMaxStates] = {0.0f, 0.0f, 0.0f, 0.0f};
          for (int k = 0; k < Op::kStates; ++k) s[k] = st[k][j];
          float pf = to_float(p[base + j]);
          Op::update(pf, to_float(g[base + j]) * grad_mul, s, coeffs[t], no_row);
          for (int k = 0; k < Op::kStates; ++k) st[k][j] = s[k];
        }
        for (int k = 0; k < Op::kStates; ++k) {
          if (!r1(k, t)) continue;
          float* rmax = acc + r1_off[k * n + t];
          float* cmax = rmax + rows;
          for (int64_t j = 0; j < block; ++j) {
            const int64_t idx = base + j;
            rmax[idx / cols] = rank1_max(rmax[idx / cols], st[k][j]);
            cmax[idx % cols] = rank1_max(cmax[idx % cols], st[k][j]);
          }
        }
      }
    }, block);
    // Maxima are exact whatever the order; rank1_max makes NaN (a poisoned row or column) win.
    for (int th = 0; th < nthreads; ++th) {
      const float* acc = local.data() + static_cast<size_t>(th) * fresh.size();
      for (size_t i = 0; i < fresh.size(); ++i) fresh[i] = rank1_max(fresh[i], acc[i]);
    }
  }

  multi_tensor_apply(nblocks.data(), n, [&](int64_t t, int64_t b0, int64_t nb) {
    T* p = l.get<T>(0, t);
    const T* g = l.get<T>(1, t);
    const uint32_t key = sr_key(static_cast<uint32_t>(a.seed), static_cast<uint32_t>(t), static_cast<uint32_t>(steps[t]));
    const uint32_t sr_offset = sr_offset_of(a, t);  // element base + j rounds as sr_offset + base + j
    alignas(64) float st[kMaxStates][kMaxQuantBlock];
    alignas(64) float scale[kMaxQuantBlock];
    const int64_t rows = any_r1 ? la.rank1_rows[t] : 1, cols = l.numels[t] / std::max<int64_t>(rows, 1);
    for (int64_t blk = b0; blk < b0 + nb; ++blk) {
      const int64_t base = blk * block;
      for (int k = 0; k < Op::kStates; ++k) {
        if (r1(k, t)) {
          rank1_scales(as_ptr<float>(la.absmax[k * n + t]), as_ptr<float>(la.colmax[k * n + t]), cols, base, block, scale);
          dequantize_rank1(books[k], l.get<uint8_t>(2 + k, t) + base / 2, scale, block, st[k]);
        } else if (quant[k]) {
          const int64_t byte0 = books[k].nc == 16 ? base / 2 : base;
          dequantize_block(books[k], &enc[k], l.get<uint8_t>(2 + k, t) + byte0, as_ptr<float>(la.absmax[k * n + t])[blk],
                           block, st[k]);
        } else {
          const T* s = l.get<T>(2 + k, t) + base;
          for (int64_t j = 0; j < block; ++j) st[k][j] = to_float(s[j]);
        }
      }
      if (a.stochastic) {
        update_block<Op, T, true>(p + base, g + base, st[0], st[1], st[2], st[3], block, grad_mul, coeffs[t], key,
                                  sr_offset + static_cast<uint32_t>(base));
      } else {
        update_block<Op, T, false>(p + base, g + base, st[0], st[1], st[2], st[3], block, grad_mul, coeffs[t], key,
                                   sr_offset + static_cast<uint32_t>(base));
      }
      for (int k = 0; k < Op::kStates; ++k) {
        if (r1(k, t)) {
          const float* rmax = fresh.data() + r1_off[k * n + t];
          rank1_scales(rmax, rmax + rows, cols, base, block, scale);
          quantize_rank1(books[k], st[k], scale, block, l.get<uint8_t>(2 + k, t) + base / 2);
        } else if (quant[k]) {
          const int64_t byte0 = books[k].nc == 16 ? base / 2 : base;
          as_ptr<float>(la.absmax[k * n + t])[blk] = quantize_block(books[k], enc[k], st[k], block, l.get<uint8_t>(2 + k, t) + byte0);
        } else {
          T* s = l.get<T>(2 + k, t) + base;
          for (int64_t j = 0; j < block; ++j) s[j] = from_float<T>(st[k][j]);
        }
      }
    }
  }, block);
  for (int k = 0; k < Op::kStates; ++k) {
    for (int64_t t = 0; t < n; ++t) {
      if (!r1(k, t)) continue;
      const float* rmax = fresh.data() + r1_off[k * n + t];
      const int64_t rows = la.rank1_rows[t], cols = l.numels[t] / rows;
      std::copy(rmax, rmax + rows, as_ptr<float>(la.absmax[k * n + t]));
      std::copy(rmax + rows, rmax + rows + cols, as_ptr<float>(la.colmax[k * n + t]));
    }
  }
}

}  // namespace

// Returns false when the op is not registered.
bool lowbit_run(const LowbitArgs& la, const ElementwiseArgs& a, double lr, float grad_mul, const double* steps) {
  bool found = false;
#define FASTOPT_LOWBIT_CASE(NAME, TYPE)                                                      \
  if (!found && a.op == NAME) {                                                              \
    found = true;                                                                            \
    FASTOPT_DTYPE_SWITCH(a.lists.dtype, [&] { run_lowbit<TYPE, scalar_t>(la, a, lr, grad_mul, steps); }); \
  }
  FASTOPT_FOR_EACH_OP(FASTOPT_LOWBIT_CASE)
#undef FASTOPT_LOWBIT_CASE
  return found;
}

void codec_run(float* x, uint8_t* codes, float* absmax, int64_t numel, int64_t block, const int32_t* book,
               bool dequantize) {
  const CodebookView b = codebook_view(book);
  const EncBook fb(b);
  const int64_t nblocks = numel / block;
  multi_tensor_apply(&nblocks, 1, [&](int64_t, int64_t b0, int64_t nb) {
    for (int64_t blk = b0; blk < b0 + nb; ++blk) {
      const int64_t base = blk * block;
      uint8_t* c = codes + (b.nc == 16 ? base / 2 : base);
      if (dequantize) {
        dequantize_block(b, &fb, c, absmax[blk], block, x + base);
      } else {
        absmax[blk] = quantize_block(b, fb, x + base, block, c);
      }
    }
  }, block);
}

}  // namespace fastopt::cpu::FASTOPT_CPU_NS
