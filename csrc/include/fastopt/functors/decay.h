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

}  // namespace functors
}  // namespace fastopt
