// fastopt/multi_tensor.cuh -- the generic CUDA multi-tensor launcher.
//
// As in apex's multi_tensor_apply: the addresses and sizes of up to kMaxTensors tensors and the
// (tensor, chunk) pair of up to kMaxBlocks CUDA blocks travel in one kernel-argument struct; the host
// walks the lists once, launching whenever the struct is full.  One block handles one chunk of
// kChunk elements.  Indexing is int64 at the chunk level (tensors of more than 2^31 elements work);
// inside a chunk it is int32.  The per-element work is a callable `op(tl, tensor, chunk_start, n)`.
#pragma once

#include <cuda_runtime.h>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "fastopt/api.h"
#include "fastopt/launch.cuh"

#ifdef FASTOPT_CUDA_ON_CPU
#define FASTOPT_NOINLINE __attribute__((noinline))
#else
#define FASTOPT_NOINLINE __noinline__
#endif

namespace fastopt {
namespace cuda {

constexpr int64_t kChunk = 65536;
constexpr int kBlockThreads = 512;

// Kernel arguments stay under the classic 4 KiB limit for every depth.
template <int DEPTH> struct Capacity;
template <> struct Capacity<4> { static constexpr int tensors = 48, blocks = 320; };
template <> struct Capacity<5> { static constexpr int tensors = 36, blocks = 320; };
template <> struct Capacity<6> { static constexpr int tensors = 30, blocks = 320; };
template <> struct Capacity<7> { static constexpr int tensors = 32, blocks = 320; };
template <> struct Capacity<8> { static constexpr int tensors = 28, blocks = 320; };
template <> struct Capacity<9> { static constexpr int tensors = 26, blocks = 320; };
template <> struct Capacity<10> { static constexpr int tensors = 24, blocks = 320; };
template <> struct Capacity<11> { static constexpr int tensors = 22, blocks = 320; };
template <> struct Capacity<12> { static constexpr int tensors = 20, blocks = 320; };

// DEPTH tensor lists; the last list of a call may hold per-tensor scalar addresses (the step counters).
template <int DEPTH>
struct TensorListMeta {
  void* addresses[DEPTH][Capacity<DEPTH>::tensors];
  int64_t numels[Capacity<DEPTH>::tensors];
  unsigned char block_to_tensor[Capacity<DEPTH>::blocks];
  int block_to_chunk[Capacity<DEPTH>::blocks];
};

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("fastopt: CUDA error in ") + what + ": " + cudaGetErrorString(err));
  }
}

// The cudaStream_t behind the ABI's stream handle (torch.cuda.current_stream().cuda_stream).
inline cudaStream_t as_stream(int64_t handle) { return reinterpret_cast<cudaStream_t>(static_cast<intptr_t>(handle)); }

// The list holding the step counters of an op's launches: Op::kStepList if the op says so, else the last.
template <typename Op, int DEPTH, typename = void> struct StepListOf { static constexpr int value = DEPTH - 1; };
template <typename Op, int DEPTH> struct StepListOf<Op, DEPTH, std::void_t<decltype(Op::kStepList)>> {
  static constexpr int value = Op::kStepList;
};

// The step increment folded into a launch (issue 18 item 3).  Every block reads its tensor's step counter
// (as step + 1), so no block may add to it while another could still read it.  Each launch with a fold
// adds 1 to the step counters of the tensors it finishes (slots [0, nsteps) of the launch: a tensor whose
// chunks continue in the next launch is left to that launch), unless found_inf is set: every block takes
// a ticket from the int32 counter *ticket (zero before the launch) after a barrier (all its threads are
// past their reads) and a fence; the block drawing the last ticket (gridDim.x - 1) has seen every other
// block's reads complete, adds the 1s and puts the counter back to zero for the next launch on the stream.
// Launches of one call run on one stream, so a counter read by an earlier launch is only incremented by
// that launch or a later one.  Blocks of an AMP-skipped step (found_inf set, one value for the call)
// take no ticket and increment nothing: the counter stays zero.  The host folds only when the call's step
// counters are distinct (a counter shared by tensors of two launches would be incremented between reads).
struct StepFold {
  int* ticket = nullptr;            // null: no fold in this launch (the host increments separately, or not)
  const float* found_inf = nullptr;  // may be null
  int nsteps = 0;                   // the launch's tensors [0, nsteps) have their last chunk in it
};

