// CudaLauncher: the launcher that the host launch code (cuda/launch.h) uses in the
// extension: kernels run on one CUDA stream. ATen-free. It keeps the first launch error
// of an op (later launches of that op are skipped) for the ATen entry point to raise
// (cuda/ops_cuda.cpp: C10_CUDA_CHECK).
//
// This header only declares the launch operator, so host-compiled code can hold a
// CudaLauncher; its definition (cuda_launcher.cuh) is nvcc code, included by the
// translation units that instantiate the launch code.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

#include "kernels/common.h"

namespace cacheblend {

class CudaLauncher {
 public:
  explicit CudaLauncher(cudaStream_t stream) : stream_(stream) {}

  template <typename... Params, typename... Args>
  void operator()(void (*kernel)(Params...), Dim3 grid, Dim3 block, size_t dynamic_smem, Args... args) const;

  // cudaSuccess, or the first error of a launch through this launcher.
  cudaError_t status() const { return status_; }

 private:
  cudaStream_t stream_;
  mutable cudaError_t status_ = cudaSuccess;
};

// Raises `kernel`'s dynamic shared memory limit on the current device to `bytes` (the
// first time a kernel asks for that much on that device; later calls are a lookup).
cudaError_t allow_dynamic_shared_memory(const void* kernel, size_t bytes);

}  // namespace cacheblend
