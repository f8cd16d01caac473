// CudaLauncher: runs a kernel on a CUDA stream. The host launch code of every op
// (cuda/*_launch.h) is written against this small interface, so the same grids, kernel
// choices and arguments also run in the host CUDA emulator (emulation/emulated_launcher.h)
// that the tests use.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <cstddef>

#include "kernels/common.h"

namespace cacheblend {

struct CudaLauncher {
  cudaStream_t stream;

  template <typename... Params, typename... Args>
  void operator()(void (*kernel)(Params...), Dim3 grid, Dim3 block, size_t dynamic_smem, Args... args) const {
    // Above 48 KB of dynamic shared memory needs the opt-in (a host-side attribute of the
    // function on the current device; cheap, and allowed during graph capture).
    if (dynamic_smem > 48 * 1024)
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(dynamic_smem)));
    kernel<<<dim3(grid.x, grid.y, grid.z), dim3(block.x, block.y, block.z), dynamic_smem, stream>>>(args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // Memory the launched kernels fill (outputs, scratch). The caching allocator keeps
  // this free of host syncs and safe under CUDA-graph capture.
  at::Tensor uninitialized(at::IntArrayRef sizes, const at::TensorOptions& options) const {
    return at::empty(sizes, options);
  }
};

}  // namespace cacheblend
