// fastopt/functors/decay.h -- the flag bits and weight decay shared by the pytorch_optimizer-style ops.
#pragma once

#include "fastopt/elementwise.h"

namespace fastopt {
namespace functors {

enum : int64_t { kDecouple = 1, kFixedDecay = 2, kRectify = 4, kDegeneratedToSgd = 8, kAdamDebias = 16 };

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
