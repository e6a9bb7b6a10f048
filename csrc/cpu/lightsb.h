// The fused Light Schrödinger Bridge pass (fastopt.ot.LightSB; Korotin, Gushchin, Burnaev, ICLR 2024):
// per row i of N points, the log-sum-exp over K mixture components of one of the two LightSB logits,
//   mode 0 (log c(x)):  a_ik = la_k + (sum_j sig_kj q_ikj^2 + 2 sum_j cen_kj x_ij) / (2 eps)
//   mode 1 (log v(y)):  a_ik = la_k - sum_j sig_kj (q_ikj - cen_kj)^2 / (2 eps)
// with q_ik = pts_i (diagonal S: coords == 0) or q_ik = coords[i, k] (full S: the rotated coordinates
// R_k^T x_i, computed by the caller), and, when `grad`, the gradient of sum_i g_i out_i (g_i = row_w[i],
// or w_scale for every row when row_w == 0) with respect to pts, coords, la, cen and sig.
//   pts     (n, d) fp32                 coords (n, k, d) fp32 or 0
//   la, cen, sig (k,), (k, d), (k, d) fp32
//   out     (n,) fp32                   out_i = LSE_k a_ik (an online log-sum-exp over component tiles)
//   dpts    (n, d) fp32 or 0            dcoords (n, k, d) fp32 or 0 (full S only)
//   dla, dcen, dsig (k,), (k, d), (k, d) fp32 or 0 (all three or none): reduced over rows in fixed
//                                       blocks (the same bits whatever the number of threads)
#pragma once

#include <cstdint>

#include "fastopt/api.h"

namespace fastopt {

struct LightSbArgs {
  int64_t pts = 0, coords = 0, la = 0, cen = 0, sig = 0, out = 0, row_w = 0;
  int64_t dpts = 0, dcoords = 0, dla = 0, dcen = 0, dsig = 0;
  int64_t n = 0, k = 0, d = 0;
  int mode = 0;
  double eps = 1.0, w_scale = 1.0;
};

inline void check_lightsb_args(const LightSbArgs& a) {
  check_arg(a.n >= 0 && a.k >= 1 && a.d >= 1, "lightsb: need n >= 0, k >= 1, d >= 1");
  check_arg(a.mode == 0 || a.mode == 1, "lightsb: mode must be 0 (log c) or 1 (log v)");
  check_arg(a.eps > 0.0, "lightsb: eps must be > 0");
  const bool params = a.dla != 0, any = a.dcen != 0 || a.dsig != 0;
  check_arg(params == (a.dcen != 0) && params == (a.dsig != 0) && (params || !any),
            "lightsb: dla, dcen and dsig are given together");
  check_arg(a.dcoords == 0 || a.coords != 0, "lightsb: dcoords needs coords");
}

void lightsb_cpu(const LightSbArgs& args);

}  // namespace fastopt