// Called by every thread of every block once the block is past its reads of its step counter (after the op in
// multi_tensor_block; right after the read in lowbit_kernel); `mine`: the step counter of the launch's tensor
// threadIdx.x if threadIdx.x < nsteps, else null (a launch finishes at most blockDim.x tensors).  Not inlined:
// after the op, inlined, it cost some 64-register Adam variants a spill (sm_90); not inlined, none.
static FASTOPT_NOINLINE __device__ void fold_step_increment(int* ticket, const float* found_inf, float* mine) {
  if (found_inf != nullptr && *found_inf != 0.0f) return;  // uniform over the grid: no block takes a ticket
  __shared__ int fold_is_last;
  __syncthreads();  // every thread of the block is past its reads
  if (threadIdx.x == 0) {
    __threadfence();
    fold_is_last = atomicAdd(ticket, 1) == static_cast<int>(gridDim.x) - 1;
    __threadfence();
  }
  __syncthreads();
  if (fold_is_last) {
    __threadfence();
    if (mine != nullptr) *mine += 1.0f;
    if (threadIdx.x == 0) *ticket = 0;
  }
}

// The fold of a launch (every thread of every block calls it, past its step reads): step_at(i) is the address
// of the step counter of the launch's tensor i.
template <typename StepAt>
__device__ __forceinline__ void fold_steps(const StepFold& f, StepAt step_at) {
  if (f.ticket == nullptr) return;
  const int i = static_cast<int>(threadIdx.x);
  fold_step_increment(f.ticket, f.found_inf, i < f.nsteps ? step_at(i) : nullptr);
}

template <int DEPTH, typename Op, typename... Args>
__device__ __forceinline__ void multi_tensor_block(const TensorListMeta<DEPTH>& meta, const StepFold& fold,
                                                   const Op& op, const Args&... args) {
  const int t = meta.block_to_tensor[blockIdx.x];
  const int64_t start = static_cast<int64_t>(meta.block_to_chunk[blockIdx.x]) * kChunk;
  const int64_t rem = meta.numels[t] - start;
  const int n = static_cast<int>(rem < kChunk ? rem : kChunk);
  op(meta, t, start, n, args...);
  // The step counters: list Op::kStepList, or the last (the host folds only for ops whose launches carry them).
  fold_steps(fold, [&](int i) { return static_cast<float*>(meta.addresses[StepListOf<Op, DEPTH>::value][i]); });
}

template <int DEPTH, typename Op, typename... Args>
__global__ void __launch_bounds__(kBlockThreads)
multi_tensor_kernel(const TensorListMeta<DEPTH> meta, const StepFold fold, Op op, Args... args) {
  multi_tensor_block(meta, fold, op, args...);
}

// The same with a minimum of 1 block per SM, for ops that say `static constexpr bool kOneBlockPerSM = true`
// (the vectorized elementwise ops): without it ptxas spills a few bytes to local memory in some of their
// variants to keep one more block resident (it sizes them at 40 or 64 registers); with it none spills
// (sm_90, tests/test_cuda_sass.py), at the price of more registers (often 65-96: one 512-thread block).
template <int DEPTH, typename Op, typename... Args>
__global__ void __launch_bounds__(kBlockThreads, 1)
multi_tensor_kernel_1(const TensorListMeta<DEPTH> meta, const StepFold fold, Op op, Args... args) {
  multi_tensor_block(meta, fold, op, args...);
}

template <typename Op, typename = void> struct OneBlockPerSM { static constexpr bool value = false; };
template <typename Op> struct OneBlockPerSM<Op, std::void_t<decltype(Op::kOneBlockPerSM)>> {
  static constexpr bool value = Op::kOneBlockPerSM;
};

