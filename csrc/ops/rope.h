// cacheblend::rope_reposition / rope_reposition_out: the argument contract that every
// entry point checks (torch_bindings.cpp for the CPU and CUDA kernels, the tests'
// emulated kernels), and the declarations of the implementations, which trust it.
#pragma once

#include "checks.h"

namespace cacheblend {

// key, out: [T, H, D] (last dim contiguous, other strides free; out may be key itself).
// src_pos, dst_pos: [T] int32/int64. cos_sin_cache: [max_pos, rotary_dim] fp32.
inline void validate_rope_reposition(const at::Tensor& key, const at::Tensor& out,
                                     const at::Tensor& src_pos, const at::Tensor& dst_pos,
                                     const at::Tensor& cos_sin_cache) {
  check_float_storage(key, "key");
  TORCH_CHECK(key.dim() == 3, "key must be [num_tokens, num_heads, head_dim], got shape ",
              key.sizes());
  check_last_dim_contiguous(key, "key");
  TORCH_CHECK(out.sizes() == key.sizes(), "out must have the shape of key ", key.sizes(), ", got ",
              out.sizes());
  TORCH_CHECK(out.scalar_type() == key.scalar_type(), "out must have the dtype of key (",
              key.scalar_type(), "), got ", out.scalar_type());
  check_last_dim_contiguous(out, "out");
  check_same_device(out, key, "out", "key");
  for (auto [t, name] : {std::pair{&src_pos, "src_pos"}, std::pair{&dst_pos, "dst_pos"}}) {
    check_index_tensor(*t, name);
    TORCH_CHECK(t->size(0) == key.size(0), name, " must have one entry per token (", key.size(0),
                "), got ", t->size(0));
    check_same_device(*t, key, name, "key");
  }
  TORCH_CHECK(dst_pos.scalar_type() == src_pos.scalar_type(), "dst_pos must have the dtype of src_pos (",
              src_pos.scalar_type(), "), got ", dst_pos.scalar_type());
  check_cos_sin_cache(cos_sin_cache, key.size(2), key, "key");
}

// Implementations: they assume validated arguments (torch_bindings.cpp validates first).
void rope_reposition_cpu(const at::Tensor& key, const at::Tensor& out, const at::Tensor& src_pos,
                         const at::Tensor& dst_pos, const at::Tensor& cos_sin_cache, bool is_neox);
#ifdef CACHEBLEND_WITH_CUDA
void rope_reposition_cuda(const at::Tensor& key, const at::Tensor& out, const at::Tensor& src_pos,
                          const at::Tensor& dst_pos, const at::Tensor& cos_sin_cache,
                          bool is_neox);
#endif

}  // namespace cacheblend
