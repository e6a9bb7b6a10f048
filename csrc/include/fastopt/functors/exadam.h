// fastopt/functors/exadam.h -- EXAdam (Adly, 2024): debiasing with cross terms
//   d1, d2 and a gradient-accelerated numerator.
// Semantics of pytorch_optimizer (equations and operation order: fastopt/reference/<name>.py);
// hyperparameters, state slots and flags: OPS in fastopt/_opspec.py.
#pragma once

#include <cmath>

#include "fastopt/elementwise.h"
#include "fastopt/functors/decay.h"

namespace fastopt {
namespace functors {

struct ExAdamOp : NoReduce {
  static constexpr int kStates = 2;  // exp_avg, exp_avg_sq
  static constexpr int kReduce = 0;
  struct Coeffs : MomentCoeffs {
    float bc1, bc2, b1t, b2t, lr;
  };

  FASTOPT_HOST_DEVICE static Coeffs coeffs(const OpScalars& s) {
    const double b1 = s.h[0], b2 = s.h[1];
    const double bc1 = 1.0 - pow(b1, s.step), bc2 = 1.0 - pow(b2, s.step);
    Coeffs c;
    set_moment_coeffs(c, s);
    c.bc1 = static_cast<float>(bc1);
    c.bc2 = static_cast<float>(bc2);
    c.b1t = static_cast<float>(1.0 - bc1);
    c.b2t = static_cast<float>(1.0 - bc2);
    c.lr = static_cast<float>(s.lr);
    return c;
  }

  FASTOPT_HOST_DEVICE static void update(float& p, float g, float (&s)[kMaxStates], const Coeffs& c, const float*) {
    decay_then_first_moment(p, g, s[0], c);
    s[1] = c.b2 * s[1] + c.omb2 * g * g;
    const float d1 = 1.0f + c.b2t * (s[1] / (s[1] + c.eps));
    const float m2 = s[0] * s[0];
    const float d2 = 1.0f + c.b1t * (m2 / (m2 + c.eps));
    const float u = (s[0] / c.bc1) * d1 + d1 * (g / c.bc1);
    const float denom = sqrtf(d2 * (s[1] / c.bc2)) + c.eps;
    p = p - c.lr * (u / denom);
  }
};

}  // namespace functors
}  // namespace fastopt
