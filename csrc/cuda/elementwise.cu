// CUDA entry point of the generic elementwise ops (fastopt/elementwise.h) under the CUDA launcher.
// lr, grad scale, found_inf and the step counters are read on the device: no host sync.
//
// Per tensor the launcher carries, after the op's lists and the step counter, three integers in
// pointer slots: the tensor's first global row, its row length and, for the stochastic rounding
// stream, its index in the call (low 32 bits) with its sr_offset (high 32 bits: the offset's low 32
// bits, all that sr_bits uses); with the sparse epilogue, two more: the tensor's uint8 mask and its
// forward weight (or null); with prune-style unstructured sparsity (api.h sparse_prune), two more: the
// uint8 mask and null (by mask), or the tensor's mask key and the call's threshold (by hash).  Phase 1 reduces a chunk that lies in one row with a block reduction and one
// atomicAdd per sum; a chunk spanning rows (rows shorter than a chunk) adds per element.  Both phases
// read the row coefficients (phase 1: those of an earlier pass, e.g. gradient centralization's means).
//
// Memory access: a tensor whose lists are all 16-byte aligned (decided per tensor in the kernel; chunks
// start at multiples of kChunk elements, so the chunk start keeps the alignment) moves 16-byte vectors,
// kVec<T> = 4 fp32 or 8 bf16/fp16 elements per thread per iteration, the chunk's last n % kVec<T>
// elements one per thread; any other tensor goes one element per thread.  Rows are followed per thread
// with adds and compares (ChunkRows, RowCursor), not a division per element.  Every element runs the
// same op_update_element / op_reduce_element as before, on register copies, with its own tensor index
// for the stochastic rounding bits: the params, states and outputs are bit-identical to the scalar loop.
// (Phase 1's per-thread partial sums of a one-row chunk now hold a thread's vectors rather than every
// blockDim-th element: another summation order, as the atomics' order already varies between runs.)
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>
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

// The row coefficients of a call without any (in global memory: no stack frame, no local-memory access).
__device__ const float kZeroRow[kMaxRowCoefs] = {0.0f, 0.0f, 0.0f, 0.0f};

// Rows inside one chunk, in int32 and without a per-element division.  The chunk starts at column `col0`
// of its first row (global row `chunk_row`); rows are `len` elements long, clamped to 2^30 (with col0 moved
// so that the elements left in the first row are kept, clamped alike): a chunk is at most 2^16 elements,
// so a clamped row still ends past the chunk and every row boundary inside it is where it was.
struct ChunkRows {
  int64_t chunk_row;  // the tensor's row holding the chunk's first element
  int col0;           // its (clamped) column
  int len;            // the (clamped) row length
  bool one_row;       // the whole chunk lies in one row
  __device__ __forceinline__ ChunkRows(int64_t start, int n, int64_t row_len) {
    constexpr int64_t kCap = int64_t{1} << 30;
    chunk_row = start / row_len;
    const int64_t left = row_len - (start - chunk_row * row_len);  // elements of the first row from start on
    len = static_cast<int>(row_len < kCap ? row_len : kCap);
    col0 = len - static_cast<int>(left < len ? left : len);
    one_row = n <= left;
  }
};

