// CPU instruction-set dispatch: kernels in csrc/cpu/*_kernels.cpp are compiled once per ISA, each
// copy in its own namespace (fastopt::cpu::baseline, fastopt::cpu::avx2), and picked at run time.
#pragma once

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

inline const char* isa_name() { return use_avx2() ? "avx2" : "baseline"; }

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
