// CPU implementation of fused_kv_concat: tokens in parallel; each token's rotations are
// computed once (kernels/rope.h) and applied to every layer and head.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "kernels/rope.h"
#include "ops/kv_concat.h"

namespace cacheblend {

void fused_kv_concat_cpu(at::TensorList chunks, const at::Tensor& src_pos, const at::Tensor& dst_pos,
                         const at::Tensor& slot_mapping, const at::Tensor& cos_sin_cache, bool is_neox,
                         at::TensorList k_caches, at::TensorList v_caches) {
  const at::Tensor& ref = k_caches[0];
  const int64_t total = src_pos.size(0);
  if (total == 0) return;
  const CacheGeometry geo = cache_geometry(ref);
  const int64_t num_layers = static_cast<int64_t>(k_caches.size());
  const int64_t num_heads = ref.size(-2);
  const int head_dim = static_cast<int>(ref.size(-1));
  const int rotary_dim = static_cast<int>(cos_sin_cache.size(1));
  const float* table = cos_sin_cache.data_ptr<float>();

  // Token -> chunk lookup: chunk_of[t] and the token's index inside its chunk.
  std::vector<int32_t> chunk_of(total);
  std::vector<int64_t> index_in_chunk(total);
  for (int64_t c = 0, t = 0; c < static_cast<int64_t>(chunks.size()); ++c)
    for (int64_t i = 0; i < chunks[c].size(2); ++i, ++t) {
      chunk_of[t] = static_cast<int32_t>(c);
      index_in_chunk[t] = i;
    }

  AT_DISPATCH_INDEX_TYPES(src_pos.scalar_type(), "fused_kv_concat_cpu", [&] {
    const index_t* src = src_pos.data_ptr<index_t>();
    const index_t* dst = dst_pos.data_ptr<index_t>();
    const index_t* slots = slot_mapping.data_ptr<index_t>();
    check_positions_in_range(src, total, cos_sin_cache.size(0), "src_pos", "cos_sin_cache rows");
    check_positions_in_range(dst, total, cos_sin_cache.size(0), "dst_pos", "cos_sin_cache rows");
    // Slots must be -1 or inside the cache, and each written at most once.
    std::vector<uint8_t> seen(geo.num_slots, 0);
    for (int64_t t = 0; t < total; ++t) {
      const int64_t s = slots[t];
      TORCH_CHECK(s >= -1 && s < geo.num_slots, "slot_mapping[", t, "] = ", s, " is outside [-1, ", geo.num_slots,
                  ") (slots of the cache)");
      if (s < 0) continue;
      TORCH_CHECK(!seen[s], "slot_mapping[", t, "] = ", s, " repeats an earlier slot: each slot is written once");
      seen[s] = 1;
    }

    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, ref.scalar_type(), "fused_kv_concat_cpu", [&] {
      std::vector<scalar_t*> k_dst(num_layers), v_dst(num_layers);
      for (int64_t l = 0; l < num_layers; ++l) {
        k_dst[l] = k_caches[l].data_ptr<scalar_t>();
        v_dst[l] = v_caches[l].data_ptr<scalar_t>();
      }
      at::parallel_for(0, total, 8, [&](int64_t begin, int64_t end) {
        std::vector<rope::Rotation> rotations(rotary_dim / 2);
        for (int64_t t = begin; t < end; ++t) {
          const int64_t slot = slots[t];
          if (slot < 0) continue;
          const at::Tensor& chunk = chunks[chunk_of[t]];
          const scalar_t* src_token = chunk.data_ptr<scalar_t>() + index_in_chunk[t] * chunk.stride(2);
          const int64_t row = (slot / geo.block_size) * geo.block_stride + (slot % geo.block_size) * geo.offset_stride;
          rope::token_rotations(table, rotary_dim, src[t], dst[t], rotations.data());
          for (int64_t l = 0; l < num_layers; ++l) {
            for (int64_t h = 0; h < num_heads; ++h) {
              const scalar_t* k_src = src_token + l * chunk.stride(0) + h * chunk.stride(3);
              const int64_t off = row + h * geo.head_stride;
              rope::reposition_head(k_src, k_dst[l] + off, rotations.data(), rotary_dim,
                                    head_dim, is_neox);
              std::memcpy(v_dst[l] + off, k_src + chunk.stride(1), head_dim * sizeof(scalar_t));
            }
          }
        }
      });
    });
  });
}

}  // namespace cacheblend
