// fastopt/functors/rectify.h -- RAdam's rectified step size (AdaBelief, diffGrad).
// Semantics of pytorch_optimizer (equations and operation order: fastopt/reference/<name>.py);
// hyperparameters, state slots and flags: OPS in fastopt/_opspec.py.
#pragma once

#include <cmath>

#include "fastopt/elementwise.h"
#include "fastopt/flags.h"

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

// The step size after pytorch_optimizer's 1/(1 - b1^t) debias (none with adam_debias), in fp32.
FASTOPT_HOST_DEVICE float debiased_step_size(const OpScalars& s, const StepSize& st, double beta1) {
  return static_cast<float>((s.flags & kAdamDebias) ? st.size : st.size / (1.0 - pow(beta1, s.step)));
}

}  // namespace functors
}  // namespace fastopt
