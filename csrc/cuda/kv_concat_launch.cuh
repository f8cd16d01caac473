// Host launch code of fused_kv_concat (kernels/kv_concat_cuda.cuh), declared in
// cuda/launch.h: chunk / layer tables, kernel choice and launches.
#pragma once

#include <algorithm>

#include "cuda/launch.h"
#include "kernels/kv_concat_cuda.cuh"

namespace cacheblend {

template <typename T, typename index_t, typename Launcher>
void launch_fused_kv_concat(const KvConcatChunk* chunks, int64_t num_chunks, const KvConcatCaches& caches,
                            kv_concat::Problem problem, const index_t* src_pos, const index_t* dst_pos,
                            const index_t* slot_mapping, bool is_neox, const Launcher& launcher) {
  const size_t smem = sizeof(rope::Rotation) * (problem.rotary_dim / 2);
  constexpr int kVec = kVec16<T>;
  const int half = problem.rotary_dim / 2;
  bool vec_ok = (is_neox ? half % kVec == 0 : problem.rotary_dim % kVec == 0) &&
                (problem.head_dim - problem.rotary_dim) % kVec == 0 && problem.head_dim % kVec == 0 &&
                is_aligned16<T>(caches.k[0], {caches.block_stride, caches.offset_stride, caches.head_stride});
  for (int64_t c = 0; c < num_chunks; ++c)
    vec_ok = vec_ok && is_aligned16<T>(chunks[c].base, {chunks[c].layer_stride, chunks[c].kv_stride,
                                                        chunks[c].token_stride, chunks[c].head_stride});
  for (int64_t l = 0; l < caches.num_layers; ++l)
    vec_ok = vec_ok && is_aligned16<T>(caches.k[l], {}) && is_aligned16<T>(caches.v[l], {});

  // Up to kMaxChunks chunks x kMaxLayers layers per launch (one launch for typical requests).
  int64_t token_offset = 0;
  for (int64_t c0 = 0; c0 < num_chunks; c0 += kv_concat::kMaxChunks) {
    kv_concat::ChunkTable table{};
    const int64_t c1 = std::min<int64_t>(num_chunks, c0 + kv_concat::kMaxChunks);
    table.num_chunks = static_cast<int>(c1 - c0);
    int64_t tokens = 0;
    for (int64_t c = c0; c < c1; ++c) {
      const int i = static_cast<int>(c - c0);
      table.base[i] = chunks[c].base;
      table.layer_stride[i] = chunks[c].layer_stride;
      table.kv_stride[i] = chunks[c].kv_stride;
      table.token_stride[i] = chunks[c].token_stride;
      table.head_stride[i] = chunks[c].head_stride;
      table.token_begin[i] = tokens;
      tokens += chunks[c].num_tokens;
    }
    table.token_begin[table.num_chunks] = tokens;
    for (int64_t l0 = 0; l0 < caches.num_layers && tokens > 0; l0 += kv_concat::kMaxLayers) {
      kv_concat::LayerTable layers{};
      layers.num_layers = static_cast<int>(std::min<int64_t>(caches.num_layers - l0, kv_concat::kMaxLayers));
      for (int l = 0; l < layers.num_layers; ++l) {
        layers.k[l] = caches.k[l0 + l];
        layers.v[l] = caches.v[l0 + l];
        // Chunk pointers address layer l0 + l as layer l of this launch.
      }
      for (int i = 0; i < table.num_chunks; ++i)
        table.base[i] = static_cast<const T*>(chunks[c0 + i].base) + l0 * table.layer_stride[i];
      layers.num_slots = caches.num_slots;
      layers.block_size = caches.block_size;
      layers.block_stride = caches.block_stride;
      layers.offset_stride = caches.offset_stride;
      layers.head_stride = caches.head_stride;
      problem.token_offset = token_offset;
      dispatch_vec_and_style<kVec>(vec_ok, is_neox, [&](auto vec_tag, auto neox_tag) {
        constexpr int V = decltype(vec_tag)::value;
        constexpr bool N = decltype(neox_tag)::value;
        launcher(kv_concat::fused_kv_concat_kernel<T, index_t, V, N>, Dim3{static_cast<unsigned>(tokens)},
                 Dim3{256}, smem, table, layers, problem, src_pos, dst_pos, slot_mapping);
      });
    }
    token_offset += tokens;
  }
}

}  // namespace cacheblend
