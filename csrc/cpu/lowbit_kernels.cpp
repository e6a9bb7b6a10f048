// The low-bit-state CPU kernels (fastopt/quant.h), compiled once per ISA (see isa.h): the fused
// dequantize -> Op::update in fp32 -> requantize step of every op in fastopt/ops.h, and the plain
// blockwise codec.  Work is split in whole blocks; one block's states live in fp32 on the stack.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "fastopt/api.h"
#include "fastopt/dispatch.h"
#include "fastopt/elementwise.h"
#include "fastopt/multi_tensor_cpu.h"
#include "fastopt/ops.h"
#include "fastopt/quant.h"

#ifndef FASTOPT_CPU_NS
#error "compile with -DFASTOPT_CPU_NS=<isa namespace>"
#endif

namespace fastopt {
namespace cpu {
namespace FASTOPT_CPU_NS {
namespace {

template <typename T>
T* addr(int64_t a) { return reinterpret_cast<T*>(static_cast<intptr_t>(a)); }

// Dequantize `len` values of one block (codes start at the block's first element).
inline void dequantize_block(const CodebookView& b, const uint8_t* codes, float absmax, int64_t len, float* out) {
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
inline float quantize_block(const CodebookView& b, const float* x, int64_t len, uint8_t* codes) {
  float amax = 0.0f;
#pragma omp simd reduction(max : amax)
  for (int64_t j = 0; j < len; ++j) amax = std::max(amax, std::fabs(x[j]));
  const float inv = quant_inv_scale(amax);
  alignas(64) int32_t rank[kMaxQuantBlock];
#pragma GCC ivdep
  for (int64_t j = 0; j < len; ++j) rank[j] = quantize_rank(b, quant_normalize(x[j], inv));
  if (!b.identity) {
    const int32_t* __restrict__ rc = b.rank_code;
#pragma GCC ivdep
    for (int64_t j = 0; j < len; ++j) rank[j] = rc[rank[j]];
  }
  if (b.nc == 16) {
    for (int64_t j = 0; j < len / 2; ++j) codes[j] = static_cast<uint8_t>(rank[2 * j] | (rank[2 * j + 1] << 4));
  } else {
    for (int64_t j = 0; j < len; ++j) codes[j] = static_cast<uint8_t>(rank[j]);
  }
  return amax;
}

template <typename Op, typename T>
void run_lowbit(const LowbitArgs& la, const ElementwiseArgs& a, double lr, float grad_mul, const double* steps) {
  const TensorLists& l = a.lists;
  const int64_t block = la.block;
  const int64_t n = l.n;
  CodebookView books[kMaxStates];
  bool quant[kMaxStates] = {false, false, false, false};
  for (int k = 0; k < Op::kStates; ++k) {
    quant[k] = la.books[k] != 0;
    if (quant[k]) books[k] = codebook_view(addr<const int32_t>(la.books[k]));
  }
  std::vector<typename Op::Coeffs> coeffs(n);
  for (int64_t t = 0; t < n; ++t) coeffs[t] = Op::coeffs(OpScalars{a.hyper.data(), a.flags, lr, steps[t]});
  std::vector<int64_t> nblocks(n);
  for (int64_t t = 0; t < n; ++t) nblocks[t] = l.numels[t] / block;
  const float no_row[kMaxRowCoefs] = {0.0f, 0.0f, 0.0f, 0.0f};

  multi_tensor_apply(nblocks.data(), n, [&](int64_t t, int64_t b0, int64_t nb) {
    T* p = l.get<T>(0, t);
    const T* g = l.get<T>(1, t);
    const uint32_t key = sr_key(static_cast<uint32_t>(a.seed), static_cast<uint32_t>(t), static_cast<uint32_t>(steps[t]));
    alignas(64) float st[kMaxStates][kMaxQuantBlock];
    for (int64_t blk = b0; blk < b0 + nb; ++blk) {
      const int64_t base = blk * block;
      for (int k = 0; k < Op::kStates; ++k) {
        if (quant[k]) {
          const int64_t byte0 = books[k].nc == 16 ? base / 2 : base;
          dequantize_block(books[k], l.get<uint8_t>(2 + k, t) + byte0, addr<float>(la.absmax[k * n + t])[blk], block,
                           st[k]);
        } else {
          const T* s = l.get<T>(2 + k, t) + base;
          for (int64_t j = 0; j < block; ++j) st[k][j] = to_float(s[j]);
        }
      }
#pragma GCC ivdep
      for (int64_t j = 0; j < block; ++j) {
        float s[kMaxStates] = {0.0f, 0.0f, 0.0f, 0.0f};
        if (Op::kStates > 0) s[0] = st[0][j];
        if (Op::kStates > 1) s[1] = st[1][j];
        if (Op::kStates > 2) s[2] = st[2][j];
        if (Op::kStates > 3) s[3] = st[3][j];
        float pf = to_float(p[base + j]);
        Op::update(pf, to_float(g[base + j]) * grad_mul, s, coeffs[t], no_row);
        p[base + j] = store_param<T>(pf, a.stochastic, key, static_cast<uint32_t>(base + j));
        if (Op::kStates > 0) st[0][j] = s[0];
        if (Op::kStates > 1) st[1][j] = s[1];
        if (Op::kStates > 2) st[2][j] = s[2];
        if (Op::kStates > 3) st[3][j] = s[3];
      }
      for (int k = 0; k < Op::kStates; ++k) {
        if (quant[k]) {
          const int64_t byte0 = books[k].nc == 16 ? base / 2 : base;
          addr<float>(la.absmax[k * n + t])[blk] = quantize_block(books[k], st[k], block, l.get<uint8_t>(2 + k, t) + byte0);
        } else {
          T* s = l.get<T>(2 + k, t) + base;
          for (int64_t j = 0; j < block; ++j) s[j] = from_float<T>(st[k][j]);
        }
      }
    }
  });
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
  const int64_t nblocks = numel / block;
  multi_tensor_apply(&nblocks, 1, [&](int64_t, int64_t b0, int64_t nb) {
    for (int64_t blk = b0; blk < b0 + nb; ++blk) {
      const int64_t base = blk * block;
      uint8_t* c = codes + (b.nc == 16 ? base / 2 : base);
      if (dequantize) {
        dequantize_block(b, c, absmax[blk], block, x + base);
      } else {
        absmax[blk] = quantize_block(b, x + base, block, c);
      }
    }
  });
}

}  // namespace FASTOPT_CPU_NS
}  // namespace cpu
}  // namespace fastopt
