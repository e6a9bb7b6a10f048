// The fused SAF pass (fastopt.sharpness.SAFLoss; Du et al., "Sharpness-Aware Training for Free"):
// one call gathers each row's past outputs from the per-example bank, computes the softmax-KL term and
// its gradient, and scatters the row's current outputs into the bank.
//   logits   (rows, classes)             storage dtype `logits_dtype`
//   indices  (rows,) int64               each in [0, n) (the wrapper checks; C++ skips a row outside)
//   bank     (slots, n, classes)         storage dtype `bank_dtype`
//   row_kl   (rows,) fp32                KL(softmax(old / T) || softmax(logits / T)) when active
//   grad     (rows, classes) fp32 or 0   grad_scale * (softmax(logits / T) - softmax(old / T)) when active
//   loss     (1,) fp32 or 0              loss_scale * sum_i row_kl[i] when active (summed in row order, in
//                                        double: the same bits whatever the threads)
// old = bank[read_slot, idx]; bank[write_slot, idx] = logits for the last row of each idx (read_slot !=
// write_slot when active, so no row read is written).  inv_temp = 1 / T.
#pragma once

#include <cstdint>

#include "fastopt/api.h"

namespace fastopt {

struct SafArgs {
  int64_t logits = 0, indices = 0, bank = 0, row_kl = 0, grad = 0, loss = 0;
  int logits_dtype = 0, bank_dtype = 0;
  int64_t rows = 0, n = 0, classes = 0, slots = 0;
  int64_t read_slot = 0, write_slot = 0;
  bool active = false;
  double inv_temp = 1.0, grad_scale = 0.0, loss_scale = 0.0;
};

// The checks of the scalar arguments, shared by both entry points (before any memory is touched).
inline void check_saf_args(const SafArgs& a) {
  check_arg(a.rows >= 0 && a.n >= 0 && a.classes >= 0, "negative size");
  check_arg(a.slots >= 1 && a.read_slot >= 0 && a.read_slot < a.slots && a.write_slot >= 0 &&
                a.write_slot < a.slots,
            "bank slot out of range");
  check_arg(!a.active || a.read_slot != a.write_slot, "the read and write slots must differ");
  check_arg(a.inv_temp > 0.0, "inv_temp must be > 0");
  for (int code : {a.logits_dtype, a.bank_dtype})
    check_arg(code == kFloat32 || code == kFloat16 || code == kBFloat16, "unsupported dtype code");
}

void saf_cpu(const SafArgs& args);
// csrc/cuda/saf.cu (same arguments; `loss` is not written: the caller sums row_kl).
void saf_cuda(const SafArgs& args, int64_t stream);

}  // namespace fastopt
