// The fused row pass of WTA-CRS (fastopt.nn.WTACRSLinear; Liu et al., "Winner-Take-All Column Row
// Sampling for Memory Efficient Adaptation of Language Model", NeurIPS 2023).  One pass over the rows of
// a (rows, cols) matrix `src` (an activation x in the forward, an output gradient dy in the backward):
//   norms[i] = ||src_i||_2 * (gnorm ? gnorm[i] : 1)                 fp32 (rows,), when norms != 0
//   out[pos[i]] = src_i * weight[pos[i]]  (fp32 product, rounded)  for every i with 0 <= pos[i] < k,
//                                                                   when pos != 0 (out: (k, cols), src's dtype;
//                                                                   weight: fp32 (k,) or 0 for 1)
// The sum of squares of a row is taken in fp64 by one thread (rounded to fp32 at the end): the result does
// not depend on the team size.  Rows are spread over OpenMP threads.
#pragma once

#include <cstdint>

#include "fastopt/api.h"

namespace fastopt {

struct WtacrsArgs {
  int64_t src = 0, pos = 0, weight = 0, out = 0, gnorm = 0, norms = 0;
  int dtype = 0;
  int64_t rows = 0, cols = 0, k = 0;
};

inline void check_wtacrs_args(const WtacrsArgs& a) {
  check_arg(a.rows >= 0 && a.cols >= 0 && a.k >= 0, "wtacrs_rows: negative size");
  check_arg(a.dtype == kFloat32 || a.dtype == kFloat16 || a.dtype == kBFloat16, "wtacrs_rows: unsupported dtype code");
  check_arg(a.pos == 0 || a.k == 0 || a.out != 0, "wtacrs_rows: pos without out");
}

void wtacrs_rows_cpu(const WtacrsArgs& args);

}  // namespace fastopt
