// rope_reposition's launch code instantiated for CudaLauncher (ATen-free translation unit).
#include "cuda/cuda_launcher.cuh"
#include "cuda/rope_launch.cuh"

namespace cacheblend {

#define CB_INSTANTIATE(T, I) \
  template void launch_rope_reposition<T, I, CudaLauncher>(const rope::RopeKernelArgs&, int64_t, const I*, \
                                                            const I*, bool, const CudaLauncher&);
CB_INSTANTIATE(float, int32_t)
CB_INSTANTIATE(float, int64_t)
CB_INSTANTIATE(half_t, int32_t)
CB_INSTANTIATE(half_t, int64_t)
CB_INSTANTIATE(bfloat16_t, int32_t)
CB_INSTANTIATE(bfloat16_t, int64_t)
#undef CB_INSTANTIATE

}  // namespace cacheblend
