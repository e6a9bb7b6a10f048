// fastopt/functors/adahessian.h -- AdaHessian (Yao et al., "ADAHESSIAN: An Adaptive Second Order
// Optimizer for Machine Learning", AAAI 2021): the update, given the Hutchinson estimate D of the
// Hessian diagonal (computed before the call by fastopt.optim.adahessian: probes, double backward,
// csrc/cpu/probe.cpp or triton_kernels/adahessian.py).
//   p <- p (1 - wd (fixed_decay ? 1 : lr))  [weight_decouple]   or   g <- g + wd p
//   m <- m + (1 - b1)(g - m)
//   v <- b2 v + (1 - b2) D D                  ("adahessian": a step with a new estimate, D in slot 2)
//   p <- p - (lr / bc1) (m / ((v / bc2)^(k/2) + eps))      (k = hessian_power; sqrt for k = 1)
// "adahessian_plain": the steps in between (update_period > 1): v as it is.
// Semantics of pytorch_optimizer 4.1.0's AdaHessian (fastopt/reference/adahessian.py); hyperparameters,
// state slots and flags: OPS["adahessian"] in fastopt/_opspec.py.
#pragma once

#include <cmath>

#include "fastopt/elementwise.h"
#include "fastopt/functors/decay.h"

namespace fastopt {
namespace functors {

template <bool UPDATE>
struct AdaHessianOp : NoReduce {
  static constexpr int kStates = UPDATE ? 3 : 2;  // exp_avg, exp_hessian_diag_sq[, the estimate D]
  static constexpr int kReduce = 0;
  struct Coeffs : MomentCoeffs {
    float bc2, step_size, half_power;
    bool sqrt_path;
  };

  // h: beta1, beta2, weight_decay, eps, hessian_power
  FASTOPT_HOST_DEVICE static Coeffs coeffs(const OpScalars& s) {
    Coeffs c;
    set_moment_coeffs(c, s);
    const double bc1 = 1.0 - pow(s.h[0], s.step);
    c.bc2 = static_cast<float>(1.0 - pow(s.h[1], s.step));
    c.step_size = static_cast<float>(s.lr / bc1);
    c.half_power = static_cast<float>(s.h[4] / 2.0);
    c.sqrt_path = s.h[4] == 1.0;
    return c;
  }

  FASTOPT_HOST_DEVICE static void update(float& p, float g, float (&s)[kMaxStates], const Coeffs& c, const float*) {
    decay_then_first_moment(p, g, s[0], c);
    if (UPDATE) s[1] = c.b2 * s[1] + c.omb2 * s[2] * s[2];
    const float x = s[1] / c.bc2;
    const float denom = (c.sqrt_path ? sqrtf(x) : powf(x, c.half_power)) + c.eps;
    p = p - c.step_size * (s[0] / denom);
  }
};

}  // namespace functors
}  // namespace fastopt