// A thread's place (row after the chunk's first, column) stepped without division: one int32 division pair
// per thread and range (init), then adds and compares per element (next) and per loop step (advance).
struct RowCursor {
  int row, col, len, step_rows, step_cols;
  __device__ __forceinline__ void init(int pos, int row_len, int stride) {  // pos: col0 + index in the chunk
    len = row_len;
    row = pos / len;
    col = pos - row * len;
    step_rows = stride / len;
    step_cols = stride - step_rows * len;
  }
  __device__ __forceinline__ void next() {  // element + 1
    if (++col == len) {
      col = 0;
      ++row;
    }
  }
  __device__ __forceinline__ void advance() {  // element + stride
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
// SPARSE: 0 none, 1 the N:M epilogue, 3 prune by mask, 4 prune by hash (op_update_element's modes).
template <typename Op, typename T, int PHASE, bool SR, int SPARSE = 0>
struct ElementwiseOp {
  static constexpr int kLists = 2 + Op::kStates;
  static constexpr bool kOneBlockPerSM = true;  // no spills (multi_tensor.cuh)
  static constexpr int kStepList = kLists;      // the step counters' list (the fold, multi_tensor.cuh)

  // The chunk's lists (pointers at the chunk's first element) and what every element needs.
  struct Chunk {
    T* p;
    const T* g;
    T* st[kMaxStates];
    const uint8_t* mask;
    T* out;
    uint32_t mask_key;        // SPARSE 4: the tensor's mask key and the call's threshold
    uint32_t mask_threshold;
    const float* rc0;     // row coefficients of the chunk's first row, or null (the call has none)
    float* sums0;         // phase 1: the sums of the chunk's first row
    ChunkRows rows;
    uint32_t sr_chunk;    // low 32 bits of the stochastic-rounding index of the chunk's first element
  };

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

    const ChunkRows rows(start, n, row_len);
    Chunk ch{static_cast<T*>(meta.addresses[0][t]) + start,
             static_cast<const T*>(meta.addresses[1][t]) + start,
             {nullptr, nullptr, nullptr, nullptr},
             nullptr,
             nullptr,
             0u,
             0u,
             s.row_coef != nullptr ? s.row_coef + (row_offset + rows.chunk_row) * kMaxRowCoefs : nullptr,
             s.reduce_out != nullptr ? s.reduce_out + (row_offset + rows.chunk_row) * kMaxReduce : nullptr,
             rows,
             sr_offset + static_cast<uint32_t>(start)};
    for (int k = 0; k < Op::kStates; ++k) ch.st[k] = static_cast<T*>(meta.addresses[2 + k][t]) + start;
    if constexpr (SPARSE == 1 || SPARSE == 3) {
      ch.mask = static_cast<const uint8_t*>(meta.addresses[kLists + 4][t]) + start;
      T* out = static_cast<T*>(meta.addresses[kLists + 5][t]);
      ch.out = out != nullptr ? out + start : nullptr;
    } else if constexpr (SPARSE == 4) {
      ch.mask_key = static_cast<uint32_t>(reinterpret_cast<uintptr_t>(meta.addresses[kLists + 4][t]));
      ch.mask_threshold = static_cast<uint32_t>(reinterpret_cast<uintptr_t>(meta.addresses[kLists + 5][t]));
    }

    constexpr int V = kVec<T>;
    bool aligned = is_aligned<T>(ch.p) && is_aligned<T>(ch.g);
#pragma unroll
    for (int k = 0; k < Op::kStates; ++k) aligned = aligned && is_aligned<T>(ch.st[k]);
    if constexpr (SPARSE == 1 || SPARSE == 3) {
      aligned = aligned && is_aligned<uint8_t, V>(ch.mask) && (ch.out == nullptr || is_aligned<T>(ch.out));
    }
    const int nvec = aligned ? n / V : 0;

    if constexpr (PHASE == 0) {
      const uint32_t key = sr_key(s.seed, index, static_cast<uint32_t>(static_cast<double>(step_now) + 1.0));
      if constexpr (SPARSE >= 3) {
        update_range<V, SPARSE>(ch, 0, nvec * V, grad_mul, c, key, s);
        update_range<1, SPARSE>(ch, nvec * V, n, grad_mul, c, key, s);
      } else if constexpr (SPARSE == 1) {
        if (ch.out != nullptr) {
          update_range<V, 2>(ch, 0, nvec * V, grad_mul, c, key, s);
          update_range<1, 2>(ch, nvec * V, n, grad_mul, c, key, s);
        } else {
          update_range<V, 1>(ch, 0, nvec * V, grad_mul, c, key, s);
          update_range<1, 1>(ch, nvec * V, n, grad_mul, c, key, s);
        }
      } else {
        update_range<V, 0>(ch, 0, nvec * V, grad_mul, c, key, s);
        update_range<1, 0>(ch, nvec * V, n, grad_mul, c, key, s);
      }
    } else {
      float acc[kMaxReduce] = {0.0f, 0.0f, 0.0f, 0.0f};
      reduce_range<V>(ch, 0, nvec * V, grad_mul, c, acc);
      reduce_range<1>(ch, nvec * V, n, grad_mul, c, acc);
      if (rows.one_row) {
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
          for (int k = 0; k < Op::kReduce; ++k) {
            float v = lane < nwarps ? warp_sums[k][lane] : 0.0f;
            for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
            if (lane == 0) atomicAdd(ch.sums0 + k, v);
          }
        }
      }
    }
  }

