// sparse_query_attention, head_dim 128, fp16: the tensor-core kernels (mma_v1, split with and
// without cp.async) instantiated for CudaLauncher. One translation unit per head dim and
// dtype (hdim{64,128}_{fp16,bf16}.cu differ only in these two), so nvcc builds them in
// parallel; ATen-free.
#include "cuda/attention_launch.cuh"
#include "cuda/cuda_launcher.cuh"

namespace cacheblend {

#define CB_INSTANTIATE(P) \
  template void launch_attention_mma<half_t, P, 128, CudaLauncher>(const attention::AttentionArgs&, const P*, \
                                                                const CudaLauncher&); \
  template void launch_attention_split<half_t, P, 128, true, CudaLauncher>( \
      const attention::AttentionArgs&, const P*, const SplitPlan&, const attention::SplitWorkspace&, \
      const CudaLauncher&); \
  template void launch_attention_split<half_t, P, 128, false, CudaLauncher>( \
      const attention::AttentionArgs&, const P*, const SplitPlan&, const attention::SplitWorkspace&, \
      const CudaLauncher&);
CB_INSTANTIATE(int32_t)
CB_INSTANTIATE(int64_t)
#undef CB_INSTANTIATE

}  // namespace cacheblend
