// CPU entry points of AdaHessian's Rademacher probes (fastopt.optim.adahessian; the bits are those of
// fastopt/reference/adahessian.py and triton_kernels/adahessian.py).  Raw addresses: the Python
// wrapper validates sizes, dtypes, devices and contiguity; these check the list lengths again.
#pragma once

#include <cstdint>
#include <vector>

namespace fastopt {

// out[t][i] = z of element offsets[t] + i of stream keys[t] (+1 / -1 in dtype `dtype`).
void probe_fill_cpu(const std::vector<int64_t>& out, const std::vector<int64_t>& numels,
                    const std::vector<int64_t>& keys, const std::vector<int64_t>& offsets, int dtype);

// acc[t][i] (fp32) = [acc[t][i] +] scale * (use_z ? z[i] hz[t][i] : |hz[t][i]|), hz in dtype `dtype`,
// z regenerated from (keys[t], offsets[t] + i).  acc may alias hz when dtype is fp32.
void probe_consume_cpu(const std::vector<int64_t>& hz, const std::vector<int64_t>& acc,
                       const std::vector<int64_t>& numels, const std::vector<int64_t>& keys,
                       const std::vector<int64_t>& offsets, int dtype, double scale, bool use_z, bool accumulate);

}  // namespace fastopt
