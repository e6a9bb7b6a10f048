// fastopt/functors/orthograd.h -- the passes of OrthoGrad, the "perpendicular gradient" projection (Prieto et al.,
// "Grokking at the Edge of Numerical Stability", 2025; pytorch_optimizer's OrthoGrad): per tensor, in fp32,
//   c = (w.g) / (w.w + eps),  go = g - c w,  g <- ||go|| <= 4 eps32 ||g|| ? 0 : go ||g|| / (||go|| + eps).
//
// What is written is the gradient, so the caller passes the GRADIENTS as the "params" list and the
// WEIGHTS as the "grads" list (no grad scale, no maximize, no step counters); one row per tensor.
// Below `grad` is the element of the "params" list and `weight` the one of the "grads" list.
//   phase 1: acc[0] += w g, acc[1] += w w, acc[2] += g g, acc[3] += (g - rc[0] w)^2
//            (a first pass with no row coefficients gives the first three sums; a second with
//            rc[0] = c gives ||go||^2 directly, without the cancellation of ||g||^2 - c w.g)
//   phase 0: g <- rc[1] == 0 ? 0 : (g - rc[0] w) rc[1]       (rc[1] = ||g|| / (||go|| + eps), or 0)
// The wrapper (fastopt/optim/orthograd.py) computes c and the scale between the passes on the device.
#pragma once

#include "fastopt/elementwise.h"

namespace fastopt {
namespace functors {

struct OrthoGradOp {
  static constexpr int kStates = 0;
  static constexpr int kReduce = 4;
  struct Coeffs {};

  FASTOPT_HOST_DEVICE static Coeffs coeffs(const OpScalars&) { return Coeffs{}; }

  FASTOPT_HOST_DEVICE static void reduce(float grad, float weight, float (&)[kMaxStates], const Coeffs&,
                                         const float* rc, float (&acc)[kMaxReduce]) {
    const float go = grad - rc[0] * weight;
    acc[0] += weight * grad;
    acc[1] += weight * weight;
    acc[2] += grad * grad;
    acc[3] += go * go;
  }

  // (A select, not the product alone: a zeroed direction stays 0 even where g - c w is not finite.)
  FASTOPT_HOST_DEVICE static void update(float& grad, float weight, float (&)[kMaxStates], const Coeffs&,
                                         const float* rc) {
    const float go = (grad - rc[0] * weight) * rc[1];
    grad = rc[1] == 0.0f ? 0.0f : go;
  }
};

}  // namespace functors
}  // namespace fastopt
