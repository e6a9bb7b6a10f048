// CPU entry point of the fused Adam/AdamW step: validates, reads the device scalars (host memory
// here), computes per-tensor coefficients, runs the ISA-specific kernel, increments the steps.
#include <cstdint>
#include <vector>

#include "fastopt/api.h"
#include "fastopt/functors/adam.h"
#include "isa.h"

namespace fastopt {
FASTOPT_CPU_KERNEL_DECL(void adam_run(const AdamArgs& a, const std::vector<functors::AdamCoeffs>& coeffs,
                                      float grad_mul))

void adam_cpu(const AdamArgs& a) {
  check_adam(a);
  if (a.found_inf_ptr && read_scalar(a.found_inf_ptr) != 0.0f) return;  // AMP: inf/nan grads, skip
  const TensorLists& l = a.lists;
  const double lr = a.lr_ptr ? read_scalar(a.lr_ptr) : a.hyper.lr;
  const float scale = a.grad_scale_ptr ? read_scalar(a.grad_scale_ptr) : 1.0f;
  const float grad_mul = (a.maximize ? -1.0f : 1.0f) / scale;

  std::vector<functors::AdamCoeffs> coeffs(l.n);
  std::vector<float*> steps(l.n);
  for (int64_t t = 0; t < l.n; ++t) {
    steps[t] = as_ptr<float>(a.steps[t]);
    coeffs[t] = functors::adam_coeffs(a.hyper, lr, static_cast<double>(*steps[t]) + 1.0);
  }
  FASTOPT_CPU_KERNEL_CALL(adam_run, a, coeffs, grad_mul);
  for (float* s : steps) *s += 1.0f;
}

}  // namespace fastopt
