// fastopt/functors/sam.h -- the first step of SAM (Foret et al., "Sharpness-Aware Minimization for
// Efficiently Improving Generalization", ICLR 2021) and of ASAM (Kwon et al., ICML 2021): the ascent
// to w + e(w), with the weights saved for an exact restore (fastopt.SAM; davda54/sam and
// pytorch_optimizer's SAM semantics).  Called with the parameters as "params", their gradients as
// "grads" and no step counters, in two passes:
//   the norm:   acc[0] += g^2   (the "clip" op's phase 1, functors/clip.h)
//               acc[0] += (|w| g)^2 = w^2 g^2   ("asam_norm", phase 1; no state: nothing written)
//               (the wrapper: norm = sqrt(sum over every tensor), rc[0] = rho / (norm + eps) per tensor,
//                0 where the norm is not finite: no perturbation)
//   the ascent: old_p <- w;  w <- w + e     e = g rc[0] ("sam")     e = (w^2 g) rc[0] ("asam")
//               (phase 0, state slot 0 = old_p; rc[0] == 0: w is left as it is, so an inf/nan
//                gradient never perturbs the weights)
// The norm pass is a stateless op so that it reads only g (and w): an op's reduce phase loads and
// stores its states.  Hyperparameters, states: OPS["sam"], OPS["asam"], OPS["asam_norm"] in
// fastopt/_opspec.py.
#pragma once

#include "fastopt/elementwise.h"
#include "fastopt/functors/clip.h"

namespace fastopt {
namespace functors {

// The ascent (phase 0 only).
template <bool ADAPTIVE>
struct SamOp : NoReduce {
  static constexpr int kStates = 1;  // old_p
  static constexpr int kReduce = 0;
  struct Coeffs {};

  FASTOPT_HOST_DEVICE static Coeffs coeffs(const OpScalars&) { return Coeffs{}; }

  FASTOPT_HOST_DEVICE static void update(float& p, float g, float (&s)[kMaxStates], const Coeffs&, const float* rc) {
    s[0] = p;
    const float d = ADAPTIVE ? p * p * g : g;
    const float e = d * rc[0];
    p = rc[0] != 0.0f ? p + e : p;
  }
};

// ASAM's norm pass (phase 1 only; the update leaves w alone).
struct AsamNormOp : StatelessOp<1> {
  FASTOPT_HOST_DEVICE static void reduce(float p, float g, float (&)[kMaxStates], const Coeffs&, const float*,
                                         float (&acc)[kMaxReduce]) {
    const float x = (p < 0.0f ? -p : p) * g;
    acc[0] += x * x;
  }

  FASTOPT_HOST_DEVICE static void update(float&, float, float (&)[kMaxStates], const Coeffs&, const float*) {}
};

}  // namespace functors
}  // namespace fastopt
