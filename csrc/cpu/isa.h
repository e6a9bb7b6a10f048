// CPU instruction-set dispatch: kernels in csrc/cpu/*_kernels.cpp are compiled once per ISA, each
// copy in its own namespace (fastopt::cpu::baseline, fastopt::cpu::avx2), and picked at run time.
#pragma once

#include <cstdlib>
#include <cstring>

namespace fastopt {
namespace cpu {

// True when this CPU runs the AVX2+FMA copies (and they were built: x86-64 only).
inline bool use_avx2() {
#if defined(FASTOPT_HAVE_AVX2_KERNELS)
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

// True when the AVX2 copy's low-bit codecs (quant_cpu.h) take their AVX-512 versions: the CPU has
// AVX-512 F/BW/DQ/VL and the environment does not set FASTOPT_CPU_ISA=avx2 (which tests use to run the
// 8-lane codecs on such a CPU).  `static`: one copy per translation unit, whatever its flags.
static inline bool use_avx512_codecs() {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool ok = [] {
    const char* env = std::getenv("FASTOPT_CPU_ISA");
    if (env != nullptr && std::strcmp(env, "avx2") == 0) return false;
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  }();
  return ok;
#else
  return false;
#endif
}

// True when the entropic-OT passes run their AVX-512 copy (namespace avx512, built from ot_kernels.cpp
// alone on x86-64): the CPU has AVX-512 F/BW/DQ/VL and FASTOPT_CPU_ISA is not avx2 (use_avx512_codecs).
static inline bool use_avx512_ot() {
#if defined(FASTOPT_HAVE_AVX512_OT_KERNELS)
  return use_avx2() && use_avx512_codecs();
#else
  return false;
#endif
}

inline const char* isa_name() {
  if (!use_avx2()) return "baseline";
  return use_avx512_codecs() ? "avx2+avx512-codecs" : "avx2";
}

}  // namespace cpu
}  // namespace fastopt

// Declares a kernel entry point (a function declaration, without the semicolon) in both ISA copies;
// use at namespace fastopt scope.
#define FASTOPT_CPU_KERNEL_DECL(...)      \
  namespace cpu {                         \
  namespace baseline { __VA_ARGS__; }     \
  namespace avx2 { __VA_ARGS__; }         \
  }

// Calls the copy of kernel entry point FN that this CPU runs.
#if defined(FASTOPT_HAVE_AVX2_KERNELS)
#define FASTOPT_CPU_KERNEL_CALL(FN, ...)                                                      \
  (::fastopt::cpu::use_avx2() ? ::fastopt::cpu::avx2::FN(__VA_ARGS__) : ::fastopt::cpu::baseline::FN(__VA_ARGS__))
#else
#define FASTOPT_CPU_KERNEL_CALL(FN, ...) (::fastopt::cpu::baseline::FN(__VA_ARGS__))
#endif
