// The fused SAF pass on the CPU (saf.h), compiled once per ISA (see isa.h).  Rows are spread over
// OpenMP threads; each row is converted to fp32 once into the thread's scratch (current z and past y,
// scaled by 1/T), then: the two maxima; one pass of exp (exp_nonpositive, which vectorizes) giving
//   S_z = sum exp(z - M_z),  S_y = sum exp(y - M_y),  A = sum exp(y - M_y) ((y - M_y) - (z - M_z)),
//   KL(p || q) = A / S_y - log S_y + log S_z
// (every term relative to its row maximum: no cancellation of the raw logits), the exponentials kept
// in the scratch for the gradient grad_scale (q - p); the current row is written to the bank as it is
// read.  Each row is one thread's: the result does not depend on the team size.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "fastopt/elementwise.h"
#include "kernel.h"
#include "saf.h"

namespace fastopt::cpu::FASTOPT_CPU_NS {
namespace {

constexpr int64_t kParallelWork = 1 << 15;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

template <typename L, typename K>
void saf_rows(const SafArgs& a, const uint8_t* writes) {
  const L* logits = as_ptr<const L>(a.logits);
  const int64_t* idx = as_ptr<const int64_t>(a.indices);
  K* bank = as_ptr<K>(a.bank);
  float* row_kl = as_ptr<float>(a.row_kl);
  float* grad = a.grad != 0 ? as_ptr<float>(a.grad) : nullptr;
  const int64_t C = a.classes;
  const float inv_t = static_cast<float>(a.inv_temp);
  const float gs = static_cast<float>(a.grad_scale);
  K* bank_w = bank + a.write_slot * a.n * C;
  const K* bank_r = bank + a.read_slot * a.n * C;
#pragma omp parallel if (a.rows * C >= kParallelWork)
  {
    std::vector<float> scratch(a.active ? static_cast<size_t>(2 * C) : 0);
    float* z = scratch.data();
    float* y = z + C;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < a.rows; ++i) {
      const int64_t r = idx[i];
      if (r < 0 || r >= a.n) continue;  // (checked by the caller and the entry point)
      const L* zi = logits + i * C;
      if (writes[i]) {
        K* w = bank_w + r * C;
        for (int64_t j = 0; j < C; ++j) w[j] = from_float<K>(to_float(zi[j]));
      }
      if (!a.active) continue;
      const K* yi = bank_r + r * C;
      float mz = kNegInf, my = kNegInf;
#pragma omp simd reduction(max : mz, my)
      for (int64_t j = 0; j < C; ++j) {
        const float zj = to_float(zi[j]) * inv_t, yj = to_float(yi[j]) * inv_t;
        z[j] = zj;
        y[j] = yj;
        mz = std::max(mz, zj);
        my = std::max(my, yj);
      }
      float sz = 0.0f, sy = 0.0f, acc = 0.0f;
#pragma omp simd reduction(+ : sz, sy, acc)
      for (int64_t j = 0; j < C; ++j) {
        const float dz = z[j] - mz, dy = y[j] - my;
        const float ez = exp_nonpositive(dz), ey = exp_nonpositive(dy);
        sz += ez;
        sy += ey;
        acc += ey * (dy - dz);
        z[j] = ez;
        y[j] = ey;
      }
      row_kl[i] = acc / sy - std::log(sy) + std::log(sz);
      if (grad != nullptr) {
        const float cz = gs / sz, cy = gs / sy;
        float* gi = grad + i * C;
#pragma omp simd
        for (int64_t j = 0; j < C; ++j) gi[j] = z[j] * cz - y[j] * cy;
      }
    }
  }
}

}  // namespace

void saf_run(const SafArgs& a, const uint8_t* writes) {
  FASTOPT_DTYPE_SWITCH(a.logits_dtype, [&] {
    using L = scalar_t;
    FASTOPT_DTYPE_SWITCH(a.bank_dtype, [&] { saf_rows<L, scalar_t>(a, writes); });
  });
}

}  // namespace fastopt::cpu::FASTOPT_CPU_NS
