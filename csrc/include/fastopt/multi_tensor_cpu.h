// fastopt/multi_tensor_cpu.h -- the generic CPU multi-tensor launchers.
//
// multi_tensor_apply: the elements of all tensors of a list, laid end to end, are split into one
// contiguous range per thread of the OpenMP team (balanced by element count, boundaries on 64-element
// multiples inside a tensor, so threads never share a cache line); each thread walks its range in
// pieces of at most kChunk elements and calls `fn(tensor_index, start, length)`, whose inner loop is
// plain and vectorizable.  Small workloads stay on the calling thread.  The split is made inside the
// parallel region from the team the runtime actually gave (omp_get_num_threads()), never from the
// team asked for: with OMP_DYNAMIC=true, nested regions or a thread limit the team may be smaller,
// and every element must still be visited exactly once.  For elementwise work the result does not
// depend on the split.
//
// multi_tensor_apply_units: for reductions.  The work is cut into fixed units (unit c of tensor t:
// elements [c * unit, min((c + 1) * unit, numel)), numbered tensor by tensor) that do not depend on
// the team; `fn(unit_index, tensor_index, start, length)` is called once per unit.  A reduction that
// keeps one partial result per unit and combines the partials in unit order afterwards gives the same
// bits whatever the number of threads and however they are scheduled.
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

// Position of part k of `parts` balanced parts of [0, total): total * k / parts without overflow.
inline int64_t split_point(int64_t total, int k, int parts) {
  return total / parts * k + (total % parts) * k / parts;
}

// `weight`: elements per item of `numels` (the low-bit kernels count quantization blocks), so that
// the one-thread threshold is in elements whatever the items are.
template <typename Fn>
void multi_tensor_apply(const int64_t* numels, int64_t n, Fn&& fn, int64_t weight = 1) {
  std::vector<int64_t> offsets(n + 1, 0);
  for (int64_t t = 0; t < n; ++t) offsets[t + 1] = offsets[t] + numels[t];
  const int64_t total = offsets[n];
  if (total == 0) return;
  const bool parallel = total >= (kParallelThreshold + weight - 1) / weight && omp_get_max_threads() > 1;

#pragma omp parallel if (parallel)
  {
    // The real team: with OMP_DYNAMIC it may be smaller than omp_get_max_threads().
    const int parts = omp_get_num_threads();
    const int k = omp_get_thread_num();
    // Where part k starts: (tensor, offset inside it).  Part k ends where part k + 1 starts.
    auto boundary = [&](int part, int64_t* tensor, int64_t* offset) {
      if (part >= parts) { *tensor = n; *offset = 0; return; }
      const int64_t pos = split_point(total, part, parts);
      const int64_t t = std::upper_bound(offsets.begin(), offsets.end(), pos) - offsets.begin() - 1;
      *tensor = t;
      *offset = (pos - offsets[t]) / kSplitAlign * kSplitAlign;
    };
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

// The fixed units of a tensor list (see the top of this file).
struct UnitPlan {
  int64_t unit = 1;
  std::vector<int64_t> first;   // n + 1 entries: the first unit of each tensor; first[n] = the unit count
  std::vector<int64_t> tensor;  // per unit: its tensor
  std::vector<int64_t> pos;     // per unit: where it starts among all elements laid end to end
  int64_t total = 0;            // elements in all
};

inline UnitPlan plan_units(const int64_t* numels, int64_t n, int64_t unit) {
  UnitPlan p;
  p.unit = unit;
  p.first.assign(n + 1, 0);
  for (int64_t t = 0; t < n; ++t) p.first[t + 1] = p.first[t] + (numels[t] + unit - 1) / unit;
  p.tensor.resize(p.first[n]);
  p.pos.resize(p.first[n]);
  int64_t at = 0;
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t u = p.first[t]; u < p.first[t + 1]; ++u) {
      p.tensor[u] = t;
      p.pos[u] = at + (u - p.first[t]) * unit;
    }
    at += numels[t];
  }
  p.total = at;
  return p;
}

// Calls fn(u, t, start, length) once per unit u of `p`.  Each thread of the real team takes a
// contiguous run of units, balanced by element count (which thread runs a unit never changes what
// the unit computes).
template <typename Fn>
void multi_tensor_apply_units(const UnitPlan& p, const int64_t* numels, Fn&& fn) {
  const int64_t units = static_cast<int64_t>(p.tensor.size());
  if (units == 0) return;
  const bool parallel = p.total >= kParallelThreshold && units > 1 && omp_get_max_threads() > 1;
#pragma omp parallel if (parallel)
  {
    const int parts = omp_get_num_threads();
    const int k = omp_get_thread_num();
    // Part k: the units that start in [split_point(k), split_point(k + 1)).
    auto first_unit = [&](int part) -> int64_t {
      if (part >= parts) return units;
      return std::lower_bound(p.pos.begin(), p.pos.end(), split_point(p.total, part, parts)) - p.pos.begin();
    };
    const int64_t u1 = first_unit(k + 1);
    for (int64_t u = first_unit(k); u < u1; ++u) {
      const int64_t t = p.tensor[u];
      const int64_t s = (u - p.first[t]) * p.unit;
      fn(u, t, s, std::min(p.unit, numels[t] - s));
    }
  }
}

}  // namespace cpu
}  // namespace fastopt
