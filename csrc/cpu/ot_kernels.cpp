// The entropic-OT passes on the CPU (fastopt/api.h OtArgs), compiled once per ISA (see isa.h).
//
// Rows i of every batch entry are spread over OpenMP threads; each row walks the columns j in blocks
// of kBlock: the costs of the block (from points: y is given transposed, fp32 [B, d, m], so the
// loop over j vectorizes; or a row of the dense cost), then the block's maximum, then the sum of
// exp(value - running max) with the running sum rescaled when the maximum grows (the online
// log-sum-exp of flash attention).  exp is exp_nonpositive (fastopt/elementwise.h; with its
// multiply-adds fused in the copies built with FMA, ot_exp_nonpositive below), which vectorizes;
// arguments below -87 count as 0, so -inf entries (no mass) add nothing.
//
// Mode 2 is the weighted soft-minimum that fastopt.ot.sinkhorn iterates,
//   out_i = -eps log(sum_j w_j exp((g_j - C_ij) / eps) / sum_j w_j),   h = w >= 0 (B, m), c = g (B, m),
// in cost units.  The plain form LSE_j(log w_j + (g_j - C_ij) / eps) cannot be evaluated in fp32 when
// eps is large against the costs: (g - C) / eps falls below the rounding of log w (1e-7 |log w|) and
// the sum of exponentials rounds it away again.  Here every quantity is relative to the row's smallest
// d_ij = C_ij - g_j: x_ij = (d_i - d_ij) / eps <= 0, S = sum w exp(x), T = sum w expm1(x) = S - W, and
//   out_i = d_i - eps * (log1p(T / W) if T / W > -1/2 else log(S / W))
// (the kernels hold d / eps: the same up to one rounding),
// accurate to fp32 rounding of the costs for any eps (fastopt/reference/ot.py softmin_reference;
// SoftMin below says how each block gets by with one exp or one expm1 per element).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "fastopt/elementwise.h"
#include "kernel.h"

namespace fastopt::cpu::FASTOPT_CPU_NS {
namespace {

constexpr int64_t kBlock = 256;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kInf = std::numeric_limits<float>::infinity();
// Below this many (i, j) pairs one thread runs the pass: waking a team costs more than the work
// (and a spinning team on a busy machine costs far more).
constexpr int64_t kParallelWork = 1 << 16;

#if defined(__FMA__)
// Where the copy has FMA (the avx2 and avx512 copies), exp_nonpositive and expm1_reduced
// (fastopt/elementwise.h) with their multiply-adds fused: the same reduction and polynomial in about half
// the operations (and each step rounded once instead of twice).
inline float ot_expm1_reduced(float r) {
  float q = 1.9875691500e-4f;
  q = std::fma(q, r, 1.3981999507e-3f);
  q = std::fma(q, r, 8.3334519073e-3f);
  q = std::fma(q, r, 4.1665795894e-2f);
  q = std::fma(q, r, 1.6666665459e-1f);
  q = std::fma(q, r, 5.0000001201e-1f);
  return std::fma(q, r * r, r);
}
inline float ot_exp_nonpositive(float x) {
  x = x > -87.0f ? x : -87.0f;
  const float n = std::floor(std::fma(x, 1.44269504088896341f, 0.5f));
  const float r = std::fma(n, 2.12194440e-4f, std::fma(n, -0.693359375f, x));
  const float y = ot_expm1_reduced(r) + 1.0f;
  return y * bits_float(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
}
#else
inline float ot_expm1_reduced(float r) { return expm1_reduced(r); }
inline float ot_exp_nonpositive(float x) { return exp_nonpositive(x); }
#endif

inline float exp_or_zero(float v) {  // v <= 0
  const float e = ot_exp_nonpositive(v);
  return v < -87.0f ? 0.0f : e;
}

// out[j] = |x_i - y_(j0 + j)|^2 for the points x_i (fp32, d) and y^T (fp32 [d, m]).
inline void sq_dist_block(const float* __restrict__ xi, const float* __restrict__ yT, int64_t m, int64_t d,
                          int64_t j0, int64_t len, float* __restrict__ out) {
  for (int64_t j = 0; j < len; ++j) out[j] = 0.0f;
  for (int64_t k = 0; k < d; ++k) {
    const float xk = xi[k];
    const float* __restrict__ yk = yT + k * m + j0;
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) {
      const float t = xk - yk[j];
      out[j] += t * t;
    }
  }
}

// C(x_i, y_j) for d = D known at compile time (the common d = 1..4): the point stays in registers and
// the cost is computed inside the caller's vectorized loop over j.
template <int D, int COST>
inline __attribute__((always_inline)) float small_cost(const float (&xk)[D], const float* __restrict__ yT,
                                                       int64_t m, int64_t j) {
  float c = 0.0f;
  for (int k = 0; k < D; ++k) {
    const float t = xk[k] - yT[k * m + j];
    c += t * t;
  }
  return COST == 1 ? std::sqrt(c) : c;
}

// The block's values s[j] = h[j] - C_ij / eps for the points x_i (fp32, d) and y^T (fp32 [d, m]).
inline void point_block(const float* __restrict__ xi, const float* __restrict__ yT, const float* __restrict__ h,
                        int64_t m, int64_t d, int64_t j0, int64_t len, int cost, float inv_eps,
                        float* __restrict__ s) {
  sq_dist_block(xi, yT, m, d, j0, len, s);
  if (cost == 1) {
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) s[j] = std::sqrt(s[j]);
  }
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) s[j] = h[j0 + j] - s[j] * inv_eps;
}

