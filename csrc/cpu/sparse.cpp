// N:M and transposable 2:4 masks on the CPU (spec: fastopt/reference/sparse.py; math: fastopt/sparse.h).
#include <omp.h>

#include <cstdint>

#include "fastopt/api.h"
#include "fastopt/dispatch.h"
#include "fastopt/sparse.h"

namespace fastopt {
namespace {

using sparse::kMaxM;
using sparse::mag_key_bits;

// One group of M (compile-time) or m (runtime, M == 0) keys at stride `inner`.
template <int M, typename T>
inline void nm_group(const T* x, uint8_t* out, int64_t inner, int m, int n) {
  constexpr int kCap = M > 0 ? M : kMaxM;
  const int mm = M > 0 ? M : m;
  uint32_t k[kCap];
  for (int j = 0; j < mm; ++j) k[j] = mag_key_bits(to_float(x[j * inner]));
  for (int i = 0; i < mm; ++i) {
    int before = 0;
    for (int j = 0; j < mm; ++j) before += (k[j] > k[i]) | ((k[j] == k[i]) & (j < i));
    out[i * inner] = static_cast<uint8_t>(before < n);
  }
}

template <int M, typename T>
void nm_run(const NMMaskArgs& a) {
  const T* x = as_ptr<const T>(a.in);
  uint8_t* out = as_ptr<uint8_t>(a.out);
  const int64_t groups = a.len / a.m, inner = a.inner;
  const int m = static_cast<int>(a.m), n = static_cast<int>(a.n);
  const int64_t total = a.outer * groups;  // (outer, group) pairs, each covering m * inner elements
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < total; ++t) {
    const int64_t base = t * a.m * inner;  // (o * len + g * m) * inner
    for (int64_t i = 0; i < inner; ++i) nm_group<M>(x + base + i, out + base + i, inner, m, n);
  }
}

// inner == 1 and M known: groups are M consecutive elements; straight-line code per group that the
// compiler can unroll (and vectorize across groups).
template <int M, typename T>
void nm_run_rows(const NMMaskArgs& a) {
  const T* __restrict__ x = as_ptr<const T>(a.in);
  uint8_t* __restrict__ out = as_ptr<uint8_t>(a.out);
  const int64_t groups = a.outer * (a.len / M);
  const int n = static_cast<int>(a.n);
#pragma omp parallel for schedule(static)
  for (int64_t g = 0; g < groups; ++g) {
    uint32_t k[M];
#pragma GCC unroll 16
    for (int j = 0; j < M; ++j) k[j] = mag_key_bits(to_float(x[g * M + j]));
#pragma GCC unroll 16
    for (int i = 0; i < M; ++i) {
      int before = 0;
#pragma GCC unroll 16
      for (int j = 0; j < M; ++j) before += (k[j] > k[i]) | ((k[j] == k[i]) & (j < i));
      out[g * M + i] = static_cast<uint8_t>(before < n);
    }
  }
}

template <typename T>
void nm_dispatch(const NMMaskArgs& a) {
  if (a.inner == 1) {
    switch (a.m) {
      case 4: return nm_run_rows<4, T>(a);
      case 8: return nm_run_rows<8, T>(a);
      case 16: return nm_run_rows<16, T>(a);
      default: break;
    }
  }
  switch (a.m) {
    case 4: return nm_run<4, T>(a);
    case 8: return nm_run<8, T>(a);
    case 16: return nm_run<16, T>(a);
    default: return nm_run<0, T>(a);
  }
}

constexpr uint16_t kPatterns[sparse::kTilePatterns] = {FASTOPT_TILE_PATTERNS};

template <typename T>
void transposable_mask_run(const TransposableMaskArgs& a) {
  const T* x = as_ptr<const T>(a.in);
  uint8_t* out = as_ptr<uint8_t>(a.out);
  const int64_t trows = a.rows / 4, tcols = a.cols / 4, cols = a.cols;
  const bool exact = a.exact;
#pragma omp parallel for schedule(static)
  for (int64_t tr = 0; tr < trows; ++tr) {
    for (int64_t tc = 0; tc < tcols; ++tc) {
      const T* src = x + tr * 4 * cols + tc * 4;
      uint8_t* dst = out + tr * 4 * cols + tc * 4;
      uint32_t kb[16];
      for (int r = 0; r < 4; ++r)
        for (int c = 0; c < 4; ++c) kb[r * 4 + c] = mag_key_bits(to_float(src[r * cols + c]));
      uint16_t keep = 0;
      if (exact) {
        float ps[4][6];
        for (int r = 0; r < 4; ++r)
          for (int p = 0; p < 6; ++p)
            ps[r][p] = bits_float(kb[r * 4 + sparse::pair_a(p)]) + bits_float(kb[r * 4 + sparse::pair_b(p)]);
        float best = -1.0f;
        int best_i = 0;
        for (int i = 0; i < sparse::kTilePatterns; ++i) {
          const uint16_t q = kPatterns[i];
          float s = ps[0][q & 15] + ps[1][(q >> 4) & 15];
          s = s + ps[2][(q >> 8) & 15];
          s = s + ps[3][q >> 12];
          if (s > best) { best = s; best_i = i; }
        }
        const uint16_t q = kPatterns[best_i];
        for (int r = 0; r < 4; ++r) {
          const int p = (q >> (4 * r)) & 15;
          keep |= static_cast<uint16_t>((1u << (r * 4 + sparse::pair_a(p))) | (1u << (r * 4 + sparse::pair_b(p))));
        }
      } else {
        int order[16];
        for (int i = 0; i < 16; ++i) {
          int rank = 0;
          for (int j = 0; j < 16; ++j) rank += sparse::ranks_before(kb[j], j, kb[i], i);
          order[rank] = i;
        }
        int rc[4] = {0, 0, 0, 0}, cc[4] = {0, 0, 0, 0};
        for (int s = 0; s < 16; ++s) {
          const int e = order[s], r = e >> 2, c = e & 3;
          if (rc[r] < 2 && cc[c] < 2) { keep |= static_cast<uint16_t>(1u << e); ++rc[r]; ++cc[c]; }
        }
      }
      for (int r = 0; r < 4; ++r)
        for (int c = 0; c < 4; ++c) dst[r * cols + c] = static_cast<uint8_t>((keep >> (r * 4 + c)) & 1u);
    }
  }
}

}  // namespace

void nm_mask_cpu(const NMMaskArgs& a) {
  check_nm_mask(a);
  if (a.outer * a.len * a.inner == 0) return;
  FASTOPT_DTYPE_SWITCH(a.dtype, [&] { nm_dispatch<scalar_t>(a); });
}

void transposable_mask_cpu(const TransposableMaskArgs& a) {
  check_transposable_mask(a);
  if (a.rows * a.cols == 0) return;
  FASTOPT_DTYPE_SWITCH(a.dtype, [&] { transposable_mask_run<scalar_t>(a); });
}

}  // namespace fastopt
