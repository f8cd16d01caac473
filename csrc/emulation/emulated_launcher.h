// EmulatedLauncher: the launcher interface of the host launch code (cuda/launch.h; the
// extension uses cuda/cuda_launcher.h), running kernels in the host CUDA emulator
// (cuda_emulator.h) on CPU tensors. Test infrastructure only.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstddef>

#include "kernels/common.h"

namespace cacheblend {

struct EmulatedLauncher {
  template <typename... Params, typename... Args>
  void operator()(void (*kernel)(Params...), Dim3 grid, Dim3 block, size_t dynamic_smem, Args... args) const {
    emulation::launch(grid, block, dynamic_smem, [&] { kernel(args...); });
  }
};

// Memory the launched kernels fill (outputs, scratch), poisoned -- NaN, or a large
// negative integer -- so an element no kernel wrote shows up in the results.
inline at::Tensor uninitialized(const EmulatedLauncher&, at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  return at::isFloatingType(t.scalar_type()) ? t.fill_(NAN) : t.fill_(-0x5A5A5A5A);
}

}  // namespace cacheblend
