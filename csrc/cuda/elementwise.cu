// CUDA entry point of the generic elementwise ops (fastopt/elementwise.h) under the CUDA launcher.
// lr, grad scale, found_inf and the step counters are read on the device: no host sync.
//
// Per tensor the launcher carries, after the op's lists and the step counter, three integers in
// pointer slots: the tensor's first global row, its row length and, for the stochastic rounding
// stream, its index in the call (low 32 bits) with its sr_offset (high 32 bits: the offset's low 32
// bits, all that sr_bits uses); with the sparse epilogue, two more: the tensor's uint8 mask and its
// forward weight (or null).  Phase 1 reduces a chunk that lies in one row with a block reduction and one
// atomicAdd per sum; a chunk spanning rows (rows shorter than a chunk) adds per element.  Both phases
// read the row coefficients (phase 1: those of an earlier pass, e.g. gradient centralization's means).
#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "fastopt/api.h"
#include "fastopt/dispatch.h"
#include "fastopt/elementwise.h"
#include "fastopt/multi_tensor.cuh"
#include "fastopt/ops.h"
#include "step.cuh"

namespace fastopt {
namespace cuda {
namespace {

struct DevScalars : StepScalars {
  const float* row_coef;
  float* reduce_out;
  float sparse_lambda;
  float sparse_beta;
};

template <typename Op, typename T, int PHASE, bool SR, bool SPARSE = false>
struct ElementwiseOp {
  static constexpr int kLists = 2 + Op::kStates;

