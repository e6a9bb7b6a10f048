// CUDA entry points of the low-bit-state step and of the blockwise codec (fastopt/quant.h), mirroring
// csrc/cpu/lowbit_kernels.cpp: per quantization block, dequantize each quantized state with the
// block's absmax, run Op::update in fp32 per element (as op_update_element does), store the param,
// then requantize each quantized state with the block's new absmax.  lr, grad scale, found_inf and
// the step counters are read on the device: no host sync.
//
// One warp owns one quantization block (at most kMaxQuantBlock = 256 elements): lane l handles the
// element pairs (2j, 2j+1) for j = l, l + 32, ..., so a lane's pair is one byte of a 4-bit state (low
// nibble = element 2j) and the block's states stay in registers (at most 4 pairs per lane) between
// the update and the requantization; the new absmax is a warp-shuffle max (NaN for a block holding a
// NaN or an infinity: quant.h's rule for non-finite values).  A CUDA block of kThreads threads takes
// a chunk of consecutive quantization blocks of one tensor, its warps striding
// over them.  As in multi_tensor.cuh, the per-tensor addresses and the (tensor, chunk) pair of every
// CUDA block travel in one kernel-argument struct, the host launching whenever it is full.
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <vector>

#include "fastopt/api.h"
#include "fastopt/dispatch.h"
#include "fastopt/elementwise.h"
#include "fastopt/multi_tensor.cuh"
#include "fastopt/ops.h"
#include "fastopt/quant.h"
#include "step.cuh"

namespace fastopt {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kPairs = kMaxQuantBlock / 64;   // element pairs per lane of one quantization block
constexpr int64_t kChunkElems = 16384;        // elements per CUDA block (a whole number of q-blocks)
constexpr int kLaunchTensors = 16;
constexpr int kLaunchBlocks = 320;

// One tensor of a launch.  States past Op::kStates, and the absmax of plain states, are null.
struct LowbitTensor {
  void* p;
  const void* g;
  void* s[kMaxStates];           // T* for a plain state, uint8_t* codes for a quantized one
  float* absmax[kMaxStates];     // [nblocks] for a quantized state
  const float* step;             // fp32 step counter, or null (the step reads as 1)
  int64_t nblocks;               // quantization blocks of the tensor
  uint32_t index;                // the tensor's index in the call (stochastic rounding stream)
  uint32_t sr_offset;            // low 32 bits of its element offset (ElementwiseArgs::sr_offsets)
};

struct LowbitMeta {
  LowbitTensor tensors[kLaunchTensors];
  unsigned char block_to_tensor[kLaunchBlocks];
  int block_to_chunk[kLaunchBlocks];
};

struct LowbitScalars : StepScalars {
  const int32_t* books[kMaxStates];  // per state: its codebook, or null for a plain state
  int block;                         // elements per quantization block
  int qchunk;                        // quantization blocks per CUDA block
  bool stochastic;
};

// Kernel arguments stay under the classic 4 KiB limit.
static_assert(kLaunchTensors <= kThreads, "fold_steps: one thread per finished tensor");
static_assert(sizeof(LowbitMeta) + sizeof(LowbitScalars) + sizeof(StepFold) <= 4096,
              "lowbit kernel arguments exceed 4 KiB");

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

// The absmax a warp stores for its block: the warp max of the lanes' |x| maxima, or NaN when any
// lane saw a NaN or an infinity (a poisoned block, quant.h; fmaxf alone would drop a NaN).
__device__ __forceinline__ float warp_absmax(float lane_max, bool lane_bad) {
  const float amax = warp_max(lane_max);
  return __any_sync(0xffffffffu, lane_bad) ? quant_poison() : amax;
}

// The normalized value quantized for x: x / absmax clamped, or 0 in a poisoned block (absmax NaN).
__device__ __forceinline__ float block_normalize(float x, float amax, float inv) {
  return quant_finite(amax) ? quant_normalize(x, inv) : 0.0f;
}

// One quantization block `qb` of tensor `tt`, handled by one warp (all 32 lanes must call it).
template <typename Op, typename T>
__device__ __forceinline__ void lowbit_block(const LowbitTensor& tt, const LowbitScalars& s,
                                             const CodebookView (&books)[kMaxStates],
                                             const bool (&quant)[kMaxStates], int64_t qb, int lane,
                                             float grad_mul, const typename Op::Coeffs& c, uint32_t key) {
  const int64_t base = qb * s.block;
  const int half = s.block >> 1;
  T* p = static_cast<T*>(tt.p);
  const T* g = static_cast<const T*>(tt.g);
  const float no_row[kMaxRowCoefs] = {0.0f, 0.0f, 0.0f, 0.0f};
  float st[kMaxStates][kPairs][2] = {};

  // Load (dequantize) the states, update, store the params.
#pragma unroll
  for (int i = 0; i < kPairs; ++i) {
    const int jp = lane + 32 * i;
    if (jp >= half) continue;
    const int64_t e0 = base + 2 * jp;
#pragma unroll
    for (int k = 0; k < Op::kStates; ++k) {
      if (quant[k]) {
        const uint8_t* codes = static_cast<const uint8_t*>(tt.s[k]);
        const float amax = tt.absmax[k][qb];
        int c0, c1;
        if (books[k].nc == 16) {
          const uint8_t byte = codes[(base >> 1) + jp];
          c0 = byte & 0xF;
          c1 = byte >> 4;
        } else {
          c0 = codes[e0];
          c1 = codes[e0 + 1];
        }
        st[k][i][0] = books[k].values[c0] * amax;
        st[k][i][1] = books[k].values[c1] * amax;
      } else {
        const T* sk = static_cast<const T*>(tt.s[k]);
        st[k][i][0] = to_float(sk[e0]);
        st[k][i][1] = to_float(sk[e0 + 1]);
      }
    }
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      float sv[kMaxStates] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
      for (int k = 0; k < Op::kStates; ++k) sv[k] = st[k][i][e];
      float pf = to_float(p[e0 + e]);
      Op::update(pf, to_float(g[e0 + e]) * grad_mul, sv, c, no_row);
      p[e0 + e] = store_param<T>(pf, s.stochastic, key, tt.sr_offset + static_cast<uint32_t>(e0 + e));
#pragma unroll
      for (int k = 0; k < Op::kStates; ++k) st[k][i][e] = sv[k];
    }
  }

