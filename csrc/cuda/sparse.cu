// CUDA N:M and transposable 2:4 masks (spec: fastopt/reference/sparse.py; math: fastopt/sparse.h),
// mirroring csrc/cpu/sparse.cpp bit for bit.
//
// N:M.  The tensor is [outer, len, inner]; a group is m consecutive positions along len.
//  * inner == 1 and m in {4, 8, 16} (nm_rows_kernel): one thread per group.  The group is
//    m * sizeof(T) contiguous bytes, loaded as 16-byte (uint4) or, for 2:4 on 16-bit types, 8-byte
//    (uint2) vectors when the input is aligned; the m mask bytes go out as one 4/8/16-byte store.
//    Consecutive threads take consecutive groups, so every load and store of a warp is contiguous.
//  * otherwise (nm_strided_kernel): one thread per (outer, group, inner) triple, inner fastest, so the
//    warp's loads of group member j are contiguous when inner > 1; keys stay in registers for
//    m in {2, 4, 8, 16} (compile-time), in a local array of kMaxM otherwise.
//  Ranks are O(m^2) compares of the uint32 keys (sparse::ranks_before); n == 0 and n == m are memsets.
//
// Transposable 2:4 (transposable_mask_kernel).  One thread per 4x4 tile, consecutive threads along a row of
// tiles: each of the tile's 4 rows is one 16-byte (fp32) / 8-byte (16-bit) load and one 4-byte store
// when aligned, contiguous across the warp.
//  * exact: the 90-pattern loop is fully unrolled with the pattern table as compile-time constants, so
//    the per-row pair sums ps[r][p] are indexed with constants and stay in registers (a __constant__
//    table would give them runtime indices and put them in local memory); the kept sum is evaluated as
//    ((s0 + s1) + s2) + s3 with plain fp32 adds (no fast-math: the build must not pass
//    --use_fast_math / -ftz=true, which would flush subnormal keys), ties to the earliest pattern.
//  * greedy: each entry's rank among the 16 (ranks_before, one compare per pair) gives the visiting
//    order as 4-bit fields of a 64-bit word; row / column counts are 4-bit fields of two registers.
//
// Launches: 256 threads per block, at most 2^20 blocks (the kernels grid-stride past that); 32-bit
// indexing where the element count fits in an int, 64-bit otherwise.
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "fastopt/api.h"
#include "fastopt/dispatch.h"
#include "fastopt/multi_tensor.cuh"
#include "fastopt/sparse.h"

