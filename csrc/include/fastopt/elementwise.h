// fastopt/elementwise.h -- the generic elementwise optimizer op, shared by the CPU and CUDA launchers.
//
// An optimizer rule is a struct `Op` (see functors/lion.h for the smallest one):
//
//   static constexpr int kStates;     // per-element state tensors (0..kMaxStates), after params, grads
//   static constexpr int kReduce;     // sums accumulated by the reduce phase (0: the op has none)
//   struct Coeffs;                    // per-tensor (per-row) coefficients, computed once per chunk
//   static Coeffs coeffs(const OpScalars&);
//   static void update(float& p, float g, float (&s)[kMaxStates], const Coeffs&, const float* rc);
//   static void reduce(float p, float g, float (&s)[kMaxStates], const Coeffs&, const float* rc,
//                      float (&acc)[kMaxReduce]);
//
// `update` is phase 0: the step itself.  Ops whose step needs per-tensor or per-row statistics
// (LAMB's trust ratio, AdamP's projection, SGD-SaI's g-SNR, a global-norm clip) first run phase 1:
// `reduce` may update the states and adds up to kMaxReduce values per element into per-row sums;
// the Python wrapper turns those sums into row coefficients, which phase 0's `update` gets as `rc`
// (kMaxRowCoefs floats of the element's row; a zero row when the call has no coefficients).  Phase 1's
// `reduce` gets the row coefficients of its call the same way (so a second reduce pass can use the
// sums of a first: gradient centralization's row means, then the cautious mask's count).  A "row" is
// tensor-local: a tensor of `rows` rows has numel/rows elements per row (one row per tensor unless the
// caller says otherwise).
//
// Everything is fp32 in registers; storage may be fp32, fp16 or bf16.  bf16 params may be stored with
// stochastic rounding (seeded, counter-based: the same bits on every backend, see sr_bits).
#pragma once

#include <cmath>
#include <cstdint>

#include "fastopt/common.h"

