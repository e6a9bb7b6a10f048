// fastopt._C -- pybind11 bindings of the torch-independent native ABI (see fastopt/api.h).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "fastopt/api.h"
#include "fastopt/flags.h"
#include "fastopt/ops.h"
#include "cpu/isa.h"
#ifndef FASTOPT_CUDA_ON_CPU
#include "cpu/probe.h"  // AdaHessian's probes (not in tests/_cuda_on_cpu_build.py's sources)
#endif
#include "cpu/saf.h"
#ifndef FASTOPT_CUDA_ON_CPU
#include "cpu/mfac.h"  // dense M-FAC's window passes (not in tests/_cuda_on_cpu_build.py's sources)
#endif
#ifndef FASTOPT_CUDA_ON_CPU
#include "cpu/lightsb.h"  // LightSB's fused pass (not in tests/_cuda_on_cpu_build.py's sources)
#endif
#ifndef FASTOPT_CUDA_ON_CPU
#include "cpu/select.h"  // magnitude selection (not in tests/_cuda_on_cpu_build.py's sources)
#endif
#ifndef FASTOPT_CUDA_ON_CPU
#include "cpu/wtacrs.h"  // WTA-CRS's row pass (not in tests/_cuda_on_cpu_build.py's sources)
#endif
#ifndef FASTOPT_CUDA_ON_CPU
#include "cpu/comm.h"  // fastopt.comm's comm-hook passes (not in tests/_cuda_on_cpu_build.py's sources)
namespace fastopt { void bind_comm(pybind11::module_& m); }  // csrc/cpu/comm_bind.cpp
#endif
#ifdef FASTOPT_CUDA_ON_CPU
#include <cuda_runtime.h>  // the CUDA-on-CPU layer: its launch counts
#endif

namespace py = pybind11;
using fastopt::AdamArgs;

