// fastopt/functors/lion.h -- Lion (Chen et al., "Symbolic Discovery of Optimization Algorithms", 2023).
//
// Semantics of pytorch_optimizer.Lion / lion-pytorch:
//   p <- p (1 - wd * (fixed_decay ? 1 : lr))      (weight_decouple)   or   g <- g + wd p
//   u <- sign(m + (1 - b1)(g - m))                 (sign(0) = 0)
//   m <- m + (1 - b2)(g - m)
//   p <- p - lr u
// Hyper: h[0] b1, h[1] b2, h[2] wd.  Flags: bit 0 weight_decouple, bit 1 fixed_decay.
#pragma once

#include "fastopt/elementwise.h"
#include "fastopt/functors/decay.h"

namespace fastopt {
namespace functors {

struct LionOp : NoReduce {
  static constexpr int kStates = 1;  // exp_avg
  static constexpr int kReduce = 0;
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

  FASTOPT_HOST_DEVICE static void update(float& p, float g, float (&s)[kMaxStates], const Coeffs& c, const float*) {
    g = g + c.decay.l2 * p;
    p = p * c.decay.factor;
    const float blend = s[0] + c.one_minus_beta1 * (g - s[0]);
    const float u = static_cast<float>(blend > 0.0f) - static_cast<float>(blend < 0.0f);
    s[0] = s[0] + c.one_minus_beta2 * (g - s[0]);
    p = p - c.lr * u;
  }
};

}  // namespace functors
}  // namespace fastopt
