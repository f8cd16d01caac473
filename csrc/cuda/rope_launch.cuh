// Host launch code of rope_reposition (kernels/rope_cuda.cuh), declared in cuda/launch.h.
#pragma once

#include "cuda/launch.h"
#include "kernels/rope_cuda.cuh"

namespace cacheblend {

template <typename T, typename index_t, typename Launcher>
void launch_rope_reposition(const rope::RopeKernelArgs& args, int64_t num_tokens, const index_t* src_pos,
                            const index_t* dst_pos, bool is_neox, const Launcher& launcher) {
  if (num_tokens == 0 || args.num_heads == 0) return;
  const int half = args.rotary_dim / 2;
  const size_t smem = sizeof(rope::Rotation) * half;
  constexpr int kVec = kVec16<T>;
  // The vector path needs every vector to stay inside one half / pair group and every
  // row to start on a 16-byte boundary.
  const bool vec_ok = (is_neox ? half % kVec == 0 : args.rotary_dim % kVec == 0) &&
                      (args.head_dim - args.rotary_dim) % kVec == 0 &&
                      is_aligned16<T>(args.in, {args.in_token_stride, args.in_head_stride}) &&
                      is_aligned16<T>(args.out, {args.out_token_stride, args.out_head_stride});
  dispatch_vec_and_style<kVec>(vec_ok, is_neox, [&](auto vec_tag, auto neox_tag) {
    constexpr int V = decltype(vec_tag)::value;
    constexpr bool N = decltype(neox_tag)::value;
    launcher(rope::rope_reposition_kernel<T, index_t, V, N>, Dim3{static_cast<unsigned>(num_tokens)}, Dim3{128},
             smem, args, src_pos, dst_pos);
  });
}

}  // namespace cacheblend
