// fastopt/functors/adagrad.h -- Adagrad (Duchi, Hazan & Singer, JMLR 2011), semantics of
// torch.optim.Adagrad (fastopt/reference/adagrad.py); t = the step after this one:
//   g   <- g + wd p
//   clr  = lr / (1 + (t - 1) lr_decay)          (fp64, rounded to fp32 once per tensor)
//   sum <- sum + g g
//   p   <- p - clr g / (sqrt(sum) + eps)
// The state "sum" starts at initial_accumulator_value (made by the wrapper).
// Hyperparameters and states: OPS["adagrad"] in fastopt/_opspec.py.
#pragma once

#include <cmath>

#include "fastopt/elementwise.h"

namespace fastopt {
namespace functors {

struct AdagradOp : NoReduce {
  static constexpr int kStates = 1;  // sum
  static constexpr int kReduce = 0;
  struct Coeffs {
    float clr, wd, eps;
  };

  FASTOPT_HOST_DEVICE static Coeffs coeffs(const OpScalars& s) {
    Coeffs c;
    c.clr = static_cast<float>(s.lr / (1.0 + (s.step - 1.0) * s.h[0]));
    c.wd = static_cast<float>(s.h[1]);
    c.eps = static_cast<float>(s.h[2]);
    return c;
  }

  FASTOPT_HOST_DEVICE static void update(float& p, float g, float (&s)[kMaxStates], const Coeffs& c, const float* rc) {
    (void)rc;
    g = g + c.wd * p;
    s[0] = s[0] + g * g;
    const float std_ = sqrtf(s[0]) + c.eps;
    p = p - c.clr * g / std_;
  }
};

}  // namespace functors
}  // namespace fastopt
