// The entropic-OT passes on the CPU (fastopt/api.h OtArgs), compiled once per ISA (see isa.h).
//
// Rows i of every batch entry are spread over OpenMP threads; each row walks the columns j in blocks
// of kBlock: the costs of the block (from points: y is given transposed, fp32 [B, d, m], so the
// loop over j vectorizes; or a row of the dense cost), then the block's maximum, then the sum of
// exp(value - running max) with the running sum rescaled when the maximum grows (the online
// log-sum-exp of flash attention).  exp is exp_nonpositive (fastopt/elementwise.h), which
// vectorizes; arguments below -87 count as 0, so -inf entries (no mass) add nothing.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "fastopt/api.h"
#include "fastopt/dispatch.h"
#include "fastopt/elementwise.h"

#ifndef FASTOPT_CPU_NS
#error "compile with -DFASTOPT_CPU_NS=<isa namespace>"
#endif

namespace fastopt {
namespace cpu {
namespace FASTOPT_CPU_NS {
namespace {

constexpr int64_t kBlock = 256;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int kMaxD = 16;
// Below this many (i, j) pairs one thread runs the pass: waking a team costs more than the work
// (and a spinning team on a busy machine costs far more).
constexpr int64_t kParallelWork = 1 << 16;  // gradient accumulators on the stack; larger d uses the generic path

inline float exp_or_zero(float v) {  // v <= 0
  const float e = exp_nonpositive(v);
  return v < -87.0f ? 0.0f : e;
}

// The block's values s[j] = h[j] - C_ij / eps for the points x_i (fp32, d) and y^T (fp32 [d, m]).
inline void point_block(const float* __restrict__ xi, const float* __restrict__ yT, const float* __restrict__ h,
                        int64_t m, int64_t d, int64_t j0, int64_t len, int cost, float inv_eps,
                        float* __restrict__ s) {
  for (int64_t j = 0; j < len; ++j) s[j] = 0.0f;
  for (int64_t k = 0; k < d; ++k) {
    const float xk = xi[k];
    const float* __restrict__ yk = yT + k * m + j0;
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) {
      const float t = xk - yk[j];
      s[j] += t * t;
    }
  }
  if (cost == 1) {
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) s[j] = std::sqrt(s[j]);
  }
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) s[j] = h[j0 + j] - s[j] * inv_eps;
}

// point_block + block_max in one pass for small d known at compile time (the common d = 1..4): the
// costs stay in registers.
template <int D, int COST>
inline float point_block_small(const float* __restrict__ xi, const float* __restrict__ yT,
                               const float* __restrict__ h, int64_t m, int64_t j0, int64_t len, float inv_eps,
                               float* __restrict__ s) {
  float xk[D];
  for (int k = 0; k < D; ++k) xk[k] = xi[k];
  float mx = kNegInf;
#pragma omp simd reduction(max : mx)
  for (int64_t j = 0; j < len; ++j) {
    float c = 0.0f;
    for (int k = 0; k < D; ++k) {
      const float t = xk[k] - yT[k * m + j0 + j];
      c += t * t;
    }
    if (COST == 1) c = std::sqrt(c);
    const float v = h[j0 + j] - c * inv_eps;
    s[j] = v;
    mx = std::max(mx, v);
  }
  return mx;
}

inline float block_max(const float* __restrict__ s, int64_t len) {
  float mx = kNegInf;
#pragma omp simd reduction(max : mx)
  for (int64_t j = 0; j < len; ++j) mx = std::max(mx, s[j]);
  return mx;
}

// Online log-sum-exp state: out = M + log(S).
struct Lse {
  float M = kNegInf, S = 0.0f;
  // Adds the block s[0..len) (its maximum bm); leaves s[j] = exp(s[j] - M) for the caller.
  inline void add(float* __restrict__ s, int64_t len, float bm, float* scale_old) {
    const float nm = std::max(M, bm);
    *scale_old = M == kNegInf ? 0.0f : exp_or_zero(M - nm);
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < len; ++j) {
      const float e = exp_or_zero(s[j] - nm);
      s[j] = e;
      acc += e;
    }
    S = S * *scale_old + acc;
    M = nm;
  }
  inline float value() const { return M == kNegInf ? kNegInf : M + std::log(S); }
};

