// Host launch code of rope_reposition (kernels/rope_cuda.cuh): kernel choice and
// arguments, for any launcher (cuda/cuda_launcher.cuh or the tests' CUDA emulator).
// Arguments are validated by the caller.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include "cuda/dispatch_utils.h"
#include "kernels/rope_cuda.cuh"

namespace cacheblend {

template <typename Launcher>
void launch_rope_reposition(const at::Tensor& key, const at::Tensor& out, const at::Tensor& src_pos,
                            const at::Tensor& dst_pos, const at::Tensor& cos_sin_cache, bool is_neox,
                            const Launcher& launcher) {
  const int64_t num_tokens = key.size(0);
  if (num_tokens == 0 || key.size(1) == 0) return;
  rope::RopeKernelArgs args{key.data_ptr(), out.data_ptr(), key.stride(0), key.stride(1), out.stride(0),
                            out.stride(1), cos_sin_cache.data_ptr<float>(), cos_sin_cache.size(0),
                            static_cast<int>(key.size(1)), static_cast<int>(key.size(2)),
                            static_cast<int>(cos_sin_cache.size(1))};
  const int half = args.rotary_dim / 2;
  const size_t smem = sizeof(rope::Rotation) * half;
  CB_DISPATCH_FLOAT_TYPES(key.scalar_type(), "rope_reposition", [&] {
    constexpr int kVec = kVec16<scalar_t>;
    // The vector path needs every vector to stay inside one half / pair group and
    // every row to start on a 16-byte boundary.
    const bool vec_ok = (is_neox ? half % kVec == 0 : args.rotary_dim % kVec == 0) &&
                        (args.head_dim - args.rotary_dim) % kVec == 0 &&
                        is_aligned16(key, {key.stride(0), key.stride(1)}) &&
                        is_aligned16(out, {out.stride(0), out.stride(1)});
    AT_DISPATCH_INDEX_TYPES(src_pos.scalar_type(), "rope_reposition", [&] {
      dispatch_vec_and_style<kVec>(vec_ok, is_neox, [&](auto vec_tag, auto neox_tag) {
        constexpr int V = decltype(vec_tag)::value;
        constexpr bool N = decltype(neox_tag)::value;
        launcher(rope::rope_reposition_kernel<scalar_t, index_t, V, N>, Dim3{static_cast<unsigned>(num_tokens)},
                 Dim3{128}, smem, args, src_pos.data_ptr<index_t>(), dst_pos.data_ptr<index_t>());
      });
    });
  });
}

}  // namespace cacheblend
