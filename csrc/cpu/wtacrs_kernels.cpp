// The WTA-CRS row pass on the CPU (wtacrs.h), compiled once per ISA (see isa.h).  Each row is read once:
// its sum of squares (fp64, column order) and, when the row is kept, its scaled copy into the compact
// output, in the same loop.  Rows are spread over OpenMP threads; a row is one thread's.
#include <omp.h>

#include <cmath>
#include <cstdint>

#include "kernel.h"
#include "wtacrs.h"

namespace fastopt::cpu::FASTOPT_CPU_NS {
namespace {

constexpr int64_t kParallelWork = 1 << 15;

template <typename T, bool kNorms>
void wtacrs_rows_typed(const WtacrsArgs& a) {
  const T* src = as_ptr<const T>(a.src);
  const int64_t* pos = a.pos != 0 ? as_ptr<const int64_t>(a.pos) : nullptr;
  const float* weight = a.weight != 0 ? as_ptr<const float>(a.weight) : nullptr;
  T* out = a.out != 0 ? as_ptr<T>(a.out) : nullptr;
  const float* gnorm = a.gnorm != 0 ? as_ptr<const float>(a.gnorm) : nullptr;
  float* norms = as_ptr<float>(a.norms);
  const int64_t C = a.cols;
#pragma omp parallel for schedule(static) if (a.rows * C >= kParallelWork)
  for (int64_t i = 0; i < a.rows; ++i) {
    const T* row = src + i * C;
    const int64_t j = pos != nullptr ? pos[i] : -1;
    const bool keep = out != nullptr && j >= 0 && j < a.k;
    if (!kNorms && !keep) continue;
    double acc = 0.0;
    if (keep) {
      const float w = weight != nullptr ? weight[j] : 1.0f;
      T* o = out + j * C;
      for (int64_t c = 0; c < C; ++c) {
        const float v = to_float(row[c]);
        if (kNorms) acc += static_cast<double>(v) * v;
        o[c] = from_float<T>(v * w);
      }
    } else {
#pragma omp simd reduction(+ : acc)
      for (int64_t c = 0; c < C; ++c) {
        const double v = to_float(row[c]);
        acc += v * v;
      }
    }
    if (kNorms) norms[i] = static_cast<float>(std::sqrt(acc)) * (gnorm != nullptr ? gnorm[i] : 1.0f);
  }
}

}  // namespace

void wtacrs_rows_run(const WtacrsArgs& a) {
  FASTOPT_DTYPE_SWITCH(a.dtype, [&] {
    if (a.norms != 0)
      wtacrs_rows_typed<scalar_t, true>(a);
    else
      wtacrs_rows_typed<scalar_t, false>(a);
  });
}

}  // namespace fastopt::cpu::FASTOPT_CPU_NS