template <int DEPTH, typename Op, typename... Args>
void launch_multi_tensor(int nblocks, cudaStream_t stream, const TensorListMeta<DEPTH>& meta, const StepFold& fold,
                         const Op& op, const Args&... args) {
  static_assert(Capacity<DEPTH>::tensors <= kBlockThreads, "fold_steps: one thread per finished tensor");
  static_assert(sizeof(TensorListMeta<DEPTH>) + sizeof(StepFold) + sizeof(Op) + (0 + ... + sizeof(Args)) <= 4096,
                "multi_tensor kernel arguments exceed 4 KiB");
  if constexpr (OneBlockPerSM<Op>::value) {
    FASTOPT_LAUNCH(nblocks, kBlockThreads, 0, stream, multi_tensor_kernel_1<DEPTH>)(meta, fold, op, args...);
  } else {
    FASTOPT_LAUNCH(nblocks, kBlockThreads, 0, stream, multi_tensor_kernel<DEPTH>)(meta, fold, op, args...);
  }
  check_cuda(cudaGetLastError(), "multi_tensor_kernel launch");
}

// Walks `addr(list, tensor)` / `numel(tensor)` for n tensors and launches `op` over every chunk.  With
// `fold.ticket` set (StepFold), each launch also increments the step counters of the tensors it finishes,
// and an empty tensor gets one chunk of 0 elements (its block reads the step counter and does nothing
// else) so that its counter is incremented too; without it empty tensors are skipped.
template <int DEPTH, typename Op, typename Addr, typename Numel, typename... Args>
void multi_tensor_apply_fold(int64_t n, Addr addr, Numel numel, cudaStream_t stream, StepFold fold, Op op,
                             Args... args) {
  using Cap = Capacity<DEPTH>;
  const bool folding = fold.ticket != nullptr;
  TensorListMeta<DEPTH> meta;
  int ntensors = 0, nblocks = 0;
  for (int64_t t = 0; t < n; ++t) {
    const int64_t size = numel(t);
    if (size == 0 && !folding) continue;
    for (int d = 0; d < DEPTH; ++d) meta.addresses[d][ntensors] = addr(d, t);
    meta.numels[ntensors] = size;
    ++ntensors;
    const int64_t chunks = size == 0 ? 1 : (size + kChunk - 1) / kChunk;
    for (int64_t c = 0; c < chunks; ++c) {
      meta.block_to_tensor[nblocks] = static_cast<unsigned char>(ntensors - 1);
      meta.block_to_chunk[nblocks] = static_cast<int>(c);
      ++nblocks;
      const bool blocks_full = nblocks == Cap::blocks;
      const bool tensors_full = ntensors == Cap::tensors && c == chunks - 1;
      const bool last = t == n - 1 && c == chunks - 1;
      if (blocks_full || tensors_full || last) {
        fold.nsteps = c == chunks - 1 ? ntensors : ntensors - 1;  // a tensor continuing in the next launch: not yet
        launch_multi_tensor(nblocks, stream, meta, fold, op, args...);
        nblocks = 0;
        if (c == chunks - 1) {
          ntensors = 0;
        } else {  // the current tensor continues in the next launch, in slot 0
          for (int d = 0; d < DEPTH; ++d) meta.addresses[d][0] = meta.addresses[d][ntensors - 1];
          meta.numels[0] = meta.numels[ntensors - 1];
          ntensors = 1;
        }
      }
    }
  }
  if (nblocks > 0) {  // zero-sized tensors at the end of the list leave a partial launch behind (only without a fold)
    fold.nsteps = ntensors;
    launch_multi_tensor(nblocks, stream, meta, fold, op, args...);
  }
}

// multi_tensor_apply_fold without a fold (the step counters, if any, are incremented by the caller).
template <int DEPTH, typename Op, typename Addr, typename Numel, typename... Args>
void multi_tensor_apply(int64_t n, Addr addr, Numel numel, cudaStream_t stream, Op op, Args... args) {
  multi_tensor_apply_fold<DEPTH>(n, addr, numel, stream, StepFold{}, op, args...);
}

// 16-byte vector access: kVec<T> elements of T (4 x fp32, 8 x bf16/fp16) moved as one aligned unit
// (one LDG.E.128 / STG.E.128).  Vec<T, 1> is a plain scalar access (the unaligned / tail paths).
template <typename T> constexpr int kVec = static_cast<int>(16 / sizeof(T));
template <typename T, int N = kVec<T>> struct alignas(sizeof(T) * N) Vec { T v[N]; };

// Whether p is aligned for a Vec<T, N> access.
template <typename T, int N = kVec<T>>
__device__ __forceinline__ bool is_aligned(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) % (sizeof(T) * N)) == 0;
}

}  // namespace cuda
}  // namespace fastopt
