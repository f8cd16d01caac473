// Helpers shared by the host launch code of the CUDA kernels (cuda/*_launch.h): dtype
// dispatch to the storage types the kernels use, and alignment checks for the 16-byte
// vector paths.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <initializer_list>
#include <type_traits>

namespace cacheblend {

// Dispatches fp32 / fp16 / bf16 with scalar_t = float / c10::Half / c10::BFloat16
// (host-device types whose float conversions the kernels use).
#define CB_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)                                  \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)        \
                         AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) AT_DISPATCH_CASE( \
                             at::kBFloat16, __VA_ARGS__))

// True when the data pointer and every given stride (in elements) keep 16-byte alignment.
inline bool is_aligned16(const at::Tensor& t, std::initializer_list<int64_t> strides) {
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  const int64_t vec = 16 / t.element_size();
  for (int64_t s : strides)
    if (s % vec != 0) return false;
  return true;
}

// Calls launch(std::integral_constant<int, V>, std::bool_constant<NEOX>) with V = kVec
// when the 16-byte vector path applies (else 1) and NEOX = is_neox.
template <int kVec, typename Launch>
inline void dispatch_vec_and_style(bool vec_ok, bool is_neox, Launch&& launch) {
  if (vec_ok) {
    is_neox ? launch(std::integral_constant<int, kVec>{}, std::true_type{})
            : launch(std::integral_constant<int, kVec>{}, std::false_type{});
  } else {
    is_neox ? launch(std::integral_constant<int, 1>{}, std::true_type{})
            : launch(std::integral_constant<int, 1>{}, std::false_type{});
  }
}

}  // namespace cacheblend