namespace fastopt {

constexpr int kMaxHyper = 16;
constexpr int kMaxStates = 4;
constexpr int kMaxReduce = 4;
constexpr int kMaxRowCoefs = 4;

struct OpScalars {
  const double* h;   // kMaxHyper hyperparameters, meaning fixed by the op
  int64_t flags;     // op-defined bits
  double lr;
  double step;       // the step count after this step (state step + 1)
};

// 32-bit integer hash (the murmur3 finalizer); identical in C++ and Triton.
FASTOPT_HOST_DEVICE uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

// The per-(tensor, step) key of the stochastic-rounding stream.
FASTOPT_HOST_DEVICE uint32_t sr_key(uint32_t seed, uint32_t tensor, uint32_t step) {
  return fmix32(seed ^ fmix32(tensor * 0x27D4EB2Fu + step * 0x165667B1u));
}

// Random bits for element i: the low 32 bits of its index in the whole tensor, i.e. of the call's
// sr_offset for the tensor (where a shard starts: api.h ElementwiseArgs::sr_offsets) plus its index
// in the tensor the kernel gets.  So a tensor stepped whole or as contiguous pieces rounds alike.
FASTOPT_HOST_DEVICE uint32_t sr_bits(uint32_t key, uint32_t i) { return fmix32(i * 0x9E3779B1u ^ key); }

// Unstructured random sparsity (fastopt.sparse.RandomSparsity; reference: fastopt/reference/unstructured.py):
// element j of a whole tensor (low 32 bits) is kept when its hash under the tensor's mask key is below
// `threshold` (floor(density * 2^32)): no mask is stored, and a shard (sr_offsets) draws its part of the
// whole tensor's mask.  The key comes from (seed, the parameter's index in the optimizer): prune_key.
FASTOPT_HOST_DEVICE uint32_t prune_key(uint32_t seed, uint32_t index) {
  return fmix32(seed ^ fmix32((index * 0x61C88647u) ^ 0x5BD1E995u));
}
FASTOPT_HOST_DEVICE bool prune_keep(uint32_t key, uint32_t j, uint32_t threshold) {
  return sr_bits(key, j) < threshold;
}

// fp32 -> bf16 with stochastic rounding: add 16 random bits below the kept mantissa, truncate.
// Non-finite values round to nearest (inf stays inf, NaN stays NaN).
FASTOPT_HOST_DEVICE bf16_t bf16_stochastic(float f, uint32_t rnd) {
  const uint32_t u = float_bits(f);
  if ((u & 0x7F800000u) == 0x7F800000u) return bf16_from_float(f);
  bf16_t r;
  r.x = static_cast<uint16_t>((u + (rnd & 0xFFFFu)) >> 16);
  return r;
}

template <typename T>
FASTOPT_HOST_DEVICE T store_param(float f, bool stochastic, uint32_t key, uint32_t i) {
  return from_float<T>(f);
}
template <>
FASTOPT_HOST_DEVICE bf16_t store_param<bf16_t>(float f, bool stochastic, uint32_t key, uint32_t i) {
  return stochastic ? bf16_stochastic(f, sr_bits(key, i)) : bf16_from_float(f);
}

// One element of every list: load, convert, Op::update, convert, store.  `ptr` = params, grads,
// then the states; `grad_mul` = (maximize ? -1 : 1) / grad_scale; `i` indexes the tensor; the
// stochastic-rounding bits are those of element `sr_offset + i` (low 32 bits) of stream `key`.
//
// SPARSE adds the sparse-training epilogue (fastopt.sparse.NMSparsity), with `p` the dense weight:
// where `mask[i]` is 0 (pruned in the forward that produced g) the gradient gets `lambda * p` (SR-STE;
// nothing is added when lambda is 0); SPARSE == 2 also writes the forward weight: out = p where
// kept, beta * p where pruned (exactly +0 when beta is 0), from the stored p.  (Selects, not
// branches, so that the CPU loops vectorize.)
//
// SPARSE 3 and 4 are prune-style unstructured sparsity (fastopt.sparse.MagnitudeSparsity /
// RandomSparsity): `p` holds the sparse weights themselves; where an element is pruned, the param and
// every state are written 0 (its gradient is unused).  3: pruned where `mask[i]` is 0; 4: pruned where
// prune_keep(mask_key, sr_offset + i, mask_threshold) is false (no mask in memory).
template <typename Op, typename T, int SPARSE = 0>
FASTOPT_HOST_DEVICE void op_update_element(T* __restrict__ p, const T* __restrict__ g, T* __restrict__ s0,
                                           T* __restrict__ s1, T* __restrict__ s2, T* __restrict__ s3,
                                           int64_t i, float grad_mul, const typename Op::Coeffs& c,
                                           const float* rc, bool stochastic, uint32_t key, uint32_t sr_offset,
                                           const uint8_t* __restrict__ mask = nullptr, T* __restrict__ out = nullptr,
                                           float lambda = 0.0f, float beta = 0.0f, uint32_t mask_key = 0,
                                           uint32_t mask_threshold = 0) {
  float st[kMaxStates] = {0.0f, 0.0f, 0.0f, 0.0f};
  if (Op::kStates > 0) st[0] = to_float(s0[i]);
  if (Op::kStates > 1) st[1] = to_float(s1[i]);
  if (Op::kStates > 2) st[2] = to_float(s2[i]);
  if (Op::kStates > 3) st[3] = to_float(s3[i]);
  float pf = to_float(p[i]);
  float gf = to_float(g[i]) * grad_mul;
  bool keep = true;
  if (SPARSE == 1 || SPARSE == 2) {
    keep = mask[i] != 0;
    gf = (keep || lambda == 0.0f) ? gf : gf + lambda * pf;
  } else if (SPARSE == 3) {
    keep = mask[i] != 0;
  } else if (SPARSE == 4) {
    keep = prune_keep(mask_key, sr_offset + static_cast<uint32_t>(i), mask_threshold);
  }
  Op::update(pf, gf, st, c, rc);
  const T stored = store_param<T>(pf, stochastic, key, sr_offset + static_cast<uint32_t>(i));
  if (SPARSE >= 3) {
    const T zero = from_float<T>(0.0f);
    p[i] = keep ? stored : zero;
    if (Op::kStates > 0) s0[i] = keep ? from_float<T>(st[0]) : zero;
    if (Op::kStates > 1) s1[i] = keep ? from_float<T>(st[1]) : zero;
    if (Op::kStates > 2) s2[i] = keep ? from_float<T>(st[2]) : zero;
    if (Op::kStates > 3) s3[i] = keep ? from_float<T>(st[3]) : zero;
    return;
  }
  p[i] = stored;
  if (SPARSE == 2) {
    const float pruned = beta == 0.0f ? 0.0f : beta * to_float(stored);
    out[i] = keep ? stored : from_float<T>(pruned);
  }
  if (Op::kStates > 0) s0[i] = from_float<T>(st[0]);
  if (Op::kStates > 1) s1[i] = from_float<T>(st[1]);
  if (Op::kStates > 2) s2[i] = from_float<T>(st[2]);
  if (Op::kStates > 3) s3[i] = from_float<T>(st[3]);
}

// Phase 1 of one element: Op::reduce may update the states (written back) and adds to `acc`.
template <typename Op, typename T>
FASTOPT_HOST_DEVICE void op_reduce_element(const T* __restrict__ p, const T* __restrict__ g, T* __restrict__ s0,
                                           T* __restrict__ s1, T* __restrict__ s2, T* __restrict__ s3,
                                           int64_t i, float grad_mul, const typename Op::Coeffs& c,
                                           const float* rc, float (&acc)[kMaxReduce]) {
  float st[kMaxStates] = {0.0f, 0.0f, 0.0f, 0.0f};
  if (Op::kStates > 0) st[0] = to_float(s0[i]);
  if (Op::kStates > 1) st[1] = to_float(s1[i]);
  if (Op::kStates > 2) st[2] = to_float(s2[i]);
  if (Op::kStates > 3) st[3] = to_float(s3[i]);
  Op::reduce(to_float(p[i]), to_float(g[i]) * grad_mul, st, c, rc, acc);
  if (Op::kStates > 0) s0[i] = from_float<T>(st[0]);
  if (Op::kStates > 1) s1[i] = from_float<T>(st[1]);
  if (Op::kStates > 2) s2[i] = from_float<T>(st[2]);
  if (Op::kStates > 3) s3[i] = from_float<T>(st[3]);
}

// e^r - 1 for |r| <= ln2 / 2: Cephes' expf polynomial, e^r = 1 + r + q(r) r^2, without the 1 (so
// without the cancellation of e^r - 1).  Vectorizable.
FASTOPT_HOST_DEVICE float expm1_reduced(float r) {
  float q = 1.9875691500e-4f;
  q = q * r + 1.3981999507e-3f;
  q = q * r + 8.3334519073e-3f;
  q = q * r + 4.1665795894e-2f;
  q = q * r + 1.6666665459e-1f;
  q = q * r + 5.0000001201e-1f;
  return q * (r * r) + r;
}

// exp(x) for x <= 0.  On the device expf; on the host Cephes' expf (x = n ln2 + r, expm1_reduced(r) + 1,
// 2^n from the exponent bits, within ~2 ulp of expf), written so that the loops calling it vectorize
// (glibc's expf does not without -ffast-math).
FASTOPT_HOST_DEVICE float exp_nonpositive(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  x = x > -87.0f ? x : -87.0f;
  const float n = floorf(x * 1.44269504088896341f + 0.5f);
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  const float y = expm1_reduced(r) + 1.0f;
  return y * bits_float(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
#endif
}

// For ops without a reduce phase.
struct NoReduce {
  template <typename C>
  FASTOPT_HOST_DEVICE static void reduce(float, float, float (&)[kMaxStates], const C&, const float*,
                                         float (&)[kMaxReduce]) {}
};

}  // namespace fastopt
