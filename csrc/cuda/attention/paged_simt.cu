// sparse_query_attention_paged: the paged SIMT kernel (every storage type), instantiated
// for CudaLauncher (ATen-free translation unit).
#include "cuda/attention_launch.cuh"
#include "cuda/cuda_launcher.cuh"

namespace cacheblend {

#define CB_INSTANTIATE_PAGED(T, P)                                                                        \
  template void launch_attention_paged_simt<T, P, CudaLauncher>(const attention::AttentionArgs&,         \
                                                                const attention::PagedKV&, const P*, \
                                                                const CudaLauncher&);
CB_INSTANTIATE_PAGED(float, int32_t)
CB_INSTANTIATE_PAGED(float, int64_t)
CB_INSTANTIATE_PAGED(half_t, int32_t)
CB_INSTANTIATE_PAGED(half_t, int64_t)
CB_INSTANTIATE_PAGED(bfloat16_t, int32_t)
CB_INSTANTIATE_PAGED(bfloat16_t, int64_t)
#undef CB_INSTANTIATE_PAGED

}  // namespace cacheblend
