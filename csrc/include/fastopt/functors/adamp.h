// fastopt/functors/adamp.h -- AdamP and SGDP (Heo et al., "AdamP: Slowing Down the Slowdown for
// Momentum Optimizers on Scale-invariant Weights", ICLR 2021), semantics of pytorch_optimizer
// (fastopt/reference/adamp.py).  Called with rows = p.shape[0] for tensors of 2+ dimensions.
//
// phase 1 (reduce): update the moments, form the direction d;
//                   per row acc = (g.p, g.g, p.p, p.d)
// (wrapper)         cosine tests per row (channel view) and per tensor (layer view); per row
//                   rc[0] = den, rc[1] = radial (0 where not projected), rc[2] = decay factor
// phase 0 (update): recompute d from the stored moments;  d -= (p / den) radial;
//                   p = p * decay - step d
// With use_gc (kUseGc) both phases first take g <- g - rc[3] (rc[3] = the row mean of g,
// from the grad_rowsum op's pass).
// With cautious (kCautious; not with use_gc, whose rc[3] it would need): the numerator m is
// masked as pytorch_optimizer's apply_cautious, m [m g > 0] scale, scale = numel / (count + 1) per
// tensor.  Phase 1 then sums (g.p, g.g, p.p, count) -- the moments updated, the count of m g > 0 in
// place of p.d; kCautiousPd marks a second reduce pass that sums only p.d (moments as stored, the scale
// in rc[3]); phase 0 reads the scale from rc[3] too.
// ("adamp_flat" / "sgdp_flat": 0-/1-D tensors in one pass, see ProjectedOp's FLAT)
//
// AdamP: m = lerp(m, g, 1-b1); v = b2 v + (1-b2) g^2;
//        d = (nesterov ? lerp(m, g, 1-b1) : m) * ((1 / (sqrt(v) + eps)) * sqrt(1-b2^t));
//        step = lr / (1-b1^t) (lr with adam_debias).
// SGDP:  buf = momentum buf + (1-dampening) g;  d = nesterov ? momentum buf + g : buf;  step = lr.
// Hyperparameters, states and flags: OPS["adamp"], OPS["sgdp"] (and the _flat variants) in
// fastopt/_opspec.py.
#pragma once

#include <cmath>

#include "fastopt/elementwise.h"
#include "fastopt/functors/decay.h"

namespace fastopt {
namespace functors {

// torch.lerp(a, b, w) for a scalar weight: two formulas, picked by w < 0.5.
struct Lerp {
  float w, one_minus_w;
  bool high;
};
FASTOPT_HOST_DEVICE Lerp make_lerp(double w) {
  return Lerp{static_cast<float>(w), static_cast<float>(1.0 - w), w >= 0.5};
}
FASTOPT_HOST_DEVICE float lerp(float a, float b, const Lerp& l) {
  const float lo = a + l.w * (b - a);
  const float hi = b - (b - a) * l.one_minus_w;
  return l.high ? hi : lo;
}

// FLAT: the one-pass variant for tensors that are never projected (fewer than two dimensions):
// phase 0 updates the moments itself, then steps with rc = (1, 0, decay); no reduce pass.

template <typename Dir, bool FLAT>
struct ProjectedOp {
  static constexpr int kStates = Dir::kStates;
  static constexpr int kReduce = FLAT ? 0 : 4;  // FLAT: never called with phase 1
  using Coeffs = typename Dir::Coeffs;

  FASTOPT_HOST_DEVICE static Coeffs coeffs(const OpScalars& s) { return Dir::coeffs(s); }

  FASTOPT_HOST_DEVICE static void reduce(float p, float g, float (&s)[kMaxStates], const Coeffs& c,
                                         const float* rc, float (&acc)[kMaxReduce]) {
    g = g - c.gc * rc[3];  // gradient centralization (AdamP's use_gc): the row mean
    if (c.cautious_pd) {   // the cautious second pass: p.d with the stored moments
      acc[3] += p * Dir::direction(g, s, c, rc[3]);
      return;
    }
    Dir::moments(g, s, c);
    acc[0] += g * p;
    acc[1] += g * g;
    acc[2] += p * p;
    acc[3] += c.cautious ? (s[0] * g > 0.0f ? 1.0f : 0.0f) : p * Dir::direction(g, s, c, 1.0f);
  }