  // Phase 0 over the chunk's elements [first, end), V per thread per iteration (V > 1: end - first a
  // multiple of V, every list aligned for Vec<T, V>).  SPARSE_OUT as op_update_element's SPARSE (0..4).
  template <int V, int SPARSE_OUT>
  __device__ __forceinline__ void update_range(const Chunk& ch, int first, int end, float grad_mul,
                                               const typename Op::Coeffs& c, uint32_t key,
                                               const DevScalars& s) const {
    const int stride = static_cast<int>(blockDim.x) * V;
    int i = first + static_cast<int>(threadIdx.x) * V;
    if (i >= end) return;
    RowCursor cur{};
    if (ch.rc0 != nullptr) cur.init(ch.rows.col0 + i, ch.rows.len, stride);
    for (; i < end; i += stride) {
      Vec<T, V> rp = *reinterpret_cast<const Vec<T, V>*>(ch.p + i);
      const Vec<T, V> rg = *reinterpret_cast<const Vec<T, V>*>(ch.g + i);
      Vec<T, V> rs[kMaxStates];
#pragma unroll
      for (int k = 0; k < Op::kStates; ++k) rs[k] = *reinterpret_cast<const Vec<T, V>*>(ch.st[k] + i);
      Vec<uint8_t, V> rmask;
      Vec<T, V> rout;
      if constexpr (SPARSE_OUT > 0 && SPARSE_OUT != 4) rmask = *reinterpret_cast<const Vec<uint8_t, V>*>(ch.mask + i);
      const uint32_t sr_base = ch.sr_chunk + static_cast<uint32_t>(i);  // element i + e: sr_base + e (mod 2^32)
      RowCursor e_cur = cur;
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const float* rc = ch.rc0 != nullptr ? ch.rc0 + e_cur.row * kMaxRowCoefs : kZeroRow;
        op_update_element<Op, T, SPARSE_OUT>(rp.v, rg.v, rs[0].v, rs[1].v, rs[2].v, rs[3].v, e, grad_mul, c, rc,
                                             SR, key, sr_base, rmask.v, SPARSE_OUT == 2 ? rout.v : nullptr,
                                             s.sparse_lambda, s.sparse_beta, ch.mask_key, ch.mask_threshold);
        if (ch.rc0 != nullptr) e_cur.next();
      }
      *reinterpret_cast<Vec<T, V>*>(ch.p + i) = rp;
#pragma unroll
      for (int k = 0; k < Op::kStates; ++k) *reinterpret_cast<Vec<T, V>*>(ch.st[k] + i) = rs[k];
      if constexpr (SPARSE_OUT == 2) *reinterpret_cast<Vec<T, V>*>(ch.out + i) = rout;
      if (ch.rc0 != nullptr) cur.advance();
    }
  }

  // Phase 1 over [first, end) as update_range.  A chunk in one row adds into the thread's `acc` (block-reduced
  // by the caller); a chunk spanning rows adds each element's sums with their own atomicAdds (as before).
  template <int V>
  __device__ __forceinline__ void reduce_range(const Chunk& ch, int first, int end, float grad_mul,
                                               const typename Op::Coeffs& c, float (&acc)[kMaxReduce]) const {
    const int stride = static_cast<int>(blockDim.x) * V;
    int i = first + static_cast<int>(threadIdx.x) * V;
    if (i >= end) return;
    RowCursor cur{};
    cur.init(ch.rows.col0 + i, ch.rows.len, stride);
    for (; i < end; i += stride) {
      const Vec<T, V> rp = *reinterpret_cast<const Vec<T, V>*>(ch.p + i);
      const Vec<T, V> rg = *reinterpret_cast<const Vec<T, V>*>(ch.g + i);
      Vec<T, V> rs[kMaxStates];
#pragma unroll
      for (int k = 0; k < Op::kStates; ++k) rs[k] = *reinterpret_cast<const Vec<T, V>*>(ch.st[k] + i);
      RowCursor e_cur = cur;
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const float* rc = ch.rc0 != nullptr ? ch.rc0 + e_cur.row * kMaxRowCoefs : kZeroRow;
        if (ch.rows.one_row) {
          op_reduce_element<Op, T>(rp.v, rg.v, rs[0].v, rs[1].v, rs[2].v, rs[3].v, e, grad_mul, c, rc, acc);
        } else {
          float one[kMaxReduce] = {0.0f, 0.0f, 0.0f, 0.0f};
          op_reduce_element<Op, T>(rp.v, rg.v, rs[0].v, rs[1].v, rs[2].v, rs[3].v, e, grad_mul, c, rc, one);
          for (int k = 0; k < Op::kReduce; ++k) atomicAdd(ch.sums0 + e_cur.row * kMaxReduce + k, one[k]);
        }
        e_cur.next();
      }
#pragma unroll
      for (int k = 0; k < Op::kStates; ++k) *reinterpret_cast<Vec<T, V>*>(ch.st[k] + i) = rs[k];
      cur.advance();
    }
  }
};