  template <int DEPTH>
  __device__ __forceinline__ void operator()(const TensorListMeta<DEPTH>& meta, int t, int64_t start, int n,
                                             const DevScalars& s) const {
    if (s.skipped()) return;
    const double lr = s.lr_now();
    const float grad_mul = s.grad_mul();
    const float* step_ptr = static_cast<const float*>(meta.addresses[kLists][t]);
    const float step_now = step_ptr != nullptr ? *step_ptr : 0.0f;
    const int64_t row_offset = reinterpret_cast<int64_t>(meta.addresses[kLists + 1][t]);
    const int64_t row_len = reinterpret_cast<int64_t>(meta.addresses[kLists + 2][t]);
    const uint64_t sr_slot = static_cast<uint64_t>(reinterpret_cast<intptr_t>(meta.addresses[kLists + 3][t]));
    const uint32_t index = static_cast<uint32_t>(sr_slot);
    const uint32_t sr_offset = static_cast<uint32_t>(sr_slot >> 32);
    const typename Op::Coeffs c = Op::coeffs(OpScalars{s.h, s.flags, lr, static_cast<double>(step_now) + 1.0});

    T* p = static_cast<T*>(meta.addresses[0][t]);
    const T* g = static_cast<const T*>(meta.addresses[1][t]);
    T* st[kMaxStates] = {nullptr, nullptr, nullptr, nullptr};
    for (int k = 0; k < Op::kStates; ++k) st[k] = static_cast<T*>(meta.addresses[2 + k][t]);

    if (PHASE == 0) {
      const uint32_t key = sr_key(s.seed, index, static_cast<uint32_t>(static_cast<double>(step_now) + 1.0));
      const float zero[kMaxRowCoefs] = {0.0f, 0.0f, 0.0f, 0.0f};
      for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const int64_t gi = start + i;
        const float* rc = s.row_coef != nullptr ? s.row_coef + (row_offset + gi / row_len) * kMaxRowCoefs : zero;
        if constexpr (SPARSE) {
          T* out = static_cast<T*>(meta.addresses[kLists + 5][t]);
          const uint8_t* mask = static_cast<const uint8_t*>(meta.addresses[kLists + 4][t]);
          if (out != nullptr) {
            op_update_element<Op, T, 2>(p, g, st[0], st[1], st[2], st[3], gi, grad_mul, c, rc, SR, key, sr_offset, mask,
                                        out, s.sparse_lambda, s.sparse_beta);
          } else {
            op_update_element<Op, T, 1>(p, g, st[0], st[1], st[2], st[3], gi, grad_mul, c, rc, SR, key, sr_offset, mask,
                                        nullptr, s.sparse_lambda, s.sparse_beta);
          }
        } else {
          op_update_element<Op, T>(p, g, st[0], st[1], st[2], st[3], gi, grad_mul, c, rc, SR, key, sr_offset);
        }
      }
    } else {
      const bool one_row = start / row_len == (start + n - 1) / row_len;
      const float zero[kMaxRowCoefs] = {0.0f, 0.0f, 0.0f, 0.0f};
      float acc[kMaxReduce] = {0.0f, 0.0f, 0.0f, 0.0f};
      for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const int64_t gi = start + i;
        const float* rc = s.row_coef != nullptr ? s.row_coef + (row_offset + gi / row_len) * kMaxRowCoefs : zero;
        if (one_row) {
          op_reduce_element<Op, T>(p, g, st[0], st[1], st[2], st[3], gi, grad_mul, c, rc, acc);
        } else {
          float one[kMaxReduce] = {0.0f, 0.0f, 0.0f, 0.0f};
          op_reduce_element<Op, T>(p, g, st[0], st[1], st[2], st[3], gi, grad_mul, c, rc, one);
          float* out = s.reduce_out + (row_offset + gi / row_len) * kMaxReduce;
          for (int k = 0; k < Op::kReduce; ++k) atomicAdd(out + k, one[k]);
        }
      }
      if (one_row) {
        __shared__ float warp_sums[kMaxReduce][32];
        const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
        for (int k = 0; k < Op::kReduce; ++k) {
          float v = acc[k];
          for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
          if (lane == 0) warp_sums[k][warp] = v;
        }
        __syncthreads();
        if (warp == 0) {
          const int nwarps = (blockDim.x + 31) >> 5;
          float* out = s.reduce_out + (row_offset + start / row_len) * kMaxReduce;
          for (int k = 0; k < Op::kReduce; ++k) {
            float v = lane < nwarps ? warp_sums[k][lane] : 0.0f;
            for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
            if (lane == 0) atomicAdd(out + k, v);
          }
        }
      }
    }
  }
};


template <typename Op, typename T, int PHASE, bool SR, bool SPARSE = false>
void launch(const ElementwiseArgs& a, const DevScalars& s, const std::vector<int64_t>& row_offset,
            cudaStream_t stream) {
  using K = ElementwiseOp<Op, T, PHASE, SR, SPARSE>;
  constexpr int kDepth = K::kLists + 4 + (SPARSE ? 2 : 0);
  const TensorLists& l = a.lists;
  auto addr = [&](int d, int64_t t) -> void* {
    if (d < K::kLists) return l.get<void>(d, t);
    if (d == K::kLists) return a.steps.empty() ? nullptr : as_ptr<void>(a.steps[t]);
    if (d == K::kLists + 4) return as_ptr<void>(a.sparse_mask[t]);
    if (d == K::kLists + 5) return a.sparse_out.empty() ? nullptr : as_ptr<void>(a.sparse_out[t]);
    const int64_t rows = row_offset[t + 1] - row_offset[t];
    if (d == K::kLists + 3) {  // index | sr_offset << 32
      const uint64_t slot = static_cast<uint64_t>(static_cast<uint32_t>(t)) |
                            (static_cast<uint64_t>(sr_offset_of(a, t)) << 32);
      return reinterpret_cast<void*>(static_cast<uintptr_t>(slot));
    }
    const int64_t value = d == K::kLists + 1 ? row_offset[t] : (l.numels[t] > 0 ? l.numels[t] / rows : 1);
    return reinterpret_cast<void*>(static_cast<intptr_t>(value));
  };
  auto numel = [&](int64_t t) { return l.numels[t]; };
  multi_tensor_apply<kDepth>(l.n, addr, numel, stream, K{}, s);
}

bool op_dispatch(const ElementwiseArgs& a, const DevScalars& s, const std::vector<int64_t>& row_offset,
                 cudaStream_t stream) {
  bool found = false;
#define FASTOPT_CUDA_CASE(NAME, TYPE)                                                           \
  if (!found && a.op == NAME) {                                                                 \
    found = true;                                                                               \
    FASTOPT_DTYPE_SWITCH(a.lists.dtype, [&] {                                                   \
      if (a.phase == 1) {                                                                       \
        if constexpr (TYPE::kReduce > 0) launch<TYPE, scalar_t, 1, false>(a, s, row_offset, stream); \
      } else {                                                                                  \
        FASTOPT_BOOL_SWITCH(a.stochastic, SR, [&] {                                           \
          if (a.sparse_mask.empty()) {                                                          \
            launch<TYPE, scalar_t, 0, SR>(a, s, row_offset, stream);                            \
          } else if constexpr (TYPE::kReduce == 0) {                                            \
            launch<TYPE, scalar_t, 0, SR, true>(a, s, row_offset, stream);                      \
          }                                                                                     \
        });                                                                                     \
      }                                                                                         \
    });                                                                                         \
  }
  FASTOPT_FOR_EACH_OP(FASTOPT_CUDA_CASE)
#undef FASTOPT_CUDA_CASE
  return found;
}

}  // namespace
}  // namespace cuda

void elementwise_cuda(const ElementwiseArgs& a, int64_t stream_handle) {
  int states = 0, reduce = 0;
  check_arg(op_shape(a.op, &states, &reduce), "unknown elementwise op '" + a.op + "'");
  check_elementwise(a, states);
  cudaStream_t stream = cuda::as_stream(stream_handle);
  cuda::DevScalars s{};
  s.set(a);
  s.row_coef = as_ptr<const float>(a.row_coef_ptr);
  s.reduce_out = as_ptr<float>(a.reduce_out_ptr);
  s.sparse_lambda = static_cast<float>(a.sparse_lambda);
  s.sparse_beta = static_cast<float>(a.sparse_beta);
  cuda::op_dispatch(a, s, row_offsets(a), stream);
  if (a.phase == 0 && !a.steps.empty()) cuda::increment_steps(a.steps, s.found_inf, stream);
}

}  // namespace fastopt
