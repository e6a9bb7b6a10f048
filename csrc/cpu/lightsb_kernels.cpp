// The fused LightSB pass on the CPU (lightsb.h), compiled once per ISA (see isa.h).
//
// Rows are cut into at most kMaxBlocks fixed blocks (a function of n, k and d only, never of the number of
// threads), spread over OpenMP threads.  Per row, the components are walked in tiles of kTile: the tile's
// logits a_ik (diagonal S: the parameters are held transposed, [d][k], so the loops over k vectorize;
// full S: one dot product over j per component), the tile's maximum, then the online log-sum-exp of
// the Sinkhorn tiles (csrc/cpu/ot_kernels.cpp): the running sum is rescaled by exp(M_old - M_new) when
// the maximum grows and the tile's exponentials exp(a - M_tile) are kept, so that with a gradient each
// component's softmax weight is exp(a - M_tile) * exp(M_tile - M) / S (one exp per tile, not per
// component).  The gradient pass then reads the row once more: the row's own gradient (pts, coords)
// is written directly, the parameter gradients go to fp32 accumulators of the thread, flushed every
// kSub rows into the block's fp64 partial sums; the blocks are summed in order at the end.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "fastopt/elementwise.h"
#include "kernel.h"
#include "lightsb.h"

namespace fastopt::cpu::FASTOPT_CPU_NS {
namespace {

constexpr int64_t kTile = 128;        // components per online log-sum-exp tile
constexpr int64_t kSub = 64;          // rows per fp32 accumulation before the fp64 flush
constexpr int64_t kMaxBlocks = 256;   // fixed row blocks (fp64 partial sums each)
constexpr int64_t kParallelWork = 1 << 15;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline float exp_or_zero(float v) {  // v <= 0
  const float e = exp_nonpositive(v);
  return v < -87.0f ? 0.0f : e;
}

struct Layout {
  bool full;
  int64_t K, d, P;  // P: parameter-gradient entries [dla K][dcen K*d][dsig K*d]
  // index of (k, j) in the mode's accumulator layout: [j][k] for diagonal S, [k][j] for full S
  inline int64_t kj(int64_t k, int64_t j) const { return full ? k * d + j : j * K + k; }
};

template <int MODE, bool FULL>
struct Row {
  // logits of components [k0, k0 + len) of row i into s
  static inline void logits(const LightSbArgs& a, const float* __restrict__ x, const float* __restrict__ q,
                            const float* __restrict__ la, const float* __restrict__ cen,
                            const float* __restrict__ sig, int64_t k0, int64_t len, float inv2e,
                            float* __restrict__ s) {
    const int64_t K = a.k, d = a.d;
    if constexpr (!FULL) {
      for (int64_t k = 0; k < len; ++k) s[k] = 0.0f;
      for (int64_t j = 0; j < d; ++j) {
        const float xj = x[j];
        const float* __restrict__ sj = sig + j * K + k0;
        const float* __restrict__ cj = cen + j * K + k0;
        if constexpr (MODE == 0) {
          const float x2 = xj * xj, x2c = 2.0f * xj;
#pragma omp simd
          for (int64_t k = 0; k < len; ++k) s[k] += sj[k] * x2 + cj[k] * x2c;
        } else {
#pragma omp simd
          for (int64_t k = 0; k < len; ++k) {
            const float t = xj - cj[k];
            s[k] += sj[k] * (t * t);
          }
        }
      }
      if constexpr (MODE == 0) {
#pragma omp simd
        for (int64_t k = 0; k < len; ++k) s[k] = la[k0 + k] + s[k] * inv2e;
      } else {
#pragma omp simd
        for (int64_t k = 0; k < len; ++k) s[k] = la[k0 + k] - s[k] * inv2e;
      }
    } else {
      for (int64_t k = 0; k < len; ++k) {
        const float* __restrict__ qk = q + (k0 + k) * d;
        const float* __restrict__ sk = sig + (k0 + k) * d;
        const float* __restrict__ ck = cen + (k0 + k) * d;
        float quad = 0.0f, lin = 0.0f;
        if constexpr (MODE == 0) {
#pragma omp simd reduction(+ : quad, lin)
          for (int64_t j = 0; j < d; ++j) {
            quad += sk[j] * (qk[j] * qk[j]);
            lin += ck[j] * x[j];
          }
          s[k] = la[k0 + k] + (quad + 2.0f * lin) * inv2e;
        } else {
#pragma omp simd reduction(+ : quad)
          for (int64_t j = 0; j < d; ++j) {
            const float t = qk[j] - ck[j];
            quad += sk[j] * (t * t);
          }
          s[k] = la[k0 + k] - quad * inv2e;
        }
      }
    }
  }

