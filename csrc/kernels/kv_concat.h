// fused_kv_concat: the CUDA kernel's arguments (kv_concat_cuda.cuh), shared with its host
// launch code (host-compilable). Chunk and layer pointer tables travel as kernel
// parameters, so a launch covers at most kMaxChunks chunks x kMaxLayers layers.
#pragma once

#include <cstdint>

namespace cacheblend {
namespace kv_concat {

constexpr int kMaxChunks = 32;
constexpr int kMaxLayers = 64;

struct ChunkTable {
  const void* base[kMaxChunks];  // element (l, kv, t, h, d) at base + l*s_layer + kv*s_kv + t*s_token + h*s_head + d
  int64_t layer_stride[kMaxChunks], kv_stride[kMaxChunks], token_stride[kMaxChunks], head_stride[kMaxChunks];
  int64_t token_begin[kMaxChunks + 1];  // prefix sums of chunk lengths, relative to this launch
  int num_chunks;
};

struct LayerTable {
  void* k[kMaxLayers];
  void* v[kMaxLayers];
  int num_layers;
  // Geometry shared by every layer's K and V cache (validated on the host).
  int64_t num_slots, block_size, block_stride, offset_stride, head_stride;
};

struct Problem {
  int num_heads, head_dim, rotary_dim;
  const float* cos_sin_cache;
  int64_t max_pos;
  int64_t token_offset;  // index of this launch's first token in src_pos / dst_pos / slot_mapping
};

}  // namespace kv_concat
}  // namespace cacheblend
