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
