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

// A thread's place (row, column) in its tensor's rows, stepped without a division: one int64 division
// pair per thread and chunk (init), then adds and compares per element (next) and per loop step (advance).
struct RowCursor {
  int64_t row, col, len, step_rows, step_cols;
  __device__ __forceinline__ void init(int64_t gi, int64_t row_len, int64_t stride) {
    len = row_len;
    row = gi / len;
    col = gi - row * len;
    step_rows = stride / len;
    step_cols = stride - step_rows * len;
  }
  __device__ __forceinline__ void next() {  // element gi + 1
    if (++col == len) {
      col = 0;
      ++row;
    }
  }
  __device__ __forceinline__ void advance() {  // element gi + stride
    row += step_rows;
    col += step_cols;
    if (col >= len) {
      col -= len;
      ++row;
    }
  }
};

// One chunk [start, start + n) of tensor t.  When every pointer of the tensor is 16-byte aligned (the
// uint8 sparse mask: aligned for kVec<T> bytes), each thread moves kVec<T> elements per iteration with
// 16-byte loads and stores (Vec<T>: 4 x fp32, 8 x bf16/fp16); the rest of the chunk (fewer than kVec<T>
// elements), and the whole chunk of an unaligned tensor, goes one element per thread (Vec<T, 1>).  Each
// element runs exactly op_update_element / op_reduce_element on register copies, with its own index in
// the tensor for the stochastic rounding bits, so the results are those of an element-wise loop.
template <typename Op, typename T, int PHASE, bool SR, bool SPARSE = false>
struct ElementwiseOp {
  static constexpr int kLists = 2 + Op::kStates;