  // the gradient of g * out_i given the weights w (already times g), into the row's outputs and the
  // accumulators acc ([dla K][dcen][dsig] in the mode's layout; unscaled: see finish())
  static inline void grad(const LightSbArgs& a, int64_t i, const float* __restrict__ x, const float* __restrict__ q,
                          const float* __restrict__ cen, const float* __restrict__ sig,
                          const float* __restrict__ w, float inv_e, float* __restrict__ acc,
                          float* __restrict__ tmp) {
    const int64_t K = a.k, d = a.d;
    float* __restrict__ adla = acc;
    float* __restrict__ acen = acc + K;
    float* __restrict__ asig = acc + K + K * d;
    float* dpts = a.dpts != 0 ? as_ptr<float>(a.dpts) + i * d : nullptr;
    if (a.dla != 0) {
#pragma omp simd
      for (int64_t k = 0; k < K; ++k) adla[k] += w[k];
    }
    if constexpr (!FULL) {
      for (int64_t j = 0; j < d; ++j) {
        const float xj = x[j];
        const float* __restrict__ sj = sig + j * K;
        const float* __restrict__ cj = cen + j * K;
        float* __restrict__ acj = acen + j * K;
        float* __restrict__ asj = asig + j * K;
        float t1 = 0.0f, t2 = 0.0f;
        if constexpr (MODE == 0) {
          if (a.dla != 0) {
            const float x2 = xj * xj;
#pragma omp simd
            for (int64_t k = 0; k < K; ++k) {
              acj[k] += w[k] * xj;
              asj[k] += w[k] * x2;
            }
          }
          if (dpts != nullptr) {
#pragma omp simd reduction(+ : t1, t2)
            for (int64_t k = 0; k < K; ++k) {
              t1 += w[k] * sj[k];
              t2 += w[k] * cj[k];
            }
            dpts[j] = inv_e * (xj * t1 + t2);
          }
        } else {
          if (a.dla != 0) {
#pragma omp simd reduction(+ : t1)
            for (int64_t k = 0; k < K; ++k) {
              const float df = xj - cj[k];
              const float t = w[k] * sj[k] * df;
              acj[k] += t;
              asj[k] += w[k] * (df * df);
              t1 += t;
            }
          } else {
#pragma omp simd reduction(+ : t1)
            for (int64_t k = 0; k < K; ++k) t1 += w[k] * sj[k] * (xj - cj[k]);
          }
          if (dpts != nullptr) dpts[j] = -inv_e * t1;
        }
      }
    } else {
      float* dq = a.dcoords != 0 ? as_ptr<float>(a.dcoords) + i * K * d : nullptr;
      for (int64_t j = 0; j < d; ++j) tmp[j] = 0.0f;
      for (int64_t k = 0; k < K; ++k) {
        const float wk = w[k];
        const float* __restrict__ qk = q + k * d;
        const float* __restrict__ sk = sig + k * d;
        const float* __restrict__ ck = cen + k * d;
        float* __restrict__ ack = acen + k * d;
        float* __restrict__ ask = asig + k * d;
        if constexpr (MODE == 0) {
          if (a.dla != 0) {
#pragma omp simd
            for (int64_t j = 0; j < d; ++j) {
              ack[j] += wk * x[j];
              ask[j] += wk * (qk[j] * qk[j]);
            }
          }
          if (dq != nullptr) {
            float* __restrict__ dqk = dq + k * d;
            const float c = inv_e * wk;
#pragma omp simd
            for (int64_t j = 0; j < d; ++j) dqk[j] = c * (sk[j] * qk[j]);
          }
#pragma omp simd
          for (int64_t j = 0; j < d; ++j) tmp[j] += wk * ck[j];
        } else {
          float* __restrict__ dqk = dq != nullptr ? dq + k * d : nullptr;
#pragma omp simd
          for (int64_t j = 0; j < d; ++j) {
            const float df = qk[j] - ck[j];
            const float t = wk * sk[j] * df;
            if (a.dla != 0) {
              ack[j] += t;
              ask[j] += wk * (df * df);
            }
            if (dqk != nullptr) dqk[j] = -inv_e * t;
          }
        }
      }
      if (dpts != nullptr) {
        for (int64_t j = 0; j < d; ++j) dpts[j] = MODE == 0 ? inv_e * tmp[j] : 0.0f;
      }
    }
  }
};

template <int MODE, bool FULL>
void run(const LightSbArgs& a) {
  const int64_t n = a.n, K = a.k, d = a.d;
  const Layout L{FULL, K, d, K + 2 * K * d};
  const float eps = static_cast<float>(a.eps);
  const float inv2e = 0.5f / eps, inv_e = 1.0f / eps;
  const bool want_grad = a.dla != 0 || a.dpts != 0 || a.dcoords != 0;
  const bool want_params = a.dla != 0;
  const float* pts = as_ptr<const float>(a.pts);
  const float* coords = a.coords != 0 ? as_ptr<const float>(a.coords) : nullptr;
  const float* la = as_ptr<const float>(a.la);
  const float* row_w = a.row_w != 0 ? as_ptr<const float>(a.row_w) : nullptr;
  float* out = as_ptr<float>(a.out);
  // the parameters in the layout the loops read: [d][k] for diagonal S
  std::vector<float> cenT, sigT;
  const float* cen = as_ptr<const float>(a.cen);
  const float* sig = as_ptr<const float>(a.sig);
  if (!FULL) {
    cenT.resize(static_cast<size_t>(K * d));
    sigT.resize(static_cast<size_t>(K * d));
    for (int64_t k = 0; k < K; ++k)
      for (int64_t j = 0; j < d; ++j) {
        cenT[j * K + k] = cen[k * d + j];
        sigT[j * K + k] = sig[k * d + j];
      }
    cen = cenT.data();
    sig = sigT.data();
  }
  // fixed row blocks, each with fp64 partial parameter gradients
  int64_t nblk = std::max<int64_t>(1, (n + kSub - 1) / kSub);
  nblk = std::min<int64_t>(nblk, kMaxBlocks);
  if (want_params) nblk = std::min<int64_t>(nblk, std::max<int64_t>(1, (int64_t{1} << 23) / L.P));
  std::vector<double> partial(want_params ? static_cast<size_t>(nblk * L.P) : 0, 0.0);
  const int64_t ntiles = (K + kTile - 1) / kTile;
#pragma omp parallel if (n * K * d >= kParallelWork)
  {
    std::vector<float> s(static_cast<size_t>(K)), tref(static_cast<size_t>(ntiles));
    std::vector<float> acc(want_grad ? static_cast<size_t>(L.P) : 0), tmp(static_cast<size_t>(d));
#pragma omp for schedule(static)
    for (int64_t b = 0; b < nblk; ++b) {
      const int64_t r0 = n * b / nblk, r1 = n * (b + 1) / nblk;
      double* part = want_params ? partial.data() + b * L.P : nullptr;
      for (int64_t c0 = r0; c0 < r1; c0 += kSub) {
        const int64_t c1 = std::min(r1, c0 + kSub);
        if (want_params) std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t i = c0; i < c1; ++i) {
          const float* x = pts + i * d;
          const float* q = FULL ? coords + i * K * d : nullptr;
          float M = kNegInf, S = 0.0f;
          for (int64_t t = 0; t < ntiles; ++t) {
            const int64_t k0 = t * kTile, len = std::min(kTile, K - k0);
            float* st = s.data() + k0;
            Row<MODE, FULL>::logits(a, x, q, la, cen, sig, k0, len, inv2e, st);
            float bm = kNegInf;
#pragma omp simd reduction(max : bm)
            for (int64_t k = 0; k < len; ++k) bm = std::max(bm, st[k]);
            const float nm = std::max(M, bm);
            if (nm == kNegInf) {  // nothing yet (every logit -inf)
              for (int64_t k = 0; k < len; ++k) st[k] = 0.0f;
              tref[t] = kNegInf;
              continue;
            }
            const float scale_old = M == kNegInf ? 0.0f : exp_or_zero(M - nm);
            float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
            for (int64_t k = 0; k < len; ++k) {
              const float e = exp_or_zero(st[k] - nm);
              st[k] = e;
              sum += e;
            }
            S = S * scale_old + sum;
            M = nm;
            tref[t] = nm;
          }
          const float lse = M == kNegInf ? kNegInf : M + std::log(S);
          out[i] = lse;
          if (!want_grad) continue;
          const float g = row_w != nullptr ? row_w[i] : static_cast<float>(a.w_scale);
          for (int64_t t = 0; t < ntiles; ++t) {
            const int64_t k0 = t * kTile, len = std::min(kTile, K - k0);
            const float f = tref[t] == kNegInf ? 0.0f : g * exp_or_zero(tref[t] - M) / S;
            float* st = s.data() + k0;
#pragma omp simd
            for (int64_t k = 0; k < len; ++k) st[k] *= f;
          }
          Row<MODE, FULL>::grad(a, i, x, q, cen, sig, s.data(), inv_e, acc.data(), tmp.data());
        }
        if (want_params)
          for (int64_t p = 0; p < L.P; ++p) part[p] += static_cast<double>(acc[p]);
      }
    }
  }
  if (!want_params) return;
  float* dla = as_ptr<float>(a.dla);
  float* dcen = as_ptr<float>(a.dcen);
  float* dsig = as_ptr<float>(a.dsig);
  const double cs = 1.0 / a.eps, ss = MODE == 0 ? 0.5 / a.eps : -0.5 / a.eps;
  for (int64_t k = 0; k < K; ++k) {
    double t = 0.0;
    for (int64_t b = 0; b < nblk; ++b) t += partial[b * L.P + k];
    dla[k] = static_cast<float>(t);
  }
#pragma omp parallel for schedule(static) if (nblk * K * d >= kParallelWork)
  for (int64_t k = 0; k < K; ++k)
    for (int64_t j = 0; j < d; ++j) {
      const int64_t e = L.kj(k, j);
      double tc = 0.0, ts = 0.0;
      for (int64_t b = 0; b < nblk; ++b) {
        tc += partial[b * L.P + K + e];
        ts += partial[b * L.P + K + K * d + e];
      }
      dcen[k * d + j] = static_cast<float>(tc * cs);
      dsig[k * d + j] = static_cast<float>(ts * ss);
    }
}

}  // namespace

void lightsb_run(const LightSbArgs& a) {
  const bool full = a.coords != 0;
  if (a.mode == 0) {
    full ? run<0, true>(a) : run<0, false>(a);
  } else {
    full ? run<1, true>(a) : run<1, false>(a);
  }
}

}  // namespace fastopt::cpu::FASTOPT_CPU_NS
