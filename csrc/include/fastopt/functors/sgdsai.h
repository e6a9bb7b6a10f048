// fastopt/functors/sgdsai.h -- SGD-SaI (Xu et al., "No More Adam: Learning Rate Scaling at
// Initialization is All You Need", 2024), semantics of pytorch_optimizer.SGDSaI
// (fastopt/reference/sgdsai.py).  The per-tensor g-SNR is computed once, at the first step, by the
// wrapper; every step is then elementwise with rc[0] = fp32(lr * gsnr):
//   buf = lerp(buf, g, 1 - momentum)      [MOMENTUM; torch.lerp's two formulas]   else buf = g
//   buf += wd p                            [L2: only without momentum, as upstream]
//   p = p (1 - lr wd) [weight_decouple]  - rc[0] buf
// Hyperparameters, states and flags: OPS["sgdsai"] / OPS["sgdsai_plain"] in fastopt/_opspec.py.
#pragma once

#include "fastopt/elementwise.h"
#include "fastopt/functors/adamp.h"
#include "fastopt/functors/decay.h"

namespace fastopt {
namespace functors {

template <bool MOMENTUM>
struct SgdSaiOp : NoReduce {
  static constexpr int kStates = MOMENTUM ? 1 : 0;  // momentum_buffer
  static constexpr int kReduce = 0;
  struct Coeffs {
    Decay decay;
    Lerp lerp;  // weight 1 - momentum, with torch.lerp's two formulas
  };

  FASTOPT_HOST_DEVICE static Coeffs coeffs(const OpScalars& s) {
    Coeffs c;
    c.decay = make_decay(s, s.h[1]);
    c.lerp = make_lerp(1.0 - s.h[0]);
    return c;
  }

  FASTOPT_HOST_DEVICE static void update(float& p, float g, float (&s)[kMaxStates], const Coeffs& c, const float* rc) {
    float buf = g;
    if (MOMENTUM) {
      buf = lerp(s[0], g, c.lerp);
      s[0] = buf;
    }
    buf = buf + c.decay.l2 * p;
    p = p * c.decay.factor - rc[0] * buf;
  }
};

}  // namespace functors
}  // namespace fastopt
