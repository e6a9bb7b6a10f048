// pybind11 bindings of the comm-hook passes (csrc/cpu/comm.h); registered by csrc/bindings.cpp.
// Raw addresses only: fastopt/comm/_kernels.py validates every tensor before it calls these.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "comm.h"

namespace py = pybind11;

namespace fastopt {

void bind_comm(py::module_& m) {
  m.def(
      "comm_psgd_pre",
      [](int64_t x, int64_t e, int64_t n, int64_t mem, std::vector<int64_t> off, std::vector<int64_t> len) {
        py::gil_scoped_release nogil;
        comm_psgd_pre(x, e, n, mem, off, len);
      },
      "PowerSGD: x += e, e = x (e == 0: skipped), mem = the segments (off, len) of x gathered.");
  m.def(
      "comm_psgd_scatter",
      [](int64_t x, int64_t mem, std::vector<int64_t> off, std::vector<int64_t> len, double world) {
        py::gil_scoped_release nogil;
        comm_psgd_scatter(x, mem, off, len, world);
      },
      "PowerSGD: the segments (off, len) of x = the gathered mem / world.");
  m.def(
      "comm_psgd_error",
      [](int64_t x, int64_t e, int64_t n) {
        py::gil_scoped_release nogil;
        comm_psgd_error(x, e, n);
      },
      "PowerSGD: e = e - x.");
  m.def(
      "comm_topk_compress",
      [](int64_t g, int64_t e, int64_t n, int64_t k, int64_t vals, int64_t idx, int phase, bool zero_g) {
        py::gil_scoped_release nogil;
        return comm_topk_compress(g, e, n, k, vals, idx, phase, zero_g);
      },
      "Top-k: x = g + e, the k largest |x| into vals/idx, e = x - sent, g = 0 (see csrc/cpu/comm.h).");
  m.def(
      "comm_topk_decompress",
      [](int64_t out, int64_t n, int64_t vals, int64_t idx, int64_t k, int64_t rank_stride, int64_t world) {
        py::gil_scoped_release nogil;
        comm_topk_decompress(out, n, vals, idx, k, rank_stride, world);
      },
      "Top-k: out[idx_r] += vals_r over the ranks, then the touched entries / world.");
  m.def(
      "comm_qsgd_compress",
      [](int64_t g, int64_t e, int64_t n, int64_t chunk, int bits, uint32_t key, int64_t norms, int64_t mags,
         int64_t signs, int phase, bool feedback) {
        py::gil_scoped_release nogil;
        comm_qsgd_compress(g, e, n, chunk, bits, key, norms, mags, signs, phase, feedback);
      },
      "QSGD: x = g + e, chunk norms, stochastic codes packed, e = x - sent (see csrc/cpu/comm.h).");
  m.def(
      "comm_qsgd_decompress",
      [](int64_t out, int64_t n, int64_t chunk, int bits, int64_t base, int64_t rank_stride, int64_t norms_off,
         int64_t mags_off, int64_t signs_off, int64_t world) {
        py::gil_scoped_release nogil;
        comm_qsgd_decompress(out, n, chunk, bits, base, rank_stride, norms_off, mags_off, signs_off, world);
      },
      "QSGD: out = the ranks' dequantized codes summed in rank order, / world.");
}

}  // namespace fastopt
