// fastopt/functors/adam.h -- the Adam / AdamW update rule, written once for CPU and CUDA.
//
// Adam (Kingma & Ba, 2015) and AdamW (Loshchilov & Hutter, 2019), with the exact semantics of
// torch.optim.Adam / torch.optim.AdamW (amsgrad, maximize, L2 or decoupled weight decay):
//
//   g  <- (maximize ? -g : g) / grad_scale
//   p  <- p * (1 - lr * wd)                     (decoupled, AdamW)      or   g <- g + wd * p   (L2, Adam)
//   m  <- m + (1 - b1) (g - m)
//   v  <- b2 v + (1 - b2) g^2
//   vmax <- max(vmax, v)                        (amsgrad; denominators use vmax instead of v)
//   p  <- p - (lr / (1 - b1^t)) * (m / (sqrt(v) / sqrt(1 - b2^t) + eps))
//
// t is the step count *after* this step (state step + 1).  Everything is fp32.
#pragma once

#include <cmath>
#include "fastopt/common.h"

namespace fastopt {
namespace functors {

// Hyperparameters arrive as doubles (Python floats); like torch's scalar arguments they are
// rounded to fp32 only where they enter fp32 element math.
struct AdamHyper {
  double lr;
  double beta1;
  double beta2;
  double eps;
  double weight_decay;
};

// Per-tensor coefficients derived from the hyperparameters and the step count.
struct AdamCoeffs {
  float one_minus_beta1;
  float beta2;
  float one_minus_beta2;
  float eps;
  float weight_decay;       // L2 coefficient (Adam)
  float decay_factor;       // 1 - lr * wd (AdamW)
  float step_size;          // lr / (1 - b1^t)
  float bc2_sqrt;           // sqrt(1 - b2^t)
};

// `lr` and `step` may come from device scalars (fp32), hence separate arguments.
FASTOPT_HOST_DEVICE AdamCoeffs adam_coeffs(const AdamHyper& h, double lr, double step) {
  // Bias corrections in double, as torch computes them for python-float steps.
  const double bc1 = 1.0 - pow(h.beta1, step);
  const double bc2 = 1.0 - pow(h.beta2, step);
  AdamCoeffs c;
  c.one_minus_beta1 = static_cast<float>(1.0 - h.beta1);
  c.beta2 = static_cast<float>(h.beta2);
  c.one_minus_beta2 = static_cast<float>(1.0 - h.beta2);
  c.eps = static_cast<float>(h.eps);
  c.weight_decay = static_cast<float>(h.weight_decay);
  c.decay_factor = static_cast<float>(1.0 - lr * h.weight_decay);
  c.step_size = static_cast<float>(lr / bc1);
  c.bc2_sqrt = static_cast<float>(sqrt(bc2));
  return c;
}

// One element.  `g` is already unscaled and sign-flipped for maximize (see adam_element below);
// vmax is only touched when AMSGRAD.  The operation order follows torch's single-tensor Adam.
template <bool DECOUPLED, bool AMSGRAD>
FASTOPT_HOST_DEVICE void adam_update(float& p, float g, float& m, float& v, float& vmax,
                                     const AdamCoeffs& c) {
  if (DECOUPLED) {
    p = p * c.decay_factor;
  } else {
    g = g + c.weight_decay * p;
  }
  m = m + c.one_minus_beta1 * (g - m);
  v = c.beta2 * v + c.one_minus_beta2 * g * g;
  float vd = v;
  if (AMSGRAD) {
    vmax = vmax > v ? vmax : v;
    vd = vmax;
  }
  const float denom = sqrtf(vd) / c.bc2_sqrt + c.eps;
  p = p - c.step_size * (m / denom);
}

// Load/convert/update/store of one element of every list: the piece both launchers call.
// `grad_mul` is (maximize ? -1 : 1) / grad_scale.
template <typename T, bool DECOUPLED, bool AMSGRAD>
FASTOPT_HOST_DEVICE void adam_element(T* p, const T* g, T* m, T* v, T* vmax, int64_t i,
                                      float grad_mul, const AdamCoeffs& c) {
  float pf = to_float(p[i]);
  float mf = to_float(m[i]);
  float vf = to_float(v[i]);
  float vmf = AMSGRAD ? to_float(vmax[i]) : 0.0f;
  adam_update<DECOUPLED, AMSGRAD>(pf, to_float(g[i]) * grad_mul, mf, vf, vmf, c);
  p[i] = from_float<T>(pf);
  m[i] = from_float<T>(mf);
  v[i] = from_float<T>(vf);
  if (AMSGRAD) vmax[i] = from_float<T>(vmf);
}

}  // namespace functors
}  // namespace fastopt

#include "fastopt/elementwise.h"

namespace fastopt {
namespace functors {

// Adam/AdamW as a registered elementwise op (fastopt/ops.h), for the paths that need the generic
// launchers (low-bit states).  Hyperparameters and states: OPS["adamw"] ... OPS["adam_ams"] in
// fastopt/_opspec.py.
template <bool DECOUPLED, bool AMSGRAD>
struct AdamOp : NoReduce {
  static constexpr int kStates = AMSGRAD ? 3 : 2;
  static constexpr int kReduce = 0;
  using Coeffs = AdamCoeffs;

  FASTOPT_HOST_DEVICE static Coeffs coeffs(const OpScalars& s) {
    return adam_coeffs(AdamHyper{s.lr, s.h[0], s.h[1], s.h[2], s.h[3]}, s.lr, s.step);
  }

  FASTOPT_HOST_DEVICE static void update(float& p, float g, float (&s)[kMaxStates], const Coeffs& c, const float*) {
    adam_update<DECOUPLED, AMSGRAD>(p, g, s[0], s[1], s[2], c);
  }
};
using AdamWOp = AdamOp<true, false>;
using AdamWAmsOp = AdamOp<true, true>;
using AdamL2Op = AdamOp<false, false>;
using AdamL2AmsOp = AdamOp<false, true>;

}  // namespace functors
}  // namespace fastopt
