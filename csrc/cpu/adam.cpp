// CPU entry point of the fused Adam/AdamW step: the shared functor under the CPU launcher.
#include <cstdint>
#include <vector>

#include "fastopt/api.h"
#include "fastopt/dispatch.h"
#include "fastopt/functors/adam.h"
#include "fastopt/multi_tensor_cpu.h"

namespace fastopt {
namespace {

template <typename T, bool DECOUPLED, bool AMSGRAD>
void adam_chunk(T* __restrict__ p, const T* __restrict__ g, T* __restrict__ m, T* __restrict__ v,
                T* __restrict__ vmax, int64_t n, float grad_mul, functors::AdamCoeffs c) {
  for (int64_t i = 0; i < n; ++i) {
    functors::adam_element<T, DECOUPLED, AMSGRAD>(p, g, m, v, vmax, i, grad_mul, c);
  }
}

inline float read_scalar(int64_t addr, float fallback) {
  return addr ? *reinterpret_cast<const float*>(static_cast<intptr_t>(addr)) : fallback;
}

}  // namespace

void adam_cpu(const AdamArgs& a) {
  check_adam(a);
  if (read_scalar(a.found_inf_ptr, 0.0f) != 0.0f) return;  // AMP: inf/nan grads -> skip the step
  const TensorLists& l = a.lists;
  const double lr = a.lr_ptr ? read_scalar(a.lr_ptr, 0.0f) : a.hyper.lr;
  const float scale = read_scalar(a.grad_scale_ptr, 1.0f);
  const float grad_mul = (a.maximize ? -1.0f : 1.0f) / scale;

  std::vector<functors::AdamCoeffs> coeffs(l.n);
  std::vector<float*> steps(l.n);
  for (int64_t t = 0; t < l.n; ++t) {
    steps[t] = reinterpret_cast<float*>(static_cast<intptr_t>(a.steps[t]));
    coeffs[t] = functors::adam_coeffs(a.hyper, lr, static_cast<double>(*steps[t]) + 1.0);
  }

  FASTOPT_DTYPE_SWITCH(l.dtype, [&] {
    FASTOPT_BOOL_SWITCH(a.decoupled, DECOUPLED, [&] {
      FASTOPT_BOOL_SWITCH(a.amsgrad, AMSGRAD, [&] {
        cpu::multi_tensor_apply(l.numels.data(), l.n, [&](int64_t t, int64_t s, int64_t len) {
          scalar_t* vmax = AMSGRAD ? l.get<scalar_t>(4, t) + s : nullptr;
          adam_chunk<scalar_t, DECOUPLED, AMSGRAD>(l.get<scalar_t>(0, t) + s, l.get<scalar_t>(1, t) + s,
                                                   l.get<scalar_t>(2, t) + s, l.get<scalar_t>(3, t) + s,
                                                   vmax, len, grad_mul, coeffs[t]);
        });
      });
    });
  });
  for (float* s : steps) *s += 1.0f;
}

}  // namespace fastopt
