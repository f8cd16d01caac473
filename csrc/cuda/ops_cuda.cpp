// CUDA implementations of every op: device guard, current stream, the ATen side of the
// launch (cuda/*_dispatch.h) with a CudaLauncher, and the launch error raised as a
// c10::Error. Compiled by the host compiler: the kernels and their launch code live in
// the ATen-free translation units (cuda/*.cu, cuda/attention/*.cu). Arguments are
// validated before these run (torch_bindings.cpp, with the contracts in ops/*.h).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdlib>
#include <optional>
#include <tuple>

#include "cuda/attention_dispatch.h"
#include "cuda/cuda_launcher.h"
#include "cuda/kv_concat_dispatch.h"
#include "cuda/rope_dispatch.h"
#include "cuda/select_dispatch.h"
#include "ops/attention.h"
#include "ops/kv_concat.h"
#include "ops/rope.h"
#include "ops/select.h"

namespace cacheblend {

// Memory the launched kernels fill (outputs, scratch). The caching allocator keeps this
// free of host syncs and safe under CUDA-graph capture.
at::Tensor uninitialized(const CudaLauncher&, at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::empty(sizes, options);
}

namespace {

CudaLauncher current_stream_launcher() { return CudaLauncher(c10::cuda::getCurrentCUDAStream()); }

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

void rope_reposition_cuda(const at::Tensor& key, const at::Tensor& out, const at::Tensor& src_pos,
                          const at::Tensor& dst_pos, const at::Tensor& cos_sin_cache, bool is_neox) {
  const c10::cuda::CUDAGuard guard(key.device());
  const CudaLauncher launcher = current_stream_launcher();
  dispatch_rope_reposition(key, out, src_pos, dst_pos, cos_sin_cache, is_neox, launcher);
  C10_CUDA_CHECK(launcher.status());
}

void fused_kv_concat_cuda(at::TensorList chunks, const at::Tensor& src_pos, const at::Tensor& dst_pos,
                          const at::Tensor& slot_mapping, const at::Tensor& cos_sin_cache, bool is_neox,
                          at::TensorList k_caches, at::TensorList v_caches) {
  const c10::cuda::CUDAGuard guard(k_caches[0].device());
  const CudaLauncher launcher = current_stream_launcher();
  dispatch_fused_kv_concat(chunks, src_pos, dst_pos, slot_mapping, cos_sin_cache, is_neox, k_caches, v_caches,
                           launcher);
  C10_CUDA_CHECK(launcher.status());
}

void kv_deviation_cuda(const at::Tensor& fresh, const at::Tensor& reused,
                       const std::optional<at::Tensor>& token_index, bool accumulate, const at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(fresh.device());
  const CudaLauncher launcher = current_stream_launcher();
  dispatch_kv_deviation(fresh, reused, token_index, accumulate, out, launcher);
  C10_CUDA_CHECK(launcher.status());
}

std::tuple<at::Tensor, at::Tensor> select_hkvd_batched_cuda(const at::Tensor& deviation, const at::Tensor& indptr,
                                                            const at::Tensor& k,
                                                            const std::optional<at::Tensor>& forced,
                                                            const std::optional<at::Tensor>& candidates,
                                                            int64_t max_selected) {
  const c10::cuda::CUDAGuard guard(deviation.device());
  const CudaLauncher launcher = current_stream_launcher();
  auto result = dispatch_select_hkvd_batched(deviation, indptr, k, forced, candidates, max_selected, launcher);
  C10_CUDA_CHECK(launcher.status());
  return result;
}

void sparse_query_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& q_pos, const std::optional<at::Tensor>& q_indptr,
                                 const std::optional<at::Tensor>& kv_indptr, double scale, const at::Tensor& out,
                                 const std::optional<at::Tensor>& lse) {
  const c10::cuda::CUDAGuard guard(q.device());
  const CudaLauncher launcher = current_stream_launcher();
  dispatch_sparse_query_attention(q, k, v, q_pos, q_indptr, kv_indptr, scale, out, lse, requested_impl(),
                                  device_has_mma(q.get_device()), /*force_splits=*/0, launcher);
  C10_CUDA_CHECK(launcher.status());
}

void sparse_query_attention_paged_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                       const at::Tensor& q_pos, const at::Tensor& q_indptr,
                                       const at::Tensor& kv_indptr, const at::Tensor& kv_indices,
                                       const at::Tensor& kv_last_page_len, double scale, const at::Tensor& out,
                                       const std::optional<at::Tensor>& lse) {
  const c10::cuda::CUDAGuard guard(q.device());
  const CudaLauncher launcher = current_stream_launcher();
  dispatch_sparse_query_attention_paged(q, k_cache, v_cache, q_pos, q_indptr, kv_indptr, kv_indices,
                                        kv_last_page_len, scale, out, lse, launcher);
  C10_CUDA_CHECK(launcher.status());
}

}  // namespace cacheblend
