// Dense M-FAC's two passes over the gradient window on the CPU (fastopt/reference/mfac.py is the
// spec; fastopt/_ops.py mfac_dots_ / mfac_update_ validate every pointer and size before a call).
#pragma once

#include <cstdint>
#include <vector>

namespace fastopt {

struct MfacArgs {
  int64_t window = 0;   // G: rows x ld, row-major, dtype gdtype (0 fp32, 2 bf16)
  int64_t rows = 0;     // m, the window's rows
  int64_t ld = 0;       // d, the window's columns = the sum of numels
  int64_t nrows = 0;    // rows in use (the passes read rows [0, nrows))
  int64_t slot = 0;     // pass 1: the row g is written to (< nrows)
  int gdtype = 0;
  std::vector<int64_t> params, grads, numels;  // fp32, contiguous; param i's columns follow param i-1's
  std::vector<int64_t> momentum;               // pass 2: fp32 momentum slices (one per param) or empty
  int64_t dots_x = 0, dots_k = 0;  // pass 1 outputs, fp64 (rows); dots_k 0: not computed (fp32 window)
  int64_t coef = 0;                // pass 2 input, fp32 (nrows)
  double wd_l2 = 0.0, damp = 1.0, momentum_coef = 0.0, lr = 0.0, wd_decoupled = 0.0;
};

void check_mfac(const MfacArgs& a, bool update);
// Pass 1: G[slot] <- g = grad + wd_l2 p; dots_x[j] = G_j . g, dots_k[j] = G_j . G[slot] (j < nrows; the
// rest of the outputs is zeroed).
void mfac_dots_cpu(const MfacArgs& a);
// Pass 2: u = g / damp - sum_j coef[j] G_j; v <- mom v + (1 - mom) u if momentum; p <- p (1 - wd_dec) - lr u.
void mfac_update_cpu(const MfacArgs& a);

}  // namespace fastopt
