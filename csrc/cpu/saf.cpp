// CPU entry point of the fused SAF pass (saf.h): validates, marks the row that writes each index (the
// last occurrence in the batch: deterministic whatever the threads), runs the ISA-specific kernel.
#include "saf.h"

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

#include "fastopt/api.h"
#include "fastopt/dispatch.h"
#include "isa.h"

namespace fastopt {
FASTOPT_CPU_KERNEL_DECL(void saf_run(const SafArgs& a, const uint8_t* writes))

void saf_cpu(const SafArgs& a) {
  check_saf_args(a);
  if (a.rows * a.classes == 0) {
    if (a.active && a.loss != 0) *as_ptr<float>(a.loss) = 0.0f;
    return;
  }
  check_arg(a.logits != 0 && a.indices != 0 && a.bank != 0 && a.row_kl != 0, "null tensor address");
  const int64_t* idx = as_ptr<const int64_t>(a.indices);
  for (int64_t i = 0; i < a.rows; ++i) check_arg(idx[i] >= 0 && idx[i] < a.n, "index out of range");
  // writes[i] = 1 when indices[i] does not occur again later in the batch
  std::vector<uint8_t> writes(static_cast<size_t>(a.rows), 1);
  std::vector<int64_t> order(static_cast<size_t>(a.rows));
  std::iota(order.begin(), order.end(), int64_t{0});
  std::sort(order.begin(), order.end(),
            [idx](int64_t x, int64_t y) { return idx[x] < idx[y] || (idx[x] == idx[y] && x < y); });
  for (int64_t k = 0; k + 1 < a.rows; ++k)
    if (idx[order[k]] == idx[order[k + 1]]) writes[order[k]] = 0;
  FASTOPT_CPU_KERNEL_CALL(saf_run, a, writes.data());
  if (a.active && a.loss != 0) {
    const float* kl = as_ptr<const float>(a.row_kl);
    double total = 0.0;
    for (int64_t i = 0; i < a.rows; ++i) total += kl[i];
    *as_ptr<float>(a.loss) = static_cast<float>(total * a.loss_scale);
  }
}

}  // namespace fastopt
