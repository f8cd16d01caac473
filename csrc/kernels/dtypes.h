// Storage types of the CUDA kernels: float and CUDA's own 16-bit formats. The kernels are
// templated on them; the ATen layer maps at::kFloat / kHalf / kBFloat16 onto them
// (cuda/dispatch_utils.h), so no ATen type reaches device code. All math is fp32
// (to_float / from_float in kernels/common.h: __half2float / __float2half and the bf16
// equivalents, round to nearest even).
#pragma once

#if !defined(CB_HOST_CUDA)  // a host build supplies these types (see kernels/common.h)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#include <type_traits>

namespace cacheblend {

using half_t = __half;
using bfloat16_t = __nv_bfloat16;

// The 16-bit formats the tensor-core kernels take.
template <typename T>
constexpr bool kIsHalfOrBFloat16 = std::is_same_v<T, half_t> || std::is_same_v<T, bfloat16_t>;

}  // namespace cacheblend
