// What the CPU entry points of the elementwise ops (plain and low-bit states) read from their
// arguments before running kernels: the device scalars (host memory here), padded hyperparameters
// and the step counts after this step.
#pragma once

#include <cstdint>
#include <vector>

#include "fastopt/api.h"

namespace fastopt {

struct CpuStep {
  bool skip = false;             // found_inf was set: the step does nothing
  double lr = 0.0;
  float grad_mul = 1.0f;         // (maximize ? -1 : 1) / grad_scale
  ElementwiseArgs padded;        // the arguments with kMaxHyper hyperparameters
  std::vector<float*> steps;     // the step counters (empty: the op counts no steps)
  std::vector<double> next;      // per tensor, the step count after this step
  std::vector<int64_t> row_offset;
};

CpuStep prepare_cpu_step(const ElementwiseArgs& a);

}  // namespace fastopt
