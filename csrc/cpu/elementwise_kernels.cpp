// The generic elementwise-op CPU kernels (fastopt/elementwise.h), compiled once per ISA (see isa.h):
// every op of fastopt/ops.h is instantiated here.
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <vector>

#include "fastopt/elementwise.h"
#include "fastopt/ops.h"
#include "kernel.h"

namespace fastopt::cpu::FASTOPT_CPU_NS {
namespace {

struct Plan {
  const ElementwiseArgs* a;
  double lr;
  float grad_mul;
  const double* steps;          // per tensor, after this step
  const int64_t* row_offset;    // first global row of each tensor (n + 1 entries)
  const float* row_coef;        // or null
};

template <typename Op, typename T, int SPARSE>
void update_range(T* __restrict__ p, const T* __restrict__ g, T* __restrict__ s0, T* __restrict__ s1,
                  T* __restrict__ s2, T* __restrict__ s3, int64_t begin, int64_t end, float grad_mul,
                  const typename Op::Coeffs c, const float* rc, bool stochastic, uint32_t key, uint32_t sr_offset,
                  const uint8_t* __restrict__ mask, T* __restrict__ out, float lambda, float beta,
                  uint32_t mask_key = 0, uint32_t mask_threshold = 0) {
  float row[kMaxRowCoefs] = {0.0f, 0.0f, 0.0f, 0.0f};
  if (rc != nullptr) std::memcpy(row, rc, sizeof(row));
  // ivdep: element i of every list is read and written only by iteration i (the lists never
  // overlap, except the clip op's, which passes one list as both param and grad).
  if (stochastic) {
#pragma GCC ivdep
    for (int64_t i = begin; i < end; ++i)
      op_update_element<Op, T, SPARSE>(p, g, s0, s1, s2, s3, i, grad_mul, c, row, true, key, sr_offset, mask, out,
                                       lambda, beta, mask_key, mask_threshold);
  } else {
#pragma GCC ivdep
    for (int64_t i = begin; i < end; ++i)
      op_update_element<Op, T, SPARSE>(p, g, s0, s1, s2, s3, i, grad_mul, c, row, false, key, sr_offset, mask, out,
                                       lambda, beta, mask_key, mask_threshold);
  }
}

// The reduce pass (phase 1): per-row sums, the same bits whatever the threads.  The elements are cut
// into fixed units of kReduceBlock elements per tensor (multi_tensor_apply_units); the part of a row
// inside one unit is summed in fp32 (an OpenMP simd reduction, so the loop vectorizes) and widened to
// fp64.  A row wholly inside a unit is written by that unit alone; the first and last row a unit
// touches may continue in neighbouring units, so those two partials are kept per unit and added to
// the row sums afterwards in unit order -- no atomics, no dependence on the team or its timing.
constexpr int64_t kReduceBlock = 4096;

template <typename Op, typename T>
void reduce_range(const T* __restrict__ p, const T* __restrict__ g, T* __restrict__ s0, T* __restrict__ s1,
                  T* __restrict__ s2, T* __restrict__ s3, int64_t begin, int64_t end, float grad_mul,
                  const typename Op::Coeffs c, const float* rc, double* out) {
  float row[kMaxRowCoefs] = {0.0f, 0.0f, 0.0f, 0.0f};
  if (rc != nullptr) std::memcpy(row, rc, sizeof(row));
  float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
  for (int64_t i = begin; i < end; ++i) {
    float acc[kMaxReduce] = {0.0f, 0.0f, 0.0f, 0.0f};
    op_reduce_element<Op, T>(p, g, s0, s1, s2, s3, i, grad_mul, c, row, acc);
    a0 += acc[0];
    a1 += acc[1];
    a2 += acc[2];
    a3 += acc[3];
  }
  const float a[kMaxReduce] = {a0, a1, a2, a3};
  for (int k = 0; k < Op::kReduce; ++k) out[k] += a[k];
}

template <typename Op, typename T>
void run_op(const Plan& pl, double* sums) {
  const ElementwiseArgs& a = *pl.a;
  const TensorLists& l = a.lists;
  auto state = [&](int k, int64_t t) -> T* { return Op::kStates > k ? l.get<T>(2 + k, t) : nullptr; };
  std::vector<typename Op::Coeffs> coeffs(l.n);
  for (int64_t t = 0; t < l.n; ++t) coeffs[t] = Op::coeffs(OpScalars{a.hyper.data(), a.flags, pl.lr, pl.steps[t]});
  auto row_len_of = [&](int64_t t) {
    const int64_t rows = pl.row_offset[t + 1] - pl.row_offset[t];
    return rows > 0 ? l.numels[t] / rows : l.numels[t];
  };
  if (a.phase != 0) {
    const UnitPlan plan = plan_units(l.numels.data(), l.n, kReduceBlock);
    const int64_t units = static_cast<int64_t>(plan.tensor.size());
    std::vector<double> edge(static_cast<size_t>(units) * 2 * kMaxReduce, 0.0);  // per unit: first, last row
    multi_tensor_apply_units(plan, l.numels.data(), [&](int64_t u, int64_t t, int64_t s, int64_t len) {
      const T* p = l.get<T>(0, t);
      const T* g = l.get<T>(1, t);
      T *s0 = state(0, t), *s1 = state(1, t), *s2 = state(2, t), *s3 = state(3, t);
      const int64_t row_len = row_len_of(t);
      for (int64_t b = s; b < s + len;) {
        const int64_t r = row_len > 0 ? b / row_len : 0;
        const int64_t e = std::min(s + len, (r + 1) * row_len);
        double* out = b == s ? edge.data() + (2 * u) * kMaxReduce
                    : e == s + len ? edge.data() + (2 * u + 1) * kMaxReduce
                                   : sums + (pl.row_offset[t] + r) * kMaxReduce;  // wholly inside unit u
        const float* rc = pl.row_coef != nullptr ? pl.row_coef + (pl.row_offset[t] + r) * kMaxRowCoefs : nullptr;
        reduce_range<Op, T>(p, g, s0, s1, s2, s3, b, e, pl.grad_mul, coeffs[t], rc, out);
        b = e;
      }
    });
    for (int64_t u = 0; u < units; ++u) {
      const int64_t t = plan.tensor[u];
      const int64_t s = (u - plan.first[t]) * kReduceBlock;
      const int64_t e = std::min(s + kReduceBlock, l.numels[t]);
      const int64_t row_len = row_len_of(t);
      const int64_t r0 = row_len > 0 ? s / row_len : 0, r1 = row_len > 0 ? (e - 1) / row_len : 0;
      for (int k = 0; k < Op::kReduce; ++k) {
        sums[(pl.row_offset[t] + r0) * kMaxReduce + k] += edge[(2 * u) * kMaxReduce + k];
        if (r1 != r0) sums[(pl.row_offset[t] + r1) * kMaxReduce + k] += edge[(2 * u + 1) * kMaxReduce + k];
      }
    }
    return;
  }
  multi_tensor_apply(l.numels.data(), l.n, [&](int64_t t, int64_t s, int64_t len) {
    T* p = l.get<T>(0, t);
    const T* g = l.get<T>(1, t);
    T *s0 = state(0, t), *s1 = state(1, t), *s2 = state(2, t), *s3 = state(3, t);
    const int64_t row_len = row_len_of(t);
    const uint32_t key = sr_key(static_cast<uint32_t>(a.seed), static_cast<uint32_t>(t),
                                static_cast<uint32_t>(pl.steps[t]));
    const uint32_t sr_offset = sr_offset_of(a, t);
    // Walk the rows this piece [s, s + len) touches: row coefficients are per row.
    for (int64_t b = s; b < s + len;) {
      const int64_t r = row_len > 0 ? b / row_len : 0;
      const int64_t e = std::min(s + len, (r + 1) * row_len);
      const int64_t grow = pl.row_offset[t] + r;
      const float* rc = pl.row_coef != nullptr ? pl.row_coef + grow * kMaxRowCoefs : nullptr;
      if (a.sparse_prune != 0) {
        if constexpr (Op::kReduce == 0) {  // prune-style unstructured sparsity (check_elementwise)
          if (a.sparse_prune == 2) {
            update_range<Op, T, 4>(p, g, s0, s1, s2, s3, b, e, pl.grad_mul, coeffs[t], rc, a.stochastic, key,
                                   sr_offset, nullptr, nullptr, 0.0f, 0.0f, static_cast<uint32_t>(a.sparse_keys[t]),
                                   static_cast<uint32_t>(a.sparse_threshold));
          } else {
            update_range<Op, T, 3>(p, g, s0, s1, s2, s3, b, e, pl.grad_mul, coeffs[t], rc, a.stochastic, key,
                                   sr_offset, as_ptr<const uint8_t>(a.sparse_mask[t]), nullptr, 0.0f, 0.0f);
          }
        }
      } else if (a.sparse_mask.empty()) {
        update_range<Op, T, 0>(p, g, s0, s1, s2, s3, b, e, pl.grad_mul, coeffs[t], rc, a.stochastic, key,
                               sr_offset, nullptr, nullptr, 0.0f, 0.0f);
      } else if constexpr (Op::kReduce == 0) {  // check_elementwise: the epilogue needs a one-pass op
        T* out = a.sparse_out.empty() ? nullptr : as_ptr<T>(a.sparse_out[t]);
        const uint8_t* mask = as_ptr<const uint8_t>(a.sparse_mask[t]);
        const float lambda = static_cast<float>(a.sparse_lambda), beta = static_cast<float>(a.sparse_beta);
        if (out != nullptr) {
          update_range<Op, T, 2>(p, g, s0, s1, s2, s3, b, e, pl.grad_mul, coeffs[t], rc, a.stochastic, key,
                                 sr_offset, mask, out, lambda, beta);
        } else {
          update_range<Op, T, 1>(p, g, s0, s1, s2, s3, b, e, pl.grad_mul, coeffs[t], rc, a.stochastic, key,
                                 sr_offset, mask, nullptr, lambda, beta);
        }
      }
      b = e;
    }
  });
}

}  // namespace

// Returns false when `a.op` is not a registered op.
bool elementwise_run(const ElementwiseArgs& a, double lr, float grad_mul, const double* steps,
                     const int64_t* row_offset, double* sums) {
  Plan pl{&a, lr, grad_mul, steps, row_offset,
          as_ptr<const float>(a.row_coef_ptr)};
  bool found = false;
#define FASTOPT_CPU_CASE(NAME, TYPE)                                          \
  if (!found && a.op == NAME) {                                               \
    found = true;                                                             \
    FASTOPT_DTYPE_SWITCH(a.lists.dtype, [&] { run_op<TYPE, scalar_t>(pl, sums); }); \
  }
  FASTOPT_FOR_EACH_OP(FASTOPT_CPU_CASE)
#undef FASTOPT_CPU_CASE
  return found;
}

}  // namespace fastopt::cpu::FASTOPT_CPU_NS
