// fused_kv_concat's launch code instantiated for CudaLauncher (ATen-free translation unit).
#include "cuda/cuda_launcher.cuh"
#include "cuda/kv_concat_launch.cuh"

namespace cacheblend {

#define CB_INSTANTIATE(T, I) \
  template void launch_fused_kv_concat<T, I, CudaLauncher>(const KvConcatChunk*, int64_t, const KvConcatCaches&, \
                                                            kv_concat::Problem, const I*, const I*, const I*, \
                                                            bool, const CudaLauncher&);
CB_INSTANTIATE(float, int32_t)
CB_INSTANTIATE(float, int64_t)
CB_INSTANTIATE(half_t, int32_t)
CB_INSTANTIATE(half_t, int64_t)
CB_INSTANTIATE(bfloat16_t, int32_t)
CB_INSTANTIATE(bfloat16_t, int64_t)
#undef CB_INSTANTIATE

}  // namespace cacheblend