template <int D, int COST>
float row_block(const float* xi, const float* yT, const float* h, int64_t m, int64_t d, int64_t j0, int64_t len,
                float inv_eps, float* s) {
  if constexpr (D > 0) {
    return point_block_small<D, COST>(xi, yT, h, m, j0, len, inv_eps, s);
  } else {
    point_block(xi, yT, h, m, d, j0, len, COST, inv_eps, s);
    return block_max(s, len);
  }
}

template <typename T, int D, int COST>
void lse_points_d(const OtArgs& a, const float* yT_all);

template <typename T>
void lse_points(const OtArgs& a, const float* yT_all) {
  const bool eu = a.cost == 1;
  switch (a.d) {
    case 1: return eu ? lse_points_d<T, 1, 1>(a, yT_all) : lse_points_d<T, 1, 0>(a, yT_all);
    case 2: return eu ? lse_points_d<T, 2, 1>(a, yT_all) : lse_points_d<T, 2, 0>(a, yT_all);
    case 3: return eu ? lse_points_d<T, 3, 1>(a, yT_all) : lse_points_d<T, 3, 0>(a, yT_all);
    case 4: return eu ? lse_points_d<T, 4, 1>(a, yT_all) : lse_points_d<T, 4, 0>(a, yT_all);
    default: return eu ? lse_points_d<T, 0, 1>(a, yT_all) : lse_points_d<T, 0, 0>(a, yT_all);
  }
}

template <typename T, int D, int COST>
void lse_points_d(const OtArgs& a, const float* yT_all) {
  const T* x = as_ptr<const T>(a.x);
  const float* h_all = as_ptr<const float>(a.h);
  float* out = as_ptr<float>(a.out);
  const int64_t n = a.n, m = a.m, d = a.d;
  const float inv_eps = static_cast<float>(1.0 / a.eps);
#pragma omp parallel if (a.batch * a.n * a.m >= kParallelWork)
  {
    alignas(64) float s[kBlock];
    float xi[kMaxD];
    float* xbuf = d <= kMaxD ? xi : new float[d];
#pragma omp for schedule(static)
    for (int64_t r = 0; r < a.batch * n; ++r) {
      const int64_t b = r / n;
      for (int64_t k = 0; k < d; ++k) xbuf[k] = to_float(x[r * d + k]);
      const float* yT = yT_all + b * d * m;
      const float* h = h_all + b * m;
      Lse l;
      for (int64_t j0 = 0; j0 < m; j0 += kBlock) {
        const int64_t len = std::min(kBlock, m - j0);
        const float bm = row_block<D, COST>(xbuf, yT, h, m, d, j0, len, inv_eps, s);
        if (bm == kNegInf) continue;
        float unused;
        l.add(s, len, bm, &unused);
      }
      out[r] = l.value();
    }
    if (xbuf != xi) delete[] xbuf;
  }
}

template <typename T>
void lse_dense(const OtArgs& a) {
  const T* C = as_ptr<const T>(a.cost_matrix);
  const float* h_all = as_ptr<const float>(a.h);
  float* out = as_ptr<float>(a.out);
  const int64_t n = a.n, m = a.m;
  const float inv_eps = static_cast<float>(1.0 / a.eps);
#pragma omp parallel if (a.batch * a.n * a.m >= kParallelWork)
  {
    alignas(64) float s[kBlock];
#pragma omp for schedule(static)
    for (int64_t r = 0; r < a.batch * n; ++r) {
      const float* h = h_all + (r / n) * m;
      const T* row = C + r * m;
      Lse l;
      for (int64_t j0 = 0; j0 < m; j0 += kBlock) {
        const int64_t len = std::min(kBlock, m - j0);
#pragma omp simd
        for (int64_t j = 0; j < len; ++j) s[j] = h[j0 + j] - to_float(row[j0 + j]) * inv_eps;
        const float bm = block_max(s, len);
        if (bm == kNegInf) continue;
        float unused;
        l.add(s, len, bm, &unused);
      }
      out[r] = l.value();
    }
  }
}