  // Store the states: requantize with the block's new absmax, or convert a plain state.
#pragma unroll
  for (int k = 0; k < Op::kStates; ++k) {
    if (quant[k]) {
      float amax = 0.0f;
      bool bad = false;
#pragma unroll
      for (int i = 0; i < kPairs; ++i) {
        if (lane + 32 * i < half) {
          amax = fmaxf(amax, fmaxf(fabsf(st[k][i][0]), fabsf(st[k][i][1])));
          bad = bad || !quant_finite(st[k][i][0]) || !quant_finite(st[k][i][1]);
        }
      }
      amax = warp_absmax(amax, bad);
      const float inv = quant_inv_scale(amax);
      uint8_t* codes = static_cast<uint8_t*>(tt.s[k]);
#pragma unroll
      for (int i = 0; i < kPairs; ++i) {
        const int jp = lane + 32 * i;
        if (jp >= half) continue;
        const int c0 = quantize_code(books[k], block_normalize(st[k][i][0], amax, inv));
        const int c1 = quantize_code(books[k], block_normalize(st[k][i][1], amax, inv));
        if (books[k].nc == 16) {
          codes[(base >> 1) + jp] = static_cast<uint8_t>(c0 | (c1 << 4));
        } else {
          codes[base + 2 * jp] = static_cast<uint8_t>(c0);
          codes[base + 2 * jp + 1] = static_cast<uint8_t>(c1);
        }
      }
      if (lane == 0) tt.absmax[k][qb] = amax;
    } else {
      T* sk = static_cast<T*>(tt.s[k]);
#pragma unroll
      for (int i = 0; i < kPairs; ++i) {
        const int jp = lane + 32 * i;
        if (jp >= half) continue;
        sk[base + 2 * jp] = from_float<T>(st[k][i][0]);
        sk[base + 2 * jp + 1] = from_float<T>(st[k][i][1]);
      }
    }
  }
}

template <typename Op, typename T>
__global__ void __launch_bounds__(kThreads)
lowbit_kernel(const LowbitMeta meta, const LowbitScalars s, const StepFold fold) {
  if (s.skipped()) return;
  const LowbitTensor& tt = meta.tensors[meta.block_to_tensor[blockIdx.x]];
  const double lr = s.lr_now();
  const float grad_mul = s.grad_mul();
  const double step = (tt.step != nullptr ? static_cast<double>(*tt.step) : 0.0) + 1.0;
  const typename Op::Coeffs c = Op::coeffs(OpScalars{s.h, s.flags, lr, step});
  const uint32_t key = sr_key(s.seed, tt.index, static_cast<uint32_t>(step));
  // The step fold (multi_tensor.cuh) right after the block's only read of its step counter: placed after the
  // main loop instead, ptxas gave these kernels about 8 more registers (a few variants a spill), here none.
  fold_steps(fold, [&](int i) { return const_cast<float*>(meta.tensors[i].step); });

  CodebookView books[kMaxStates];
  bool quant[kMaxStates] = {false, false, false, false};
#pragma unroll
  for (int k = 0; k < Op::kStates; ++k) {
    quant[k] = s.books[k] != nullptr;
    if (quant[k]) books[k] = codebook_view(s.books[k]);
  }

  const int64_t q0 = static_cast<int64_t>(meta.block_to_chunk[blockIdx.x]) * s.qchunk;
  const int64_t q1 = q0 + s.qchunk < tt.nblocks ? q0 + s.qchunk : tt.nblocks;
  const int lane = threadIdx.x & 31;
  for (int64_t qb = q0 + (threadIdx.x >> 5); qb < q1; qb += kWarps) {  // warp-uniform loop
    lowbit_block<Op, T>(tt, s, books, quant, qb, lane, grad_mul, c, key);
  }
}


