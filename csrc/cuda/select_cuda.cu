// ATen wrappers of the kv_deviation and select_hkvd_batched CUDA kernels: device guard
// and stream; the launch code is in select_launch.h.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/cuda_launcher.cuh"
#include "cuda/select_launch.h"
#include "ops/select.h"

namespace cacheblend {

void kv_deviation_cuda(const at::Tensor& fresh, const at::Tensor& reused,
                       const std::optional<at::Tensor>& token_index, bool accumulate, const at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(fresh.device());
  launch_kv_deviation(fresh, reused, token_index, accumulate, out, CudaLauncher{c10::cuda::getCurrentCUDAStream()});
}

std::tuple<at::Tensor, at::Tensor> select_hkvd_batched_cuda(const at::Tensor& deviation, const at::Tensor& indptr,
                                                            const at::Tensor& k,
                                                            const std::optional<at::Tensor>& forced,
                                                            const std::optional<at::Tensor>& candidates,
                                                            int64_t max_selected) {
  const c10::cuda::CUDAGuard guard(deviation.device());
  return launch_select_hkvd_batched(deviation, indptr, k, forced, candidates, max_selected,
                                    CudaLauncher{c10::cuda::getCurrentCUDAStream()});
}

}  // namespace cacheblend
