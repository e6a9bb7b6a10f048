// CPU entry points of the low-bit-state step and of the blockwise codec: validate, read the device
// scalars, run the ISA-specific kernels (lowbit_kernels.cpp), increment the steps.
#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "fastopt/api.h"
#include "fastopt/elementwise.h"
#include "fastopt/quant.h"
#include "isa.h"
#include "step.h"

namespace fastopt {
FASTOPT_CPU_KERNEL_DECL(bool lowbit_run(const LowbitArgs& la, const ElementwiseArgs& a, double lr, float grad_mul,
                                        const double* steps))
FASTOPT_CPU_KERNEL_DECL(void codec_run(float* x, uint8_t* codes, float* absmax, int64_t numel, int64_t block,
                                       const int32_t* book, bool dequantize))

// Values per byte of each state list's codes (1 for plain states): 2 where the codes of the call's
// first non-empty tensor are numel / 2 bytes.  check_lists then holds every tensor of the list to it;
// the CPU entry point also checks it against the codebook's code count.
static std::vector<int> code_packing(const LowbitArgs& la, int states) {
  const TensorLists& l = la.base.lists;
  std::vector<int> per(2 + states, 1);
  for (int k = 0; k < states; ++k) {
    if (la.books[k] == 0) continue;
    for (int64_t t = 0; t < l.n; ++t) {
      const int64_t numel = l.numels[t], codes = l.numels[(2 + k) * l.n + t];
      if (numel == 0) continue;
      per[2 + k] = 2 * codes == numel ? 2 : 1;
      break;
    }
  }
  return per;
}

void check_lowbit(const LowbitArgs& la, int states) {
  const ElementwiseArgs& a = la.base;
  check_arg(static_cast<int64_t>(la.books.size()) == states, "one codebook address (or 0) per state");
  check_arg(static_cast<int64_t>(a.lists.numels.size()) == a.lists.depth * a.lists.n,
            "one numel per tensor of every list is required");
  check_elementwise(a, states, code_packing(la, states));
  int op_states = 0, op_reduce = 0;
  op_shape(a.op, &op_states, &op_reduce);
  check_arg(op_reduce == 0, "op '" + a.op + "' has a reduce phase; low-bit states are for single-pass ops");
  check_arg(a.phase == 0, "low-bit states support the update phase only");
  check_arg(a.rows.empty() && a.row_coef_ptr == 0, "low-bit states take no row coefficients");
  check_arg(la.block >= 2 && la.block <= kMaxQuantBlock && la.block % 2 == 0,
            "block must be even and at most " + std::to_string(kMaxQuantBlock));
  check_arg(static_cast<int64_t>(la.absmax.size()) == states * a.lists.n, "one absmax address per state and tensor");
  check_arg(la.absmax_numels.size() == la.absmax.size(), "one absmax numel per state and tensor");
  const bool any_rank1 = std::any_of(la.colmax.begin(), la.colmax.end(), [](int64_t c) { return c != 0; });
  for (int k = 0; k < states; ++k) {
    for (int64_t t = 0; t < a.lists.n; ++t) {
      const int64_t i = k * a.lists.n + t;
      const bool has = la.absmax[i] != 0;
      check_arg(la.books[k] == 0 ? !has : (has || a.lists.numels[t] == 0),
                "a quantized state needs an absmax per tensor, a plain one none");
      const bool rank1 = any_rank1 && la.colmax[i] != 0;
      if (la.books[k] != 0 && !rank1) {
        check_arg(la.absmax_numels[i] == a.lists.numels[t] / la.block, "an absmax tensor must hold one value per block");
      }
    }
  }
  for (int64_t t = 0; t < a.lists.n; ++t) {
    check_arg(a.lists.numels[t] % la.block == 0, "every tensor's numel must be a multiple of the block");
  }
  check_arg(la.colmax.empty() || static_cast<int64_t>(la.colmax.size()) == states * a.lists.n,
            "colmax: one address (or 0) per state and tensor");
  check_arg(la.colmax_numels.size() == la.colmax.size(), "one colmax numel per colmax address");
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
        check_arg(la.absmax_numels[k * a.lists.n + t] == rows && la.colmax_numels[k * a.lists.n + t] == a.lists.numels[t] / rows,
                  "a rank-1 state holds one maximum per row (absmax) and per column (colmax)");
      }
    }
  }
}

void lowbit_cpu(const LowbitArgs& la) {
  int states = 0, reduce = 0;
  check_arg(op_shape(la.base.op, &states, &reduce), "unknown elementwise op '" + la.base.op + "'");
  check_lowbit(la, states);
  const std::vector<int> packing = code_packing(la, states);
  for (int k = 0; k < states; ++k) {
    if (!la.books[k]) continue;
    const int nc = codebook_view(as_ptr<const int32_t>(la.books[k])).nc;
    check_arg(nc == 256 || nc == 16, "a codebook has 256 or 16 codes");
    check_arg(packing[2 + k] == (nc == 16 ? 2 : 1), "codes must hold one byte per value (256 codes) or per two (16)");
  }
  CpuStep st = prepare_cpu_step(la.base);
  if (st.skip) return;
  FASTOPT_CPU_KERNEL_CALL(lowbit_run, la, st.padded, st.lr, st.grad_mul, st.next.data());
  for (float* s : st.steps) *s += 1.0f;
}

void check_codec(const CodecArgs& a) {
  check_arg(a.numel >= 0 && a.block >= 2 && a.block % 2 == 0 && a.block <= kMaxQuantBlock && a.numel % a.block == 0,
            "numel must be a multiple of an even block of at most " + std::to_string(kMaxQuantBlock));
  check_arg(a.absmax_numel == a.numel / a.block, "absmax must hold one value per block");
  check_arg(a.codes_numel == a.numel || 2 * a.codes_numel == a.numel, "codes must hold numel or numel / 2 bytes");
  check_arg(a.numel == 0 || (a.x != 0 && a.codes != 0 && a.absmax != 0 && a.book != 0), "null address");
}

void quantize_cpu(const CodecArgs& a) {
  check_codec(a);
  if (a.numel == 0) return;
  const auto* bp = as_ptr<const int32_t>(a.book);
  const int nc = codebook_view(bp).nc;
  check_arg(nc == 256 || nc == 16, "a codebook has 256 or 16 codes");
  check_arg(a.codes_numel == (nc == 16 ? a.numel / 2 : a.numel), "codes must hold numel (256 codes) or numel / 2 "
            "(16 codes) bytes");
  auto* xp = as_ptr<float>(a.x);
  auto* cp = as_ptr<uint8_t>(a.codes);
  auto* ap = as_ptr<float>(a.absmax);
  FASTOPT_CPU_KERNEL_CALL(codec_run, xp, cp, ap, a.numel, a.block, bp, a.dequantize);
}

}  // namespace fastopt
