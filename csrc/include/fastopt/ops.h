// fastopt/ops.h -- the registry of elementwise optimizer ops (see elementwise.h).
//
// FASTOPT_FOR_EACH_OP(X) expands X(name, Type) once per op; the CPU and CUDA launchers instantiate
// their kernels from it and the Python wrapper selects an op by name.  Adding an optimizer means a
// functor header and one line here.
#pragma once

#include "fastopt/functors/clip.h"
#include "fastopt/functors/lion.h"

#define FASTOPT_FOR_EACH_OP(X)         \
  X("lion", ::fastopt::functors::LionOp) \
  X("clip", ::fastopt::functors::ClipOp)
