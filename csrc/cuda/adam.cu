// CUDA entry point of the fused Adam/AdamW step: the shared functor under the CUDA launcher.
// Scalars that change between steps (lr, step counters, grad scale, found_inf) are read on the
// device, so a step never syncs with the host and can be captured in a CUDA graph.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "fastopt/api.h"
#include "fastopt/dispatch.h"
#include "fastopt/functors/adam.h"
#include "fastopt/multi_tensor.cuh"
#include "step.cuh"

namespace fastopt {
namespace cuda {
namespace {

struct AdamScalars {
  functors::AdamHyper hyper;
  const float* lr;          // may be null
  const float* grad_scale;  // may be null
  const float* found_inf;   // may be null
  float sign;               // -1 for maximize
};

template <typename T, bool DECOUPLED, bool AMSGRAD>
struct AdamOp {
  static constexpr int kLists = AMSGRAD ? 5 : 4;  // + the step counters as the last list

  template <int DEPTH>
  __device__ __forceinline__ void operator()(const TensorListMeta<DEPTH>& meta, int t, int64_t start, int n,
                                             AdamScalars s) const {
    if (s.found_inf != nullptr && *s.found_inf != 0.0f) return;
    const double lr = s.lr != nullptr ? static_cast<double>(*s.lr) : s.hyper.lr;
    const float grad_mul = s.grad_scale != nullptr ? s.sign / *s.grad_scale : s.sign;
    const double step = static_cast<double>(*static_cast<const float*>(meta.addresses[DEPTH - 1][t])) + 1.0;
    const functors::AdamCoeffs c = functors::adam_coeffs(s.hyper, lr, step);

    T* p = static_cast<T*>(meta.addresses[0][t]) + start;
    const T* g = static_cast<const T*>(meta.addresses[1][t]) + start;
    T* m = static_cast<T*>(meta.addresses[2][t]) + start;
    T* v = static_cast<T*>(meta.addresses[3][t]) + start;
    T* vmax = AMSGRAD ? static_cast<T*>(meta.addresses[4][t]) + start : nullptr;

    bool aligned = is_aligned<T>(p) && is_aligned<T>(g) && is_aligned<T>(m) && is_aligned<T>(v);
    if (AMSGRAD) aligned = aligned && is_aligned<T>(vmax);
    constexpr int V = kVec<T>;  // 16-byte vectors: 4 x fp32, 8 x bf16/fp16
    const int nvec = aligned ? n / V : 0;
    for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
      Vec<T> rp = reinterpret_cast<const Vec<T>*>(p)[i];
      const Vec<T> rg = reinterpret_cast<const Vec<T>*>(g)[i];
      Vec<T> rm = reinterpret_cast<const Vec<T>*>(m)[i];
      Vec<T> rv = reinterpret_cast<const Vec<T>*>(v)[i];
      Vec<T> rvm;
      if (AMSGRAD) rvm = reinterpret_cast<const Vec<T>*>(vmax)[i];
#pragma unroll
      for (int k = 0; k < V; ++k) {
        functors::adam_element<T, DECOUPLED, AMSGRAD>(rp.v, rg.v, rm.v, rv.v, rvm.v, k, grad_mul, c);
      }
      reinterpret_cast<Vec<T>*>(p)[i] = rp;
      reinterpret_cast<Vec<T>*>(m)[i] = rm;
      reinterpret_cast<Vec<T>*>(v)[i] = rv;
      if (AMSGRAD) reinterpret_cast<Vec<T>*>(vmax)[i] = rvm;
    }
    for (int i = nvec * V + threadIdx.x; i < n; i += blockDim.x) {  // guarded tail / unaligned path
      functors::adam_element<T, DECOUPLED, AMSGRAD>(p, g, m, v, vmax, i, grad_mul, c);
    }
  }
};

constexpr int kStepsPerLaunch = 256;
struct StepList {
  float* steps[kStepsPerLaunch];
  int n;
};

__global__ void increment_steps_kernel(StepList list, const float* found_inf) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= list.n) return;
  if (found_inf != nullptr && *found_inf != 0.0f) return;
  *list.steps[i] += 1.0f;
}


}  // namespace

void increment_steps(const std::vector<int64_t>& steps, const float* found_inf, cudaStream_t stream) {
  for (size_t base = 0; base < steps.size(); base += kStepsPerLaunch) {
    StepList list;
    list.n = static_cast<int>(steps.size() - base < kStepsPerLaunch ? steps.size() - base : kStepsPerLaunch);
    for (int i = 0; i < list.n; ++i) list.steps[i] = as_ptr<float>(steps[base + i]);
    FASTOPT_LAUNCH(1, kStepsPerLaunch, 0, stream, increment_steps_kernel)(list, found_inf);
    check_cuda(cudaGetLastError(), "increment_steps_kernel launch");
  }
}

int* fold_ticket(const std::vector<int64_t>& steps, int64_t ticket) {
  if (ticket == 0 || steps.empty()) return nullptr;
  std::vector<int64_t> sorted(steps);
  std::sort(sorted.begin(), sorted.end());
  if (std::adjacent_find(sorted.begin(), sorted.end()) != sorted.end()) return nullptr;
  return as_ptr<int>(ticket);
}

}  // namespace cuda

void adam_cuda(const AdamArgs& a, int64_t ticket, int64_t stream_handle) {
  check_adam(a);
  const TensorLists& l = a.lists;
  cudaStream_t stream = cuda::as_stream(stream_handle);
  cuda::AdamScalars s{a.hyper, as_ptr<const float>(a.lr_ptr), as_ptr<const float>(a.grad_scale_ptr),
                      as_ptr<const float>(a.found_inf_ptr), a.maximize ? -1.0f : 1.0f};
  cuda::StepFold fold;  // the step counters are the launches' last list
  fold.ticket = cuda::fold_ticket(a.steps, ticket);
  fold.found_inf = s.found_inf;
  FASTOPT_DTYPE_SWITCH(l.dtype, [&] {
    FASTOPT_BOOL_SWITCH(a.decoupled, DECOUPLED, [&] {
      FASTOPT_BOOL_SWITCH(a.amsgrad, AMSGRAD, [&] {
        using Op = cuda::AdamOp<scalar_t, DECOUPLED, AMSGRAD>;
        constexpr int kDepth = Op::kLists + 1;
        auto addr = [&](int d, int64_t t) -> void* {
          return d == kDepth - 1 ? as_ptr<void>(a.steps[t]) : l.get<void>(d, t);
        };
        auto numel = [&](int64_t t) { return l.numels[t]; };
        cuda::multi_tensor_apply_fold<kDepth>(l.n, addr, numel, stream, fold, Op{}, s);
      });
    });
  });
  if (fold.ticket == nullptr) cuda::increment_steps(a.steps, as_ptr<const float>(a.found_inf_ptr), stream);
}

}  // namespace fastopt
