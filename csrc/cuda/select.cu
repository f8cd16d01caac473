// kv_deviation's and select_hkvd_batched's launch code instantiated for CudaLauncher
// (ATen-free translation unit).
#include "cuda/cuda_launcher.cuh"
#include "cuda/select_launch.cuh"

namespace cacheblend {

#define CB_INSTANTIATE_DEVIATION(T, I) \
  template void launch_kv_deviation<T, I, CudaLauncher>(const select::DeviationArgs&, const I*, \
                                                         const CudaLauncher&);
CB_INSTANTIATE_DEVIATION(float, int32_t)
CB_INSTANTIATE_DEVIATION(float, int64_t)
CB_INSTANTIATE_DEVIATION(half_t, int32_t)
CB_INSTANTIATE_DEVIATION(half_t, int64_t)
CB_INSTANTIATE_DEVIATION(bfloat16_t, int32_t)
CB_INSTANTIATE_DEVIATION(bfloat16_t, int64_t)
#undef CB_INSTANTIATE_DEVIATION

#define CB_INSTANTIATE_SELECT(P, K) \
  template void launch_select_hkvd_batched<P, K, CudaLauncher>(const select::SelectArgs&, int64_t, const P*, \
                                                                const K*, const CudaLauncher&);
CB_INSTANTIATE_SELECT(int32_t, int32_t)
CB_INSTANTIATE_SELECT(int32_t, int64_t)
CB_INSTANTIATE_SELECT(int64_t, int32_t)
CB_INSTANTIATE_SELECT(int64_t, int64_t)
#undef CB_INSTANTIATE_SELECT

}  // namespace cacheblend
