// fastopt/api.h -- the torch-independent native ABI.
//
// Tensors travel as raw addresses (int64) plus element counts and a dtype code; scalars that may
// change between steps (lr, step counts, grad scale, found_inf) may travel as addresses of fp32
// scalars on the tensors' device, so that nothing syncs with the host.  The Python wrapper validates
// everything first; check_* here re-checks cheaply and throws std::invalid_argument.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "fastopt/functors/adam.h"

namespace fastopt {

// The pointer behind an address of the ABI (a tensor's data_ptr, or 0 for "none").
template <typename T> T* as_ptr(int64_t addr) { return reinterpret_cast<T*>(static_cast<intptr_t>(addr)); }
// The fp32 scalar at a host address (the CPU entry points' lr / grad_scale / found_inf).
inline float read_scalar(int64_t addr) { return *as_ptr<const float>(addr); }

// The lists of one multi-tensor call: `ptrs` holds `depth` lists of `n` addresses, list after list,
// and `numels` the element count of every one of those tensors in the same order.  The first `n`
// numels (the params') are what the kernels iterate over; check_lists refuses a call in which any
// other tensor's numel disagrees with its param's (see NOTE: [the tensor boundary] in _ops.py).
struct TensorLists {
  std::vector<int64_t> ptrs;
  std::vector<int64_t> numels;    // depth * n element counts, list after list
  int64_t depth = 0;
  int64_t n = 0;
  int dtype = kFloat32;
  template <typename T> T* get(int64_t list, int64_t t) const {
    return as_ptr<T>(ptrs[list * n + t]);
  }
};

struct AdamArgs {
  TensorLists lists;              // params, grads, exp_avgs, exp_avg_sqs[, max_exp_avg_sqs]
  std::vector<int64_t> steps;     // n addresses of fp32 step counters (incremented by the call)
  functors::AdamHyper hyper;
  int64_t lr_ptr = 0;             // fp32 lr on the device, or 0: use hyper.lr
  int64_t grad_scale_ptr = 0;     // fp32 scale the grads were multiplied by, or 0
  int64_t found_inf_ptr = 0;      // fp32 flag; nonzero -> the whole step is skipped
  bool decoupled = true;
  bool amsgrad = false;
  bool maximize = false;
};

inline void check_arg(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument("fastopt: " + msg);
}

// `values_per_element[d]` (default 1 for every list): how many of the params' values one element of
// list d holds (2 for packed 4-bit codes), so that list d's tensor t must have numel[t] / that many
// elements.
inline void check_lists(const TensorLists& l, int64_t depth, const std::vector<int>& values_per_element = {}) {
  check_arg(l.depth == depth, "expected " + std::to_string(depth) + " tensor lists, got " +
                                  std::to_string(l.depth));
  check_arg(l.n >= 0 && static_cast<int64_t>(l.ptrs.size()) == l.depth * l.n, "pointer table has the wrong length");
  check_arg(static_cast<int64_t>(l.numels.size()) == l.depth * l.n, "one numel per tensor of every list is required");
  check_arg(l.dtype == kFloat32 || l.dtype == kFloat16 || l.dtype == kBFloat16,
            "unsupported dtype code " + std::to_string(l.dtype));
  for (int64_t t = 0; t < l.n; ++t) {
    const int64_t numel = l.numels[t];
    check_arg(numel >= 0, "negative numel");
    for (int64_t d = 1; d < l.depth; ++d) {
      const int per = d < static_cast<int64_t>(values_per_element.size()) ? values_per_element[d] : 1;
      check_arg(per >= 1 && numel % per == 0 && l.numels[d * l.n + t] == numel / per,
                "tensor " + std::to_string(t) + " of list " + std::to_string(d) + " has " +
                    std::to_string(l.numels[d * l.n + t]) + " elements, its param " + std::to_string(numel));
    }
    if (numel == 0) continue;
    for (int64_t d = 0; d < l.depth; ++d) check_arg(l.ptrs[d * l.n + t] != 0, "null tensor address");
  }
}

inline void check_adam(const AdamArgs& a) {
  check_lists(a.lists, a.amsgrad ? 5 : 4);
  check_arg(static_cast<int64_t>(a.steps.size()) == a.lists.n, "one step counter per tensor is required");
  for (int64_t s : a.steps) check_arg(s != 0, "null step counter address");
  const auto& h = a.hyper;
  check_arg(h.lr >= 0.0, "invalid learning rate");
  check_arg(h.eps >= 0.0, "invalid epsilon");
  check_arg(h.beta1 >= 0.0 && h.beta1 < 1.0, "invalid beta1");
  check_arg(h.beta2 >= 0.0 && h.beta2 < 1.0, "invalid beta2");
  check_arg(h.weight_decay >= 0.0, "invalid weight_decay");
}

// One call of a registered elementwise op (fastopt/ops.h): phase 0 is the step, phase 1 the reduce pass.
struct ElementwiseArgs {
  std::string op;
  TensorLists lists;              // params, grads, then the op's state lists
  std::vector<int64_t> steps;     // n addresses of fp32 step counters (phase 0 increments them), or
                                  // empty for ops without a step count (the step reads as 1)
  std::vector<double> hyper;      // at most kMaxHyper values, meaning fixed by the op
  int64_t flags = 0;
  double lr = 0.0;
  int64_t lr_ptr = 0;             // fp32 lr on the device, or 0: use lr
  int64_t grad_scale_ptr = 0;
  int64_t found_inf_ptr = 0;
  bool maximize = false;
  int phase = 0;                  // 0: update (+ step increment), 1: reduce into reduce_out
  std::vector<int64_t> rows;      // rows per tensor (each divides its numel), or empty: one row each
  int64_t row_coef_ptr = 0;       // fp32 [total rows, kMaxRowCoefs] read by both phases, or 0
  int64_t reduce_out_ptr = 0;     // phase 1: fp32 [total rows, kMaxReduce], added to (caller zeroes)
  uint64_t seed = 0;              // stochastic rounding of bf16 params (phase 0) when `stochastic`
  bool stochastic = false;
  // Per tensor, the index its first element has in the whole tensor (a shard's start under FSDP2):
  // element i of tensor t is rounded with the bits of element sr_offsets[t] + i (elementwise.h
  // sr_bits), so results do not depend on how a tensor is split.  Empty: all 0.  Each >= 0.
  std::vector<int64_t> sr_offsets;  // empty, or one per tensor
  // The sparse-training epilogue (phase 0 of ops without a reduce phase; see op_update_element):
  // the params are the dense weights; per tensor the address of its uint8 mask (nonzero = kept) and
  // of its forward weight (the params' dtype, or 0: not written).  Empty: no epilogue.
  std::vector<int64_t> sparse_mask;
  std::vector<int64_t> sparse_out;  // empty or one per tensor
  std::vector<int64_t> sparse_numels;  // the numel of every mask, then of every output (each the param's)
  double sparse_lambda = 0.0;       // SR-STE: g += lambda * p where the mask is 0
  double sparse_beta = 0.0;         // out = beta * p where the mask is 0
  // Prune-style unstructured sparsity (fastopt.sparse.RandomSparsity / MagnitudeSparsity; elementwise.h
  // op_update_element SPARSE 3 / 4): the params hold the sparse weights; pruned elements of the param and
  // of every state are written 0.  0: off (the N:M epilogue above, if any); 1: pruned where sparse_mask
  // (one uint8 mask per tensor, no sparse_out, lambda and beta 0) is 0; 2: no mask: element i of tensor t
  // is kept when prune_keep(sparse_keys[t], sr_offsets[t] + i, sparse_threshold).
  int sparse_prune = 0;
  std::vector<int64_t> sparse_keys;  // mode 2: one uint32 key per tensor (elementwise.h prune_key)
  int64_t sparse_threshold = 0;      // mode 2: floor(density * 2^32), in [0, 2^32)
};

// The low 32 bits of tensor t's stochastic-rounding offset (what sr_bits hashes; 0 without offsets).
inline uint32_t sr_offset_of(const ElementwiseArgs& a, int64_t t) {
  return a.sr_offsets.empty() ? 0u : static_cast<uint32_t>(static_cast<uint64_t>(a.sr_offsets[t]));
}

// One step of a registered elementwise op with low-bit states (fastopt/quant.h): `base` as above
// (phase 0 only), except that a quantized state's list holds its codes (uint8; numel or numel / 2
// bytes).  Every tensor's numel is a multiple of `block`; plain states have the params' dtype.
struct LowbitArgs {
  ElementwiseArgs base;
  std::vector<int64_t> books;     // per state: address of its int32 codebook (the tensors' device), or 0: plain
  std::vector<int64_t> absmax;    // per state, per tensor (state-major): fp32 [numel / block], or 0 for plain
  std::vector<int64_t> absmax_numels;  // the numel of each absmax tensor (0 for plain states)
  int64_t block = 0;              // elements per quantization block, at most kMaxQuantBlock
  // Rank-1 normalization (Li et al. 2023): a state whose colmax address is nonzero is scaled per
  // element by min(row max, column max) of the tensor viewed as [rows, numel / rows] instead of per
  // block; its absmax address then holds the row maxima.  CPU only.
  std::vector<int64_t> colmax;    // per state and tensor (state-major): fp32 [cols], or 0; may be empty
  std::vector<int64_t> colmax_numels;  // the numel of each colmax tensor (as colmax)
  std::vector<int64_t> rank1_rows;  // per tensor: rows of the rank-1 view (needed where colmax is set)
};

// The state-list and reduce counts of a registered op; false when `op` is unknown.
bool op_shape(const std::string& op, int* states, int* reduce);
// Checks the parts every backend relies on; `states` is the op's state count; `values_per_element`
// as for check_lists (the packed codes of low-bit states).
void check_elementwise(const ElementwiseArgs& a, int states, const std::vector<int>& values_per_element = {});
// First global row of each tensor, n + 1 entries (rows per tensor, or one each).
std::vector<int64_t> row_offsets(const ElementwiseArgs& a);

// Checks a low-bit call (and its base); `states` is the op's state count.
void check_lowbit(const LowbitArgs& a, int states);

// N:M mask of one contiguous tensor viewed as [outer, len, inner]: groups of m consecutive positions
// along len; out (uint8, same numel) gets 1 for the n kept elements of each group (fastopt/sparse.h).
struct NMMaskArgs {
  int64_t in = 0, out = 0;
  int64_t outer = 0, len = 0, inner = 0;
  int64_t n = 0, m = 0;
  int dtype = kFloat32;
};
// Transposable 2:4 mask of one contiguous [rows, cols] matrix (rows, cols multiples of 4).
struct TransposableMaskArgs {
  int64_t in = 0, out = 0;
  int64_t rows = 0, cols = 0;
  int dtype = kFloat32;
  bool exact = true;
};

inline void check_nm_mask(const NMMaskArgs& a) {
  check_arg(a.outer >= 0 && a.len >= 0 && a.inner >= 0, "negative size");
  check_arg(a.m >= 1 && a.m <= 64 && a.n >= 0 && a.n <= a.m, "need 0 <= n <= m <= 64");
  check_arg(a.len % a.m == 0, "the masked dimension is not a multiple of m");
  check_arg(a.dtype == kFloat32 || a.dtype == kFloat16 || a.dtype == kBFloat16, "unsupported dtype code");
  check_arg(a.outer * a.len * a.inner == 0 || (a.in != 0 && a.out != 0), "null tensor address");
}

inline void check_transposable_mask(const TransposableMaskArgs& a) {
  check_arg(a.rows >= 0 && a.cols >= 0 && a.rows % 4 == 0 && a.cols % 4 == 0,
            "rows and cols must be non-negative multiples of 4");
  check_arg(a.dtype == kFloat32 || a.dtype == kFloat16 || a.dtype == kBFloat16, "unsupported dtype code");
  check_arg(a.rows * a.cols == 0 || (a.in != 0 && a.out != 0), "null tensor address");
}

// One pass of entropic optimal transport over a batch of point clouds (fastopt/ot, the CPU side of
// triton_kernels/ot.py).  For every batch entry b and row i, with C_ij = cost(x[b,i], y[b,j]) computed
// on the fly (cost 0: |x - y|^2, 1: |x - y|) or read from a dense cost matrix (B, n, m):
//   mode 0:  out[b,i]   = LSE_j (h[b,j] - C_ij / eps)                           (fp32 (B, n))
//   mode 1:  out[b,i,:] = sum_j exp(c[b,i] + h[b,j] - C_ij / eps) * dC_ij/dx_i  (fp32 (B, n, d); points only)
//   mode 2:  out[b,i]   = -eps log(sum_j h[b,j] exp((c[b,j] - C_ij) / eps) / sum_j h[b,j])
//            the weighted soft-minimum in cost units (h: weights >= 0, c: a potential, both (B, m);
//            fp32 (B, n)), evaluated relative to the row's smallest C - c so that no eps cancels
// h (B, m) and c (B, n) (mode 2: (B, m)) are fp32 and may hold -inf (no mass); x (B, n, d), y (B, m, d) and the cost
// matrix have the storage dtype; accumulation is fp32 with an online (rescaled) maximum.
struct OtArgs {
  int64_t x = 0, y = 0, cost_matrix = 0;  // x, y: points; or cost_matrix (then x = y = 0)
  int64_t h = 0, c = 0, out = 0;
  int64_t batch = 0, n = 0, m = 0, d = 0;
  int cost = 0;
  int mode = 0;
  double eps = 1.0;
  int dtype = kFloat32;
};

inline void check_ot(const OtArgs& a) {
  check_arg(a.batch >= 0 && a.n >= 0 && a.m >= 0 && a.d >= 0, "negative size");
  check_arg(a.mode >= 0 && a.mode <= 2, "mode must be 0 (log-sum-exp), 1 (gradient) or 2 (soft-minimum)");
  check_arg(a.cost == 0 || a.cost == 1, "cost must be 0 (squared Euclidean) or 1 (Euclidean)");
  check_arg(a.eps > 0.0, "eps must be > 0");
  check_arg(a.dtype == kFloat32 || a.dtype == kFloat16 || a.dtype == kBFloat16, "unsupported dtype code");
  const bool dense = a.cost_matrix != 0;
  check_arg(!dense || a.mode != 1, "the gradient pass needs points, not a cost matrix");
  check_arg(dense || a.d >= 1, "points need d >= 1");
  if (a.batch * a.n == 0) return;
  check_arg(a.h != 0 && a.out != 0 && (a.mode == 0 || a.c != 0), "null tensor address");
  check_arg(dense || (a.x != 0 && (a.m == 0 || a.y != 0)), "null point address");
}

void ot_pass_cpu(const OtArgs& args);
void nm_mask_cpu(const NMMaskArgs& args);
void transposable_mask_cpu(const TransposableMaskArgs& args);
void adam_cpu(const AdamArgs& args);
void elementwise_cpu(const ElementwiseArgs& args);
void lowbit_cpu(const LowbitArgs& args);
// Blockwise codec of one fp32 buffer: quantize (x -> codes, absmax) or dequantize (codes, absmax -> x).
struct CodecArgs {
  int64_t x = 0, codes = 0, absmax = 0, book = 0;
  int64_t numel = 0;          // fp32 values in x
  int64_t codes_numel = 0;    // bytes of codes: numel, or numel / 2 for a 16-code book
  int64_t absmax_numel = 0;   // numel / block
  int64_t block = 0;
  bool dequantize = false;
};
// Checks the sizes and addresses of a codec call.
void check_codec(const CodecArgs& a);
void quantize_cpu(const CodecArgs& args);
#ifdef FASTOPT_WITH_CUDA
void nm_mask_cuda(const NMMaskArgs& args, int64_t stream);
void transposable_mask_cuda(const TransposableMaskArgs& args, int64_t stream);
// The optimizer steps take `ticket`: the address of an int32 counter, zero between calls, owned by the caller
// per (device, stream) (fastopt/_ops.py), with which the step counters' increment is folded into the main
// launches (StepFold, multi_tensor.cuh); 0: a separate increment launch, as before.
void adam_cuda(const AdamArgs& args, int64_t ticket, int64_t stream);
void elementwise_cuda(const ElementwiseArgs& args, int64_t ticket, int64_t stream);
void lowbit_cuda(const LowbitArgs& args, int64_t ticket, int64_t stream);
void quantize_cuda(const CodecArgs& args, int64_t stream);
#endif

}  // namespace fastopt
