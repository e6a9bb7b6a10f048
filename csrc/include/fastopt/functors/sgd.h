// fastopt/functors/sgd.h -- SGD with momentum, semantics of torch.optim.SGD (fastopt/reference/sgd.py).
//
//   g   <- g + wd p                                   (weight_decay, L2 as torch)
//   buf <- (t == 1) ? g : momentum buf + (1 - dampening) g        [MOMENTUM; t = the step after this one]
//   d   <- nesterov ? g + momentum buf : buf                      [MOMENTUM]   else d = g
//   p   <- p - lr d
// torch creates momentum_buffer = clone(g) at its first momentum step; fastopt's wrapper makes the
// buffer with the step counter at 0, so "t == 1" is that step (fastopt/optim/sgd.py, NOTE: [SGD's step]).
// Hyperparameters, states and flags: OPS["sgd"] / OPS["sgd_plain"] in fastopt/_opspec.py.
#pragma once

#include "fastopt/elementwise.h"
#include "fastopt/flags.h"

namespace fastopt {
namespace functors {

template <bool MOMENTUM>
struct SgdOp : NoReduce {
  static constexpr int kStates = MOMENTUM ? 1 : 0;  // momentum_buffer
  static constexpr int kReduce = 0;
  struct Coeffs {
    float momentum, one_minus_dampening, wd, lr;
    bool first, nesterov;
  };

  FASTOPT_HOST_DEVICE static Coeffs coeffs(const OpScalars& s) {
    Coeffs c;
    c.momentum = static_cast<float>(s.h[0]);
    c.one_minus_dampening = static_cast<float>(1.0 - s.h[1]);
    c.wd = static_cast<float>(s.h[2]);
    c.lr = static_cast<float>(s.lr);
    c.first = s.step <= 1.0;
    c.nesterov = (s.flags & kNesterov) != 0;
    return c;
  }

  FASTOPT_HOST_DEVICE static void update(float& p, float g, float (&s)[kMaxStates], const Coeffs& c, const float* rc) {
    (void)rc;
    g = g + c.wd * p;
    if (MOMENTUM) {
      const float buf = c.first ? g : c.momentum * s[0] + c.one_minus_dampening * g;
      s[0] = buf;
      g = c.nesterov ? g + c.momentum * buf : buf;
    }
    p = p - c.lr * g;
  }
};

}  // namespace functors
}  // namespace fastopt
