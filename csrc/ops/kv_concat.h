// cacheblend::fused_kv_concat: the argument contract that every entry point
// checks (torch_bindings.cpp for the CPU and CUDA kernels, the tests' emulated kernels),
// and the declarations of the implementations, which trust it.
//
// Sources: chunks[i] is [L, 2, T_i, H, D] (K after RoPE at its cached positions, then V),
// last dim contiguous, other strides free (views of a larger store buffer work without a
// copy). Token t of the concatenation of all chunks goes to slot slot_mapping[t]
// (-1 = skip) of every layer, its K re-rotated from src_pos[t] to dst_pos[t].
// Destinations: k_caches / v_caches are L tensors each, all of one shape, dtype and
// strides: [num_slots, H, D] (contiguous request KV: slot = row) or
// [num_blocks, block_size, H, D] (paged: slot = block * block_size + offset). The sizes
// say which dim is which; the strides are free (last dim contiguous), so every engine
// layout is a view: heads before the block offset (HND, a transposed view), K and V of
// one [num_blocks, 2, ...] tensor, K and V side by side in one last dimension, one layer
// of an all-layers buffer (cacheblend_ext.ops.paged_view).
#pragma once

#include <ATen/core/ATen_fwd.h>

#include <utility>

#include "checks.h"

namespace cacheblend {

// Where slot s of a destination lives: (s / block_size) * block_stride + (s % block_size) * offset_stride.
struct CacheGeometry {
  int64_t num_slots, block_size, block_stride, offset_stride, head_stride;
};

inline CacheGeometry cache_geometry(const at::Tensor& cache) {
  if (cache.dim() == 3) return {cache.size(0), 1, cache.stride(0), 0, cache.stride(1)};
  return {cache.size(0) * cache.size(1), cache.size(1), cache.stride(0), cache.stride(1), cache.stride(2)};
}

inline void validate_fused_kv_concat(at::TensorList chunks, const at::Tensor& src_pos,
                                     const at::Tensor& dst_pos, const at::Tensor& slot_mapping,
                                     const at::Tensor& cos_sin_cache, at::TensorList k_caches,
                                     at::TensorList v_caches) {
  TORCH_CHECK(!k_caches.empty(), "k_caches must hold one tensor per layer, got an empty list");
  const at::Tensor& ref = k_caches[0];
  check_float_storage(ref, "k_caches[0]");
  TORCH_CHECK(ref.dim() == 3 || ref.dim() == 4,
              "k_caches[l] must be [num_slots, H, D] or [num_blocks, block_size, H, D], got shape ", ref.sizes());
  const int64_t num_layers = static_cast<int64_t>(k_caches.size());
  const int64_t num_heads = ref.size(-2), head_dim = ref.size(-1);
  TORCH_CHECK(v_caches.size() == k_caches.size(), "v_caches must have one tensor per layer like k_caches (",
              num_layers, "), got ", v_caches.size());
  for (auto [list, name] : {std::pair{k_caches, "k_caches"}, std::pair{v_caches, "v_caches"}}) {
    for (size_t l = 0; l < list.size(); ++l) {
      const at::Tensor& c = list[l];
      TORCH_CHECK(c.sizes() == ref.sizes() && c.strides() == ref.strides(), name, "[", l,
                  "] must have the shape and strides of k_caches[0] (", ref.sizes(), ", ", ref.strides(), "), got ",
                  c.sizes(), ", ", c.strides());
      TORCH_CHECK(c.scalar_type() == ref.scalar_type(), name, "[", l, "] must have dtype ", ref.scalar_type(),
                  ", got ", c.scalar_type());
      check_same_device(c, ref, name, "k_caches[0]");
    }
  }
  check_last_dim_contiguous(ref, "k_caches[l]");
  for (int64_t i = 0; i + 1 < ref.dim(); ++i)
    TORCH_CHECK(ref.stride(i) != 0 || ref.size(i) <= 1, "k_caches[l] must not be an expanded view (stride 0 in dim ",
                i, "): distinct slots and heads must be distinct memory, got strides ", ref.strides());
  int64_t total_tokens = 0;
  for (size_t i = 0; i < chunks.size(); ++i) {
    const at::Tensor& c = chunks[i];
    TORCH_CHECK(c.dim() == 5 && c.size(0) == num_layers && c.size(1) == 2 && c.size(3) == num_heads &&
                    c.size(4) == head_dim,
                "chunks[", i, "] must be [L=", num_layers, ", 2, T, H=", num_heads, ", D=", head_dim, "], got shape ",
                c.sizes());
    TORCH_CHECK(c.scalar_type() == ref.scalar_type(), "chunks[", i, "] must have the caches' dtype ",
                ref.scalar_type(), ", got ", c.scalar_type());
    TORCH_CHECK(c.stride(4) == 1, "chunks[", i, "] must have a contiguous last dimension, got strides ", c.strides());
    check_same_device(c, ref, "chunks[i]", "k_caches[0]");
    total_tokens += c.size(2);
  }
  for (auto [t, name] : {std::pair{&src_pos, "src_pos"}, std::pair{&dst_pos, "dst_pos"},
                         std::pair{&slot_mapping, "slot_mapping"}}) {
    check_index_tensor(*t, name);
    TORCH_CHECK(t->size(0) == total_tokens, name, " must have one entry per chunk token (", total_tokens,
                " in all), got ", t->size(0));
    TORCH_CHECK(t->scalar_type() == src_pos.scalar_type(), name, " must have the dtype of src_pos (",
                src_pos.scalar_type(), "), got ", t->scalar_type());
    check_same_device(*t, ref, name, "k_caches[0]");
  }
  check_cos_sin_cache(cos_sin_cache, head_dim, ref, "k_caches[0]");
}

// Implementations: they assume validated arguments (torch_bindings.cpp validates first).
void fused_kv_concat_cpu(at::TensorList chunks, const at::Tensor& src_pos, const at::Tensor& dst_pos,
                         const at::Tensor& slot_mapping, const at::Tensor& cos_sin_cache, bool is_neox,
                         at::TensorList k_caches, at::TensorList v_caches);
#ifdef CACHEBLEND_WITH_CUDA
void fused_kv_concat_cuda(at::TensorList chunks, const at::Tensor& src_pos, const at::Tensor& dst_pos,
                          const at::Tensor& slot_mapping, const at::Tensor& cos_sin_cache, bool is_neox,
                          at::TensorList k_caches, at::TensorList v_caches);
#endif

}  // namespace cacheblend
