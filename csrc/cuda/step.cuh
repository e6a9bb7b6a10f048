// What the CUDA steps of the elementwise ops (elementwise.cu, lowbit.cu) take from ElementwiseArgs to
// the device: the padded hyperparameters and flags, lr (a value, or a device pointer read by the
// kernel: no host sync), the AMP scalars, the sign of maximize and the stochastic-rounding seed.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "fastopt/api.h"
#include "fastopt/elementwise.h"

namespace fastopt {
namespace cuda {

struct StepScalars {
  double h[kMaxHyper];
  int64_t flags;
  double lr;
  const float* lr_ptr;
  const float* grad_scale;
  const float* found_inf;
  float sign;
  uint32_t seed;

  // found_inf is set (AMP: inf/nan gradients): the step does nothing.
  __device__ __forceinline__ bool skipped() const { return found_inf != nullptr && *found_inf != 0.0f; }
  __device__ __forceinline__ double lr_now() const { return lr_ptr != nullptr ? static_cast<double>(*lr_ptr) : lr; }
  // (maximize ? -1 : 1) / grad_scale
  __device__ __forceinline__ float grad_mul() const { return grad_scale != nullptr ? sign / *grad_scale : sign; }

  void set(const ElementwiseArgs& a) {
    for (int k = 0; k < kMaxHyper; ++k) h[k] = k < static_cast<int>(a.hyper.size()) ? a.hyper[k] : 0.0;
    flags = a.flags;
    lr = a.lr;
    lr_ptr = as_ptr<const float>(a.lr_ptr);
    grad_scale = as_ptr<const float>(a.grad_scale_ptr);
    found_inf = as_ptr<const float>(a.found_inf_ptr);
    sign = a.maximize ? -1.0f : 1.0f;
    seed = static_cast<uint32_t>(a.seed);
  }
};

// Adds 1 to every step counter on the device unless *found_inf is nonzero (defined in adam.cu): a
// separate launch, for calls that do not fold the increment into their main launches.
void increment_steps(const std::vector<int64_t>& steps, const float* found_inf, cudaStream_t stream);

// The ticket counter for folding a call's step increment into its launches (StepFold, multi_tensor.cuh):
// the int32 at address `ticket` (zero between launches; the Python side keeps one per device and stream)
// when the call has step counters and they are distinct, else null: the caller then runs increment_steps
// (ticket 0 passed, or step counters shared by several tensors).  Defined in adam.cu.
int* fold_ticket(const std::vector<int64_t>& steps, int64_t ticket);

}  // namespace cuda
}  // namespace fastopt
