// Argument validation shared by the CPU and CUDA implementations, so both raise the
// same clear errors. Only metadata is inspected here (no device reads): range checks of
// index *values* live in the CPU kernels, and the CUDA kernels guard them on device.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>

namespace cacheblend {

inline void check_float_storage(const at::Tensor& t, const char* name) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat, name,
              " must be float16, bfloat16 or float32, got ", dt);
}

inline void check_index_tensor(const at::Tensor& t, const char* name) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kInt || dt == at::kLong, name, " must be int32 or int64, got ", dt);
  TORCH_CHECK(t.dim() == 1, name, " must be 1-D, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name,
                              const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, " must be on the same device as ", ref_name,
              " (", ref.device(), "), got ", t.device());
}

inline void check_last_dim_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.stride(-1) == 1, name, " must have a contiguous last dimension (stride 1), got strides ",
              t.strides());
}

// cos_sin_cache: [max_pos, rotary_dim] fp32, contiguous, rotary_dim even and <= head_dim.
inline void check_cos_sin_cache(const at::Tensor& cache, int64_t head_dim, const at::Tensor& ref,
                                const char* ref_name) {
  TORCH_CHECK(cache.scalar_type() == at::kFloat, "cos_sin_cache must be float32, got ",
              cache.scalar_type());
  TORCH_CHECK(cache.dim() == 2, "cos_sin_cache must be [max_pos, rotary_dim], got shape ",
              cache.sizes());
  TORCH_CHECK(cache.is_contiguous(), "cos_sin_cache must be contiguous");
  const int64_t rotary_dim = cache.size(1);
  TORCH_CHECK(rotary_dim > 0 && rotary_dim % 2 == 0,
              "cos_sin_cache rotary_dim (size(1)) must be even and positive, got ", rotary_dim);
  TORCH_CHECK(rotary_dim <= head_dim, "cos_sin_cache rotary_dim ", rotary_dim,
              " exceeds head_dim ", head_dim);
  check_same_device(cache, ref, "cos_sin_cache", ref_name);
}

// Host-side range check of index values (CPU tensors only).
template <typename index_t>
inline void check_positions_in_range(const index_t* pos, int64_t n, int64_t limit, const char* name,
                                     const char* limit_name) {
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(pos[i] >= 0 && pos[i] < limit, name, "[", i, "] = ", static_cast<int64_t>(pos[i]),
                " is outside [0, ", limit, ") (", limit_name, ")");
  }
}

}  // namespace cacheblend
