// CUDA kernel of rope_reposition. One block per token: the token's rotations are
// computed once into shared memory and reused by all its heads; each thread then
// rotates VEC-element 16-byte vectors (both halves of a NeoX pair, or VEC/2
// interleaved GPT-J pairs).
#pragma once

#include "kernels/common.h"
#include "kernels/rope.h"

namespace cacheblend {
namespace rope {

// Fills rot[0..half) for one token; call with all threads of the block.
template <typename index_t>
CB_DEVICE void load_token_rotations(Rotation* rot, const float* table, int64_t max_pos, int rotary_dim,
                                    index_t src, index_t dst) {
  CB_DEVICE_CHECK(src >= 0 && src < max_pos, "rope: src_pos outside the cos_sin_cache rows");
  CB_DEVICE_CHECK(dst >= 0 && dst < max_pos, "rope: dst_pos outside the cos_sin_cache rows");
  const int half = rotary_dim / 2;
  const float* src_row = table + static_cast<int64_t>(src) * rotary_dim;
  const float* dst_row = table + static_cast<int64_t>(dst) * rotary_dim;
  for (int i = threadIdx.x; i < half; i += blockDim.x) rot[i] = reposition_rotation(src_row, dst_row, half, i);
}

// Width of one rotation work item: VEC elements, but at least one GPT-J pair.
template <int VEC, bool NEOX>
constexpr int kItemWidth = (!NEOX && VEC < 2) ? 2 : VEC;

// Rotation work items per head: NeoX items cover VEC pairs (one vector in each half),
// GPT-J items cover kItemWidth / 2 adjacent pairs.
template <int VEC, bool NEOX>
CB_HOST_DEVICE int rotation_items(int rotary_dim) {
  return NEOX ? rotary_dim / 2 / VEC : rotary_dim / kItemWidth<VEC, NEOX>;
}

// Rotates work item j of one head (in -> out; they may alias).
template <typename T, int VEC, bool NEOX>
CB_DEVICE void reposition_item(const T* in, T* out, const Rotation* rot, int rotary_dim, int j) {
  if constexpr (NEOX) {
    using V = Array<T, VEC>;
    const int half = rotary_dim / 2;
    V a = *reinterpret_cast<const V*>(in + j * VEC);
    V b = *reinterpret_cast<const V*>(in + half + j * VEC);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      float x = to_float(a.v[e]), y = to_float(b.v[e]);
      rotate(x, y, rot[j * VEC + e]);
      a.v[e] = from_float<T>(x);
      b.v[e] = from_float<T>(y);
    }
    *reinterpret_cast<V*>(out + j * VEC) = a;
    *reinterpret_cast<V*>(out + half + j * VEC) = b;
  } else if constexpr (VEC == 1) {
    // Scalar path: rows may be only element-aligned, so no paired loads.
    float x = to_float(in[2 * j]), y = to_float(in[2 * j + 1]);
    rotate(x, y, rot[j]);
    out[2 * j] = from_float<T>(x);
    out[2 * j + 1] = from_float<T>(y);
  } else {
    constexpr int W = kItemWidth<VEC, NEOX>;
    using V = Array<T, W>;
    V a = *reinterpret_cast<const V*>(in + j * W);
#pragma unroll
    for (int e = 0; e < W / 2; ++e) {
      float x = to_float(a.v[2 * e]), y = to_float(a.v[2 * e + 1]);
      rotate(x, y, rot[j * (W / 2) + e]);
      a.v[2 * e] = from_float<T>(x);
      a.v[2 * e + 1] = from_float<T>(y);
    }
    *reinterpret_cast<V*>(out + j * W) = a;
  }
}

template <typename T, typename index_t, int VEC, bool NEOX>
__global__ void rope_reposition_kernel(RopeKernelArgs args, const index_t* __restrict__ src_pos,
                                       const index_t* __restrict__ dst_pos) {
  CB_DYNAMIC_SHARED(Rotation, rotations_smem);
  const int64_t t = blockIdx.x;
  load_token_rotations(rotations_smem, args.cos_sin_cache, args.max_pos, args.rotary_dim,
                       static_cast<int64_t>(src_pos[t]), static_cast<int64_t>(dst_pos[t]));
  __syncthreads();
  const T* in = static_cast<const T*>(args.in) + t * args.in_token_stride;
  T* out = static_cast<T*>(args.out) + t * args.out_token_stride;
  const bool in_place = static_cast<const void*>(in) == static_cast<const void*>(out);
  // Work items of all heads are spread over the block: rotations, then (out of place)
  // the pass-through vectors past rotary_dim.
  const int rot_items = rotation_items<VEC, NEOX>(args.rotary_dim);
  const int pass_items = in_place ? 0 : (args.head_dim - args.rotary_dim) / VEC;
  const int items = rot_items + pass_items;
  for (int w = threadIdx.x; w < args.num_heads * items; w += blockDim.x) {
    const int h = w / items, j = w % items;
    const T* in_h = in + h * args.in_head_stride;
    T* out_h = out + h * args.out_head_stride;
    if (j < rot_items) {
      reposition_item<T, VEC, NEOX>(in_h, out_h, rotations_smem, args.rotary_dim, j);
    } else {
      using V = Array<T, VEC>;
      const int d = args.rotary_dim + (j - rot_items) * VEC;
      *reinterpret_cast<V*>(out_h + d) = *reinterpret_cast<const V*>(in_h + d);
    }
  }
}

}  // namespace rope
}  // namespace cacheblend
