// ATen side of rope_reposition's CUDA launch: tensors to kernel arguments and dtype
// dispatch, for any launcher (the CUDA entry point in cuda/ops_cuda.cpp, the tests' host
// emulator). Arguments are validated by the caller (ops/rope.h).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include "cuda/dispatch_utils.h"
#include "cuda/launch.h"

namespace cacheblend {

template <typename Launcher>
void dispatch_rope_reposition(const at::Tensor& key, const at::Tensor& out, const at::Tensor& src_pos,
                              const at::Tensor& dst_pos, const at::Tensor& cos_sin_cache, bool is_neox,
                              const Launcher& launcher) {
  const rope::RopeKernelArgs args{key.data_ptr(), out.data_ptr(), key.stride(0), key.stride(1), out.stride(0),
                                  out.stride(1), cos_sin_cache.data_ptr<float>(), cos_sin_cache.size(0),
                                  static_cast<int>(key.size(1)), static_cast<int>(key.size(2)),
                                  static_cast<int>(cos_sin_cache.size(1))};
  CB_DISPATCH_FLOAT_TYPES(key.scalar_type(), "rope_reposition", [&] {
    AT_DISPATCH_INDEX_TYPES(src_pos.scalar_type(), "rope_reposition", [&] {
      launch_rope_reposition<scalar_t, index_t>(args, key.size(0), src_pos.data_ptr<index_t>(),
                                                dst_pos.data_ptr<index_t>(), is_neox, launcher);
    });
  });
}

}  // namespace cacheblend
