// The Adam/AdamW CPU kernel body, compiled once per ISA (see isa.h): FASTOPT_CPU_NS names the copy.
#include <cstdint>
#include <vector>

#include "fastopt/functors/adam.h"
#include "kernel.h"

namespace fastopt::cpu::FASTOPT_CPU_NS {
namespace {

template <typename T, bool DECOUPLED, bool AMSGRAD>
void adam_chunk(T* __restrict__ p, const T* __restrict__ g, T* __restrict__ m, T* __restrict__ v,
                T* __restrict__ vmax, int64_t n, float grad_mul, functors::AdamCoeffs c) {
  for (int64_t i = 0; i < n; ++i) {
    functors::adam_element<T, DECOUPLED, AMSGRAD>(p, g, m, v, vmax, i, grad_mul, c);
  }
}

}  // namespace

void adam_run(const AdamArgs& a, const std::vector<functors::AdamCoeffs>& coeffs, float grad_mul) {
  const TensorLists& l = a.lists;
  FASTOPT_DTYPE_SWITCH(l.dtype, [&] {
    FASTOPT_BOOL_SWITCH(a.decoupled, DECOUPLED, [&] {
      FASTOPT_BOOL_SWITCH(a.amsgrad, AMSGRAD, [&] {
        multi_tensor_apply(l.numels.data(), l.n, [&](int64_t t, int64_t s, int64_t len) {
          scalar_t* vmax = AMSGRAD ? l.get<scalar_t>(4, t) + s : nullptr;
          adam_chunk<scalar_t, DECOUPLED, AMSGRAD>(l.get<scalar_t>(0, t) + s, l.get<scalar_t>(1, t) + s,
                                                   l.get<scalar_t>(2, t) + s, l.get<scalar_t>(3, t) + s,
                                                   vmax, len, grad_mul, coeffs[t]);
        });
      });
    });
  });
}

}  // namespace fastopt::cpu::FASTOPT_CPU_NS
