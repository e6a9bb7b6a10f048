// fastopt/multi_tensor_cpu.h -- the generic CPU multi-tensor launcher.
//
// The elements of all tensors of a list, laid end to end, are split into one contiguous range per
// OpenMP thread (balanced by element count, boundaries on 64-element multiples inside a tensor, so
// threads never share a cache line); each thread walks its range in pieces of at most kChunk
// elements and calls `fn(tensor_index, start, length)`, whose inner loop is plain and vectorizable.
// Small workloads stay on the calling thread.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace fastopt {
namespace cpu {

constexpr int64_t kChunk = 65536;
constexpr int64_t kParallelThreshold = 32768;  // total elements below which one thread does it all
constexpr int64_t kSplitAlign = 64;             // elements; a multiple of every cache line size

template <typename Fn>
void multi_tensor_apply(const int64_t* numels, int64_t n, Fn&& fn) {
  std::vector<int64_t> offsets(n + 1, 0);
  for (int64_t t = 0; t < n; ++t) offsets[t + 1] = offsets[t] + numels[t];
  const int64_t total = offsets[n];
  if (total == 0) return;
  const int nthreads = total >= kParallelThreshold ? omp_get_max_threads() : 1;

  // Where thread k's range starts: (tensor, offset inside it).  Thread k ends where k + 1 starts.
  auto boundary = [&](int k, int64_t* tensor, int64_t* offset) {
    if (k >= nthreads) { *tensor = n; *offset = 0; return; }
    const int64_t pos = total / nthreads * k + (total % nthreads) * k / nthreads;
    const int64_t t = std::upper_bound(offsets.begin(), offsets.end(), pos) - offsets.begin() - 1;
    *tensor = t;
    *offset = (pos - offsets[t]) / kSplitAlign * kSplitAlign;
  };

#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
  {
    const int k = omp_get_thread_num();
    int64_t t0, o0, t1, o1;
    boundary(k, &t0, &o0);
    boundary(k + 1, &t1, &o1);
    for (int64_t t = t0; t <= t1 && t < n; ++t) {
      const int64_t begin = t == t0 ? o0 : 0;
      const int64_t end = t == t1 ? o1 : numels[t];
      for (int64_t s = begin; s < end; s += kChunk) fn(t, s, std::min(kChunk, end - s));
    }
  }
}

}  // namespace cpu
}  // namespace fastopt
