// ATen side of fused_kv_concat's CUDA launch: chunk and cache tensors to the launch
// code's tables, dtype dispatch, for any launcher (cuda/ops_cuda.cpp, the tests' host
// emulator). Arguments are validated by the caller (ops/kv_concat.h).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include <vector>

#include "cuda/dispatch_utils.h"
#include "cuda/launch.h"
#include "ops/kv_concat.h"

namespace cacheblend {

template <typename Launcher>
void dispatch_fused_kv_concat(at::TensorList chunks, const at::Tensor& src_pos, const at::Tensor& dst_pos,
                              const at::Tensor& slot_mapping, const at::Tensor& cos_sin_cache, bool is_neox,
                              at::TensorList k_caches, at::TensorList v_caches, const Launcher& launcher) {
  const at::Tensor& ref = k_caches[0];
  if (src_pos.size(0) == 0) return;
  const CacheGeometry geo = cache_geometry(ref);
  const kv_concat::Problem problem{static_cast<int>(ref.size(-2)), static_cast<int>(ref.size(-1)),
                                   static_cast<int>(cos_sin_cache.size(1)), cos_sin_cache.data_ptr<float>(),
                                   cos_sin_cache.size(0), 0};
  std::vector<KvConcatChunk> sources;
  sources.reserve(chunks.size());
  for (const at::Tensor& c : chunks)
    sources.push_back({c.data_ptr(), c.stride(0), c.stride(1), c.stride(2), c.stride(3), c.size(2)});
  std::vector<void*> k_ptrs, v_ptrs;
  for (size_t l = 0; l < k_caches.size(); ++l) {
    k_ptrs.push_back(k_caches[l].data_ptr());
    v_ptrs.push_back(v_caches[l].data_ptr());
  }
  const KvConcatCaches caches{k_ptrs.data(),    v_ptrs.data(),    static_cast<int64_t>(k_ptrs.size()),
                              geo.num_slots,    geo.block_size,   geo.block_stride,
                              geo.offset_stride, geo.head_stride};
  CB_DISPATCH_FLOAT_TYPES(ref.scalar_type(), "fused_kv_concat", [&] {
    AT_DISPATCH_INDEX_TYPES(src_pos.scalar_type(), "fused_kv_concat", [&] {
      launch_fused_kv_concat<scalar_t, index_t>(sources.data(), static_cast<int64_t>(sources.size()), caches,
                                                problem, src_pos.data_ptr<index_t>(), dst_pos.data_ptr<index_t>(),
                                                slot_mapping.data_ptr<index_t>(), is_neox, launcher);
    });
  });
}

}  // namespace cacheblend
