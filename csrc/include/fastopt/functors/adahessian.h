// fastopt/functors/adahessian.h -- AdaHessian (Yao et al., "ADAHESSIAN: An Adaptive Second Order
// Optimizer for Machine Learning", AAAI 2021): the update, given the Hutchinson estimate D of the
// Hessian diagonal (computed before the call by fastopt.optim.adahessian: probes, double backward,
// csrc/cpu/probe.cpp or triton_kernels/adahessian.py).
//   p <- p (1 - wd (fixed_decay ? 1 : lr))  [weight_decouple]   or   g <- g + wd p
//   m <- m + (1 - b1)(g - m)
//   v <- b2 v + (1 - b2) D D                  ("adahessian": a step with a new estimate, D in slot 2)
//   p <- p - (lr / bc1) (m / ((v / bc2)^(k/2) + eps))      (k = hessian_power; sqrt for k = 1)
// "adahessian_plain": the steps in between (update_period > 1): v as it is.  The "_pow" variants take any
// hessian_power (pow_nonnegative); the others are its value 1 (sqrt), the default (two op types, so that
// the CPU loops of each vectorize: a select between sqrt and pow would compute both).
// Semantics of pytorch_optimizer 4.1.0's AdaHessian (fastopt/reference/adahessian.py); hyperparameters,
// state slots and flags: OPS["adahessian"] in fastopt/_opspec.py.
#pragma once

#include <cmath>

#include "fastopt/elementwise.h"
#include "fastopt/functors/decay.h"

namespace fastopt {
namespace functors {

// x^y for x >= 0 (or inf, NaN) and 0 < y <= 1: the denominator's power (hessian_power / 2).  On the
// device powf; on the host log2 and exp2 by polynomials in fp64 (|error| of the fp64 result < 1e-9
// relative, so the fp32 result is powf's up to its last-bit rounding), written branch-free so that the
// CPU loops vectorize (glibc's powf does not).
FASTOPT_HOST_DEVICE float pow_nonnegative(float x, float y) {
#if defined(__CUDA_ARCH__)
  return powf(x, y);
#else
  const bool tiny = x < 1.17549435e-38f;  // 0 and the subnormals: scaled by 2^24 first
  const uint32_t u = float_bits(tiny ? x * 16777216.0f : x);
  const int32_t e0 = static_cast<int32_t>((u >> 23) & 0xFFu) - 127 - (tiny ? 24 : 0);
  const float mf = bits_float((u & 0x007FFFFFu) | 0x3F800000u);  // x = mf 2^e0, mf in [1, 2)
  const bool big = mf > 1.41421356f;                               // m in [sqrt(1/2), sqrt(2)]
  const double m = big ? 0.5 * static_cast<double>(mf) : static_cast<double>(mf);
  const double e = static_cast<double>(e0 + (big ? 1 : 0));
  const double s = (m - 1.0) / (m + 1.0), s2 = s * s;              // ln m = 2 atanh(s)
  double p = 1.0 / 13.0;
  p = p * s2 + 1.0 / 11.0;
  p = p * s2 + 1.0 / 9.0;
  p = p * s2 + 1.0 / 7.0;
  p = p * s2 + 1.0 / 5.0;
  p = p * s2 + 1.0 / 3.0;
  p = p * s2 + 1.0;
  const double t = static_cast<double>(y) * (e + 2.0 * s * p * 1.4426950408889634);  // y log2(x)
  const int32_t n = static_cast<int32_t>(t + 1024.5) - 1024;                          // round(t)
  const double r = (t - static_cast<double>(n)) * 0.6931471805599453;                 // |r| <= ln2 / 2
  double q = 1.0 / 40320.0;
  q = q * r + 1.0 / 5040.0;
  q = q * r + 1.0 / 720.0;
  q = q * r + 1.0 / 120.0;
  q = q * r + 1.0 / 24.0;
  q = q * r + 1.0 / 6.0;
  q = q * r + 0.5;
  q = q * r + 1.0;
  q = q * r + 1.0;
  const double scale = bit_cast<double>(static_cast<uint64_t>(static_cast<int64_t>(n) + 1023) << 52);
  const float out = static_cast<float>(q * scale);
  const bool special = !(x > 0.0f) || x == INFINITY;  // 0, NaN, inf: x^y = x
  return special ? x : out;
#endif
}

template <bool UPDATE, bool POW>
struct AdaHessianOp : NoReduce {
  static constexpr int kStates = UPDATE ? 3 : 2;  // exp_avg, exp_hessian_diag_sq[, the estimate D]
  static constexpr int kReduce = 0;
  struct Coeffs : MomentCoeffs {
    float bc2, step_size, half_power;
  };

  // h: beta1, beta2, weight_decay, eps, hessian_power
  FASTOPT_HOST_DEVICE static Coeffs coeffs(const OpScalars& s) {
    Coeffs c;
    set_moment_coeffs(c, s);
    const double bc1 = 1.0 - pow(s.h[0], s.step);
    c.bc2 = static_cast<float>(1.0 - pow(s.h[1], s.step));
    c.step_size = static_cast<float>(s.lr / bc1);
    c.half_power = static_cast<float>(s.h[4] / 2.0);
    return c;
  }

  FASTOPT_HOST_DEVICE static void update(float& p, float g, float (&s)[kMaxStates], const Coeffs& c, const float*) {
    decay_then_first_moment(p, g, s[0], c);
    if (UPDATE) s[1] = c.b2 * s[1] + c.omb2 * s[2] * s[2];
    const float x = s[1] / c.bc2;
    const float denom = (POW ? pow_nonnegative(x, c.half_power) : sqrtf(x)) + c.eps;
    p = p - c.step_size * (s[0] / denom);
  }
};

// The registered types (ops.h: no commas in its macro arguments).
using AdaHessianSqrtOp = AdaHessianOp<true, false>;
using AdaHessianPlainSqrtOp = AdaHessianOp<false, false>;
using AdaHessianPowOp = AdaHessianOp<true, true>;
using AdaHessianPlainPowOp = AdaHessianOp<false, true>;

}  // namespace functors
}  // namespace fastopt