  template <int DEPTH>
  __device__ __forceinline__ void operator()(const TensorListMeta<DEPTH>& meta, int t, int64_t start, int n,
                                             const DevScalars& s) const {
    if (s.skipped()) return;
    const double lr = s.lr_now();
    const float* step_ptr = static_cast<const float*>(meta.addresses[kLists][t]);
    const float step_now = step_ptr != nullptr ? *step_ptr : 0.0f;
    // First, so that little is live across the (non-inlined) pow of some ops' coefficients.
    const typename Op::Coeffs c = Op::coeffs(OpScalars{s.h, s.flags, lr, static_cast<double>(step_now) + 1.0});
    const float grad_mul = s.grad_mul();
    const int64_t row_offset = reinterpret_cast<int64_t>(meta.addresses[kLists + 1][t]);
    const int64_t row_len = reinterpret_cast<int64_t>(meta.addresses[kLists + 2][t]);
    const uint64_t sr_slot = static_cast<uint64_t>(reinterpret_cast<intptr_t>(meta.addresses[kLists + 3][t]));
    const uint32_t index = static_cast<uint32_t>(sr_slot);
    const uint32_t sr_offset = static_cast<uint32_t>(sr_slot >> 32);

    T* p = static_cast<T*>(meta.addresses[0][t]);
    const T* g = static_cast<const T*>(meta.addresses[1][t]);
    T* st[kMaxStates] = {nullptr, nullptr, nullptr, nullptr};
    for (int k = 0; k < Op::kStates; ++k) st[k] = static_cast<T*>(meta.addresses[2 + k][t]);
    const uint8_t* mask = nullptr;
    T* out = nullptr;
    if constexpr (SPARSE) {
      mask = static_cast<const uint8_t*>(meta.addresses[kLists + 4][t]);
      out = static_cast<T*>(meta.addresses[kLists + 5][t]);
    }

    constexpr int V = kVec<T>;
    bool aligned = is_aligned<T>(p + start) && is_aligned<T>(g + start);
#pragma unroll
    for (int k = 0; k < Op::kStates; ++k) aligned = aligned && is_aligned<T>(st[k] + start);
    if constexpr (SPARSE) {
      aligned = aligned && is_aligned<uint8_t, V>(mask + start) && (out == nullptr || is_aligned<T>(out + start));
    }
    const int nvec = aligned ? n / V : 0;

    if constexpr (PHASE == 0) {
      const uint32_t key = sr_key(s.seed, index, static_cast<uint32_t>(static_cast<double>(step_now) + 1.0));
      update_range<V>(p, g, st, mask, out, start, 0, nvec, row_offset, row_len, s, grad_mul, c, key, sr_offset);
      update_range<1>(p, g, st, mask, out, start, nvec * V, n - nvec * V, row_offset, row_len, s, grad_mul, c, key,
                      sr_offset);
    } else {
      const bool one_row = start / row_len == (start + n - 1) / row_len;
      float acc[kMaxReduce] = {0.0f, 0.0f, 0.0f, 0.0f};
      reduce_range<V>(p, g, st, start, 0, nvec, row_offset, row_len, one_row, s, grad_mul, c, acc);
      reduce_range<1>(p, g, st, start, nvec * V, n - nvec * V, row_offset, row_len, one_row, s, grad_mul, c, acc);
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
          float* sums = s.reduce_out + (row_offset + start / row_len) * kMaxReduce;
          for (int k = 0; k < Op::kReduce; ++k) {
            float v = lane < nwarps ? warp_sums[k][lane] : 0.0f;
            for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
            if (lane == 0) atomicAdd(sums + k, v);
          }
        }
      }
    }
  }

  // Phase 0 over `count` units (V > 1: vectors of V elements, every pointer aligned for Vec<T, V>; V == 1:
  // elements) from chunk offset `first`, one unit per thread per iteration.
  template <int V>
  __device__ __forceinline__ void update_range(T* p, const T* g, T* const (&st)[kMaxStates], const uint8_t* mask,
                                               T* out, int64_t start, int first, int count, int64_t row_offset,
                                               int64_t row_len, const DevScalars& s, float grad_mul,
                                               const typename Op::Coeffs& c, uint32_t key, uint32_t sr_offset) const {
    const int nv = count;  // V > 1: vectors, V == 1: elements
    if (static_cast<int>(threadIdx.x) >= nv) return;
    const float zero[kMaxRowCoefs] = {0.0f, 0.0f, 0.0f, 0.0f};
    const int stride = static_cast<int>(blockDim.x) * V;
    int64_t gi = start + first + static_cast<int64_t>(threadIdx.x) * V;
    const bool has_rc = s.row_coef != nullptr;
    RowCursor cur{};
    if (has_rc) cur.init(gi, row_len, stride);
    for (int v = threadIdx.x; v < nv; v += blockDim.x, gi += stride) {
      Vec<T, V> rp = *reinterpret_cast<const Vec<T, V>*>(p + gi);
      const Vec<T, V> rg = *reinterpret_cast<const Vec<T, V>*>(g + gi);
      Vec<T, V> rs[kMaxStates];
#pragma unroll
      for (int k = 0; k < Op::kStates; ++k) rs[k] = *reinterpret_cast<const Vec<T, V>*>(st[k] + gi);
      Vec<uint8_t, V> rmask;
      Vec<T, V> rout;
      if constexpr (SPARSE) rmask = *reinterpret_cast<const Vec<uint8_t, V>*>(mask + gi);
      const uint32_t sr_base = sr_offset + static_cast<uint32_t>(gi);  // element gi + e: sr_base + e (mod 2^32)
      RowCursor e_cur = cur;
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const float* rc = has_rc ? s.row_coef + (row_offset + e_cur.row) * kMaxRowCoefs : zero;
        if constexpr (SPARSE) {
          if (out != nullptr) {
            op_update_element<Op, T, 2>(rp.v, rg.v, rs[0].v, rs[1].v, rs[2].v, rs[3].v, e, grad_mul, c, rc, SR,
                                        key, sr_base, rmask.v, rout.v, s.sparse_lambda, s.sparse_beta);
          } else {
            op_update_element<Op, T, 1>(rp.v, rg.v, rs[0].v, rs[1].v, rs[2].v, rs[3].v, e, grad_mul, c, rc, SR,
                                        key, sr_base, rmask.v, nullptr, s.sparse_lambda, s.sparse_beta);
          }
        } else {
          op_update_element<Op, T>(rp.v, rg.v, rs[0].v, rs[1].v, rs[2].v, rs[3].v, e, grad_mul, c, rc, SR, key,
                                   sr_base);
        }
        if (has_rc) e_cur.next();
      }
      *reinterpret_cast<Vec<T, V>*>(p + gi) = rp;
#pragma unroll
      for (int k = 0; k < Op::kStates; ++k) *reinterpret_cast<Vec<T, V>*>(st[k] + gi) = rs[k];
      if constexpr (SPARSE) {
        if (out != nullptr) *reinterpret_cast<Vec<T, V>*>(out + gi) = rout;
      }
      if (has_rc) cur.advance();
    }
  }

  // Phase 1 over `count` units (as update_range) from chunk offset `first`.  A chunk in one row adds into
  // the thread's `acc` (block-reduced by the caller); a chunk spanning rows adds each run of a vector's
  // elements in one row with one atomicAdd per sum.
  template <int V>
  __device__ __forceinline__ void reduce_range(T* p, const T* g, T* const (&st)[kMaxStates], int64_t start, int first,
                                               int count, int64_t row_offset, int64_t row_len, bool one_row,
                                               const DevScalars& s, float grad_mul, const typename Op::Coeffs& c,
                                               float (&acc)[kMaxReduce]) const {
    const int nv = count;
    if (static_cast<int>(threadIdx.x) >= nv) return;
    const float zero[kMaxRowCoefs] = {0.0f, 0.0f, 0.0f, 0.0f};
    const int stride = static_cast<int>(blockDim.x) * V;
    int64_t gi = start + first + static_cast<int64_t>(threadIdx.x) * V;
    const bool has_rc = s.row_coef != nullptr;
    RowCursor cur{};
    cur.init(gi, row_len, stride);
    for (int v = threadIdx.x; v < nv; v += blockDim.x, gi += stride) {
      const Vec<T, V> rp = *reinterpret_cast<const Vec<T, V>*>(p + gi);
      const Vec<T, V> rg = *reinterpret_cast<const Vec<T, V>*>(g + gi);
      Vec<T, V> rs[kMaxStates];
#pragma unroll
      for (int k = 0; k < Op::kStates; ++k) rs[k] = *reinterpret_cast<const Vec<T, V>*>(st[k] + gi);
      RowCursor e_cur = cur;
      float run[kMaxReduce] = {0.0f, 0.0f, 0.0f, 0.0f};
      int64_t run_row = e_cur.row;
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const float* rc = has_rc ? s.row_coef + (row_offset + e_cur.row) * kMaxRowCoefs : zero;
        if (one_row) {
          op_reduce_element<Op, T>(rp.v, rg.v, rs[0].v, rs[1].v, rs[2].v, rs[3].v, e, grad_mul, c, rc, acc);
        } else {
          if (e_cur.row != run_row) {
            float* sums = s.reduce_out + (row_offset + run_row) * kMaxReduce;
            for (int k = 0; k < Op::kReduce; ++k) {
              atomicAdd(sums + k, run[k]);
              run[k] = 0.0f;
            }
            run_row = e_cur.row;
          }
          op_reduce_element<Op, T>(rp.v, rg.v, rs[0].v, rs[1].v, rs[2].v, rs[3].v, e, grad_mul, c, rc, run);
        }
        e_cur.next();
      }
      if (!one_row) {
        float* sums = s.reduce_out + (row_offset + run_row) * kMaxReduce;
        for (int k = 0; k < Op::kReduce; ++k) atomicAdd(sums + k, run[k]);
      }
#pragma unroll
      for (int k = 0; k < Op::kStates; ++k) *reinterpret_cast<Vec<T, V>*>(st[k] + gi) = rs[k];
      cur.advance();
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
