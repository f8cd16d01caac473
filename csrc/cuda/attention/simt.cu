// sparse_query_attention: the SIMT kernel (every storage type), instantiated for
// CudaLauncher (ATen-free translation unit).
#include "cuda/attention_launch.cuh"
#include "cuda/cuda_launcher.cuh"

namespace cacheblend {

#define CB_INSTANTIATE_SIMT(T, P) \
  template void launch_attention_simt<T, P, CudaLauncher>(const attention::AttentionArgs&, const P*, \
                                                           const CudaLauncher&);
CB_INSTANTIATE_SIMT(float, int32_t)
CB_INSTANTIATE_SIMT(float, int64_t)
CB_INSTANTIATE_SIMT(half_t, int32_t)
CB_INSTANTIATE_SIMT(half_t, int64_t)
CB_INSTANTIATE_SIMT(bfloat16_t, int32_t)
CB_INSTANTIATE_SIMT(bfloat16_t, int64_t)
#undef CB_INSTANTIATE_SIMT

}  // namespace cacheblend
