// ATen side of the CUDA launch code (cuda/*_dispatch.h): the dtype dispatch from ATen's
// scalar types to the kernels' storage types (kernels/dtypes.h).
#pragma once

#include <ATen/Dispatch.h>
#include <c10/core/ScalarType.h>

#include "kernels/dtypes.h"

// Dispatches fp32 / fp16 / bf16 with scalar_t = float / half_t / bfloat16_t (CUDA's
// __half / __nv_bfloat16: the types the kernels are instantiated with).
#define CB_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)                                            \
  [&] {                                                                                     \
    const at::ScalarType cb_dispatch_type = (TYPE);                                         \
    switch (cb_dispatch_type) {                                                             \
      case at::kFloat: {                                                                    \
        using scalar_t = float;                                                             \
        return __VA_ARGS__();                                                               \
      }                                                                                     \
      case at::kHalf: {                                                                     \
        using scalar_t = ::cacheblend::half_t;                                              \
        return __VA_ARGS__();                                                               \
      }                                                                                     \
      case at::kBFloat16: {                                                                 \
        using scalar_t = ::cacheblend::bfloat16_t;                                          \
        return __VA_ARGS__();                                                               \
      }                                                                                     \
      default:                                                                              \
        TORCH_CHECK(false, NAME, ": unsupported dtype ", cb_dispatch_type);                 \
    }                                                                                       \
  }()
