// ATen wrapper of the fused_kv_concat CUDA kernel: device guard and stream; the launch
// code is in kv_concat_launch.h.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/cuda_launcher.cuh"
#include "cuda/kv_concat_launch.h"
#include "ops/kv_concat.h"

namespace cacheblend {

void fused_kv_concat_cuda(at::TensorList chunks, const at::Tensor& src_pos, const at::Tensor& dst_pos,
                          const at::Tensor& slot_mapping, const at::Tensor& cos_sin_cache, bool is_neox,
                          at::TensorList k_caches, at::TensorList v_caches) {
  const c10::cuda::CUDAGuard guard(k_caches[0].device());
  launch_fused_kv_concat(chunks, src_pos, dst_pos, slot_mapping, cos_sin_cache, is_neox, k_caches, v_caches,
                         CudaLauncher{c10::cuda::getCurrentCUDAStream()});
}

}  // namespace cacheblend
