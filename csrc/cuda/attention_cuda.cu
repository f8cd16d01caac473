// ATen wrapper of the sparse_query_attention CUDA kernels: device guard, stream, kernel
// choice from the environment; the launch code is in attention_launch.h.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdlib>

#include "cuda/attention_launch.h"
#include "cuda/cuda_launcher.cuh"
#include "ops/attention.h"

namespace cacheblend {
namespace {

// CACHEBLEND_ATTENTION_IMPL selects the kernel for fp16 / bf16 (read per call, so tests
// and benchmarks can switch it):
//   unset / "mma_v1": the tensor-core kernel verified on an H100 (one block per row tile
//                     and kv head, no key split) -- the default;
//   "split":          the split-key tensor-core kernel with cp.async double-buffering
//                     and a combine kernel (passes the tests in the host CUDA emulator;
//                     not yet run on a GPU, hence not the default);
//   "split_sync":     the split-key kernel without cp.async;
//   "simt":           the SIMT kernel.
AttentionImpl requested_impl() { return parse_attention_impl(std::getenv("CACHEBLEND_ATTENTION_IMPL")); }

bool device_has_mma(int device) {
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  return major >= 8;
}

}  // namespace

void sparse_query_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& q_pos, const std::optional<at::Tensor>& q_indptr,
                                 const std::optional<at::Tensor>& kv_indptr, double scale, const at::Tensor& out,
                                 const std::optional<at::Tensor>& lse) {
  const c10::cuda::CUDAGuard guard(q.device());
  // Offsets as int64 (an on-device conversion when they are int32; no host sync).
  const at::Tensor q_ind = q_indptr.has_value() ? q_indptr->to(at::kLong) : at::Tensor();
  const at::Tensor kv_ind = kv_indptr.has_value() ? kv_indptr->to(at::kLong) : at::Tensor();
  launch_sparse_query_attention(q, k, v, q_pos, q_ind, kv_ind, scale, out, lse, requested_impl(),
                                device_has_mma(q.get_device()), /*force_splits=*/0,
                                CudaLauncher{c10::cuda::getCurrentCUDAStream()});
}

}  // namespace cacheblend
