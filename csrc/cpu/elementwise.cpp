// CPU entry point of the generic elementwise ops: validates, reads the device scalars (host memory
// here), runs the ISA-specific kernels, then adds the reduce sums or increments the steps.
#include <cstdint>
#include <vector>

#include "fastopt/api.h"
#include "fastopt/elementwise.h"
#include "fastopt/ops.h"
#include "isa.h"
#include "step.h"

namespace fastopt {
FASTOPT_CPU_KERNEL_DECL(bool elementwise_run(const ElementwiseArgs& a, double lr, float grad_mul, const double* steps,
                                             const int64_t* row_offset, double* sums))

bool op_shape(const std::string& op, int* states, int* reduce) {
#define FASTOPT_OP_SHAPE(NAME, TYPE) \
  if (op == NAME) { *states = TYPE::kStates; *reduce = TYPE::kReduce; return true; }
  FASTOPT_FOR_EACH_OP(FASTOPT_OP_SHAPE)
#undef FASTOPT_OP_SHAPE
  return false;
}

void check_elementwise(const ElementwiseArgs& a, int states, const std::vector<int>& values_per_element) {
  int op_states = 0, op_reduce = 0;
  check_arg(op_shape(a.op, &op_states, &op_reduce), "unknown elementwise op '" + a.op + "'");
  check_arg(states == op_states, "op '" + a.op + "' takes " + std::to_string(op_states) + " state lists");
  check_lists(a.lists, 2 + op_states, values_per_element);
  check_arg(a.steps.empty() || static_cast<int64_t>(a.steps.size()) == a.lists.n,
            "one step counter per tensor (or none) is required");
  for (int64_t s : a.steps) check_arg(s != 0, "null step counter address");
  check_arg(a.hyper.size() <= static_cast<size_t>(kMaxHyper), "too many hyperparameters");
  check_arg(a.phase == 0 || a.phase == 1, "phase must be 0 (update) or 1 (reduce)");
  check_arg(a.phase == 0 || op_reduce > 0, "op '" + a.op + "' has no reduce phase");
  check_arg(a.phase == 0 || a.reduce_out_ptr != 0, "the reduce phase needs reduce_out");
  check_arg(a.rows.empty() || static_cast<int64_t>(a.rows.size()) == a.lists.n, "one row count per tensor");
  for (size_t t = 0; t < a.rows.size(); ++t) {
    check_arg(a.rows[t] >= 1 && (a.lists.numels[t] == 0 || a.lists.numels[t] % a.rows[t] == 0),
              "a row count must be >= 1 and divide its tensor's numel");
  }
  check_arg(!a.stochastic || a.lists.dtype == kBFloat16, "stochastic rounding is for bf16 params");
  check_arg(a.sr_offsets.empty() || static_cast<int64_t>(a.sr_offsets.size()) == a.lists.n,
            "sr_offsets: one stochastic-rounding element offset per tensor (or none), got " +
                std::to_string(a.sr_offsets.size()) + " for " + std::to_string(a.lists.n) + " tensors");
  for (int64_t o : a.sr_offsets) check_arg(o >= 0, "sr_offsets: a stochastic-rounding element offset must be >= 0");
  check_arg(a.sparse_prune >= 0 && a.sparse_prune <= 2, "sparse_prune must be 0, 1 (by mask) or 2 (by hash)");
  if (a.sparse_prune == 2) {
    check_arg(a.phase == 0 && op_reduce == 0, "the sparse epilogue is for the update of ops without a reduce phase");
    check_arg(a.sparse_mask.empty() && a.sparse_out.empty() && a.sparse_numels.empty(),
              "sparse_prune 2 (by hash) takes no sparse masks or outputs");
    check_arg(static_cast<int64_t>(a.sparse_keys.size()) == a.lists.n, "sparse_prune 2: one mask key per tensor");
    for (int64_t k : a.sparse_keys) check_arg(k >= 0 && k <= 0xFFFFFFFFLL, "sparse_keys: a key is a uint32");
    check_arg(a.sparse_threshold >= 0 && a.sparse_threshold <= 0xFFFFFFFFLL,
              "sparse_threshold must be in [0, 2^32)");
    return;
  }
  check_arg(a.sparse_keys.empty(), "sparse_keys are for sparse_prune 2");
  check_arg(a.sparse_prune == 0 || !a.sparse_mask.empty(), "sparse_prune 1 needs sparse_mask");
  check_arg(a.sparse_prune == 0 || (a.sparse_out.empty() && a.sparse_lambda == 0.0 && a.sparse_beta == 0.0),
            "sparse_prune 1 takes no sparse_out, lambda or beta");
  if (a.sparse_mask.empty()) {
    check_arg(a.sparse_out.empty(), "sparse_out needs sparse_mask");
    return;
  }
  check_arg(a.phase == 0 && op_reduce == 0, "the sparse epilogue is for the update of ops without a reduce phase");
  check_arg(static_cast<int64_t>(a.sparse_mask.size()) == a.lists.n, "one sparse mask per tensor");
  check_arg(a.sparse_out.empty() || static_cast<int64_t>(a.sparse_out.size()) == a.lists.n,
            "one sparse output per tensor (or none)");
  check_arg(a.sparse_lambda >= 0.0 && a.sparse_beta >= 0.0 && a.sparse_beta <= 1.0,
            "sparse lambda must be >= 0 and beta in [0, 1]");
  check_arg(a.sparse_numels.size() == a.sparse_mask.size() + a.sparse_out.size(), "one numel per sparse tensor");
  for (size_t i = 0; i < a.sparse_numels.size(); ++i) {
    check_arg(a.sparse_numels[i] == a.lists.numels[i % a.lists.n], "a sparse mask or output must have its param's numel");
  }
  for (int64_t t = 0; t < a.lists.n; ++t) {
    if (a.lists.numels[t] > 0) check_arg(a.sparse_mask[t] != 0, "null sparse mask address");
  }
}

// Row offsets (n + 1 entries) of the per-row sums and coefficients.
std::vector<int64_t> row_offsets(const ElementwiseArgs& a) {
  std::vector<int64_t> off(a.lists.n + 1, 0);
  for (int64_t t = 0; t < a.lists.n; ++t) off[t + 1] = off[t] + (a.rows.empty() ? 1 : a.rows[t]);
  return off;
}

CpuStep prepare_cpu_step(const ElementwiseArgs& a) {
  CpuStep st;
  st.skip = a.found_inf_ptr && read_scalar(a.found_inf_ptr) != 0.0f;  // AMP: inf/nan grads, skip
  st.lr = a.lr_ptr ? read_scalar(a.lr_ptr) : a.lr;
  const float scale = a.grad_scale_ptr ? read_scalar(a.grad_scale_ptr) : 1.0f;
  st.grad_mul = (a.maximize ? -1.0f : 1.0f) / scale;
  st.padded = a;
  st.padded.hyper.assign(kMaxHyper, 0.0);
  std::copy(a.hyper.begin(), a.hyper.end(), st.padded.hyper.begin());
  st.steps.resize(a.steps.size());
  st.next.assign(a.lists.n, 1.0);
  for (size_t t = 0; t < a.steps.size(); ++t) {
    st.steps[t] = as_ptr<float>(a.steps[t]);
    st.next[t] = static_cast<double>(*st.steps[t]) + 1.0;
  }
  st.row_offset = row_offsets(a);
  return st;
}

void elementwise_cpu(const ElementwiseArgs& a) {
  int states = 0, reduce = 0;
  check_arg(op_shape(a.op, &states, &reduce), "unknown elementwise op '" + a.op + "'");
  check_elementwise(a, states);
  CpuStep st = prepare_cpu_step(a);
  if (st.skip) return;
  const std::vector<int64_t>& off = st.row_offset;
  std::vector<double> sums(a.phase == 1 ? off[a.lists.n] * kMaxReduce : 0, 0.0);
  FASTOPT_CPU_KERNEL_CALL(elementwise_run, st.padded, st.lr, st.grad_mul, st.next.data(), off.data(), sums.data());
  if (a.phase == 1) {
    float* out = as_ptr<float>(a.reduce_out_ptr);
    for (size_t i = 0; i < sums.size(); ++i) out[i] += static_cast<float>(sums[i]);
  } else {
    for (float* s : st.steps) *s += 1.0f;
  }
}

}  // namespace fastopt
