// CPU entry points of the low-bit-state step and of the blockwise codec: validate, read the device
// scalars, run the ISA-specific kernels (lowbit_kernels.cpp), increment the steps.
#include <cstdint>
#include <string>
#include <vector>

#include "fastopt/api.h"
#include "fastopt/elementwise.h"
#include "fastopt/quant.h"
#include "isa.h"
#include "step.h"

namespace fastopt {
namespace cpu {
#define FASTOPT_LOWBIT_DECLS                                                                                  \
  bool lowbit_run(const LowbitArgs& la, const ElementwiseArgs& a, double lr, float grad_mul, const double* steps); \
  void codec_run(float* x, uint8_t* codes, float* absmax, int64_t numel, int64_t block, const int32_t* book,  \
                 bool dequantize);
namespace baseline { FASTOPT_LOWBIT_DECLS }
namespace avx2 { FASTOPT_LOWBIT_DECLS }
#undef FASTOPT_LOWBIT_DECLS
}  // namespace cpu

void check_lowbit(const LowbitArgs& la, int states) {
  const ElementwiseArgs& a = la.base;
  check_elementwise(a, states);
  int op_states = 0, op_reduce = 0;
  op_shape(a.op, &op_states, &op_reduce);
  check_arg(op_reduce == 0, "op '" + a.op + "' has a reduce phase; low-bit states are for single-pass ops");
  check_arg(a.phase == 0, "low-bit states support the update phase only");
  check_arg(a.rows.empty() && a.row_coef_ptr == 0, "low-bit states take no row coefficients");
  check_arg(la.block >= 2 && la.block <= kMaxQuantBlock && la.block % 2 == 0,
            "block must be even and at most " + std::to_string(kMaxQuantBlock));
  check_arg(static_cast<int64_t>(la.books.size()) == states, "one codebook address (or 0) per state");
  check_arg(static_cast<int64_t>(la.absmax.size()) == states * a.lists.n, "one absmax address per state and tensor");
  for (int k = 0; k < states; ++k) {
    for (int64_t t = 0; t < a.lists.n; ++t) {
      const bool has = la.absmax[k * a.lists.n + t] != 0;
      check_arg(la.books[k] == 0 ? !has : (has || a.lists.numels[t] == 0),
                "a quantized state needs an absmax per tensor, a plain one none");
    }
  }
  for (int64_t t = 0; t < a.lists.n; ++t) {
    check_arg(a.lists.numels[t] % la.block == 0, "every tensor's numel must be a multiple of the block");
  }
  check_arg(la.colmax.empty() || static_cast<int64_t>(la.colmax.size()) == states * a.lists.n,
            "colmax: one address (or 0) per state and tensor");
  bool any = false;
  for (int64_t c : la.colmax) any = any || c != 0;
  if (any) {
    check_arg(static_cast<int64_t>(la.rank1_rows.size()) == a.lists.n, "rank1_rows: one row count per tensor");
    for (int k = 0; k < states; ++k) {
      for (int64_t t = 0; t < a.lists.n; ++t) {
        if (la.colmax[k * a.lists.n + t] == 0) continue;
        const int64_t rows = la.rank1_rows[t];
        check_arg(la.books[k] != 0 && rows >= 1 && a.lists.numels[t] % rows == 0,
                  "a rank-1 state is quantized and its row count divides the tensor's numel");
      }
    }
  }
}

void lowbit_cpu(const LowbitArgs& la) {
  int states = 0, reduce = 0;
  check_arg(op_shape(la.base.op, &states, &reduce), "unknown elementwise op '" + la.base.op + "'");
  check_lowbit(la, states);
  for (int64_t book : la.books) {
    if (book) check_arg(codebook_view(as_ptr<const int32_t>(book)).nc == 256 ||
                        codebook_view(as_ptr<const int32_t>(book)).nc == 16,
                        "a codebook has 256 or 16 codes");
  }
  CpuStep st = prepare_cpu_step(la.base);
  if (st.skip) return;
#if defined(FASTOPT_HAVE_AVX2_KERNELS)
  if (cpu::use_avx2()) {
    cpu::avx2::lowbit_run(la, st.padded, st.lr, st.grad_mul, st.next.data());
  } else {
    cpu::baseline::lowbit_run(la, st.padded, st.lr, st.grad_mul, st.next.data());
  }
#else
  cpu::baseline::lowbit_run(la, st.padded, st.lr, st.grad_mul, st.next.data());
#endif
  for (float* s : st.steps) *s += 1.0f;
}

void quantize_cpu(int64_t x, int64_t codes, int64_t absmax, int64_t numel, int64_t block, int64_t book, bool dequantize) {
  check_arg(x != 0 && codes != 0 && absmax != 0 && book != 0, "null address");
  check_arg(block >= 2 && block % 2 == 0 && block <= kMaxQuantBlock && numel % block == 0,
            "numel must be a multiple of an even block of at most " + std::to_string(kMaxQuantBlock));
  auto* xp = as_ptr<float>(x);
  auto* cp = as_ptr<uint8_t>(codes);
  auto* ap = as_ptr<float>(absmax);
  const auto* bp = as_ptr<const int32_t>(book);
#if defined(FASTOPT_HAVE_AVX2_KERNELS)
  if (cpu::use_avx2()) {
    cpu::avx2::codec_run(xp, cp, ap, numel, block, bp, dequantize);
    return;
  }
#endif
  cpu::baseline::codec_run(xp, cp, ap, numel, block, bp, dequantize);
}

}  // namespace fastopt
