// Host launch code of fused_kv_concat (kernels/kv_concat_cuda.cuh): chunk / layer tables,
// kernel choice and launches, for any launcher (cuda/cuda_launcher.cuh or the tests' CUDA
// emulator). Arguments are validated by the caller.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include <algorithm>

#include "cuda/dispatch_utils.h"
#include "kernels/kv_concat_cuda.cuh"
#include "ops/kv_concat.h"

namespace cacheblend {

template <typename Launcher>
void launch_fused_kv_concat(at::TensorList chunks, const at::Tensor& src_pos, const at::Tensor& dst_pos,
                            const at::Tensor& slot_mapping, const at::Tensor& cos_sin_cache, bool is_neox,
                            at::TensorList k_caches, at::TensorList v_caches, const Launcher& launcher) {
  const at::Tensor& ref = k_caches[0];
  if (src_pos.size(0) == 0) return;
  const CacheGeometry geo = cache_geometry(ref);
  kv_concat::Problem problem{static_cast<int>(ref.size(-2)), static_cast<int>(ref.size(-1)),
                             static_cast<int>(cos_sin_cache.size(1)), cos_sin_cache.data_ptr<float>(),
                             cos_sin_cache.size(0), 0};
  const size_t smem = sizeof(rope::Rotation) * (problem.rotary_dim / 2);
  const int64_t num_layers = static_cast<int64_t>(k_caches.size());

  CB_DISPATCH_FLOAT_TYPES(ref.scalar_type(), "fused_kv_concat", [&] {
    constexpr int kVec = kVec16<scalar_t>;
    const int half = problem.rotary_dim / 2;
    bool vec_ok = (is_neox ? half % kVec == 0 : problem.rotary_dim % kVec == 0) &&
                  (problem.head_dim - problem.rotary_dim) % kVec == 0 && problem.head_dim % kVec == 0 &&
                  is_aligned16(ref, {geo.block_stride, geo.offset_stride, geo.head_stride});
    for (const auto& c : chunks) vec_ok = vec_ok && is_aligned16(c, {c.stride(0), c.stride(1), c.stride(2), c.stride(3)});
    for (size_t l = 0; l < k_caches.size(); ++l) vec_ok = vec_ok && is_aligned16(k_caches[l], {}) && is_aligned16(v_caches[l], {});

    AT_DISPATCH_INDEX_TYPES(src_pos.scalar_type(), "fused_kv_concat", [&] {
      // Up to kMaxChunks chunks x kMaxLayers layers per launch (one launch for typical requests).
      int64_t token_offset = 0;
      for (size_t c0 = 0; c0 < chunks.size(); c0 += kv_concat::kMaxChunks) {
        kv_concat::ChunkTable table{};
        const size_t c1 = std::min(chunks.size(), c0 + kv_concat::kMaxChunks);
        table.num_chunks = static_cast<int>(c1 - c0);
        int64_t tokens = 0;
        for (size_t c = c0; c < c1; ++c) {
          const int i = static_cast<int>(c - c0);
          table.base[i] = chunks[c].data_ptr();
          table.layer_stride[i] = chunks[c].stride(0);
          table.kv_stride[i] = chunks[c].stride(1);
          table.token_stride[i] = chunks[c].stride(2);
          table.head_stride[i] = chunks[c].stride(3);
          table.token_begin[i] = tokens;
          tokens += chunks[c].size(2);
        }
        table.token_begin[table.num_chunks] = tokens;
        for (int64_t l0 = 0; l0 < num_layers && tokens > 0; l0 += kv_concat::kMaxLayers) {
          kv_concat::LayerTable layers{};
          layers.num_layers = static_cast<int>(std::min<int64_t>(num_layers - l0, kv_concat::kMaxLayers));
          for (int l = 0; l < layers.num_layers; ++l) {
            layers.k[l] = k_caches[l0 + l].data_ptr();
            layers.v[l] = v_caches[l0 + l].data_ptr();
            // Chunk pointers address layer l0 + l as layer l of this launch.
          }
          for (int i = 0; i < table.num_chunks; ++i)
            table.base[i] = static_cast<const scalar_t*>(chunks[c0 + i].data_ptr()) + l0 * table.layer_stride[i];
          layers.num_slots = geo.num_slots;
          layers.block_size = geo.block_size;
          layers.block_stride = geo.block_stride;
          layers.offset_stride = geo.offset_stride;
          layers.head_stride = geo.head_stride;
          problem.token_offset = token_offset;
          dispatch_vec_and_style<kVec>(vec_ok, is_neox, [&](auto vec_tag, auto neox_tag) {
            constexpr int V = decltype(vec_tag)::value;
            constexpr bool N = decltype(neox_tag)::value;
            launcher(kv_concat::fused_kv_concat_kernel<scalar_t, index_t, V, N>, Dim3{static_cast<unsigned>(tokens)},
                     Dim3{256}, smem, table, layers, problem, src_pos.data_ptr<index_t>(),
                     dst_pos.data_ptr<index_t>(), slot_mapping.data_ptr<index_t>());
          });
        }
        token_offset += tokens;
      }
    });
  });
}

}  // namespace cacheblend
