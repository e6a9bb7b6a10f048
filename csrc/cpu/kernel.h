// Included by every CPU kernel body (csrc/cpu/*_kernels.cpp).  CMakeLists.txt compiles each body once
// per instruction set with -DFASTOPT_CPU_NS=<isa> (see isa.h); a body defines its entry points in
// namespace fastopt::cpu::FASTOPT_CPU_NS, where the entry points of csrc/cpu/*.cpp find them.
#pragma once

#ifndef FASTOPT_CPU_NS
#error "compile with -DFASTOPT_CPU_NS=<isa namespace>"
#endif

#include "fastopt/api.h"
#include "fastopt/dispatch.h"
#include "fastopt/multi_tensor_cpu.h"
