// CudaLauncher's launch operator (declared in cuda_launcher.h): nvcc code.
#pragma once

#include <cuda_runtime.h>

#include "cuda/cuda_launcher.h"

namespace cacheblend {

template <typename... Params, typename... Args>
void CudaLauncher::operator()(void (*kernel)(Params...), Dim3 grid, Dim3 block, size_t dynamic_smem,
                              Args... args) const {
  if (status_ != cudaSuccess) return;  // an earlier launch of this op failed: it is reported
  // Above 48 KB of dynamic shared memory needs the opt-in (a host-side attribute of the
  // function on the current device; cheap, and allowed during graph capture).
  if (dynamic_smem > 48 * 1024) {
    status_ = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(dynamic_smem));
    if (status_ != cudaSuccess) return;
  }
  kernel<<<dim3(grid.x, grid.y, grid.z), dim3(block.x, block.y, block.z), dynamic_smem, stream_>>>(args...);
  status_ = cudaGetLastError();
}

}  // namespace cacheblend
