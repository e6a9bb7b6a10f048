// fastopt._C -- pybind11 bindings of the torch-independent native ABI (see fastopt/api.h).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <vector>

#include "fastopt/api.h"
#include "cpu/isa.h"

namespace py = pybind11;
using fastopt::AdamArgs;

namespace {

AdamArgs make_adam_args(std::vector<int64_t> ptrs, std::vector<int64_t> numels, std::vector<int64_t> steps,
                        int dtype, double lr, int64_t lr_ptr, double beta1, double beta2, double eps,
                        double weight_decay, bool decoupled, bool amsgrad, bool maximize,
                        int64_t grad_scale_ptr, int64_t found_inf_ptr) {
  AdamArgs a;
  a.lists.n = static_cast<int64_t>(numels.size());
  a.lists.depth = a.lists.n ? static_cast<int64_t>(ptrs.size()) / a.lists.n : (amsgrad ? 5 : 4);
  a.lists.ptrs = std::move(ptrs);
  a.lists.numels = std::move(numels);
  a.lists.dtype = dtype;
  a.steps = std::move(steps);
  a.hyper = {lr, beta1, beta2, eps, weight_decay};
  a.lr_ptr = lr_ptr;
  a.grad_scale_ptr = grad_scale_ptr;
  a.found_inf_ptr = found_inf_ptr;
  a.decoupled = decoupled;
  a.amsgrad = amsgrad;
  a.maximize = maximize;
  return a;
}

constexpr const char* kAdamDoc =
    "Fused multi-tensor Adam/AdamW step.  ptrs: addresses of params, grads, exp_avgs, exp_avg_sqs"
    "[, max_exp_avg_sqs], list after list; numels: element count per tensor; steps: addresses of the "
    "fp32 step counters (incremented unless found_inf is set); dtype: 0 fp32, 1 fp16, 2 bf16; "
    "lr_ptr/grad_scale_ptr/found_inf_ptr: addresses of fp32 scalars or 0.";

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastopt native kernels (torch-independent ABI: raw addresses, sizes, dtype codes)";
#ifdef FASTOPT_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.def("cpu_isa", &fastopt::cpu::isa_name, "The CPU kernels' instruction set on this machine.");
  m.def(
      "adam_cpu",
      [](std::vector<int64_t> ptrs, std::vector<int64_t> numels, std::vector<int64_t> steps, int dtype,
         double lr, int64_t lr_ptr, double beta1, double beta2, double eps, double weight_decay, bool decoupled,
         bool amsgrad, bool maximize, int64_t grad_scale_ptr, int64_t found_inf_ptr) {
        AdamArgs a = make_adam_args(std::move(ptrs), std::move(numels), std::move(steps), dtype, lr, lr_ptr,
                                    beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize,
                                    grad_scale_ptr, found_inf_ptr);
        py::gil_scoped_release nogil;
        fastopt::adam_cpu(a);
      },
      kAdamDoc);
#ifdef FASTOPT_WITH_CUDA
  m.def(
      "adam_cuda",
      [](std::vector<int64_t> ptrs, std::vector<int64_t> numels, std::vector<int64_t> steps, int dtype,
         double lr, int64_t lr_ptr, double beta1, double beta2, double eps, double weight_decay, bool decoupled,
         bool amsgrad, bool maximize, int64_t grad_scale_ptr, int64_t found_inf_ptr, int64_t stream) {
        AdamArgs a = make_adam_args(std::move(ptrs), std::move(numels), std::move(steps), dtype, lr, lr_ptr,
                                    beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize,
                                    grad_scale_ptr, found_inf_ptr);
        py::gil_scoped_release nogil;
        fastopt::adam_cuda(a, stream);
      },
      kAdamDoc);
#endif
}