namespace fastopt {
namespace cuda {
namespace {

// Unroll hints for the __host__ __device__ helpers (the host compiler does not know the pragma).
#if defined(__CUDA_ARCH__)
#define FASTOPT_HD_UNROLL _Pragma("unroll")
#else
#define FASTOPT_HD_UNROLL
#endif

constexpr int kSparseThreads = 256;
constexpr int64_t kSparseMaxGrid = int64_t{1} << 20;


int grid_for(int64_t work) {
  const int64_t want = (work + kSparseThreads - 1) / kSparseThreads;
  return static_cast<int>(want < kSparseMaxGrid ? want : kSparseMaxGrid);
}

// ---- keys ----

template <typename T> FASTOPT_HOST_DEVICE uint32_t key_of(T v) { return sparse::mag_key_bits(to_float(v)); }

// The key of element j of a run of elements held as raw little-endian 32-bit words.
template <typename T> FASTOPT_HOST_DEVICE uint32_t word_key(const uint32_t* w, int j);
template <> FASTOPT_HOST_DEVICE uint32_t word_key<float>(const uint32_t* w, int j) {
  return sparse::mag_key_bits(bits_float(w[j]));
}
template <> FASTOPT_HOST_DEVICE uint32_t word_key<f16_t>(const uint32_t* w, int j) {
  f16_t h;
  h.x = static_cast<uint16_t>(w[j >> 1] >> (16 * (j & 1)));
  return key_of(h);
}
template <> FASTOPT_HOST_DEVICE uint32_t word_key<bf16_t>(const uint32_t* w, int j) {
  bf16_t h;
  h.x = static_cast<uint16_t>(w[j >> 1] >> (16 * (j & 1)));
  return key_of(h);
}

// Bytes of the vector that holds one whole group of M contiguous elements (at most 16 per access).
template <int M, typename T> struct GroupVec {
  static constexpr int kBytes = M * static_cast<int>(sizeof(T));
  static constexpr int kInAlign = kBytes < 16 ? kBytes : 16;  // input alignment the vector loads need
  static constexpr int kOutAlign = M < 16 ? M : 16;           // mask alignment the vector store needs
};

// Loads M contiguous elements at p (aligned to GroupVec<M, T>::kInAlign) as vectors and returns their keys.
template <int M, typename T>
__device__ __forceinline__ void load_keys_vec(const T* p, uint32_t (&k)[M]) {
  constexpr int kBytes = GroupVec<M, T>::kBytes;
  static_assert(kBytes == 8 || kBytes % 16 == 0, "unsupported group size");
  uint32_t w[kBytes / 4];
  if constexpr (kBytes == 8) {
    const uint2 u = __ldg(reinterpret_cast<const uint2*>(p));
    w[0] = u.x;
    w[1] = u.y;
  } else {
#pragma unroll
    for (int v = 0; v < kBytes / 16; ++v) {
      const uint4 u = __ldg(reinterpret_cast<const uint4*>(p) + v);
      w[4 * v] = u.x;
      w[4 * v + 1] = u.y;
      w[4 * v + 2] = u.z;
      w[4 * v + 3] = u.w;
    }
  }
#pragma unroll
  for (int j = 0; j < M; ++j) k[j] = word_key<T>(w, j);
}

// Keep bits (bit i: member i kept) of one group of M keys: fewer than n members rank before it.
template <int M>
FASTOPT_HOST_DEVICE uint32_t nm_keep_bits(const uint32_t (&k)[M], int n) {
  int before[M];
  FASTOPT_HD_UNROLL
  for (int i = 0; i < M; ++i) before[i] = 0;
  FASTOPT_HD_UNROLL
  for (int i = 0; i < M; ++i) {
    FASTOPT_HD_UNROLL
    for (int j = i + 1; j < M; ++j) {
      const int b = sparse::ranks_before(k[i], i, k[j], j) ? 1 : 0;  // i before j, else j before i
      before[j] += b;
      before[i] += 1 - b;
    }
  }
  uint32_t keep = 0;
  FASTOPT_HD_UNROLL
  for (int i = 0; i < M; ++i) keep |= static_cast<uint32_t>(before[i] < n) << i;
  return keep;
}

// Bytes 0/1 of 4 keep bits, byte c = bit c.
FASTOPT_HOST_DEVICE uint32_t spread4(uint32_t b) {
  return (b & 1u) | ((b & 2u) << 7) | ((b & 4u) << 14) | ((b & 8u) << 21);
}

// inner == 1, m == M: one thread per group.
template <int M, typename T, bool kVec>
__global__ void __launch_bounds__(kSparseThreads)
nm_rows_kernel(const T* __restrict__ x, uint8_t* __restrict__ out, int64_t groups, int n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kSparseThreads;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * kSparseThreads + threadIdx.x; g < groups; g += stride) {
    uint32_t k[M];
    if constexpr (kVec) {
      load_keys_vec<M, T>(x + g * M, k);
    } else {
#pragma unroll
      for (int j = 0; j < M; ++j) k[j] = key_of(x[g * M + j]);
    }
    const uint32_t keep = nm_keep_bits<M>(k, n);
    uint8_t* o = out + g * M;
    if constexpr (kVec) {
      uint32_t w[M / 4];
#pragma unroll
      for (int v = 0; v < M / 4; ++v) w[v] = spread4((keep >> (4 * v)) & 15u);
      if constexpr (M == 4) {
        *reinterpret_cast<uint32_t*>(o) = w[0];
      } else if constexpr (M == 8) {
        *reinterpret_cast<uint2*>(o) = make_uint2(w[0], w[1]);
      } else {
        static_assert(M == 16, "vector stores cover m = 4, 8, 16");
        *reinterpret_cast<uint4*>(o) = make_uint4(w[0], w[1], w[2], w[3]);
      }
    } else {
#pragma unroll
      for (int i = 0; i < M; ++i) o[i] = static_cast<uint8_t>((keep >> i) & 1u);
    }
  }
}

// Any inner and m: one thread per (outer, group, inner) triple, t = (o * groups + g) * inner + i.
// M > 0: m == M known at compile time; M == 0: runtime m <= kMaxM.
template <int M, typename T, typename Index>
__global__ void __launch_bounds__(kSparseThreads)
nm_strided_kernel(const T* __restrict__ x, uint8_t* __restrict__ out, Index total, Index inner, int m, int n) {
  const Index stride = static_cast<Index>(gridDim.x) * kSparseThreads;
  for (Index t = static_cast<Index>(blockIdx.x) * kSparseThreads + threadIdx.x; t < total; t += stride) {
    const Index og = t / inner;
    const Index i = t - og * inner;
    if constexpr (M > 0) {
      const Index base = og * static_cast<Index>(M) * inner + i;
      uint32_t k[M];
#pragma unroll
      for (int j = 0; j < M; ++j) k[j] = key_of(x[base + static_cast<Index>(j) * inner]);
      const uint32_t keep = nm_keep_bits<M>(k, n);
#pragma unroll
      for (int j = 0; j < M; ++j) out[base + static_cast<Index>(j) * inner] = static_cast<uint8_t>((keep >> j) & 1u);
    } else {
      const Index base = og * static_cast<Index>(m) * inner + i;
      uint32_t k[sparse::kMaxM];
      for (int j = 0; j < m; ++j) k[j] = key_of(x[base + static_cast<Index>(j) * inner]);
      for (int a = 0; a < m; ++a) {
        int before = 0;
        for (int j = 0; j < m; ++j) before += sparse::ranks_before(k[j], j, k[a], a) ? 1 : 0;
        out[base + static_cast<Index>(a) * inner] = static_cast<uint8_t>(before < n);
      }
    }
  }
}

template <int M, typename T>
void launch_nm_rows(const T* x, uint8_t* out, int64_t groups, int n, bool vec, cudaStream_t stream) {
  const int grid = grid_for(groups);
  if (vec) {
    FASTOPT_LAUNCH(grid, kSparseThreads, 0, stream, nm_rows_kernel<M, T, true>)(x, out, groups, n);
  } else {
    FASTOPT_LAUNCH(grid, kSparseThreads, 0, stream, nm_rows_kernel<M, T, false>)(x, out, groups, n);
  }
  check_cuda(cudaGetLastError(), "nm_rows_kernel launch");
}

template <int M, typename T>
void launch_nm_strided(const T* x, uint8_t* out, int64_t numel, int64_t inner, int m, int n, cudaStream_t stream) {
  const int64_t total = numel / m;  // (outer, group, inner) triples
  const int grid = grid_for(total);
  if (numel <= INT_MAX) {  // every address offset and t + stride fit in uint32
    FASTOPT_LAUNCH(grid, kSparseThreads, 0, stream, nm_strided_kernel<M, T, uint32_t>)(
        x, out, static_cast<uint32_t>(total), static_cast<uint32_t>(inner), m, n);
  } else {
    FASTOPT_LAUNCH(grid, kSparseThreads, 0, stream, nm_strided_kernel<M, T, int64_t>)(x, out, total, inner, m, n);
  }
  check_cuda(cudaGetLastError(), "nm_strided_kernel launch");
}

template <int M, typename T>
bool rows_aligned(int64_t in, int64_t out) {
  return in % GroupVec<M, T>::kInAlign == 0 && out % GroupVec<M, T>::kOutAlign == 0;
}

template <typename T>
void nm_launch(const NMMaskArgs& a, int64_t numel, cudaStream_t stream) {
  const T* x = as_ptr<const T>(a.in);
  uint8_t* out = as_ptr<uint8_t>(a.out);
  const int m = static_cast<int>(a.m), n = static_cast<int>(a.n);
  if (a.inner == 1) {
    const int64_t groups = numel / m;
    switch (m) {
      case 4: return launch_nm_rows<4, T>(x, out, groups, n, rows_aligned<4, T>(a.in, a.out), stream);
      case 8: return launch_nm_rows<8, T>(x, out, groups, n, rows_aligned<8, T>(a.in, a.out), stream);
      case 16: return launch_nm_rows<16, T>(x, out, groups, n, rows_aligned<16, T>(a.in, a.out), stream);
      default: break;
    }
  }
  switch (m) {
    case 2: return launch_nm_strided<2, T>(x, out, numel, a.inner, m, n, stream);
    case 4: return launch_nm_strided<4, T>(x, out, numel, a.inner, m, n, stream);
    case 8: return launch_nm_strided<8, T>(x, out, numel, a.inner, m, n, stream);
    case 16: return launch_nm_strided<16, T>(x, out, numel, a.inner, m, n, stream);
    default: return launch_nm_strided<0, T>(x, out, numel, a.inner, m, n, stream);
  }
}

// ---- transposable 2:4 ----

// Keep bits (bit 4 * row + col) of the row pairs q = q0 | q1 << 4 | q2 << 8 | q3 << 12.
FASTOPT_HOST_DEVICE uint32_t pattern_bits(uint32_t q) {
  uint32_t bits = 0;
  FASTOPT_HD_UNROLL
  for (int r = 0; r < 4; ++r) {
    const int p = static_cast<int>((q >> (4 * r)) & 15u);
    bits |= (1u << (4 * r + sparse::pair_a(p))) | (1u << (4 * r + sparse::pair_b(p)));
  }
  return bits;
}

// Exact: the first of the 90 patterns with the largest ((s0 + s1) + s2) + s3.
FASTOPT_HOST_DEVICE uint32_t tile_exact(const uint32_t (&kb)[16]) {
  constexpr uint16_t kPatterns[sparse::kTilePatterns] = {FASTOPT_TILE_PATTERNS};
  float ps[4][6];
  FASTOPT_HD_UNROLL
  for (int r = 0; r < 4; ++r) {
    FASTOPT_HD_UNROLL
    for (int p = 0; p < 6; ++p) {
      ps[r][p] = bits_float(kb[4 * r + sparse::pair_a(p)]) + bits_float(kb[4 * r + sparse::pair_b(p)]);
    }
  }
  // Keys are >= 0 and sums of them never NaN: pattern 0 always beats -1.
  float best = -1.0f;
  uint32_t best_bits = 0;
  FASTOPT_HD_UNROLL
  for (int i = 0; i < sparse::kTilePatterns; ++i) {
    const uint32_t q = kPatterns[i];
    float s = ps[0][q & 15u] + ps[1][(q >> 4) & 15u];
    s = s + ps[2][(q >> 8) & 15u];
    s = s + ps[3][q >> 12];
    if (s > best) {
      best = s;
      best_bits = pattern_bits(q);
    }
  }
  return best_bits;
}

// Greedy: visit by descending key (ties: lowest index), keep while row and column hold fewer than 2.
FASTOPT_HOST_DEVICE uint32_t tile_greedy(const uint32_t (&kb)[16]) {
  int rank[16];
  FASTOPT_HD_UNROLL
  for (int i = 0; i < 16; ++i) rank[i] = 0;
  FASTOPT_HD_UNROLL
  for (int i = 0; i < 16; ++i) {
    FASTOPT_HD_UNROLL
    for (int j = i + 1; j < 16; ++j) {
      const int b = sparse::ranks_before(kb[i], i, kb[j], j) ? 1 : 0;
      rank[j] += b;
      rank[i] += 1 - b;
    }
  }
  uint64_t order = 0;  // 4-bit field s: the entry visited s-th (the ranks are a permutation of 0..15)
  FASTOPT_HD_UNROLL
  for (int i = 0; i < 16; ++i) order |= static_cast<uint64_t>(i) << (4 * rank[i]);
  uint32_t keep = 0, rc = 0, cc = 0;  // rc, cc: 4-bit count fields per row / column
  FASTOPT_HD_UNROLL
  for (int s = 0; s < 16; ++s) {
    const int e = static_cast<int>((order >> (4 * s)) & 15u);
    const int rs = 4 * (e >> 2), cs = 4 * (e & 3);
    if (((rc >> rs) & 15u) < 2u && ((cc >> cs) & 15u) < 2u) {
      keep |= 1u << e;
      rc += 1u << rs;
      cc += 1u << cs;
    }
  }
  return keep;
}

// One thread per tile, t = tile_row * tcols + tile_col.
template <typename T, bool kVec, bool kExact, typename Index>
__global__ void __launch_bounds__(kSparseThreads)
transposable_mask_kernel(const T* __restrict__ x, uint8_t* __restrict__ out, Index tiles, Index tcols, Index cols) {
  const Index stride = static_cast<Index>(gridDim.x) * kSparseThreads;
  for (Index t = static_cast<Index>(blockIdx.x) * kSparseThreads + threadIdx.x; t < tiles; t += stride) {
    const Index tr = t / tcols;
    const Index tc = t - tr * tcols;
    const Index off = tr * 4 * cols + tc * 4;
    uint32_t kb[16];
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const T* src = x + off + static_cast<Index>(r) * cols;
      if constexpr (kVec) {
        uint32_t w[sizeof(T)];  // 4 elements = sizeof(T) words
        if constexpr (sizeof(T) == 4) {
          const uint4 u = __ldg(reinterpret_cast<const uint4*>(src));
          w[0] = u.x;
          w[1] = u.y;
          w[2] = u.z;
          w[3] = u.w;
        } else {
          const uint2 u = __ldg(reinterpret_cast<const uint2*>(src));
          w[0] = u.x;
          w[1] = u.y;
        }
#pragma unroll
        for (int c = 0; c < 4; ++c) kb[4 * r + c] = word_key<T>(w, c);
      } else {
#pragma unroll
        for (int c = 0; c < 4; ++c) kb[4 * r + c] = key_of(src[c]);
      }
    }
    const uint32_t keep = kExact ? tile_exact(kb) : tile_greedy(kb);
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      uint8_t* dst = out + off + static_cast<Index>(r) * cols;
      const uint32_t row = (keep >> (4 * r)) & 15u;
      if constexpr (kVec) {
        *reinterpret_cast<uint32_t*>(dst) = spread4(row);
      } else {
#pragma unroll
        for (int c = 0; c < 4; ++c) dst[c] = static_cast<uint8_t>((row >> c) & 1u);
      }
    }
  }
}

