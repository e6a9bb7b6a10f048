// fastopt/functors/adan.h -- Adan (Xie et al., "Adan: Adaptive Nesterov Momentum Algorithm for
// Faster Optimizing Deep Models", 2022), semantics of pytorch_optimizer.Adan; the equations and
// their order are those of fastopt/reference/adan.py:
//   diff = g + prev (prev = -g_{t-1}; diff = 0 at t = 1)   m += (1-b1)(g - m)   d += (1-b2)(diff - d)
//   u = g + b2 diff    n = b3 n + (1-b3) u^2    denom = sqrt(n)/sqrt(1-b3^t) + eps
//   p *= 1 - lr wd [weight_decouple]   p -= lr/(1-b1^t) m/denom   p -= lr b2/(1-b2^t) d/denom
//   p /= 1 + lr wd [not weight_decouple]    prev = -g
// Hyperparameters, states and flags: OPS["adan"] in fastopt/_opspec.py (weight_decouple is the
// official code's no_prox=True).  rc[0] (optional row coefficient): the gradient's row
// mean for use_gc (gradient centralization, subtracted first), from the grad_rowsum op's pass.
#pragma once

#include <cmath>

#include "fastopt/elementwise.h"
#include "fastopt/flags.h"

namespace fastopt {
namespace functors {

struct AdanOp : NoReduce {
  static constexpr int kStates = 4;
  static constexpr int kReduce = 0;

  struct Coeffs {
    float omb1, omb2, b2, b3, omb3, bc3_sqrt, eps, step_size, diff_step_size, decay, prox;
    float not_first;  // 0 at t = 1: the first gradient difference is 0 (-rc[0] with use_gc)
    float first;      // 1 - not_first
  };

  FASTOPT_HOST_DEVICE static Coeffs coeffs(const OpScalars& s) {
    const double b1 = s.h[0], b2 = s.h[1], b3 = s.h[2], wd = s.h[3], t = s.step, lr = s.lr;
    const bool decouple = s.flags & kDecouple;
    Coeffs c;
    c.omb1 = static_cast<float>(1.0 - b1);
    c.omb2 = static_cast<float>(1.0 - b2);
    c.b2 = static_cast<float>(b2);
    c.b3 = static_cast<float>(b3);
    c.omb3 = static_cast<float>(1.0 - b3);
    c.bc3_sqrt = static_cast<float>(sqrt(1.0 - pow(b3, t)));
    c.eps = static_cast<float>(s.h[4]);
    c.step_size = static_cast<float>(lr / (1.0 - pow(b1, t)));
    c.diff_step_size = static_cast<float>(lr * b2 / (1.0 - pow(b2, t)));
    c.decay = static_cast<float>(decouple ? 1.0 - lr * wd : 1.0);
    c.prox = static_cast<float>(decouple ? 1.0 : 1.0 + lr * wd);
    c.not_first = t == 1.0 ? 0.0f : 1.0f;
    c.first = 1.0f - c.not_first;
    return c;
  }

  FASTOPT_HOST_DEVICE static void update(float& p, float g, float (&s)[kMaxStates], const Coeffs& c, const float* rc) {
    // A multiply, not a select on the first step: a data-independent branch in this loop keeps GCC
    // from vectorizing it (about 5x slower on a CPU core when it does).
    // Gradient centralization (use_gc): rc[0] is the row mean of g, else 0.  Upstream starts
    // previous_grad at minus the raw first gradient, so the first difference is -rc[0] (0 without gc).
    g = g - rc[0];
    const float diff = (g + s[3]) * c.not_first - rc[0] * c.first;
    s[0] = s[0] + c.omb1 * (g - s[0]);
    s[2] = s[2] + c.omb2 * (diff - s[2]);
    const float u = g + c.b2 * diff;
    s[1] = c.b3 * s[1] + c.omb3 * u * u;
    const float denom = sqrtf(s[1]) / c.bc3_sqrt + c.eps;
    p = p * c.decay;
    p = p - c.step_size * (s[0] / denom);
    p = p - c.diff_step_size * (s[2] / denom);
    p = p / c.prox;
    s[3] = -g;
  }
};

}  // namespace functors
}  // namespace fastopt
