// CUDA kernel of fused_kv_concat: gathers K and V of many chunks for many layers in one
// launch and re-rotates K on the way. One block per source token: the token's chunk,
// slot and RoPE rotations are resolved once, then all (layer, head, vector) work items
// of that token are spread over the block. Every destination element is written by
// exactly one thread; sources are read once.
//
// Chunk and layer pointer tables travel as kernel parameters (no device copy, CUDA-graph
// safe); the wrapper splits larger requests into several launches.
#pragma once

#include "kernels/common.h"
#include "kernels/kv_concat.h"
#include "kernels/rope.h"
#include "kernels/rope_cuda.cuh"

namespace cacheblend {
namespace kv_concat {

template <typename T, typename index_t, int VEC, bool NEOX>
__global__ void fused_kv_concat_kernel(ChunkTable chunks, LayerTable layers, Problem p,
                                       const index_t* __restrict__ src_pos, const index_t* __restrict__ dst_pos,
                                       const index_t* __restrict__ slot_mapping) {
  CB_DYNAMIC_SHARED(rope::Rotation, rotations_smem);
  const int64_t t = blockIdx.x;  // token within this launch
  const int64_t slot = static_cast<int64_t>(slot_mapping[p.token_offset + t]);
  CB_DEVICE_CHECK(slot >= -1 && slot < layers.num_slots, "fused_kv_concat: slot_mapping entry outside the cache");
  if (slot < 0) return;  // the whole block leaves together, before any barrier
  int c = 0;
  while (c + 1 < chunks.num_chunks && chunks.token_begin[c + 1] <= t) ++c;
  const int64_t tc = t - chunks.token_begin[c];
  rope::load_token_rotations(rotations_smem, p.cos_sin_cache, p.max_pos, p.rotary_dim,
                             static_cast<int64_t>(src_pos[p.token_offset + t]),
                             static_cast<int64_t>(dst_pos[p.token_offset + t]));
  __syncthreads();

  using V = Array<T, VEC>;
  const T* src_token = static_cast<const T*>(chunks.base[c]) + tc * chunks.token_stride[c];
  const int64_t dst_row = (slot / layers.block_size) * layers.block_stride + (slot % layers.block_size) * layers.offset_stride;
  const int rot_items = rope::rotation_items<VEC, NEOX>(p.rotary_dim);
  const int pass_items = (p.head_dim - p.rotary_dim) / VEC;
  const int v_items = p.head_dim / VEC;
  const int items_per_head = rot_items + pass_items + v_items;
  const int items_per_layer = p.num_heads * items_per_head;
  const int total = layers.num_layers * items_per_layer;
  for (int w = threadIdx.x; w < total; w += blockDim.x) {
    const int l = w / items_per_layer;
    const int h = (w % items_per_layer) / items_per_head;
    const int j = w % items_per_head;
    const T* src_k = src_token + l * chunks.layer_stride[c] + h * chunks.head_stride[c];
    const int64_t dst = dst_row + h * layers.head_stride;
    if (j < rot_items) {
      rope::reposition_item<T, VEC, NEOX>(src_k, static_cast<T*>(layers.k[l]) + dst, rotations_smem, p.rotary_dim, j);
    } else if (j < rot_items + pass_items) {
      const int d = p.rotary_dim + (j - rot_items) * VEC;
      *reinterpret_cast<V*>(static_cast<T*>(layers.k[l]) + dst + d) = *reinterpret_cast<const V*>(src_k + d);
    } else {
      const int d = (j - rot_items - pass_items) * VEC;
      const T* src_v = src_k + chunks.kv_stride[c];
      *reinterpret_cast<V*>(static_cast<T*>(layers.v[l]) + dst + d) = *reinterpret_cast<const V*>(src_v + d);
    }
  }
}

}  // namespace kv_concat
}  // namespace cacheblend