// point_block + block_max in one pass for small d known at compile time: the costs stay in registers.
template <int D, int COST>
inline float point_block_small(const float* __restrict__ xi, const float* __restrict__ yT,
                               const float* __restrict__ h, int64_t m, int64_t j0, int64_t len, float inv_eps,
                               float* __restrict__ s) {
  float xk[D];
  for (int k = 0; k < D; ++k) xk[k] = xi[k];
  float mx = kNegInf;
#pragma omp simd reduction(max : mx)
  for (int64_t j = 0; j < len; ++j) {
    const float v = h[j0 + j] - small_cost<D, COST>(xk, yT, m, j0 + j) * inv_eps;
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

// x >= -kSmallX: ot_exp_nonpositive's reduction has n = 0 (|x| < ln2 / 2), so there ot_expm1_reduced(x)
// is its e^x - 1 (the same polynomial, fused or not like the exp).
constexpr float kSmallX = 0.34f;

// Online weighted soft-minimum state (see the file comment), in units of eps: the running minimum
// dmin of d_j = (C_ij - g_j) / eps, S = sum w exp(x), T = sum w expm1(x) (x = dmin - d <= 0),
// W = sum w.  A block whose x all lie in [-kSmallX, 0] (always, when eps is large against the costs)
// adds sum w expm1(x) to T and W + that to S, with no exp at all; any other block adds sum w exp(x)
// to S and (sum w exp(x)) - (sum w) to T.  That difference rounds to eps_32 * W, but such a block has
// a d - dmin > kSmallX, so eps < 3 (C - g spread) and the error of the output, eps * eps_32, stays
// below 3 eps_32 times the spread of the row's costs.
struct SoftMin {
  float dmin = kInf, S = 0.0f, T = 0.0f, W = 0.0f;
  // Adds the block dd[0..len) (+inf where w = 0) with weights w (summing to ws), minimum bm
  // (finite) and largest finite value bx.
  inline void add(const float* __restrict__ dd, const float* __restrict__ w, int64_t len, float ws, float bm,
                  float bx) {
    if (bm < dmin) {
      if (W > 0.0f) {  // the sums so far, relative to the new minimum: e^(x + dl) - 1 = e^x e^dl - 1
        const float dl = bm - dmin;
        const float r = exp_or_zero(dl);
        const float rm1 = dl >= -kSmallX ? ot_expm1_reduced(dl) : r - 1.0f;
        T = T * r + W * rm1;  // sum w (e^x e^dl - 1) = (W + T) e^dl - W
        S = S * r;
      }
      dmin = bm;
    }
    const float m0 = dmin;
    float acc = 0.0f;
    if (m0 - bx >= -kSmallX) {
#pragma omp simd reduction(+ : acc)
      for (int64_t j = 0; j < len; ++j) acc += w[j] > 0.0f ? w[j] * ot_expm1_reduced(m0 - dd[j]) : 0.0f;
      S += ws + acc;
      T += acc;
    } else {
#pragma omp simd reduction(+ : acc)
      for (int64_t j = 0; j < len; ++j) acc += w[j] * exp_or_zero(m0 - dd[j]);  // 0 where w = 0
      S += acc;
      T += acc - ws;
    }
    W += ws;
  }
  inline float value(double eps) const {
    if (!(W > 0.0f)) return kInf;  // no mass: the minimum over nothing
    const float r = T / W;
    const float L = r > -0.5f ? std::log1p(r) : std::log(S / W);
    return static_cast<float>(eps * (static_cast<double>(dmin) - static_cast<double>(L)));
  }
};

// What the soft-minimum passes read per batch entry besides the points: gs = g / eps (-inf where
// w = 0, so that d = C / eps - gs is +inf there) and the weight of every block of kBlock columns.
struct SoftMinInputs {
  std::vector<float> gs, wblk;
  int64_t nb;
  explicit SoftMinInputs(const OtArgs& a) : nb((a.m + kBlock - 1) / kBlock) {
    const float* w = as_ptr<const float>(a.h);
    const float* g = as_ptr<const float>(a.c);
    gs.resize(static_cast<size_t>(a.batch * a.m));
    wblk.assign(static_cast<size_t>(a.batch * nb), 0.0f);
    for (int64_t b = 0; b < a.batch; ++b)
      for (int64_t j = 0; j < a.m; ++j) {
        const int64_t k = b * a.m + j;
        gs[k] = w[k] > 0.0f ? static_cast<float>(static_cast<double>(g[k]) / a.eps) : -kInf;
        wblk[b * nb + j / kBlock] += w[k];
      }
  }
};

// The soft-minimum values of one block from its costs c (c[j] = C_i,(j0 + j); dd may be c):
// dd[j] = c[j] / eps - gs_j (+inf where w_j = 0); returns the minimum, and the largest finite value in
// *mx_out.
inline float soft_block_from_costs(const float* c, const float* __restrict__ gs, int64_t len, float inv_eps,
                                   float* dd, float* mx_out) {
  float mn = kInf, mx = -kInf;
#pragma omp simd reduction(min : mn) reduction(max : mx)
  for (int64_t j = 0; j < len; ++j) {
    const float v = c[j] * inv_eps - gs[j];
    dd[j] = v;
    mn = std::min(mn, v);
    mx = std::max(mx, v < kInf ? v : -kInf);
  }
  *mx_out = mx;
  return mn;
}

// soft_block_from_costs for the points x_i and y^T: for d known at compile time in one pass (the
// costs stay in registers), else the squared distances first.
template <int D, int COST>
float soft_block(const float* xi, const float* yT, const float* gs, int64_t m, int64_t d, int64_t j0, int64_t len,
                 float inv_eps, float* dd, float* mx_out) {
  if constexpr (D > 0) {
    float xk[D];
    for (int k = 0; k < D; ++k) xk[k] = xi[k];
    float mn = kInf, mx = -kInf;
#pragma omp simd reduction(min : mn) reduction(max : mx)
    for (int64_t j = 0; j < len; ++j) {
      const float v = small_cost<D, COST>(xk, yT, m, j0 + j) * inv_eps - gs[j0 + j];
      dd[j] = v;
      mn = std::min(mn, v);
      mx = std::max(mx, v < kInf ? v : -kInf);
    }
    *mx_out = mx;
    return mn;
  } else {
    sq_dist_block(xi, yT, m, d, j0, len, dd);
    if (COST == 1) {
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) dd[j] = std::sqrt(dd[j]);
    }
    return soft_block_from_costs(dd, gs + j0, len, inv_eps, dd, mx_out);
  }
}

// Runs row(r, b, xi, scratch) for every row r (batch entry b = r / n), the rows spread over the
// OpenMP team: xi holds x_r in fp32 (points; nothing for a cost matrix) followed by `extra` floats,
// scratch is 2 * kBlock floats; both belong to the calling thread.
template <typename T, typename Row>
void for_each_row(const OtArgs& a, int64_t extra, Row&& row) {
  const T* x = as_ptr<const T>(a.x);
  const int64_t n = a.n, d = a.cost_matrix == 0 ? a.d : 0;
#pragma omp parallel if (a.batch * a.n * a.m >= kParallelWork)
  {
    alignas(64) float scratch[2 * kBlock];
    std::vector<float> xi(static_cast<size_t>(d + extra));
#pragma omp for schedule(static)
    for (int64_t r = 0; r < a.batch * n; ++r) {
      for (int64_t k = 0; k < d; ++k) xi[k] = to_float(x[r * d + k]);
      row(r, r / n, xi.data(), scratch);
    }
  }
}

// Calls f(D, COST) with the point dimension D (1..4; 0 for any other d) and the cost as compile-time
// constants (std::integral_constant).
template <typename F>
void with_point_kernel(const OtArgs& a, F&& f) {
  auto cost = [&](auto D) {
    if (a.cost == 1) {
      f(D, std::integral_constant<int, 1>{});
    } else {
      f(D, std::integral_constant<int, 0>{});
    }
  };
  switch (a.d) {
    case 1: return cost(std::integral_constant<int, 1>{});
    case 2: return cost(std::integral_constant<int, 2>{});
    case 3: return cost(std::integral_constant<int, 3>{});
    case 4: return cost(std::integral_constant<int, 4>{});
    default: return cost(std::integral_constant<int, 0>{});
  }
}

// The soft-minimum pass (mode 2): block(r, b, xi, j0, len, gs, dd, &bx) fills dd with the values of
// columns j0 .. j0 + len of row r (soft_block_from_costs) and returns their minimum.
template <typename T, typename Block>
void softmin_rows(const OtArgs& a, Block&& block) {
  const float* w_all = as_ptr<const float>(a.h);
  float* out = as_ptr<float>(a.out);
  const int64_t m = a.m;
  const SoftMinInputs in(a);
  for_each_row<T>(a, 0, [&](int64_t r, int64_t b, const float* xi, float* dd) {
    const float* gs = in.gs.data() + b * m;
    const float* w = w_all + b * m;
    SoftMin sm;
    for (int64_t j0 = 0; j0 < m; j0 += kBlock) {
      const int64_t len = std::min(kBlock, m - j0);
      float bx;
      const float bm = block(r, b, xi, j0, len, gs, dd, &bx);
      if (bm == kInf) continue;
      sm.add(dd, w + j0, len, in.wblk[b * in.nb + j0 / kBlock], bm, bx);
    }
    out[r] = sm.value(a.eps);
  });
}

// The log-sum-exp pass (mode 0): block(r, b, xi, j0, len, s) fills s with the values h_j - C_ij / eps
// of columns j0 .. j0 + len of row r and returns their maximum.
template <typename T, typename Block>
void lse_rows(const OtArgs& a, Block&& block) {
  float* out = as_ptr<float>(a.out);
  const int64_t m = a.m;
  for_each_row<T>(a, 0, [&](int64_t r, int64_t b, const float* xi, float* s) {
    Lse l;
    for (int64_t j0 = 0; j0 < m; j0 += kBlock) {
      const int64_t len = std::min(kBlock, m - j0);
      const float bm = block(r, b, xi, j0, len, s);
      if (bm == kNegInf) continue;
      float unused;
      l.add(s, len, bm, &unused);
    }
    out[r] = l.value();
  });
}

template <typename T>
void ot_rows(const OtArgs& a, const float* yT_all) {
  const int64_t m = a.m, d = a.d;
  const float inv_eps = static_cast<float>(1.0 / a.eps);
  const T* C = as_ptr<const T>(a.cost_matrix);
  const float* h_all = as_ptr<const float>(a.h);
  if (a.mode == 2 && a.cost_matrix != 0) {
    softmin_rows<T>(a, [&](int64_t r, int64_t, const float*, int64_t j0, int64_t len, const float* gs, float* dd,
                           float* bx) {
      const T* row = C + r * m;
      for (int64_t j = 0; j < len; ++j) dd[j] = to_float(row[j0 + j]);
      return soft_block_from_costs(dd, gs + j0, len, inv_eps, dd, bx);
    });
  } else if (a.mode == 2) {
    with_point_kernel(a, [&](auto D, auto COST) {
      softmin_rows<T>(a, [&](int64_t, int64_t b, const float* xi, int64_t j0, int64_t len, const float* gs,
                             float* dd, float* bx) {
        return soft_block<D, COST>(xi, yT_all + b * d * m, gs, m, d, j0, len, inv_eps, dd, bx);
      });
    });
  } else if (a.cost_matrix != 0) {
    lse_rows<T>(a, [&](int64_t r, int64_t b, const float*, int64_t j0, int64_t len, float* s) {
      const float* h = h_all + b * m;
      const T* row = C + r * m;
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) s[j] = h[j0 + j] - to_float(row[j0 + j]) * inv_eps;
      return block_max(s, len);
    });
  } else {
    with_point_kernel(a, [&](auto D, auto COST) {
      lse_rows<T>(a, [&](int64_t, int64_t b, const float* xi, int64_t j0, int64_t len, float* s) {
        return row_block<D, COST>(xi, yT_all + b * d * m, h_all + b * m, m, d, j0, len, inv_eps, s);
      });
    });
  }
}

