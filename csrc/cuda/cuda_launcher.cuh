// CudaLauncher's launch operator (declared in cuda_launcher.h): nvcc code.
#pragma once

#include <cuda_runtime.h>

#include "cuda/cuda_launcher.h"

namespace cacheblend {

template <typename... Params, typename... Args>
void CudaLauncher::operator()(void (*kernel)(Params...), Dim3 grid, Dim3 block, size_t dynamic_smem,
                              Args... args) const {
  if (status_ != cudaSuccess) return;  // an earlier launch of this op failed: it is reported
  // Static plus dynamic shared memory above 48 KB needs the opt-in: a host-side attribute
  // of the function on the current device, allowed during graph capture. Set once per
  // (kernel, device, size).
  if (dynamic_smem > 0) {
    status_ = allow_dynamic_shared_memory(reinterpret_cast<const void*>(kernel), dynamic_smem);
    if (status_ != cudaSuccess) return;
  }
  kernel<<<dim3(grid.x, grid.y, grid.z), dim3(block.x, block.y, block.z), dynamic_smem, stream_>>>(args...);
  status_ = cudaGetLastError();
}

}  // namespace cacheblend
