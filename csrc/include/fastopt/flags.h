// fastopt/flags.h -- the flag bits of the elementwise ops: one numbering for every op, the C++ copy of
// FLAGS in fastopt/_opspec.py (tests/test_opspec.py compares them through fastopt._C.flag_bits()).
// A flag is named after the param-group option that sets it.
#pragma once

#include <cstdint>

namespace fastopt {

enum OpFlag : int64_t {
  kDecouple = 1,            // weight_decouple: decoupled weight decay (else L2 added to the gradient)
  kFixedDecay = 2,          // fixed_decay: decoupled decay not scaled by lr
  kRectify = 4,             // rectify: RAdam rectification
  kDegeneratedToSgd = 8,    // degenerated_to_sgd: below RAdam's threshold a momentum-SGD step
  kAdamDebias = 16,         // adam_debias: no 1 / (1 - b1^t) on the step size
  kNesterov = 32,           // nesterov
  kUseGc = 64,              // use_gc: gradient centralization (row means in rc[0] or rc[3])
  kCautious = 128,          // cautious: the cautious mask
  kCautiousPd = 256,        // cautious_pd: AdamP's second reduce pass of the cautious mode
  kAmsgrad = 512,           // amsgrad (the Triton Adam launcher; the C++ Adam ops are named *_ams)
};

#define FASTOPT_FOR_EACH_FLAG(X)            \
  X("weight_decouple", kDecouple)           \
  X("fixed_decay", kFixedDecay)             \
  X("rectify", kRectify)                    \
  X("degenerated_to_sgd", kDegeneratedToSgd) \
  X("adam_debias", kAdamDebias)             \
  X("nesterov", kNesterov)                  \
  X("use_gc", kUseGc)                       \
  X("cautious", kCautious)                  \
  X("cautious_pd", kCautiousPd)             \
  X("amsgrad", kAmsgrad)

}  // namespace fastopt
