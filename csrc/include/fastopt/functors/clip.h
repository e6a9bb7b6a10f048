// fastopt/functors/clip.h -- the two passes of a fused global-norm gradient clip
// (torch.nn.utils.clip_grad_norm_ with norm_type 2).  Called with the gradients as both the
// "params" and the "grads" list and no step counters:
//   phase 1: acc[0] += g^2 per tensor       (the wrapper: total = sqrt(sum), coef = min(1, max/(total+1e-6)))
//   phase 0: g <- g * rc[0]                  (rc[0] = coef, the same for every tensor)
#pragma once

#include "fastopt/elementwise.h"

namespace fastopt {
namespace functors {

// An op with no state, REDUCE per-row sums and nothing read from the hyperparameters (both below).
template <int REDUCE>
struct StatelessOp {
  static constexpr int kStates = 0;
  static constexpr int kReduce = REDUCE;
  struct Coeffs {};

  FASTOPT_HOST_DEVICE static Coeffs coeffs(const OpScalars&) { return Coeffs{}; }
};

struct ClipOp : StatelessOp<1> {
  FASTOPT_HOST_DEVICE static void reduce(float, float g, float (&)[kMaxStates], const Coeffs&, const float*,
                                         float (&acc)[kMaxReduce]) {
    acc[0] += g * g;
  }

  FASTOPT_HOST_DEVICE static void update(float& p, float g, float (&)[kMaxStates], const Coeffs&, const float* rc) {
    p = g * rc[0];
  }
};

// The per-row sums of the (unscaled, signed) gradients: the first pass of gradient centralization
// (pytorch_optimizer's use_gc: g <- g - mean of g over every dim but the first, for 2+-dim tensors).
// Called with rows = p.shape[0] and no step counters; phase 1 only (the update leaves p alone).
struct GradRowSumOp : StatelessOp<1> {
  FASTOPT_HOST_DEVICE static void reduce(float, float g, float (&)[kMaxStates], const Coeffs&, const float*,
                                         float (&acc)[kMaxReduce]) {
    acc[0] += g;
  }

  FASTOPT_HOST_DEVICE static void update(float&, float, float (&)[kMaxStates], const Coeffs&, const float*) {}
};

}  // namespace functors
}  // namespace fastopt
