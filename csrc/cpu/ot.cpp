// CPU entry point of the entropic-OT passes (fastopt/api.h OtArgs): validates, lays y out transposed
// in fp32 ([B, d, m], so the kernels' loops over j vectorize), runs the ISA-specific kernel (the AVX-512
// copy of ot_kernels.cpp where isa.h use_avx512_ot says so).
// Mode 2 is the weighted soft-minimum (h: weights (B, m), c: a potential (B, m) in cost units; see
// ot_kernels.cpp), the pass fastopt.ot.sinkhorn runs.
#include <cstdint>
#include <vector>

#include "fastopt/api.h"
#include "fastopt/dispatch.h"
#include "isa.h"

namespace fastopt {
FASTOPT_CPU_KERNEL_DECL(void ot_run(const OtArgs& a, const float* yT))
#if defined(FASTOPT_HAVE_AVX512_OT_KERNELS)
namespace cpu::avx512 {
void ot_run(const OtArgs& a, const float* yT);
}
#endif

void ot_pass_cpu(const OtArgs& a) {
  check_ot(a);
  if (a.batch * a.n == 0) return;
  std::vector<float> yT;
  if (a.cost_matrix == 0) {
    yT.resize(static_cast<size_t>(a.batch * a.d * a.m));
    FASTOPT_DTYPE_SWITCH(a.dtype, [&] {
      const scalar_t* y = as_ptr<const scalar_t>(a.y);
      for (int64_t b = 0; b < a.batch; ++b)
        for (int64_t j = 0; j < a.m; ++j)
          for (int64_t k = 0; k < a.d; ++k)
            yT[(b * a.d + k) * a.m + j] = to_float(y[(b * a.m + j) * a.d + k]);
    });
  }
#if defined(FASTOPT_HAVE_AVX512_OT_KERNELS)
  if (cpu::use_avx512_ot()) return cpu::avx512::ot_run(a, yT.data());
#endif
  FASTOPT_CPU_KERNEL_CALL(ot_run, a, yT.data());
}

}  // namespace fastopt
