// Dense M-FAC's two passes over the gradient window (csrc/cpu/mfac.h), compiled once per ISA (isa.h).
//
// The window G (rows x ld, fp32 or bf16) holds the params' gradients side by side.  Both passes walk
// the columns in blocks of kBlock spread over OpenMP threads (statically, so every run adds the same
// partial sums in the same order); a block reads rows [0, nrows) of its columns once.
//   pass 1 (mfac_dots_run): the block's g = grad (+ wd_l2 p) is written to row `slot` and kept in fp32
//     (and, for a bf16 window, its stored value back in fp32); then one walk over the rows gives the
//     block's dot products with both, in fp32 (a vectorized `omp simd` reduction), added to per-thread
//     fp64 sums that are reduced in thread order at the end.
//   pass 2 (mfac_update_run): acc = sum_j coef[j] G_j over the block's columns (acc in L1), then per
//     column u = g / damp - acc, the momentum, the decay and the parameter update in one go.
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "kernel.h"
#include "mfac.h"

namespace fastopt::cpu::FASTOPT_CPU_NS {
namespace {

constexpr int64_t kBlock = 2048;
// Below this many window elements one thread runs the pass.
constexpr int64_t kParallelWork = 1 << 18;

struct Blk {
  int64_t t, start, len, col;  // tensor, first element in it, length, first column in the window
};

std::vector<Blk> make_blocks(const MfacArgs& a) {
  std::vector<Blk> out;
  int64_t col = 0;
  for (size_t t = 0; t < a.numels.size(); ++t) {
    for (int64_t s = 0; s < a.numels[t]; s += kBlock)
      out.push_back({static_cast<int64_t>(t), s, std::min(kBlock, a.numels[t] - s), col + s});
    col += a.numels[t];
  }
  return out;
}

int threads_for(const MfacArgs& a, size_t nblocks) {
  if (a.nrows * a.ld < kParallelWork) return 1;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(omp_get_max_threads(), nblocks)));
}

template <typename T, bool TWO>
void dots_body(const MfacArgs& a) {
  T* G = reinterpret_cast<T*>(a.window);
  const int64_t nr = a.nrows, ld = a.ld;
  const float wd = static_cast<float>(a.wd_l2);
  const bool has_wd = a.wd_l2 != 0.0;
  const std::vector<Blk> blocks = make_blocks(a);
  const int nthreads = threads_for(a, blocks.size());
  const int64_t per = TWO ? 2 * nr : nr;
  std::vector<double> part(static_cast<size_t>(nthreads) * per, 0.0);
  const int64_t nb = static_cast<int64_t>(blocks.size());
#pragma omp parallel num_threads(nthreads)
  {
    double* px = part.data() + static_cast<int64_t>(omp_get_thread_num()) * per;
    double* pk = px + (TWO ? nr : 0);
    alignas(64) float gb[kBlock];
    alignas(64) float kb[kBlock];
#pragma omp for schedule(static)
    for (int64_t b = 0; b < nb; ++b) {
      const Blk& bl = blocks[b];
      const float* __restrict__ gr = reinterpret_cast<const float*>(a.grads[bl.t]) + bl.start;
      const float* __restrict__ pr = reinterpret_cast<const float*>(a.params[bl.t]) + bl.start;
      T* __restrict__ gs = G + a.slot * ld + bl.col;
      const int64_t len = bl.len;
      for (int64_t k = 0; k < len; ++k) {
        const float g = has_wd ? gr[k] + wd * pr[k] : gr[k];
        gb[k] = g;
        const T s = from_float<T>(g);
        gs[k] = s;
        if (TWO) kb[k] = to_float(s);
      }
      for (int64_t j = 0; j < nr; ++j) {
        const T* __restrict__ row = G + j * ld + bl.col;
        float ax = 0.0f, ak = 0.0f;
        if (TWO) {
#pragma omp simd reduction(+ : ax, ak)
          for (int64_t k = 0; k < len; ++k) {
            const float x = to_float(row[k]);
            ax += x * gb[k];
            ak += x * kb[k];
          }
          pk[j] += ak;
        } else {
#pragma omp simd reduction(+ : ax)
          for (int64_t k = 0; k < len; ++k) ax += to_float(row[k]) * gb[k];
        }
        px[j] += ax;
      }
    }
  }
  double* dx = reinterpret_cast<double*>(a.dots_x);
  double* dk = TWO ? reinterpret_cast<double*>(a.dots_k) : nullptr;
  for (int64_t j = 0; j < a.rows; ++j) {
    dx[j] = 0.0;
    if (TWO) dk[j] = 0.0;
  }
  for (int t = 0; t < nthreads; ++t) {
    const double* px = part.data() + static_cast<int64_t>(t) * per;
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
  const std::vector<Blk> blocks = make_blocks(a);
  const int nthreads = threads_for(a, blocks.size());
  const int64_t nb = static_cast<int64_t>(blocks.size());
#pragma omp parallel num_threads(nthreads)
  {
    alignas(64) float acc[kBlock];
#pragma omp for schedule(static)
    for (int64_t b = 0; b < nb; ++b) {
      const Blk& bl = blocks[b];
      const int64_t len = bl.len;
      for (int64_t k = 0; k < len; ++k) acc[k] = 0.0f;
      for (int64_t j = 0; j < nr; ++j) {
        const float c = coef[j];
        const T* __restrict__ row = G + j * ld + bl.col;
#pragma omp simd
        for (int64_t k = 0; k < len; ++k) acc[k] += c * to_float(row[k]);
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