namespace {

AdamArgs make_adam_args(std::vector<int64_t> ptrs, std::vector<int64_t> numels, std::vector<int64_t> steps,
                        int dtype, double lr, int64_t lr_ptr, double beta1, double beta2, double eps,
                        double weight_decay, bool decoupled, bool amsgrad, bool maximize,
                        int64_t grad_scale_ptr, int64_t found_inf_ptr) {
  AdamArgs a;
  a.lists.depth = amsgrad ? 5 : 4;
  a.lists.n = static_cast<int64_t>(ptrs.size()) / a.lists.depth;
  a.lists.ptrs = std::move(ptrs);
  a.lists.numels = std::move(numels);
  a.lists.dtype = dtype;
  a.steps = std::move(steps);
  a.hyper = {lr, beta1, beta2, eps, weight_decay};
  a.lr_ptr = lr_ptr;
  a.grad_scale_ptr = grad_scale_ptr;
  a.found_inf_ptr = found_inf_ptr;
  a.decoupled = decoupled;
  a.amsgrad = amsgrad;
  a.maximize = maximize;
  return a;
}

constexpr const char* kAdamDoc =
    "Fused multi-tensor Adam/AdamW step.  ptrs: addresses of params, grads, exp_avgs, exp_avg_sqs"
    "[, max_exp_avg_sqs], list after list; numels: the element count of every one of those tensors, in the "
    "same order (each must equal its param's); steps: addresses of the "
    "fp32 step counters (incremented unless found_inf is set); dtype: 0 fp32, 1 fp16, 2 bf16; "
    "lr_ptr/grad_scale_ptr/found_inf_ptr: addresses of fp32 scalars or 0.";

fastopt::ElementwiseArgs make_elementwise_args(std::string op, std::vector<int64_t> ptrs, std::vector<int64_t> numels,
                                               std::vector<int64_t> steps, int dtype, std::vector<double> hyper,
                                               int64_t flags, double lr, int64_t lr_ptr, int64_t grad_scale_ptr,
                                               int64_t found_inf_ptr, bool maximize, int phase,
                                               std::vector<int64_t> rows, int64_t row_coef_ptr,
                                               int64_t reduce_out_ptr, uint64_t seed, bool stochastic) {
  fastopt::ElementwiseArgs a;
  a.op = std::move(op);
  int states = 0, reduce = 0;
  a.lists.depth = fastopt::op_shape(a.op, &states, &reduce) ? 2 + states : 0;
  a.lists.n = a.lists.depth ? static_cast<int64_t>(ptrs.size()) / a.lists.depth : 0;
  a.lists.ptrs = std::move(ptrs);
  a.lists.numels = std::move(numels);
  a.lists.dtype = dtype;
  a.steps = std::move(steps);
  a.hyper = std::move(hyper);
  a.flags = flags;
  a.lr = lr;
  a.lr_ptr = lr_ptr;
  a.grad_scale_ptr = grad_scale_ptr;
  a.found_inf_ptr = found_inf_ptr;
  a.maximize = maximize;
  a.phase = phase;
  a.rows = std::move(rows);
  a.row_coef_ptr = row_coef_ptr;
  a.reduce_out_ptr = reduce_out_ptr;
  a.seed = seed;
  a.stochastic = stochastic;
  return a;
}

constexpr const char* kElementwiseDoc =
    "One call of a registered elementwise optimizer op (csrc/include/fastopt/ops.h).  ptrs: params, "
    "grads and the op's state lists, list after list; numels: the element count of each of those tensors "
    "(each must equal its param's); steps: fp32 step counters (phase 0 increments "
    "them unless found_inf is set); hyper: up to 16 op-defined values; phase 0 updates, phase 1 adds "
    "per-row sums into reduce_out (fp32 [rows, 4]); rows: rows per tensor or []; row_coef_ptr: fp32 "
    "[rows, 4] coefficients read by phase 0, or 0; seed/stochastic: stochastic rounding of bf16 params; "
    "sparse_mask/sparse_out/sparse_numels/sparse_lambda/sparse_beta: the sparse-training epilogue (uint8 "
    "masks and forward weights per tensor, or [] for none, and the numel of each; see fastopt/elementwise.h); "
    "sr_offsets: per tensor the index of its first element in the whole tensor (a shard's start), so that "
    "element i rounds stochastically as element sr_offsets[t] + i, or [] (all 0).";

void set_sparse(fastopt::ElementwiseArgs& a, std::vector<int64_t> mask, std::vector<int64_t> out,
                std::vector<int64_t> numels, double lambda, double beta) {
  a.sparse_mask = std::move(mask);
  a.sparse_out = std::move(out);
  a.sparse_numels = std::move(numels);
  a.sparse_lambda = lambda;
  a.sparse_beta = beta;
}

#define FASTOPT_ELEMENTWISE_PARAMS                                                                      \
  std::string op, std::vector<int64_t> ptrs, std::vector<int64_t> numels, std::vector<int64_t> steps,   \
      int dtype, std::vector<double> hyper, int64_t flags, double lr, int64_t lr_ptr,                   \
      int64_t grad_scale_ptr, int64_t found_inf_ptr, bool maximize, int phase, std::vector<int64_t> rows, \
      int64_t row_coef_ptr, int64_t reduce_out_ptr, uint64_t seed, bool stochastic
#define FASTOPT_ELEMENTWISE_ARGS                                                                        \
  make_elementwise_args(std::move(op), std::move(ptrs), std::move(numels), std::move(steps), dtype,     \
                        std::move(hyper), flags, lr, lr_ptr, grad_scale_ptr, found_inf_ptr, maximize,   \
                        phase, std::move(rows), row_coef_ptr, reduce_out_ptr, seed, stochastic)

// Argument names of the bindings above (Python may pass them by keyword; sr_offsets, last before the
// CUDA stream, may be left out on the CPU entry points: empty, i.e. every offset 0).  The CUDA optimizer steps
// take `ticket` before the stream: the address of an int32 counter, zero between calls, one per (device,
// stream), with which their launches increment the step counters themselves (fastopt/_ops.py), or 0.
#define FASTOPT_ELEMENTWISE_NAMES                                                                       \
  py::arg("op"), py::arg("ptrs"), py::arg("numels"), py::arg("steps"), py::arg("dtype"), py::arg("hyper"), \
      py::arg("flags"), py::arg("lr"), py::arg("lr_ptr"), py::arg("grad_scale_ptr"), py::arg("found_inf_ptr"), \
      py::arg("maximize"), py::arg("phase"), py::arg("rows"), py::arg("row_coef_ptr"), py::arg("reduce_out_ptr"), \
      py::arg("seed"), py::arg("stochastic")
#define FASTOPT_SPARSE_NAMES                                                                            \
  py::arg("sparse_mask"), py::arg("sparse_out"), py::arg("sparse_numels"), py::arg("sparse_lambda"),       \
      py::arg("sparse_beta")
#define FASTOPT_LOWBIT_NAMES                                                                            \
  py::arg("books"), py::arg("absmax"), py::arg("absmax_numels"), py::arg("block"), py::arg("colmax"),      \
      py::arg("colmax_numels"), py::arg("rank1_rows")

constexpr const char* kLowbitDoc =
    "One step of a registered elementwise op with low-bit states (csrc/include/fastopt/quant.h): the "
    "elementwise arguments (phase 0, no rows), then books: per state the address of its int32 codebook "
    "or 0 (a plain state of the params' dtype); absmax: per state and tensor (state-major) the address "
    "of its fp32 block maxima, 0 for plain states; absmax_numels: the numel of each; block: elements per "
    "block; colmax: per state and tensor the fp32 column maxima of a rank-1 normalized state (its absmax "
    "then holds the row maxima) or 0, or []; colmax_numels: the numel of each; rank1_rows: rows of each tensor's rank-1 view (CPU only); "
    "sr_offsets: as for the elementwise ops (a shard's first element in the whole tensor, per tensor, or []).  "
    "A quantized state's list holds its uint8 codes.";

constexpr const char* kQuantizeDoc =
    "Blockwise codec (x, codes, absmax, numel, codes_numel, absmax_numel, block, book, dequantize[, stream]) of "
    "one fp32 buffer of numel values: quantize x into codes (uint8; numel/2 bytes for a 16-code book) and "
    "absmax (fp32 [numel/block]), or dequantize them into x.";

fastopt::LowbitArgs make_lowbit_args(fastopt::ElementwiseArgs base, std::vector<int64_t> books,
                                     std::vector<int64_t> absmax, std::vector<int64_t> absmax_numels, int64_t block,
                                     std::vector<int64_t> colmax, std::vector<int64_t> colmax_numels,
                                     std::vector<int64_t> rank1_rows) {
  fastopt::LowbitArgs a;
  a.base = std::move(base);
  a.books = std::move(books);
  a.absmax = std::move(absmax);
  a.absmax_numels = std::move(absmax_numels);
  a.block = block;
  a.colmax = std::move(colmax);
  a.colmax_numels = std::move(colmax_numels);
  a.rank1_rows = std::move(rank1_rows);
  return a;
}

constexpr const char* kNMMaskDoc =
    "N:M mask (in, out, outer, len, inner, n, m, dtype[, stream]): in viewed as [outer, len, inner]; out (uint8) "
    "gets 1 for the n largest |x| of every m consecutive positions along len (NaN as +inf, ties to the lowest "
    "index).";
constexpr const char* kOtDoc =
    "Entropic-OT pass (x, y, cost_matrix, h, c, out, batch, n, m, d, cost, mode, eps, dtype) over B point clouds "
    "x (B, n, d), y (B, m, d) (or a dense cost (B, n, m), then x = y = 0): mode 0 writes out[b,i] = "
    "LSE_j(h[b,j] - C_ij / eps) (fp32), mode 1 writes out[b,i,:] = sum_j exp(c[b,i] + h[b,j] - C_ij / eps) dC_ij/dx_i, "
    "mode 2 writes the soft-minimum out[b,i] = -eps log(sum_j h[b,j] exp((c[b,j] - C_ij) / eps) / sum_j h[b,j]); "
    "cost 0 = |x - y|^2, 1 = |x - y|.";
constexpr const char* kTransposableMaskDoc =
    "Transposable 2:4 mask (in, out, rows, cols, dtype, exact[, stream]) of a [rows, cols] matrix: 2 kept per "
    "row and column of every 4x4 tile; exact = best of the 90 patterns, else greedy.";

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastopt native kernels (torch-independent ABI: raw addresses, sizes, dtype codes)";
#ifndef FASTOPT_CUDA_ON_CPU
  fastopt::bind_comm(m);  // comm_* (csrc/cpu/comm_bind.cpp)
#endif
#ifdef FASTOPT_CUDA_ON_CPU
  m.def("coc_launch_counts", [] { return fastopt_coc::launch_counts(); },
        "CUDA-on-CPU test build only: {kernel expression of FASTOPT_LAUNCH: launches} since the module loaded.");
#endif
#ifdef FASTOPT_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.def("cpu_isa", &fastopt::cpu::isa_name, "The CPU kernels' instruction set on this machine.");
#ifndef FASTOPT_CUDA_ON_CPU
  m.def(
      "probe_fill_cpu",
      [](std::vector<int64_t> out, std::vector<int64_t> numels, std::vector<int64_t> keys,
         std::vector<int64_t> offsets, int dtype) {
        py::gil_scoped_release nogil;
        fastopt::probe_fill_cpu(out, numels, keys, offsets, dtype);
      },
      "AdaHessian's Rademacher probes (csrc/cpu/probe.h): raw addresses; fastopt.optim.adahessian validates.");
  m.def(
      "probe_consume_cpu",
      [](std::vector<int64_t> hz, std::vector<int64_t> acc, std::vector<int64_t> numels, std::vector<int64_t> keys,
         std::vector<int64_t> offsets, int dtype, double scale, bool use_z, bool accumulate) {
        py::gil_scoped_release nogil;
        fastopt::probe_consume_cpu(hz, acc, numels, keys, offsets, dtype, scale, use_z, accumulate);
      },
      "AdaHessian's Hutchinson estimate from Hz (csrc/cpu/probe.h): raw addresses; fastopt.optim.adahessian "
      "validates.");
#endif
  m.def(
      "adam_cpu",
      [](std::vector<int64_t> ptrs, std::vector<int64_t> numels, std::vector<int64_t> steps, int dtype,
         double lr, int64_t lr_ptr, double beta1, double beta2, double eps, double weight_decay, bool decoupled,
         bool amsgrad, bool maximize, int64_t grad_scale_ptr, int64_t found_inf_ptr) {
        AdamArgs a = make_adam_args(std::move(ptrs), std::move(numels), std::move(steps), dtype, lr, lr_ptr,
                                    beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize,
                                    grad_scale_ptr, found_inf_ptr);
        py::gil_scoped_release nogil;
        fastopt::adam_cpu(a);
      },
      kAdamDoc);
  m.def(
      "elementwise_cpu",
      [](FASTOPT_ELEMENTWISE_PARAMS, std::vector<int64_t> sparse_mask, std::vector<int64_t> sparse_out,
         std::vector<int64_t> sparse_numels, double sparse_lambda, double sparse_beta, std::vector<int64_t> sr_offsets,
         int sparse_prune, std::vector<int64_t> sparse_keys, int64_t sparse_threshold) {
        fastopt::ElementwiseArgs a = FASTOPT_ELEMENTWISE_ARGS;
        set_sparse(a, std::move(sparse_mask), std::move(sparse_out), std::move(sparse_numels), sparse_lambda,
                   sparse_beta);
        a.sr_offsets = std::move(sr_offsets);
        a.sparse_prune = sparse_prune;  // prune-style unstructured sparsity (api.h)
        a.sparse_keys = std::move(sparse_keys);
        a.sparse_threshold = sparse_threshold;
        py::gil_scoped_release nogil;
        fastopt::elementwise_cpu(a);
      },
      kElementwiseDoc, FASTOPT_ELEMENTWISE_NAMES, FASTOPT_SPARSE_NAMES, py::arg("sr_offsets") = std::vector<int64_t>{},
      py::arg("sparse_prune") = 0, py::arg("sparse_keys") = std::vector<int64_t>{}, py::arg("sparse_threshold") = 0);
  m.def(
      "lowbit_cpu",
      [](FASTOPT_ELEMENTWISE_PARAMS, std::vector<int64_t> books, std::vector<int64_t> absmax,
         std::vector<int64_t> absmax_numels, int64_t block, std::vector<int64_t> colmax,
         std::vector<int64_t> colmax_numels, std::vector<int64_t> rank1_rows, std::vector<int64_t> sr_offsets) {
        fastopt::LowbitArgs a = make_lowbit_args(FASTOPT_ELEMENTWISE_ARGS, std::move(books), std::move(absmax),
                                                 std::move(absmax_numels), block, std::move(colmax),
                                                 std::move(colmax_numels), std::move(rank1_rows));
        a.base.sr_offsets = std::move(sr_offsets);
        py::gil_scoped_release nogil;
        fastopt::lowbit_cpu(a);
      },
      kLowbitDoc, FASTOPT_ELEMENTWISE_NAMES, FASTOPT_LOWBIT_NAMES, py::arg("sr_offsets") = std::vector<int64_t>{});
  m.def(
      "quantize_cpu",
      [](int64_t x, int64_t codes, int64_t absmax, int64_t numel, int64_t codes_numel, int64_t absmax_numel,
         int64_t block, int64_t book, bool dequantize) {
        fastopt::CodecArgs a{x, codes, absmax, book, numel, codes_numel, absmax_numel, block, dequantize};
        py::gil_scoped_release nogil;
        fastopt::quantize_cpu(a);
      },
      kQuantizeDoc);
  m.def(
      "nm_mask_cpu",
      [](int64_t in, int64_t out, int64_t outer, int64_t len, int64_t inner, int64_t n, int64_t m_, int dtype) {
        fastopt::NMMaskArgs a{in, out, outer, len, inner, n, m_, dtype};
        py::gil_scoped_release nogil;
        fastopt::nm_mask_cpu(a);
      },
      kNMMaskDoc);
  m.def(
      "ot_pass_cpu",
      [](int64_t x, int64_t y, int64_t cost_matrix, int64_t h, int64_t c, int64_t out, int64_t batch, int64_t n,
         int64_t m_, int64_t d, int cost, int mode, double eps, int dtype) {
        fastopt::OtArgs a{x, y, cost_matrix, h, c, out, batch, n, m_, d, cost, mode, eps, dtype};
        py::gil_scoped_release nogil;
        fastopt::ot_pass_cpu(a);
      },
      kOtDoc);
  m.def(
      "saf_cpu",
      [](int64_t logits, int logits_dtype, int64_t indices, int64_t bank, int bank_dtype, int64_t row_kl,
         int64_t grad, int64_t rows, int64_t n, int64_t classes, int64_t slots, int64_t read_slot,
         int64_t write_slot, bool active, double inv_temp, double grad_scale, int64_t loss, double loss_scale) {
        fastopt::SafArgs a;
        a.logits = logits; a.indices = indices; a.bank = bank; a.row_kl = row_kl; a.grad = grad;
        a.loss = loss; a.loss_scale = loss_scale;
        a.logits_dtype = logits_dtype; a.bank_dtype = bank_dtype;
        a.rows = rows; a.n = n; a.classes = classes; a.slots = slots;
        a.read_slot = read_slot; a.write_slot = write_slot; a.active = active;
        a.inv_temp = inv_temp; a.grad_scale = grad_scale;
        py::gil_scoped_release nogil;
        fastopt::saf_cpu(a);
      },
      "The fused SAF pass (csrc/cpu/saf.h): raw addresses; the caller (fastopt.sharpness.saf) validates.");
#ifndef FASTOPT_CUDA_ON_CPU  // (tests/_cuda_on_cpu_build.py does not compile csrc/cpu/lightsb*.cpp)
  m.def(
      "lightsb_cpu",
      [](int64_t pts, int64_t coords, int64_t la, int64_t cen, int64_t sig, int64_t out, int64_t row_w,
         int64_t dpts, int64_t dcoords, int64_t dla, int64_t dcen, int64_t dsig, int64_t n, int64_t k, int64_t d,
         int mode, double eps, double w_scale) {
        fastopt::LightSbArgs a;
        a.pts = pts; a.coords = coords; a.la = la; a.cen = cen; a.sig = sig; a.out = out; a.row_w = row_w;
        a.dpts = dpts; a.dcoords = dcoords; a.dla = dla; a.dcen = dcen; a.dsig = dsig;
        a.n = n; a.k = k; a.d = d; a.mode = mode; a.eps = eps; a.w_scale = w_scale;
        py::gil_scoped_release nogil;
        fastopt::lightsb_cpu(a);
      },
      "The fused LightSB pass (csrc/cpu/lightsb.h): raw addresses; the caller (fastopt.ot.lightsb) validates.");
#endif
#ifndef FASTOPT_CUDA_ON_CPU  // (tests/_cuda_on_cpu_build.py does not compile csrc/cpu/wtacrs*.cpp)
  m.def(
      "wtacrs_rows_cpu",
      [](int64_t src, int dtype, int64_t rows, int64_t cols, int64_t pos, int64_t weight, int64_t out, int64_t k,
         int64_t gnorm, int64_t norms) {
        fastopt::WtacrsArgs a;
        a.src = src; a.dtype = dtype; a.rows = rows; a.cols = cols; a.pos = pos; a.weight = weight; a.out = out;
        a.k = k; a.gnorm = gnorm; a.norms = norms;
        py::gil_scoped_release nogil;
        fastopt::wtacrs_rows_cpu(a);
      },
      "The WTA-CRS row pass (csrc/cpu/wtacrs.h): raw addresses; the caller (fastopt.nn.wtacrs) validates.");
#endif
#ifndef FASTOPT_CUDA_ON_CPU  // (tests/_cuda_on_cpu_build.py does not compile csrc/cpu/select.cpp)
  m.def(
      "magnitude_select_cpu",
      [](std::vector<int64_t> ptrs, std::vector<int64_t> numels, std::vector<int> dtypes, std::vector<int64_t> groups,
         std::vector<int64_t> counts, int64_t thresholds, std::vector<int64_t> masks) {
        fastopt::SelectArgs a;
        a.ptrs = std::move(ptrs); a.numels = std::move(numels); a.dtypes = std::move(dtypes);
        a.groups = std::move(groups); a.counts = std::move(counts); a.thresholds = thresholds;
        a.masks = std::move(masks);
        py::gil_scoped_release nogil;
        fastopt::magnitude_select_cpu(a);
      },
      "Magnitude selection (csrc/cpu/select.h): raw addresses; fastopt/_ops.py magnitude_select_ validates.");
#endif
#ifndef FASTOPT_CUDA_ON_CPU  // (tests/_cuda_on_cpu_build.py does not compile csrc/cpu/mfac*.cpp)
  m.def(
      "mfac_dots_cpu",
      [](int64_t window, int64_t rows, int64_t ld, int64_t nrows, int64_t slot, int gdtype,
         std::vector<int64_t> params, std::vector<int64_t> grads, std::vector<int64_t> numels, double wd_l2,
         int64_t dots_x, int64_t dots_k) {
        fastopt::MfacArgs a;
        a.window = window; a.rows = rows; a.ld = ld; a.nrows = nrows; a.slot = slot; a.gdtype = gdtype;
        a.params = std::move(params); a.grads = std::move(grads); a.numels = std::move(numels);
        a.wd_l2 = wd_l2; a.dots_x = dots_x; a.dots_k = dots_k;
        py::gil_scoped_release nogil;
        fastopt::mfac_dots_cpu(a);
      },
      "Dense M-FAC pass 1 (csrc/cpu/mfac.h): raw addresses; fastopt/_ops.py mfac_dots_ validates.");
  m.def(
      "mfac_update_cpu",
      [](int64_t window, int64_t rows, int64_t ld, int64_t nrows, int gdtype, std::vector<int64_t> params,
         std::vector<int64_t> grads, std::vector<int64_t> numels, std::vector<int64_t> momentum, int64_t coef,
         double wd_l2, double damp, double momentum_coef, double lr, double wd_decoupled) {
        fastopt::MfacArgs a;
        a.window = window; a.rows = rows; a.ld = ld; a.nrows = nrows; a.gdtype = gdtype;
        a.params = std::move(params); a.grads = std::move(grads); a.numels = std::move(numels);
        a.momentum = std::move(momentum); a.coef = coef; a.wd_l2 = wd_l2; a.damp = damp;
        a.momentum_coef = momentum_coef; a.lr = lr; a.wd_decoupled = wd_decoupled;
        py::gil_scoped_release nogil;
        fastopt::mfac_update_cpu(a);
      },
      "Dense M-FAC pass 2 (csrc/cpu/mfac.h): raw addresses; fastopt/_ops.py mfac_update_ validates.");
#endif
  m.def(
      "transposable_mask_cpu",
      [](int64_t in, int64_t out, int64_t rows, int64_t cols, int dtype, bool exact) {
        fastopt::TransposableMaskArgs a{in, out, rows, cols, dtype, exact};
        py::gil_scoped_release nogil;
        fastopt::transposable_mask_cpu(a);
      },
      kTransposableMaskDoc);
  m.def("op_shape", [](const std::string& op) {
    int states = 0, reduce = 0;
    if (!fastopt::op_shape(op, &states, &reduce)) throw std::invalid_argument("fastopt: unknown op '" + op + "'");
    return py::make_tuple(states, reduce);
  }, "(state lists, reduce sums) of a registered elementwise op.");
  m.def("op_registry", []() {
    py::dict out;
#define FASTOPT_OP_ENTRY(name, Type) out[name] = py::make_tuple(Type::kStates, Type::kReduce);
    FASTOPT_FOR_EACH_OP(FASTOPT_OP_ENTRY)
#undef FASTOPT_OP_ENTRY
    return out;
  }, "{op name: (state lists, reduce sums)} of every registered elementwise op (FASTOPT_FOR_EACH_OP); "
     "tests/test_opspec.py checks it against fastopt/_opspec.py.");
  m.def("flag_bits", []() {
    py::dict out;
#define FASTOPT_FLAG_ENTRY(name, value) out[name] = static_cast<int64_t>(fastopt::value);
    FASTOPT_FOR_EACH_FLAG(FASTOPT_FLAG_ENTRY)
#undef FASTOPT_FLAG_ENTRY
    return out;
  }, "{flag name: bit} of csrc/include/fastopt/flags.h.");
#ifdef FASTOPT_WITH_CUDA
  m.def(
      "adam_cuda",
      [](std::vector<int64_t> ptrs, std::vector<int64_t> numels, std::vector<int64_t> steps, int dtype,
         double lr, int64_t lr_ptr, double beta1, double beta2, double eps, double weight_decay, bool decoupled,
         bool amsgrad, bool maximize, int64_t grad_scale_ptr, int64_t found_inf_ptr, int64_t ticket,
         int64_t stream) {
        AdamArgs a = make_adam_args(std::move(ptrs), std::move(numels), std::move(steps), dtype, lr, lr_ptr,
                                    beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize,
                                    grad_scale_ptr, found_inf_ptr);
        py::gil_scoped_release nogil;
        fastopt::adam_cuda(a, ticket, stream);
      },
      kAdamDoc);
  m.def(
      "elementwise_cuda",
      [](FASTOPT_ELEMENTWISE_PARAMS, std::vector<int64_t> sparse_mask, std::vector<int64_t> sparse_out,
         std::vector<int64_t> sparse_numels, double sparse_lambda, double sparse_beta, std::vector<int64_t> sr_offsets,
         int sparse_prune, std::vector<int64_t> sparse_keys, int64_t sparse_threshold, int64_t ticket, int64_t stream) {
        fastopt::ElementwiseArgs a = FASTOPT_ELEMENTWISE_ARGS;
        set_sparse(a, std::move(sparse_mask), std::move(sparse_out), std::move(sparse_numels), sparse_lambda,
                   sparse_beta);
        a.sr_offsets = std::move(sr_offsets);
        a.sparse_prune = sparse_prune;  // prune-style unstructured sparsity (api.h)
        a.sparse_keys = std::move(sparse_keys);
        a.sparse_threshold = sparse_threshold;
        py::gil_scoped_release nogil;
        fastopt::elementwise_cuda(a, ticket, stream);
      },
      kElementwiseDoc, FASTOPT_ELEMENTWISE_NAMES, FASTOPT_SPARSE_NAMES, py::arg("sr_offsets"), py::arg("sparse_prune"),
      py::arg("sparse_keys"), py::arg("sparse_threshold"), py::arg("ticket"), py::arg("stream"));
  m.def(
      "lowbit_cuda",
      [](FASTOPT_ELEMENTWISE_PARAMS, std::vector<int64_t> books, std::vector<int64_t> absmax,
         std::vector<int64_t> absmax_numels, int64_t block, std::vector<int64_t> colmax,
         std::vector<int64_t> colmax_numels, std::vector<int64_t> rank1_rows, std::vector<int64_t> sr_offsets,
         int64_t ticket, int64_t stream) {
        fastopt::LowbitArgs a = make_lowbit_args(FASTOPT_ELEMENTWISE_ARGS, std::move(books), std::move(absmax),
                                                 std::move(absmax_numels), block, std::move(colmax),
                                                 std::move(colmax_numels), std::move(rank1_rows));
        a.base.sr_offsets = std::move(sr_offsets);
        py::gil_scoped_release nogil;
        fastopt::lowbit_cuda(a, ticket, stream);
      },
      kLowbitDoc, FASTOPT_ELEMENTWISE_NAMES, FASTOPT_LOWBIT_NAMES, py::arg("sr_offsets"), py::arg("ticket"),
      py::arg("stream"));
  m.def(
      "nm_mask_cuda",
      [](int64_t in, int64_t out, int64_t outer, int64_t len, int64_t inner, int64_t n, int64_t m_, int dtype,
         int64_t stream) {
        fastopt::NMMaskArgs a{in, out, outer, len, inner, n, m_, dtype};
        py::gil_scoped_release nogil;
        fastopt::nm_mask_cuda(a, stream);
      },
      kNMMaskDoc);
  m.def(
      "transposable_mask_cuda",
      [](int64_t in, int64_t out, int64_t rows, int64_t cols, int dtype, bool exact, int64_t stream) {
        fastopt::TransposableMaskArgs a{in, out, rows, cols, dtype, exact};
        py::gil_scoped_release nogil;
        fastopt::transposable_mask_cuda(a, stream);
      },
      kTransposableMaskDoc);
  m.def(
      "quantize_cuda",
      [](int64_t x, int64_t codes, int64_t absmax, int64_t numel, int64_t codes_numel, int64_t absmax_numel,
         int64_t block, int64_t book, bool dequantize, int64_t stream) {
        fastopt::CodecArgs a{x, codes, absmax, book, numel, codes_numel, absmax_numel, block, dequantize};
        py::gil_scoped_release nogil;
        fastopt::quantize_cuda(a, stream);
      },
      kQuantizeDoc);
  m.def(
      "saf_cuda",
      [](int64_t logits, int logits_dtype, int64_t indices, int64_t bank, int bank_dtype, int64_t row_kl,
         int64_t grad, int64_t rows, int64_t n, int64_t classes, int64_t slots, int64_t read_slot,
         int64_t write_slot, bool active, double inv_temp, double grad_scale, int64_t stream) {
        fastopt::SafArgs a;
        a.logits = logits; a.indices = indices; a.bank = bank; a.row_kl = row_kl; a.grad = grad;
        a.logits_dtype = logits_dtype; a.bank_dtype = bank_dtype;
        a.rows = rows; a.n = n; a.classes = classes; a.slots = slots;
        a.read_slot = read_slot; a.write_slot = write_slot; a.active = active;
        a.inv_temp = inv_temp; a.grad_scale = grad_scale;
        py::gil_scoped_release nogil;
        fastopt::saf_cuda(a, stream);
      },
      "The fused SAF pass on CUDA (csrc/cuda/saf.cu): raw addresses; fastopt.sharpness.saf validates.");
#endif
}
