// AdaHessian's Rademacher probes on the CPU (see probe.h): OpenMP over blocks of each tensor, the
// element loops branch-free so that they vectorize.
#include "probe.h"

#include <cmath>
#include <stdexcept>
#include <string>

#include "fastopt/api.h"
#include "fastopt/dispatch.h"
#include "fastopt/elementwise.h"

namespace fastopt {
namespace {

constexpr int64_t kProbeBlock = 1 << 16;

// -1.0f where the top bit of the element's hash is set, else +1.0f.
inline float probe_sign(uint32_t key, uint32_t j) {
  return 1.0f - 2.0f * static_cast<float>(fmix32(j * 0x9E3779B1u ^ key) >> 31);
}

void check_lists(const char* who, size_t n, std::initializer_list<size_t> sizes) {
  for (size_t s : sizes)
    if (s != n) throw std::invalid_argument(std::string(who) + ": lists of different lengths");
}

template <typename T>
void fill_one(T* o, int64_t n, uint32_t key, uint32_t off) {
#pragma omp parallel for schedule(static) if (n > kProbeBlock)
  for (int64_t b = 0; b < n; b += kProbeBlock) {
    const int64_t e = b + kProbeBlock < n ? b + kProbeBlock : n;
    for (int64_t i = b; i < e; ++i) o[i] = from_float<T>(probe_sign(key, off + static_cast<uint32_t>(i)));
  }
}

template <typename T, bool USE_Z, bool ACCUMULATE>
void consume_one(const T* h, float* a, int64_t n, uint32_t key, uint32_t off, float sc) {
#pragma omp parallel for schedule(static) if (n > kProbeBlock)
  for (int64_t b = 0; b < n; b += kProbeBlock) {
    const int64_t e = b + kProbeBlock < n ? b + kProbeBlock : n;
    for (int64_t i = b; i < e; ++i) {
      const float hv = to_float(h[i]);
      const float term = USE_Z ? (sc * hv) * probe_sign(key, off + static_cast<uint32_t>(i)) : sc * std::fabs(hv);
      a[i] = ACCUMULATE ? a[i] + term : term;
    }
  }
}

}  // namespace

void probe_fill_cpu(const std::vector<int64_t>& out, const std::vector<int64_t>& numels,
                    const std::vector<int64_t>& keys, const std::vector<int64_t>& offsets, int dtype) {
  check_lists("probe_fill_cpu", out.size(), {numels.size(), keys.size(), offsets.size()});
  FASTOPT_DTYPE_SWITCH(dtype, [&] {
    for (size_t t = 0; t < out.size(); ++t)
      fill_one(as_ptr<scalar_t>(out[t]), numels[t], static_cast<uint32_t>(keys[t]), static_cast<uint32_t>(offsets[t]));
  });
}

void probe_consume_cpu(const std::vector<int64_t>& hz, const std::vector<int64_t>& acc,
                       const std::vector<int64_t>& numels, const std::vector<int64_t>& keys,
                       const std::vector<int64_t>& offsets, int dtype, double scale, bool use_z, bool accumulate) {
  check_lists("probe_consume_cpu", hz.size(), {acc.size(), numels.size(), keys.size(), offsets.size()});
  const float sc = static_cast<float>(scale);
  FASTOPT_DTYPE_SWITCH(dtype, [&] {
    for (size_t t = 0; t < hz.size(); ++t) {
      const scalar_t* h = as_ptr<const scalar_t>(hz[t]);
      float* a = as_ptr<float>(acc[t]);
      const uint32_t key = static_cast<uint32_t>(keys[t]), off = static_cast<uint32_t>(offsets[t]);
      if (use_z && accumulate) consume_one<scalar_t, true, true>(h, a, numels[t], key, off, sc);
      else if (use_z) consume_one<scalar_t, true, false>(h, a, numels[t], key, off, sc);
      else if (accumulate) consume_one<scalar_t, false, true>(h, a, numels[t], key, off, sc);
      else consume_one<scalar_t, false, false>(h, a, numels[t], key, off, sc);
    }
  });
}

}  // namespace fastopt