  FASTOPT_HOST_DEVICE static void update(float& p, float g, float (&s)[kMaxStates], const Coeffs& c, const float* rc) {
    g = g - c.gc * rc[3];
    if (FLAT) Dir::moments(g, s, c);
    const float d = Dir::direction(g, s, c, c.cautious ? rc[3] : 1.0f) - (p / rc[0]) * rc[1];
    p = p * rc[2] - c.step * d;
  }
};

struct AdamPDir {
  static constexpr int kStates = 2;  // exp_avg, exp_avg_sq
  struct Coeffs {
    Lerp lerp1;
    float b2, omb2, eps, bc2_sqrt, step, gc;
    bool nesterov, cautious, cautious_pd;
  };
  FASTOPT_HOST_DEVICE static Coeffs coeffs(const OpScalars& s) {
    const double b1 = s.h[0], b2 = s.h[1];
    Coeffs c;
    c.lerp1 = make_lerp(1.0 - b1);
    c.b2 = static_cast<float>(b2);
    c.omb2 = static_cast<float>(1.0 - b2);
    c.eps = static_cast<float>(s.h[2]);
    c.bc2_sqrt = static_cast<float>(sqrt(1.0 - pow(b2, s.step)));
    c.step = static_cast<float>((s.flags & kAdamDebias) ? s.lr : s.lr / (1.0 - pow(b1, s.step)));
    c.nesterov = (s.flags & kNesterov) != 0;
    c.gc = (s.flags & kUseGc) ? 1.0f : 0.0f;
    c.cautious = (s.flags & kCautious) != 0;
    c.cautious_pd = (s.flags & kCautiousPd) != 0;
    return c;
  }
  FASTOPT_HOST_DEVICE static void moments(float g, float (&s)[kMaxStates], const Coeffs& c) {
    s[0] = lerp(s[0], g, c.lerp1);
    s[1] = c.b2 * s[1] + c.omb2 * g * g;
  }
  // scale: the cautious mask's numel / (count + 1) (with c.cautious), else unused
  FASTOPT_HOST_DEVICE static float direction(float g, const float (&s)[kMaxStates], const Coeffs& c, float scale) {
    float m = s[0];
    if (c.cautious) m = m * (m * g > 0.0f ? scale : 0.0f);
    const float num = c.nesterov ? lerp(m, g, c.lerp1) : m;
    return num * ((1.0f / (sqrtf(s[1]) + c.eps)) * c.bc2_sqrt);
  }
};

struct SgdPDir {
  static constexpr int kStates = 1;  // momentum
  struct Coeffs {
    float momentum, one_minus_dampening, step, gc;
    bool nesterov, cautious, cautious_pd;
  };
  FASTOPT_HOST_DEVICE static Coeffs coeffs(const OpScalars& s) {
    Coeffs c;
    c.momentum = static_cast<float>(s.h[0]);
    c.one_minus_dampening = static_cast<float>(1.0 - s.h[1]);
    c.step = static_cast<float>(s.lr);
    c.nesterov = (s.flags & kNesterov) != 0;
    c.gc = 0.0f;  // SGDP has neither use_gc nor cautious (pytorch_optimizer's SGDP drops them)
    c.cautious = c.cautious_pd = false;
    return c;
  }
  FASTOPT_HOST_DEVICE static void moments(float g, float (&s)[kMaxStates], const Coeffs& c) {
    s[0] = s[0] * c.momentum + c.one_minus_dampening * g;
  }
  FASTOPT_HOST_DEVICE static float direction(float g, const float (&s)[kMaxStates], const Coeffs& c, float) {
    return c.nesterov ? s[0] * c.momentum + g : s[0];
  }
};

using AdamPOp = ProjectedOp<AdamPDir, false>;
using SgdPOp = ProjectedOp<SgdPDir, false>;
using AdamPFlatOp = ProjectedOp<AdamPDir, true>;
using SgdPFlatOp = ProjectedOp<SgdPDir, true>;

}  // namespace functors
}  // namespace fastopt
