// fastopt/launch.cuh -- the one way the CUDA sources launch a kernel.
//
//   FASTOPT_LAUNCH(grid, block, smem, stream, kernel)(args...);
//
// Under nvcc it is kernel<<<grid, block, smem, stream>>>(args...).  Built as plain C++ against the
// CUDA-on-CPU layer (csrc/cuda_on_cpu/, -DFASTOPT_CUDA_ON_CPU, a test-only module), that layer's
// cuda_runtime.h defines it first and the grid runs on the CPU.  The kernel comes last, so template
// kernels with commas (`lowbit_kernel<Op, T>`) need no extra parentheses.
#pragma once

#include <cuda_runtime.h>

#ifndef FASTOPT_LAUNCH
#define FASTOPT_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#endif
