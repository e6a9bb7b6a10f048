// fastopt/functors/lamb.h -- LAMB (You et al., "Large Batch Optimization for Deep Learning: Training
// BERT in 76 minutes", ICLR 2020), semantics of pytorch_optimizer.Lamb (fastopt/reference/lamb.py).
//
// phase 1 (reduce):  m = b1 m + b3 g ;  v = b2 v + (1-b2) g^2 ;  p' = p decay ;
//                    u = m / (sqrt(v) + eps) + l2 p'    acc[0] += p'^2, acc[1] += u^2
// (wrapper)          rc[0] = step_size * trust, trust = min(|p'|, clamp) / (|u| + eps) (1 if a norm is 0)
// phase 0 (update):  p = p' - rc[0] u      (m, v as stored by phase 1; g unused)
// Hyperparameters, states and flags: OPS["lamb"] in fastopt/_opspec.py (beta3 = 1 - b1 with
// grad_averaging, else 1).
#pragma once

#include <cmath>

#include "fastopt/elementwise.h"
#include "fastopt/functors/decay.h"

namespace fastopt {
namespace functors {

struct LambOp {
  static constexpr int kStates = 2;  // exp_avg, exp_avg_sq
  static constexpr int kReduce = 2;
  struct Coeffs {
    Decay decay;
    float b1, b2, b3, omb2, eps;
  };

  FASTOPT_HOST_DEVICE static Coeffs coeffs(const OpScalars& s) {
    Coeffs c;
    c.decay = make_decay(s, s.h[3]);
    c.b1 = static_cast<float>(s.h[0]);
    c.b2 = static_cast<float>(s.h[1]);
    c.b3 = static_cast<float>(s.h[2]);
    c.omb2 = static_cast<float>(1.0 - s.h[1]);
    c.eps = static_cast<float>(s.h[4]);
    return c;
  }

  FASTOPT_HOST_DEVICE static float direction(float pd, float m, float v, const Coeffs& c) {
    return m / (sqrtf(v) + c.eps) + c.decay.l2 * pd;
  }

  FASTOPT_HOST_DEVICE static void reduce(float p, float g, float (&s)[kMaxStates], const Coeffs& c, const float*,
                                         float (&acc)[kMaxReduce]) {
    s[0] = c.b1 * s[0] + c.b3 * g;
    s[1] = c.b2 * s[1] + c.omb2 * g * g;
    const float pd = p * c.decay.factor;
    const float u = direction(pd, s[0], s[1], c);
    acc[0] += pd * pd;
    acc[1] += u * u;
  }

  FASTOPT_HOST_DEVICE static void update(float& p, float, float (&s)[kMaxStates], const Coeffs& c, const float* rc) {
    const float pd = p * c.decay.factor;
    p = pd - rc[0] * direction(pd, s[0], s[1], c);
  }
};

}  // namespace functors
}  // namespace fastopt