// mode 1: out_i = exp(c_i + M) * sum_j exp(s_j - M) * dC/dx_i, with the sums rescaled as M grows.
//   |x-y|^2: dC/dx_i = 2 (x_i - y_j)  ->  2 (x_i W - sum_j w_j y_j)
//   |x-y|:   dC/dx_i = (x_i - y_j) / |x_i - y_j|  (0 where x_i == y_j)
template <typename T>
void grad_points(const OtArgs& a, const float* yT_all) {
  const float* h_all = as_ptr<const float>(a.h);
  const float* c = as_ptr<const float>(a.c);
  float* out = as_ptr<float>(a.out);
  const int64_t m = a.m, d = a.d;
  const float inv_eps = static_cast<float>(1.0 / a.eps);
  for_each_row<T>(a, d, [&](int64_t r, int64_t b, float* xi, float* scratch) {
    float* s = scratch;
    float* dist = scratch + kBlock;
    float* acc = xi + d;
    for (int64_t k = 0; k < d; ++k) acc[k] = 0.0f;
    const float* yT = yT_all + b * d * m;
    const float* h = h_all + b * m;
    Lse l;
    float W = 0.0f;
    for (int64_t j0 = 0; j0 < m; j0 += kBlock) {
      const int64_t len = std::min(kBlock, m - j0);
      point_block(xi, yT, h, m, d, j0, len, a.cost, inv_eps, s);
      if (a.cost == 1) sq_dist_block(xi, yT, m, d, j0, len, dist);  // the distances again, for the unit vectors
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
  });
}

}  // namespace

void ot_run(const OtArgs& a, const float* yT) {
  FASTOPT_DTYPE_SWITCH(a.dtype, [&] {
    if (a.mode == 1) {
      grad_points<scalar_t>(a, yT);
    } else {
      ot_rows<scalar_t>(a, yT);
    }
  });
}

}  // namespace fastopt::cpu::FASTOPT_CPU_NS
