// The fused SAF pass on CUDA (csrc/cpu/saf.h; spec: fastopt/reference/saf.py; the same formulas as
// csrc/cpu/saf_kernels.cpp and triton_kernels/saf.py).
//
// One block per row i of the batch (r = indices[i]); its threads stride over the classes:
//  * the duplicate scan: the row writes the bank only when r does not occur again later in the batch
//    (every block reads the indices after its own: the result does not depend on the block order);
//  * pass 1: the row's outputs go to the bank's write slot (rounded to nearest even for bf16 / fp16),
//    and, when active, the maxima M_z, M_y of z = logits_i / T and y = bank[read, r] / T;
//  * pass 2: S_z = sum exp(z - M_z), S_y = sum exp(y - M_y), A = sum exp(y - M_y)((y - M_y) - (z - M_z)),
//    row_kl_i = A / S_y - log S_y + log S_z;
//  * pass 3 (with a gradient): grad_i = grad_scale (exp(z - M_z) / S_z - exp(y - M_y) / S_y).
// Block reductions are a fixed tree (warp xor-shuffles, then the warps' partials): deterministic.  The
// read slot differs from the write slot, so no block reads what another writes.  A row whose index is
// out of range is skipped (the wrapper has raised before any launch; this keeps a bad call memory-safe).
#include <cuda_runtime.h>

#include <cstdint>

#include "../cpu/saf.h"
#include "fastopt/api.h"
#include "fastopt/dispatch.h"
#include "fastopt/elementwise.h"
#include "fastopt/launch.cuh"
#include "fastopt/multi_tensor.cuh"

namespace fastopt {
namespace cuda {
namespace {

constexpr int kMaxWarps = 8;  // blocks of at most 256 threads

// The block's reduction of v (max or sum) over its threads; every thread gets the result.  `slot`
// (kMaxWarps floats of shared memory) must not be in use by another reduction in flight.
template <bool MAX>
__device__ __forceinline__ float block_reduce(float v, float* slot) {
  for (int off = 16; off > 0; off >>= 1) {
    const float o = __shfl_xor_sync(0xffffffffu, v, off);
    v = MAX ? fmaxf(v, o) : v + o;
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  if (lane == 0) slot[warp] = v;
  __syncthreads();
  float r = slot[0];
  for (int w = 1; w < warps; ++w) r = MAX ? fmaxf(r, slot[w]) : r + slot[w];
  __syncthreads();  // (slot free again)
  return r;
}

template <typename L, typename K>
__global__ void __launch_bounds__(256) saf_kernel(const L* __restrict__ logits, const int64_t* __restrict__ idx,
                                                  K* __restrict__ bank, float* __restrict__ row_kl,
                                                  float* __restrict__ grad, int64_t rows, int64_t n, int64_t C,
                                                  int64_t read_base, int64_t write_base, bool active, float inv_t,
                                                  float gs) {
  __shared__ float red[3][kMaxWarps];
  const int64_t i = blockIdx.x;
  const int64_t r = idx[i];
  if (r < 0 || r >= n) return;  // (the whole block)
  int later = 0;
  for (int64_t j = i + 1 + threadIdx.x; j < rows; j += blockDim.x) later |= idx[j] == r ? 1 : 0;
  const bool writes = block_reduce<true>(static_cast<float>(later), red[0]) == 0.0f;
  const L* zi = logits + i * C;
  K* wi = bank + write_base + r * C;
  const K* yi = bank + read_base + r * C;
  float mz = -INFINITY, my = -INFINITY;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    const float x = to_float(zi[c]);
    if (writes) wi[c] = from_float<K>(x);
    if (active) {
      mz = fmaxf(mz, x * inv_t);
      my = fmaxf(my, to_float(yi[c]) * inv_t);
    }
  }
  if (!active) return;
  mz = block_reduce<true>(mz, red[0]);
  my = block_reduce<true>(my, red[1]);
  float sz = 0.0f, sy = 0.0f, acc = 0.0f;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    const float dz = to_float(zi[c]) * inv_t - mz, dy = to_float(yi[c]) * inv_t - my;
    const float ey = exp_nonpositive(dy);
    sz += exp_nonpositive(dz);
    sy += ey;
    acc += ey * (dy - dz);
  }
  sz = block_reduce<false>(sz, red[0]);
  sy = block_reduce<false>(sy, red[1]);
  acc = block_reduce<false>(acc, red[2]);
  if (threadIdx.x == 0) row_kl[i] = acc / sy - logf(sy) + logf(sz);
  if (grad == nullptr) return;
  const float cz = gs / sz, cy = gs / sy;
  float* gi = grad + i * C;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    const float dz = to_float(zi[c]) * inv_t - mz, dy = to_float(yi[c]) * inv_t - my;
    gi[c] = exp_nonpositive(dz) * cz - exp_nonpositive(dy) * cy;
  }
}

template <typename L, typename K>
void saf_launch(const SafArgs& a, cudaStream_t stream) {
  const int threads = a.classes >= 1024 ? 256 : (a.classes >= 256 ? 128 : 64);
  FASTOPT_LAUNCH(dim3(static_cast<unsigned>(a.rows)), dim3(threads), 0, stream, saf_kernel<L, K>)(
      as_ptr<const L>(a.logits), as_ptr<const int64_t>(a.indices), as_ptr<K>(a.bank), as_ptr<float>(a.row_kl),
      a.grad != 0 ? as_ptr<float>(a.grad) : nullptr, a.rows, a.n, a.classes, a.read_slot * a.n * a.classes,
      a.write_slot * a.n * a.classes, a.active, static_cast<float>(a.inv_temp), static_cast<float>(a.grad_scale));
  check_cuda(cudaGetLastError(), "saf_kernel launch");
}

}  // namespace
}  // namespace cuda

// The CUDA entry point: the checks of saf_cpu that need no device memory (the wrapper checked the
// indices' range on the host; the kernel skips a row outside it).  `loss` is not written (the caller
// sums row_kl).
void saf_cuda(const SafArgs& a, int64_t stream_handle) {
  check_saf_args(a);
  check_arg(a.rows <= 0x7fffffff, "more than 2^31 - 1 rows");
  if (a.rows * a.classes == 0) return;
  check_arg(a.logits != 0 && a.indices != 0 && a.bank != 0 && a.row_kl != 0, "null tensor address");
  cudaStream_t stream = cuda::as_stream(stream_handle);
  FASTOPT_DTYPE_SWITCH(a.logits_dtype, [&] {
    using L = scalar_t;
    FASTOPT_DTYPE_SWITCH(a.bank_dtype, [&] { cuda::saf_launch<L, scalar_t>(a, stream); });
  });
}

}  // namespace fastopt
