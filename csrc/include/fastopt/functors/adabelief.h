// fastopt/functors/adabelief.h -- AdaBelief (Zhuang et al., NeurIPS 2020):
//   s <- b2 s + (1-b2)(g-m)^2 + eps, denom sqrt(s)/c2 + eps.
// Semantics of pytorch_optimizer (equations and operation order: fastopt/reference/<name>.py);
// hyperparameters, state slots and flags: OPS in fastopt/_opspec.py.
#pragma once

#include <cmath>

#include "fastopt/elementwise.h"
#include "fastopt/functors/decay.h"
#include "fastopt/functors/rectify.h"

namespace fastopt {
namespace functors {

template <bool AMS>
struct AdaBeliefOp : NoReduce {
  static constexpr int kStates = AMS ? 3 : 2;  // exp_avg, exp_avg_var[, max_exp_avg_var]
  static constexpr int kReduce = 0;
  struct Coeffs : MomentCoeffs {
    float c2, step_size;
    int mode;
  };

  FASTOPT_HOST_DEVICE static Coeffs coeffs(const OpScalars& s) {
    const double b1 = s.h[0], b2 = s.h[1];
    Coeffs c;
    set_moment_coeffs(c, s);
    const StepSize st = rectified_step(s, b2);
    c.c2 = static_cast<float>((s.flags & kRectify) ? 1.0 : sqrt(1.0 - pow(b2, s.step)));
    c.step_size = debiased_step_size(s, st, b1);
    c.mode = st.mode;
    return c;
  }

  FASTOPT_HOST_DEVICE static void update(float& p, float g, float (&s)[kMaxStates], const Coeffs& c, const float*) {
    decay_then_first_moment(p, g, s[0], c);
    const float r = g - s[0];
    s[1] = c.b2 * s[1] + c.omb2 * r * r + c.eps;
    float sd = s[1];
    if (AMS) {
      s[2] = s[2] > s[1] ? s[2] : s[1];
      sd = s[2];
    }
    if (c.mode == 1) {
      p = p - c.step_size * (s[0] / (sqrtf(sd) / c.c2 + c.eps));
    } else if (c.mode == 2) {
      p = p - c.step_size * s[0];
    }
  }
};

}  // namespace functors
}  // namespace fastopt