// Walks the tensors and launches lowbit_kernel over every chunk of quantization blocks.  With a fold
// (multi_tensor.cuh's StepFold), each launch increments the step counters of the tensors it finishes, and
// an empty tensor gets one chunk of no quantization blocks so that its counter is incremented too.
template <typename Op, typename T>
void launch_lowbit(const LowbitArgs& la, const LowbitScalars& s, StepFold fold, cudaStream_t stream) {
  const ElementwiseArgs& a = la.base;
  const TensorLists& l = a.lists;
  const int64_t n = l.n;
  LowbitMeta meta;
  int ntensors = 0, nblocks = 0;
  auto flush = [&](int nsteps) {
    fold.nsteps = nsteps;
    FASTOPT_LAUNCH(nblocks, kThreads, 0, stream, lowbit_kernel<Op, T>)(meta, s, fold);
    check_cuda(cudaGetLastError(), "lowbit_kernel launch");
    nblocks = 0;
  };
  for (int64_t t = 0; t < n; ++t) {
    const int64_t qblocks = l.numels[t] / la.block;
    if (qblocks == 0 && fold.ticket == nullptr) continue;
    LowbitTensor& tt = meta.tensors[ntensors];
    tt.p = l.get<void>(0, t);
    tt.g = l.get<void>(1, t);
    for (int k = 0; k < kMaxStates; ++k) {
      tt.s[k] = k < Op::kStates ? l.get<void>(2 + k, t) : nullptr;
      tt.absmax[k] = k < Op::kStates ? as_ptr<float>(la.absmax[k * n + t]) : nullptr;
    }
    tt.step = a.steps.empty() ? nullptr : as_ptr<const float>(a.steps[t]);
    tt.nblocks = qblocks;
    tt.index = static_cast<uint32_t>(t);
    tt.sr_offset = sr_offset_of(a, t);
    ++ntensors;
    const int64_t chunks = qblocks == 0 ? 1 : (qblocks + s.qchunk - 1) / s.qchunk;  // <= INT_MAX: lowbit_cuda
    for (int64_t ch = 0; ch < chunks; ++ch) {
      meta.block_to_tensor[nblocks] = static_cast<unsigned char>(ntensors - 1);
      meta.block_to_chunk[nblocks] = static_cast<int>(ch);
      ++nblocks;
      const bool blocks_full = nblocks == kLaunchBlocks;
      const bool tensors_full = ntensors == kLaunchTensors && ch == chunks - 1;
      if (blocks_full || tensors_full) {
        flush(ch == chunks - 1 ? ntensors : ntensors - 1);  // a tensor continuing in the next launch: not yet
        if (ch == chunks - 1) {
          ntensors = 0;
        } else {  // the current tensor continues in the next launch, in slot 0
          meta.tensors[0] = meta.tensors[ntensors - 1];
          ntensors = 1;
        }
      }
    }
  }
  if (nblocks > 0) flush(ntensors);
}

bool lowbit_dispatch(const LowbitArgs& la, const LowbitScalars& s, const StepFold& fold, cudaStream_t stream) {
  bool found = false;
#define FASTOPT_LOWBIT_CUDA_CASE(NAME, TYPE)                                                   \
  if (!found && la.base.op == NAME) {                                                          \
    found = true;                                                                              \
    FASTOPT_DTYPE_SWITCH(la.base.lists.dtype, [&] { launch_lowbit<TYPE, scalar_t>(la, s, fold, stream); }); \
  }
  FASTOPT_FOR_EACH_OP(FASTOPT_LOWBIT_CUDA_CASE)
#undef FASTOPT_LOWBIT_CUDA_CASE
  return found;
}