template <typename T, bool kVec, bool kExact>
void launch_transposable_mask_as(const T* x, uint8_t* out, int64_t rows, int64_t cols, cudaStream_t stream) {
  const int64_t tiles = (rows / 4) * (cols / 4);
  const int grid = grid_for(tiles);
  if (rows * cols <= INT_MAX) {
    FASTOPT_LAUNCH(grid, kSparseThreads, 0, stream, transposable_mask_kernel<T, kVec, kExact, uint32_t>)(
        x, out, static_cast<uint32_t>(tiles), static_cast<uint32_t>(cols / 4), static_cast<uint32_t>(cols));
  } else {
    FASTOPT_LAUNCH(grid, kSparseThreads, 0, stream, transposable_mask_kernel<T, kVec, kExact, int64_t>)(x, out, tiles, cols / 4, cols);
  }
  check_cuda(cudaGetLastError(), "transposable_mask_kernel launch");
}

template <typename T>
void transposable_mask_launch(const TransposableMaskArgs& a, cudaStream_t stream) {
  const T* x = as_ptr<const T>(a.in);
  uint8_t* out = as_ptr<uint8_t>(a.out);
  // cols % 4 == 0: every tile row starts as aligned as the matrix.
  const bool vec = a.in % (4 * static_cast<int64_t>(sizeof(T))) == 0 && a.out % 4 == 0;
  if (vec) {
    if (a.exact) return launch_transposable_mask_as<T, true, true>(x, out, a.rows, a.cols, stream);
    return launch_transposable_mask_as<T, true, false>(x, out, a.rows, a.cols, stream);
  }
  if (a.exact) return launch_transposable_mask_as<T, false, true>(x, out, a.rows, a.cols, stream);
  return launch_transposable_mask_as<T, false, false>(x, out, a.rows, a.cols, stream);
}

#undef FASTOPT_HD_UNROLL

}  // namespace
}  // namespace cuda

void nm_mask_cuda(const NMMaskArgs& a, int64_t stream_handle) {
  check_nm_mask(a);
  const int64_t numel = a.outer * a.len * a.inner;
  if (numel == 0) return;
  cudaStream_t stream = cuda::as_stream(stream_handle);
  if (a.n == 0 || a.n == a.m) {  // nothing / everything kept
    cuda::check_cuda(cudaMemsetAsync(as_ptr<void>(a.out), a.n == 0 ? 0 : 1, static_cast<size_t>(numel), stream),
                     "nm_mask memset");
    return;
  }
  FASTOPT_DTYPE_SWITCH(a.dtype, [&] { cuda::nm_launch<scalar_t>(a, numel, stream); });
}

void transposable_mask_cuda(const TransposableMaskArgs& a, int64_t stream_handle) {
  check_transposable_mask(a);
  if (a.rows * a.cols == 0) return;
  cudaStream_t stream = cuda::as_stream(stream_handle);
  FASTOPT_DTYPE_SWITCH(a.dtype, [&] { cuda::transposable_mask_launch<scalar_t>(a, stream); });
}

}  // namespace fastopt
