// fastopt/functors/diffgrad.h -- diffGrad (Dubey et al., IEEE TNNLS 2019):
//   the friction sigmoid(|g_{t-1} - g_t|) scales m.
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
struct DiffGradOp : NoReduce {
  static constexpr int kStates = AMS ? 4 : 3;  // exp_avg, exp_avg_sq, previous_grad[, max_exp_avg_sq]
  static constexpr int kReduce = 0;
  struct Coeffs : MomentCoeffs {
    float step_size;
    int mode;
  };

  FASTOPT_HOST_DEVICE static Coeffs coeffs(const OpScalars& s) {
    const double b1 = s.h[0], b2 = s.h[1];
    Coeffs c;
    set_moment_coeffs(c, s);
    StepSize st = rectified_step(s, b2);
    if (!(s.flags & kRectify)) st.size *= sqrt(1.0 - pow(b2, s.step));
    c.step_size = debiased_step_size(s, st, b1);
    c.mode = st.mode;
    return c;
  }

  FASTOPT_HOST_DEVICE static void update(float& p, float g, float (&s)[kMaxStates], const Coeffs& c, const float*) {
    decay_then_first_moment(p, g, s[0], c);
    s[1] = c.b2 * s[1] + c.omb2 * g * g;
    float vd = s[1];
    if (AMS) {
      s[3] = s[3] > s[1] ? s[3] : s[1];
      vd = s[3];
    }
    if (c.mode == 1) {
      const float denom = sqrtf(vd + 1e-15f) + c.eps;
      const float dfc = 1.0f / (1.0f + exp_nonpositive(-fabsf(s[2] - g)));
      p = p - c.step_size * ((dfc * s[0]) / denom);
    } else if (c.mode == 2) {
      p = p - c.step_size * s[0];
    }
    s[2] = g;
  }
};

}  // namespace functors
}  // namespace fastopt
