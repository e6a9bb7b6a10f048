// fastopt/functors/decay.h -- the weight decay shared by the pytorch_optimizer-style ops (flag bits: fastopt/flags.h).
#pragma once

#include "fastopt/elementwise.h"
#include "fastopt/flags.h"

namespace fastopt {
namespace functors {

// Weight decay as pytorch_optimizer applies it: decoupled p *= 1 - wd (fixed_decay ? 1 : lr), or
// L2 g += wd p; a zero wd leaves both untouched.
struct Decay {
  float factor, l2;
};
FASTOPT_HOST_DEVICE Decay make_decay(const OpScalars& s, double wd) {
  const bool decouple = s.flags & kDecouple;
  Decay d;
  d.factor = static_cast<float>(decouple ? 1.0 - wd * ((s.flags & kFixedDecay) ? 1.0 : s.lr) : 1.0);
  d.l2 = static_cast<float>(decouple ? 0.0 : wd);
  return d;
}

// The coefficients AdaBelief, diffGrad and EXAdam share (h[0] b1, h[1] b2, h[2] wd, h[3] eps), and the
// opening of their updates: weight decay, then the first moment m <- m + (1 - b1)(g - m).
struct MomentCoeffs {
  Decay decay;
  float omb1, b2, omb2, eps;
};
FASTOPT_HOST_DEVICE void set_moment_coeffs(MomentCoeffs& c, const OpScalars& s) {
  c.decay = make_decay(s, s.h[2]);
  c.omb1 = static_cast<float>(1.0 - s.h[0]);
  c.b2 = static_cast<float>(s.h[1]);
  c.omb2 = static_cast<float>(1.0 - s.h[1]);
  c.eps = static_cast<float>(s.h[3]);
}
FASTOPT_HOST_DEVICE void decay_then_first_moment(float& p, float& g, float& m, const MomentCoeffs& c) {
  p = p * c.decay.factor;
  g = g + c.decay.l2 * p;
  m = m + c.omb1 * (g - m);
}

}  // namespace functors
}  // namespace fastopt
