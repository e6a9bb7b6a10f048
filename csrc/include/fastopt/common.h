// fastopt/common.h -- portable scalar helpers shared by the CPU and CUDA code.
//
// Storage types are plain 16-bit wrappers so that the same header compiles with g++ (no CUDA headers)
// and with nvcc.  All math is done in fp32; these helpers only convert at load/store time.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#define FASTOPT_HOST_DEVICE __host__ __device__ __forceinline__
#define FASTOPT_DEVICE_CODE 1
#else
// always_inline: the CPU kernels are compiled once per instruction set (baseline, AVX2); forcing
// inlining keeps an AVX2 copy of a shared inline function from being linked into the baseline path.
#define FASTOPT_HOST_DEVICE inline __attribute__((always_inline))
#endif

namespace fastopt {

// Dtype codes of the native ABI (the Python wrapper maps torch dtypes to these).
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct alignas(2) f16_t { uint16_t x; };
struct alignas(2) bf16_t { uint16_t x; };

// The bits of a value as another type of the same size (C++20's std::bit_cast).  memcpy is the
// defined way on the host and in device code; both compilers turn it into a register move.
template <typename To, typename From>
FASTOPT_HOST_DEVICE To bit_cast(From v) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast between types of different sizes");
  To r;
  std::memcpy(&r, &v, sizeof(To));
  return r;
}
FASTOPT_HOST_DEVICE uint32_t float_bits(float f) { return bit_cast<uint32_t>(f); }
FASTOPT_HOST_DEVICE float bits_float(uint32_t u) { return bit_cast<float>(u); }

// ---- bfloat16: the upper 16 bits of an fp32; round to nearest even, NaN kept quiet. ----
FASTOPT_HOST_DEVICE float to_float(bf16_t v) { return bits_float(static_cast<uint32_t>(v.x) << 16); }
FASTOPT_HOST_DEVICE bf16_t bf16_from_float(float f) {
  uint32_t u = float_bits(f);
  bf16_t r;
  if ((u & 0x7fffffffu) > 0x7f800000u) { r.x = static_cast<uint16_t>((u >> 16) | 0x40u); return r; }
  u += 0x7fffu + ((u >> 16) & 1u);
  r.x = static_cast<uint16_t>(u >> 16);
  return r;
}

// ---- IEEE binary16.  Device: hardware conversion.  Host: exact bit-level conversion (RNE). ----
FASTOPT_HOST_DEVICE float to_float(f16_t v) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(v.x));
#else
  const uint32_t sign = static_cast<uint32_t>(v.x & 0x8000u) << 16;
  const uint32_t exp = (v.x >> 10) & 0x1fu;
  const uint32_t man = v.x & 0x3ffu;
  if (exp == 0x1fu) return bits_float(sign | 0x7f800000u | (man << 13));  // inf / nan
  if (exp == 0) {                                                         // zero / subnormal
    // man * 2^-24, exact in fp32.
    const float mag = static_cast<float>(man) * 5.9604644775390625e-08f;
    return sign ? -mag : mag;
  }
  return bits_float(sign | ((exp + 112u) << 23) | (man << 13));
#endif
}
FASTOPT_HOST_DEVICE f16_t f16_from_float(float f) {
  f16_t r;
#if defined(__CUDA_ARCH__)
  r.x = __half_as_ushort(__float2half_rn(f));
#else
  const uint32_t u = float_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t au = u & 0x7fffffffu;
  if (au > 0x7f800000u) { r.x = static_cast<uint16_t>(sign | 0x7e00u); return r; }       // nan
  if (au >= 0x477ff000u) { r.x = static_cast<uint16_t>(sign | 0x7c00u); return r; }      // rounds to inf
  if (au < 0x38800000u) {                                                               // subnormal / zero
    // value * 2^24 rounded to nearest even, computed exactly with the fp32 magic-number trick.
    const float scaled = bits_float(au) + 0.5f;  // 0.5 = 2^-1: aligns the half-subnormal ulp (2^-24)
    r.x = static_cast<uint16_t>(sign | (float_bits(scaled) - 0x3f000000u));
    return r;
  }
  uint32_t m = au + 0xc8000fffu + ((au >> 13) & 1u);  // rebias exponent (-112 << 23) and round
  r.x = static_cast<uint16_t>(sign | (m >> 13));
#endif
  return r;
}

FASTOPT_HOST_DEVICE float to_float(float v) { return v; }

template <typename T> FASTOPT_HOST_DEVICE T from_float(float f);
template <> FASTOPT_HOST_DEVICE float from_float<float>(float f) { return f; }
template <> FASTOPT_HOST_DEVICE f16_t from_float<f16_t>(float f) { return f16_from_float(f); }
template <> FASTOPT_HOST_DEVICE bf16_t from_float<bf16_t>(float f) { return bf16_from_float(f); }

}  // namespace fastopt
