// Magnitude selection on the CPU: the thresholds and keep-masks of magnitude pruning for many tensors in
// one call (fastopt/reference/select.py is the spec; fastopt/_ops.py magnitude_select_ validates every
// pointer and size before a call).
#pragma once

#include <cstdint>
#include <vector>

namespace fastopt {

// Tensor i (contiguous, numels[i] elements of dtype code dtypes[i]) belongs to group groups[i]; the
// groups are numbered 0, 1, ... in list order (each group's tensors consecutive).  Group g prunes the
// counts[g] smallest keys (|x| in fp32, NaN as +inf; ties: the highest flat index first).
struct SelectArgs {
  std::vector<int64_t> ptrs, numels;
  std::vector<int> dtypes;
  std::vector<int64_t> groups;   // one per tensor, non-decreasing, starting at 0, steps of 0 or 1
  std::vector<int64_t> counts;   // one per group: elements to prune, 0 <= counts[g] <= the group's numel
  int64_t thresholds = 0;        // fp32 (groups): the largest pruned key, -inf when counts[g] == 0
  std::vector<int64_t> masks;    // one uint8 tensor per input (its numel; 1 = kept), or empty: no masks
};

void check_select(const SelectArgs& a);
void magnitude_select_cpu(const SelectArgs& a);

}  // namespace fastopt
