// ATen wrapper of the rope_reposition CUDA kernel: device guard and stream; the launch
// code is in rope_launch.h.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/cuda_launcher.cuh"
#include "cuda/rope_launch.h"
#include "ops/rope.h"

namespace cacheblend {

void rope_reposition_cuda(const at::Tensor& key, const at::Tensor& out, const at::Tensor& src_pos,
                          const at::Tensor& dst_pos, const at::Tensor& cos_sin_cache, bool is_neox) {
  const c10::cuda::CUDAGuard guard(key.device());
  launch_rope_reposition(key, out, src_pos, dst_pos, cos_sin_cache, is_neox,
                         CudaLauncher{c10::cuda::getCurrentCUDAStream()});
}

}  // namespace cacheblend