// mode 1: out_i = exp(c_i + M) * sum_j exp(s_j - M) * dC/dx_i, with the sums rescaled as M grows.
//   |x-y|^2: dC/dx_i = 2 (x_i - y_j)  ->  2 (x_i W - sum_j w_j y_j)
//   |x-y|:   dC/dx_i = (x_i - y_j) / |x_i - y_j|  (0 where x_i == y_j)
template <typename T>
void grad_points(const OtArgs& a, const float* yT_all) {
  const T* x = as_ptr<const T>(a.x);
  const float* h_all = as_ptr<const float>(a.h);
  const float* c = as_ptr<const float>(a.c);
  float* out = as_ptr<float>(a.out);
  const int64_t n = a.n, m = a.m, d = a.d;
  const float inv_eps = static_cast<float>(1.0 / a.eps);
#pragma omp parallel if (a.batch * a.n * a.m >= kParallelWork)
  {
    alignas(64) float s[kBlock];
    alignas(64) float dist[kBlock];
    float* xi = new float[d];
    float* acc = new float[d];
#pragma omp for schedule(static)
    for (int64_t r = 0; r < a.batch * n; ++r) {
      const int64_t b = r / n;
      for (int64_t k = 0; k < d; ++k) {
        xi[k] = to_float(x[r * d + k]);
        acc[k] = 0.0f;
      }
      const float* yT = yT_all + b * d * m;
      const float* h = h_all + b * m;
      Lse l;
      float W = 0.0f;
      for (int64_t j0 = 0; j0 < m; j0 += kBlock) {
        const int64_t len = std::min(kBlock, m - j0);
        point_block(xi, yT, h, m, d, j0, len, a.cost, inv_eps, s);
        if (a.cost == 1) {  // the distances again, for the unit vectors
          for (int64_t j = 0; j < len; ++j) dist[j] = 0.0f;
          for (int64_t k = 0; k < d; ++k) {
            const float* yk = yT + k * m + j0;
#pragma omp simd
            for (int64_t j = 0; j < len; ++j) {
              const float t = xi[k] - yk[j];
              dist[j] += t * t;
            }
          }
        }
        const float bm = block_max(s, len);
        if (bm == kNegInf) continue;
        float scale;
        l.add(s, len, bm, &scale);  // s[j] = w_j = exp(s_j - M)
        W *= scale;
        for (int64_t k = 0; k < d; ++k) acc[k] *= scale;
        if (a.cost == 1) {  // |x-y|: the weights of the unit vectors, w_j / |x_i - y_j|
#pragma omp simd
          for (int64_t j = 0; j < len; ++j) s[j] = dist[j] > 0.0f ? s[j] / std::sqrt(dist[j]) : 0.0f;
        }
        float wsum = 0.0f;
#pragma omp simd reduction(+ : wsum)
        for (int64_t j = 0; j < len; ++j) wsum += s[j];
        W += wsum;
        for (int64_t k = 0; k < d; ++k) {
          const float* yk = yT + k * m + j0;
          float wy = 0.0f;
#pragma omp simd reduction(+ : wy)
          for (int64_t j = 0; j < len; ++j) wy += s[j] * yk[j];
          acc[k] += wy;
        }
      }
      const float ci = c[r];
      const float mult = (l.M == kNegInf || ci == kNegInf) ? 0.0f : std::exp(ci + l.M) * (a.cost == 0 ? 2.0f : 1.0f);
      for (int64_t k = 0; k < d; ++k) out[r * d + k] = mult * (xi[k] * W - acc[k]);
    }
    delete[] xi;
    delete[] acc;
  }
}

}  // namespace

void ot_run(const OtArgs& a, const float* yT) {
  FASTOPT_DTYPE_SWITCH(a.dtype, [&] {
    if (a.cost_matrix != 0) {
      lse_dense<scalar_t>(a);
    } else if (a.mode == 0) {
      lse_points<scalar_t>(a, yT);
    } else {
      grad_points<scalar_t>(a, yT);
    }
  });
}

}  // namespace FASTOPT_CPU_NS
}  // namespace cpu
}  // namespace fastopt
