// fastopt/functors/lion.h -- Lion (Chen et al., "Symbolic Discovery of Optimization Algorithms", 2023).
//
// Semantics of pytorch_optimizer.Lion / lion-pytorch:
//   p <- p (1 - wd * (fixed_decay ? 1 : lr))      (weight_decouple)   or   g <- g + wd p
//   u <- sign(m + (1 - b1)(g - m))                 (sign(0) = 0)
//   m <- m + (1 - b2)(g - m)
//   p <- p - lr u
// Hyperparameters, states and flags: OPS["lion"] / OPS["lion_cautious"] in fastopt/_opspec.py.
// Row coefficients (optional): rc[0] the gradient's row mean (use_gc), rc[1] the cautious scale.
#pragma once

#include "fastopt/elementwise.h"
#include "fastopt/functors/decay.h"

namespace fastopt {
namespace functors {

// CAUTIOUS ("lion_cautious", Liang et al., "Cautious Optimizers: Improving Training with One Line of
// Code", 2024, as pytorch_optimizer's apply_cautious): the sign update u is kept only where u g > 0
// and rescaled by numel / (count + 1) per tensor, count = the number of kept elements.  Phase 1 counts
// (acc[0] += u g > 0, nothing written); the wrapper sums the rows of each tensor and sets rc[1] to
// fp32(numel) / (count + 1); phase 0 steps with u * (u g > 0 ? rc[1] : 0).
// Both variants first take g <- g - rc[0]: gradient centralization (use_gc; rc[0] = the row mean of
// g, from the grad_rowsum op's pass; 0 without it), before the weight decay as upstream.
template <bool CAUTIOUS>
struct LionOpT {
  static constexpr int kStates = 1;  // exp_avg
  static constexpr int kReduce = CAUTIOUS ? 1 : 0;
  struct Coeffs {
    float one_minus_beta1, one_minus_beta2, lr;
    Decay decay;
  };

  FASTOPT_HOST_DEVICE static Coeffs coeffs(const OpScalars& s) {
    Coeffs c;
    c.one_minus_beta1 = static_cast<float>(1.0 - s.h[0]);
    c.one_minus_beta2 = static_cast<float>(1.0 - s.h[1]);
    c.lr = static_cast<float>(s.lr);
    c.decay = make_decay(s, s.h[2]);
    return c;
  }

  FASTOPT_HOST_DEVICE static float sign_update(float m, float g, const Coeffs& c) {
    const float blend = m + c.one_minus_beta1 * (g - m);
    return static_cast<float>(blend > 0.0f) - static_cast<float>(blend < 0.0f);
  }

  FASTOPT_HOST_DEVICE static void reduce(float p, float g, float (&s)[kMaxStates], const Coeffs& c, const float* rc,
                                         float (&acc)[kMaxReduce]) {
    g = g - rc[0];
    g = g + c.decay.l2 * p;
    acc[0] += sign_update(s[0], g, c) * g > 0.0f ? 1.0f : 0.0f;
  }

  FASTOPT_HOST_DEVICE static void update(float& p, float g, float (&s)[kMaxStates], const Coeffs& c, const float* rc) {
    g = g - rc[0];
    g = g + c.decay.l2 * p;
    p = p * c.decay.factor;
    float u = sign_update(s[0], g, c);
    if (CAUTIOUS) u = u * (u * g > 0.0f ? rc[1] : 0.0f);
    s[0] = s[0] + c.one_minus_beta2 * (g - s[0]);
    p = p - c.lr * u;
  }
};

using LionOp = LionOpT<false>;
using LionCautiousOp = LionOpT<true>;

}  // namespace functors
}  // namespace fastopt
