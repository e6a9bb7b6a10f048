// fastopt/ops.h -- the registry of elementwise optimizer ops (see elementwise.h).
//
// FASTOPT_FOR_EACH_OP(X) expands X(name, Type) once per op; the CPU and CUDA launchers instantiate
// their kernels from it and the Python wrapper selects an op by name.  Adding an optimizer means a
// functor header and one line here.
#pragma once

#include "fastopt/functors/adam.h"
#include "fastopt/functors/adahessian.h"
#include "fastopt/functors/adamp.h"
#include "fastopt/functors/adan.h"
#include "fastopt/functors/adabelief.h"
#include "fastopt/functors/diffgrad.h"
#include "fastopt/functors/exadam.h"
#include "fastopt/functors/clip.h"
#include "fastopt/functors/lamb.h"
#include "fastopt/functors/orthograd.h"
#include "fastopt/functors/sam.h"
#include "fastopt/functors/sgdsai.h"
#include "fastopt/functors/sgd.h"
#include "fastopt/functors/adagrad.h"
#include "fastopt/functors/rmsprop.h"
#include "fastopt/functors/lion.h"

// A build may define the list itself (-D'FASTOPT_FOR_EACH_OP(X)=X("lamb", ::fastopt::functors::LambOp)'):
// tests/test_cuda_on_cpu.py's mutation builds recompile one kernel file for the one op they run, instead
// of every op's instantiations.  A library build never does.
#ifndef FASTOPT_FOR_EACH_OP
#define FASTOPT_FOR_EACH_OP(X)                                \
  X("adamw", ::fastopt::functors::AdamWOp)      \
  X("adamw_ams", ::fastopt::functors::AdamWAmsOp)   \
  X("adam", ::fastopt::functors::AdamL2Op)      \
  X("adam_ams", ::fastopt::functors::AdamL2AmsOp)   \
  X("lion", ::fastopt::functors::LionOp)                      \
  X("lion_cautious", ::fastopt::functors::LionCautiousOp)     \
  X("grad_rowsum", ::fastopt::functors::GradRowSumOp)         \
  X("clip", ::fastopt::functors::ClipOp)                      \
  X("adan", ::fastopt::functors::AdanOp)                      \
  X("adabelief", ::fastopt::functors::AdaBeliefOp<false>)     \
  X("adabelief_ams", ::fastopt::functors::AdaBeliefOp<true>)  \
  X("diffgrad", ::fastopt::functors::DiffGradOp<false>)       \
  X("diffgrad_ams", ::fastopt::functors::DiffGradOp<true>)    \
  X("exadam", ::fastopt::functors::ExAdamOp)                  \
  X("adahessian", ::fastopt::functors::AdaHessianSqrtOp)      \
  X("adahessian_plain", ::fastopt::functors::AdaHessianPlainSqrtOp) \
  X("adahessian_pow", ::fastopt::functors::AdaHessianPowOp)   \
  X("adahessian_plain_pow", ::fastopt::functors::AdaHessianPlainPowOp) \
  X("lamb", ::fastopt::functors::LambOp)                      \
  X("sgdsai", ::fastopt::functors::SgdSaiOp<true>)            \
  X("sgdsai_plain", ::fastopt::functors::SgdSaiOp<false>)     \
  X("adamp", ::fastopt::functors::AdamPOp)                    \
  X("sgdp", ::fastopt::functors::SgdPOp)                      \
  X("adamp_flat", ::fastopt::functors::AdamPFlatOp)           \
  X("sgdp_flat", ::fastopt::functors::SgdPFlatOp)           \
  X("sam", ::fastopt::functors::SamOp<false>)                \
  X("asam", ::fastopt::functors::SamOp<true>)                \
  X("asam_norm", ::fastopt::functors::AsamNormOp)            \
  X("sgd", ::fastopt::functors::SgdOp<true>)                  \
  X("sgd_plain", ::fastopt::functors::SgdOp<false>)           \
  X("adagrad", ::fastopt::functors::AdagradOp)                \
  X("rmsprop", ::fastopt::functors::RmspropPlainOp)                 \
  X("rmsprop_momentum", ::fastopt::functors::RmspropMomentumOp)     \
  X("rmsprop_centered", ::fastopt::functors::RmspropCenteredOp)     \
  X("rmsprop_centered_momentum", ::fastopt::functors::RmspropCenteredMomentumOp)\
  X("orthograd", ::fastopt::functors::OrthoGradOp)
#endif  // FASTOPT_FOR_EACH_OP
