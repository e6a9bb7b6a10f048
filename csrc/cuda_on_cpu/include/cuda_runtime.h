// The CUDA-on-CPU build's <cuda_runtime.h>: this directory comes first on its include path, so the
// .cu sources' `#include <cuda_runtime.h>` gets the CPU execution layer (test-only; see ../cuda_on_cpu.h).
#pragma once
#include "../cuda_on_cpu.h"
