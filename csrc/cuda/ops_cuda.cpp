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

#include <atomic>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

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

cudaError_t allow_dynamic_shared_memory(const void* kernel, size_t bytes) {
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, size_t> allowed;  // (kernel, device) -> bytes
  int device = 0;
  cudaError_t status = cudaGetDevice(&device);
  if (status != cudaSuccess) return status;
  const std::lock_guard<std::mutex> lock(mutex);
  size_t& limit = allowed[{kernel, device}];
  if (limit >= bytes) return cudaSuccess;
  status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (status == cudaSuccess) limit = bytes;
  return status;
}

namespace {

CudaLauncher current_stream_launcher() { return CudaLauncher(c10::cuda::getCurrentCUDAStream()); }

// A kernel name this build can run: the variants (flash_s2, flash_s3, flash_m32) are compiled
// only with CACHEBLEND_ATTENTION_VARIANTS=1 at build time.
AttentionImpl checked_attention_impl(const char* name) {
  const AttentionImpl impl = parse_attention_impl(name);
#if !defined(CACHEBLEND_ATTENTION_VARIANTS)
  TORCH_CHECK(impl == AttentionImpl::kFlash || impl == AttentionImpl::kSimt, "attention kernel '", name,
              "' is a benchmarking variant, not compiled into this build: rebuild with "
              "CACHEBLEND_ATTENTION_VARIANTS=1 (or use flash or simt)");
#endif
  return impl;
}

// The kernel sparse_query_attention(_paged) runs for fp16 / bf16: CACHEBLEND_ATTENTION_IMPL
// (flash, the default; flash_s2; flash_s3; flash_m32; simt) and CACHEBLEND_ATTENTION_TILES_PER_SPLIT (0: the
// planned key split), read once, at the first call; set_attention_kernel changes both.
struct AttentionKernelState {
  std::atomic<int> impl;
  std::atomic<int> tiles_per_split;
  AttentionKernelState()
      : impl(static_cast<int>(checked_attention_impl(std::getenv("CACHEBLEND_ATTENTION_IMPL")))),
        tiles_per_split(parse_tiles_per_split(std::getenv("CACHEBLEND_ATTENTION_TILES_PER_SPLIT"))) {}
  static int parse_tiles_per_split(const char* text) {
    if (text == nullptr || text[0] == '\0') return 0;
    char* end = nullptr;
    const long value = std::strtol(text, &end, 10);
    TORCH_CHECK(*end == '\0' && value >= 0 && value <= (1 << 20),
                "CACHEBLEND_ATTENTION_TILES_PER_SPLIT must be a non-negative integer, got '", text, "'");
    return static_cast<int>(value);
  }
};

AttentionKernelState& attention_kernel_state() {
  static AttentionKernelState state;
  return state;
}

AttentionKernelChoice attention_kernel_choice() {
  const AttentionKernelState& s = attention_kernel_state();
  return {static_cast<AttentionImpl>(s.impl.load(std::memory_order_relaxed)),
          s.tiles_per_split.load(std::memory_order_relaxed)};
}

// Compute capability and SM count, read once per device.
const AttentionDevice& attention_device(int device) {
  static std::mutex mutex;
  static std::vector<std::unique_ptr<AttentionDevice>> devices;
  const std::lock_guard<std::mutex> lock(mutex);
  if (static_cast<size_t>(device) >= devices.size()) devices.resize(device + 1);
  if (!devices[device]) {
    int major = 0, sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    devices[device] = std::make_unique<AttentionDevice>(AttentionDevice{major >= 8, sms});
  }
  return *devices[device];
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
  dispatch_sparse_query_attention(q, k, v, q_pos, q_indptr, kv_indptr, scale, out, lse, attention_kernel_choice(),
                                  attention_device(q.get_device()), launcher);
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
                                        kv_last_page_len, scale, out, lse, attention_kernel_choice(),
                                        attention_device(q.get_device()), launcher);
  C10_CUDA_CHECK(launcher.status());
}

void set_attention_kernel_cuda(const std::string& impl, int64_t tiles_per_split) {
  TORCH_CHECK(tiles_per_split >= 0 && tiles_per_split <= (1 << 20),
              "tiles_per_split must be 0 (planned) or a positive number of key tiles, got ", tiles_per_split);
  const AttentionImpl parsed = checked_attention_impl(impl.c_str());
  AttentionKernelState& s = attention_kernel_state();
  s.impl.store(static_cast<int>(parsed), std::memory_order_relaxed);
  s.tiles_per_split.store(static_cast<int>(tiles_per_split), std::memory_order_relaxed);
}

std::tuple<std::string, int64_t> attention_kernel_cuda() {
  const AttentionKernelChoice c = attention_kernel_choice();
  return {attention_impl_name(c.impl), c.tiles_per_split};
}

}  // namespace cacheblend
