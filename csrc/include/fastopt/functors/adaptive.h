// fastopt/functors/adaptive.h -- AdaBelief, diffGrad and EXAdam: Adam-family rules with the
// semantics of pytorch_optimizer (equations and operation order: fastopt/reference/<name>.py).
//
//   AdaBelief (Zhuang et al., NeurIPS 2020): s <- b2 s + (1-b2)(g-m)^2 + eps, denom sqrt(s)/c2 + eps
//   diffGrad (Dubey et al., IEEE TNNLS 2019): friction sigmoid(|g_{t-1} - g_t|) scales m
//   EXAdam (Adly, 2024): debiasing with cross terms d1, d2 and a gradient-accelerated numerator
//
// Common hyper: h[0] b1, h[1] b2, h[2] wd, h[3] eps, h[4] n_sma_threshold.  Flags: bit 0
// weight_decouple, bit 1 fixed_decay, bit 2 rectify (RAdam), bit 3 degenerated_to_sgd, bit 4 adam_debias.
#pragma once

#include <cmath>

#include "fastopt/elementwise.h"
#include "fastopt/functors/decay.h"

namespace fastopt {
namespace functors {

// pytorch_optimizer's step size with optional RAdam rectification (fp64), before the 1/(1 - b1^t)
// debias.  mode: 1 adaptive, 2 plain momentum step (degenerated to SGD), 0 no update.
struct StepSize {
  double size;
  int mode;
};
FASTOPT_HOST_DEVICE StepSize rectified_step(const OpScalars& s, double beta2) {
  StepSize r{s.lr, 1};
  if (!(s.flags & kRectify)) return r;
  const double n_sma_max = 2.0 / (1.0 - beta2) - 1.0;
  const double b2t = pow(beta2, s.step);
  const double n_sma = n_sma_max - 2.0 * s.step * b2t / (1.0 - b2t);
  if (n_sma >= s.h[4]) {
    const double rt2 = (1.0 - b2t) * (n_sma - 4.0) / (n_sma_max - 4.0) * (n_sma - 2.0) / n_sma * n_sma_max /
                       (n_sma_max - 2.0);
    r.size = s.lr * sqrt(rt2);
  } else {
    r.size = (s.flags & kDegeneratedToSgd) ? s.lr : -s.lr;
    r.mode = r.size > 0.0 ? 2 : 0;
  }
  return r;
}

template <bool AMS>
struct AdaBeliefOp : NoReduce {
  static constexpr int kStates = AMS ? 3 : 2;  // exp_avg, exp_avg_var[, max_exp_avg_var]
  static constexpr int kReduce = 0;
  struct Coeffs {
    Decay decay;
    float omb1, b2, omb2, eps, c2, step_size;
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
    const StepSize st = rectified_step(s, b2);
    c.c2 = static_cast<float>((s.flags & kRectify) ? 1.0 : sqrt(1.0 - pow(b2, s.step)));
    c.step_size = static_cast<float>((s.flags & kAdamDebias) ? st.size : st.size / (1.0 - pow(b1, s.step)));
    c.mode = st.mode;
    return c;
  }

  FASTOPT_HOST_DEVICE static void update(float& p, float g, float (&s)[kMaxStates], const Coeffs& c, const float*) {
    p = p * c.decay.factor;
    g = g + c.decay.l2 * p;
    s[0] = s[0] + c.omb1 * (g - s[0]);
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

struct ExAdamOp : NoReduce {
  static constexpr int kStates = 2;  // exp_avg, exp_avg_sq
  static constexpr int kReduce = 0;
  struct Coeffs {
    Decay decay;
    float omb1, b2, omb2, eps, bc1, bc2, b1t, b2t, lr;
  };

  FASTOPT_HOST_DEVICE static Coeffs coeffs(const OpScalars& s) {
    const double b1 = s.h[0], b2 = s.h[1];
    const double bc1 = 1.0 - pow(b1, s.step), bc2 = 1.0 - pow(b2, s.step);
    Coeffs c;
    c.decay = make_decay(s, s.h[2]);
    c.omb1 = static_cast<float>(1.0 - b1);
    c.b2 = static_cast<float>(b2);
    c.omb2 = static_cast<float>(1.0 - b2);
    c.eps = static_cast<float>(s.h[3]);
    c.bc1 = static_cast<float>(bc1);
    c.bc2 = static_cast<float>(bc2);
    c.b1t = static_cast<float>(1.0 - bc1);
    c.b2t = static_cast<float>(1.0 - bc2);
    c.lr = static_cast<float>(s.lr);
    return c;
  }

  FASTOPT_HOST_DEVICE static void update(float& p, float g, float (&s)[kMaxStates], const Coeffs& c, const float*) {
    p = p * c.decay.factor;
    g = g + c.decay.l2 * p;
    s[0] = s[0] + c.omb1 * (g - s[0]);
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
