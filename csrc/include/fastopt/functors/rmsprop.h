// fastopt/functors/rmsprop.h -- RMSprop (Hinton, Coursera lecture 6e; centered: Graves 2013), semantics
// of torch.optim.RMSprop (fastopt/reference/rmsprop.py):
//   g    <- g + wd p
//   v    <- alpha v + (1 - alpha) g g                           (square_avg)
//   m    <- lerp(m, g, 1 - alpha)     [CENTERED; torch.lerp's two formulas]   (grad_avg)
//   avg   = sqrt(CENTERED ? v - m m : v) + eps
//   buf  <- momentum buf + g / avg    [MOMENTUM]   (momentum_buffer)
//   p    <- p - lr (MOMENTUM ? buf : g / avg)
// State slots in torch's order: square_avg, [momentum_buffer], [grad_avg].
// Hyperparameters and states: OPS["rmsprop"], OPS["rmsprop_momentum"], OPS["rmsprop_centered"],
// OPS["rmsprop_centered_momentum"] in fastopt/_opspec.py.
#pragma once

#include <cmath>

#include "fastopt/elementwise.h"
#include "fastopt/functors/adamp.h"  // Lerp

namespace fastopt {
namespace functors {

template <bool MOMENTUM, bool CENTERED>
struct RmspropOp : NoReduce {
  static constexpr int kStates = 1 + (MOMENTUM ? 1 : 0) + (CENTERED ? 1 : 0);
  static constexpr int kReduce = 0;
  static constexpr int kBuf = 1;                      // momentum_buffer's slot (MOMENTUM)
  static constexpr int kGradAvg = MOMENTUM ? 2 : 1;   // grad_avg's slot (CENTERED)
  struct Coeffs {
    float alpha, one_minus_alpha, eps, wd, momentum, lr;
    Lerp lerp;  // weight 1 - alpha
  };

  FASTOPT_HOST_DEVICE static Coeffs coeffs(const OpScalars& s) {
    Coeffs c;
    c.alpha = static_cast<float>(s.h[0]);
    c.one_minus_alpha = static_cast<float>(1.0 - s.h[0]);
    c.eps = static_cast<float>(s.h[1]);
    c.wd = static_cast<float>(s.h[2]);
    c.momentum = static_cast<float>(s.h[3]);
    c.lr = static_cast<float>(s.lr);
    c.lerp = make_lerp(1.0 - s.h[0]);
    return c;
  }

  FASTOPT_HOST_DEVICE static void update(float& p, float g, float (&s)[kMaxStates], const Coeffs& c, const float* rc) {
    (void)rc;
    g = g + c.wd * p;
    s[0] = s[0] * c.alpha + (c.one_minus_alpha * g) * g;  // torch's mul_, addcmul_
    float var = s[0];
    if (CENTERED) {
      const float m = lerp(s[kGradAvg], g, c.lerp);
      s[kGradAvg] = m;
      var = var - m * m;
    }
    const float avg = sqrtf(var) + c.eps;
    if (MOMENTUM) {
      const float buf = s[kBuf] * c.momentum + g / avg;
      s[kBuf] = buf;
      p = p - c.lr * buf;
    } else {
      p = p - (c.lr * g) / avg;  // torch's addcdiv_(g, avg, value=-lr)
    }
  }
};

// (aliases: FASTOPT_FOR_EACH_OP's macro arguments cannot hold a comma)
using RmspropPlainOp = RmspropOp<false, false>;
using RmspropMomentumOp = RmspropOp<true, false>;
using RmspropCenteredOp = RmspropOp<false, true>;
using RmspropCenteredMomentumOp = RmspropOp<true, true>;

}  // namespace functors
}  // namespace fastopt
