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
  struct Coeffs {
    Decay decay;
    float omb1, b2, omb2, eps, step_size;
    int mode;
  };

  FASTOPT_HOST_DEVICE static Coeffs coeffs(const OpScalars& s) {
    const double b1 = s.h[0], b2 = s.h[1];
    Coeffs c;
    c.decay = make_decay(s, s.h[2]);
    c.omb1 = static_cast<float>(1.0 - b1);
    c.b2 = static_cast<float>(b2);
    c.omb2 = static_cast<float>(1.0 - b2);
    c.eps = static_cast<float>(s.h[3]);
    StepSize st = rectified_step(s, b2);
    if (!(s.flags & kRectify)) st.size *= sqrt(1.0 - pow(b2, s.step));
    c.step_size = static_cast<float>((s.flags & kAdamDebias) ? st.size : st.size / (1.0 - pow(b1, s.step)));
    c.mode = st.mode;
    return c;
  }

  FASTOPT_HOST_DEVICE static void update(float& p, float g, float (&s)[kMaxStates], const Coeffs& c, const float*) {
    p = p * c.decay.factor;
    g = g + c.decay.l2 * p;
    s[0] = s[0] + c.omb1 * (g - s[0]);
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