template <typename Op, typename T, int PHASE, bool SR, int SPARSE = 0>
void launch(const ElementwiseArgs& a, const DevScalars& s, const std::vector<int64_t>& row_offset,
            const StepFold& fold, cudaStream_t stream) {
  using K = ElementwiseOp<Op, T, PHASE, SR, SPARSE>;
  constexpr int kDepth = K::kLists + 4 + (SPARSE ? 2 : 0);
  const TensorLists& l = a.lists;
  auto addr = [&](int d, int64_t t) -> void* {
    if (d < K::kLists) return l.get<void>(d, t);
    if (d == K::kLists) return a.steps.empty() ? nullptr : as_ptr<void>(a.steps[t]);
    if (SPARSE == 4 && d == K::kLists + 4) return reinterpret_cast<void*>(static_cast<uintptr_t>(a.sparse_keys[t]));
    if (SPARSE == 4 && d == K::kLists + 5) return reinterpret_cast<void*>(static_cast<uintptr_t>(a.sparse_threshold));
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
  multi_tensor_apply_fold<kDepth>(l.n, addr, numel, stream, fold, K{}, s);
}

bool op_dispatch(const ElementwiseArgs& a, const DevScalars& s, const std::vector<int64_t>& row_offset,
                 const StepFold& fold, cudaStream_t stream) {
  bool found = false;
#define FASTOPT_CUDA_CASE(NAME, TYPE)                                                           \
  if (!found && a.op == NAME) {                                                                 \
    found = true;                                                                               \
    FASTOPT_DTYPE_SWITCH(a.lists.dtype, [&] {                                                   \
      if (a.phase == 1) {                                                                       \
        if constexpr (TYPE::kReduce > 0) launch<TYPE, scalar_t, 1, false>(a, s, row_offset, fold, stream); \
      } else {                                                                                  \
        /* stochastic rounding changes bf16 stores only (store_param): other dtypes get the   \
           SR = false kernels alone, a third fewer instantiations to compile */                 \
        constexpr bool kRounds = std::is_same<scalar_t, ::fastopt::bf16_t>::value;              \
        FASTOPT_BOOL_SWITCH(kRounds && a.stochastic, SR_ASKED, [&] {                            \
          constexpr bool SR = SR_ASKED && kRounds;                                              \
          if (a.sparse_prune != 0) {                                                            \
            if constexpr (TYPE::kReduce == 0) {                                                 \
              if (a.sparse_prune == 2) launch<TYPE, scalar_t, 0, SR, 4>(a, s, row_offset, fold, stream); \
              else launch<TYPE, scalar_t, 0, SR, 3>(a, s, row_offset, fold, stream);            \
            }                                                                                   \
          } else if (a.sparse_mask.empty()) {                                                   \
            launch<TYPE, scalar_t, 0, SR>(a, s, row_offset, fold, stream);                      \
          } else if constexpr (TYPE::kReduce == 0) {                                            \
            launch<TYPE, scalar_t, 0, SR, 1>(a, s, row_offset, fold, stream);                   \
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

void elementwise_cuda(const ElementwiseArgs& a, int64_t ticket, int64_t stream_handle) {
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
  cuda::StepFold fold;  // phase 0 with step counters: each launch increments those of the tensors it finishes
  if (a.phase == 0) fold.ticket = cuda::fold_ticket(a.steps, ticket);
  fold.found_inf = s.found_inf;
  // (false only in a build whose op list leaves this op out: tests/test_cuda_on_cpu.py's mutation builds)
  check_arg(cuda::op_dispatch(a, s, row_offsets(a), fold, stream), "no CUDA kernel for elementwise op '" + a.op + "'");
  if (a.phase == 0 && !a.steps.empty() && fold.ticket == nullptr) cuda::increment_steps(a.steps, s.found_inf, stream);
}

}  // namespace fastopt
