// fastopt/dispatch.h -- runtime values to compile-time switches (in the spirit of flash-attention's
// static_switch.h), shared by the CPU and CUDA entry points.
#pragma once

#include <stdexcept>
#include <string>
#include "fastopt/common.h"

#define FASTOPT_BOOL_SWITCH(COND, NAME, ...) \
  [&] {                                      \
    if (COND) {                              \
      constexpr bool NAME = true;            \
      return __VA_ARGS__();                  \
    } else {                                 \
      constexpr bool NAME = false;           \
      return __VA_ARGS__();                  \
    }                                        \
  }()

// Binds `scalar_t` to the storage type of a dtype code.
#define FASTOPT_DTYPE_SWITCH(CODE, ...)                                              \
  [&] {                                                                              \
    switch (CODE) {                                                                  \
      case ::fastopt::kFloat32: { using scalar_t = float; return __VA_ARGS__(); }    \
      case ::fastopt::kFloat16: { using scalar_t = ::fastopt::f16_t; return __VA_ARGS__(); } \
      case ::fastopt::kBFloat16: { using scalar_t = ::fastopt::bf16_t; return __VA_ARGS__(); } \
      default: throw std::invalid_argument("fastopt: unsupported dtype code " + std::to_string(CODE)); \
    }                                                                                \
  }()