// The blockwise codec of one fp32 buffer: one warp per quantization block (any even block size:
// lanes stride over the block's element pairs; quantizing reads x twice, for the max, then the codes).
__global__ void __launch_bounds__(kThreads)
codec_kernel(float* x, uint8_t* codes, float* absmax, int64_t nblocks, int block, const int32_t* book,
             bool dequantize) {
  const CodebookView b = codebook_view(book);
  const bool four_bit = b.nc == 16;
  const int lane = threadIdx.x & 31;
  const int half = block >> 1;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t qb = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); qb < nblocks; qb += warps) {
    const int64_t base = qb * block;
    uint8_t* cb = codes + (four_bit ? base / 2 : base);
    if (dequantize) {
      const float amax = absmax[qb];
      for (int jp = lane; jp < half; jp += 32) {
        int c0, c1;
        if (four_bit) {
          const uint8_t byte = cb[jp];
          c0 = byte & 0xF;
          c1 = byte >> 4;
        } else {
          c0 = cb[2 * jp];
          c1 = cb[2 * jp + 1];
        }
        x[base + 2 * jp] = b.values[c0] * amax;
        x[base + 2 * jp + 1] = b.values[c1] * amax;
      }
    } else {
      float amax = 0.0f;
      bool bad = false;
      for (int jp = lane; jp < half; jp += 32) {
        const float x0 = x[base + 2 * jp], x1 = x[base + 2 * jp + 1];
        amax = fmaxf(amax, fmaxf(fabsf(x0), fabsf(x1)));
        bad = bad || !quant_finite(x0) || !quant_finite(x1);
      }
      amax = warp_absmax(amax, bad);
      const float inv = quant_inv_scale(amax);
      for (int jp = lane; jp < half; jp += 32) {
        const int c0 = quantize_code(b, block_normalize(x[base + 2 * jp], amax, inv));
        const int c1 = quantize_code(b, block_normalize(x[base + 2 * jp + 1], amax, inv));
        if (four_bit) {
          cb[jp] = static_cast<uint8_t>(c0 | (c1 << 4));
        } else {
          cb[2 * jp] = static_cast<uint8_t>(c0);
          cb[2 * jp + 1] = static_cast<uint8_t>(c1);
        }
      }
      if (lane == 0) absmax[qb] = amax;
    }
  }
}

}  // namespace
}  // namespace cuda

void lowbit_cuda(const LowbitArgs& la, int64_t ticket, int64_t stream_handle) {
  int states = 0, reduce = 0;
  check_arg(op_shape(la.base.op, &states, &reduce), "unknown elementwise op '" + la.base.op + "'");
  check_lowbit(la, states);
  for (int64_t c : la.colmax) check_arg(c == 0, "rank-1 normalized states run on the cpu (and torch) backends only");
  // The codebooks live on the device: their code counts (256 or 16) are not re-checked here.
  const ElementwiseArgs& a = la.base;
  cudaStream_t stream = cuda::as_stream(stream_handle);
  cuda::LowbitScalars s{};
  s.set(a);
  for (int k = 0; k < states; ++k) s.books[k] = as_ptr<const int32_t>(la.books[k]);
  s.block = static_cast<int>(la.block);
  s.qchunk = static_cast<int>(cuda::kChunkElems / la.block);
  s.stochastic = a.stochastic;
  for (int64_t numel : a.lists.numels) check_arg(numel / la.block / s.qchunk < INT_MAX, "tensor too large");
  cuda::StepFold fold;  // with step counters: each launch increments those of the tensors it finishes
  fold.ticket = cuda::fold_ticket(a.steps, ticket);
  fold.found_inf = s.found_inf;
  cuda::lowbit_dispatch(la, s, fold, stream);
  if (!a.steps.empty() && fold.ticket == nullptr) cuda::increment_steps(a.steps, s.found_inf, stream);
}

void quantize_cuda(const CodecArgs& a, int64_t stream_handle) {
  check_codec(a);
  check_arg(a.block <= INT_MAX, "block too large");
  const int64_t nblocks = a.numel / a.block;
  if (nblocks <= 0) return;
  cudaStream_t stream = cuda::as_stream(stream_handle);
  const int64_t want = (nblocks + cuda::kWarps - 1) / cuda::kWarps;
  const int grid = static_cast<int>(want < (1 << 20) ? want : (1 << 20));  // the kernel grid-strides past this
  FASTOPT_LAUNCH(grid, cuda::kThreads, 0, stream, cuda::codec_kernel)(
      as_ptr<float>(a.x), as_ptr<uint8_t>(a.codes), as_ptr<float>(a.absmax), nblocks,
      static_cast<int>(a.block), as_ptr<const int32_t>(a.book), a.dequantize);
  cuda::check_cuda(cudaGetLastError(), "codec_kernel launch");
}

}  // namespace fastopt
