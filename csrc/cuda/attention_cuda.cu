// ATen wrapper of the sparse_query_attention CUDA kernels (kernels/attention_cuda.cuh):
// picks the first tensor-core kernel (default), the split-key tensor-core kernel or the
// SIMT kernel and launches on the current stream. Argument packing and split planning
// live in attention_plan.h, shared with the host emulator the tests run the kernels in.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

#include "cuda/dispatch_utils.cuh"
#include "cuda/attention_plan.h"
#include "ops/attention.h"

namespace cacheblend {
namespace {

using attention::AttentionArgs;

// CACHEBLEND_ATTENTION_IMPL selects the kernel for fp16 / bf16 (read per call, so tests
// and benchmarks can switch it):
//   unset / "mma_v1": the tensor-core kernel verified on an H100 (one block per row tile
//                     and kv head, no key split) -- the default;
//   "split":          the split-key tensor-core kernel with cp.async double-buffering
//                     and a combine kernel (passes the tests in the host CUDA emulator;
//                     not yet run on a GPU, hence not the default);
//   "split_sync":     the split-key kernel without cp.async;
//   "simt":           the SIMT kernel.
enum class Impl { kMmaV1, kSplit, kSplitSync, kSimt };

Impl requested_impl() {
  const char* impl = std::getenv("CACHEBLEND_ATTENTION_IMPL");
  if (impl == nullptr || impl[0] == '\0' || std::strcmp(impl, "mma_v1") == 0) return Impl::kMmaV1;
  if (std::strcmp(impl, "split") == 0) return Impl::kSplit;
  if (std::strcmp(impl, "split_sync") == 0) return Impl::kSplitSync;
  if (std::strcmp(impl, "simt") == 0) return Impl::kSimt;
  TORCH_CHECK(false, "CACHEBLEND_ATTENTION_IMPL must be unset, mma_v1, split, split_sync or simt, got '", impl, "'");
}

bool device_has_mma(int device) {
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  return major >= 8;
}

template <typename scalar_t, typename pos_t, int D, bool kPipelined>
void launch_split(const AttentionArgs& args, const pos_t* q_pos, const at::Tensor& q, cudaStream_t stream) {
  const SplitPlan plan = plan_split(args);
  attention::SplitWorkspace ws{nullptr, nullptr, plan.tiles_per_split};
  at::Tensor part_o, part_lse;
  if (plan.splits > 1) {
    // Sizes from the shapes only: safe under CUDA-graph capture (caching allocator).
    std::tie(part_o, part_lse) = allocate_split_workspace(args, plan, q.options());
    ws.part_o = part_o.data_ptr<float>();
    ws.part_lse = part_lse.data_ptr<float>();
  }
  const int splits = plan.splits;
  const dim3 grid(static_cast<unsigned>(plan.row_tiles), static_cast<unsigned>(args.hkv), static_cast<unsigned>(splits));
  constexpr int smem_bytes = attention::split_kernel_smem_bytes<D, kPipelined>();
  auto* kernel = attention::sparse_query_attention_split_kernel<scalar_t, pos_t, D, kPipelined>;
  // Above 48 KB of dynamic shared memory needs the opt-in (a host-side attribute of the
  // function on the current device; cheap, and allowed during graph capture).
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes));
  kernel<<<grid, attention::kMmaThreads, smem_bytes, stream>>>(args, q_pos, ws);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (splits > 1) {
    const int64_t rows = args.num_q * args.hq;
    const dim3 cgrid(static_cast<unsigned>(ceil_div(rows, int64_t{attention::kCombineWarps})));
    attention::sparse_query_attention_combine_kernel<scalar_t>
        <<<cgrid, attention::kCombineWarps * 32, 0, stream>>>(args, ws.part_o, ws.part_lse, splits);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename scalar_t, typename pos_t>
void launch(const AttentionArgs& args, const pos_t* q_pos, bool use_mma, Impl impl, const at::Tensor& q,
            cudaStream_t stream) {
  if constexpr (!std::is_same_v<scalar_t, float>) {
    if (use_mma && (impl == Impl::kSplit || impl == Impl::kSplitSync)) {
      const bool pipelined = impl == Impl::kSplit;
      if (args.head_dim == 64) {
        if (pipelined)
          launch_split<scalar_t, pos_t, 64, true>(args, q_pos, q, stream);
        else
          launch_split<scalar_t, pos_t, 64, false>(args, q_pos, q, stream);
      } else {
        if (pipelined)
          launch_split<scalar_t, pos_t, 128, true>(args, q_pos, q, stream);
        else
          launch_split<scalar_t, pos_t, 128, false>(args, q_pos, q, stream);
      }
      return;
    }
    if (use_mma) {
      const int tokens_per_block = attention::kMmaRows / args.group;
      const dim3 grid(static_cast<unsigned>(ceil_div(args.num_q, tokens_per_block)), args.hkv);
      if (args.head_dim == 64) {
        attention::sparse_query_attention_mma_kernel<scalar_t, pos_t, 64>
            <<<grid, attention::kMmaThreads, 0, stream>>>(args, q_pos);
      } else {
        attention::sparse_query_attention_mma_kernel<scalar_t, pos_t, 128>
            <<<grid, attention::kMmaThreads, 0, stream>>>(args, q_pos);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
  }
  const dim3 grid(static_cast<unsigned>(args.num_q), static_cast<unsigned>(ceil_div(args.hq, attention::kSimtWarps)));
  attention::sparse_query_attention_simt_kernel<scalar_t, pos_t>
      <<<grid, attention::kSimtWarps * 32, 0, stream>>>(args, q_pos);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void sparse_query_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& q_pos, const std::optional<at::Tensor>& q_indptr,
                                 const std::optional<at::Tensor>& kv_indptr, double scale, const at::Tensor& out,
                                 const std::optional<at::Tensor>& lse) {
  const int64_t num_q = q.size(0);
  TORCH_CHECK(num_q < (int64_t{1} << 31), "sparse_query_attention: at most 2^31 - 1 queries, got ", num_q);
  TORCH_CHECK(k.size(1) <= 65535, "sparse_query_attention: at most 65535 kv heads, got ", k.size(1));
  if (num_q == 0) return;
  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  // Offsets as int64 (an on-device conversion when they are int32; no host sync).
  const at::Tensor q_ind = q_indptr.has_value() ? q_indptr->to(at::kLong) : at::Tensor();
  const at::Tensor kv_ind = kv_indptr.has_value() ? kv_indptr->to(at::kLong) : at::Tensor();
  const AttentionArgs args = make_attention_args(q, k, v, q_ind, kv_ind, scale, out, lse);

  const Impl impl = requested_impl();
  const bool use_mma = q.scalar_type() != at::kFloat && (args.head_dim == 64 || args.head_dim == 128) &&
                       args.group <= attention::kMmaRows && is_aligned16(q, {q.stride(0), q.stride(1)}) &&
                       is_aligned16(k, {k.stride(0), k.stride(1)}) && is_aligned16(v, {v.stride(0), v.stride(1)}) &&
                       impl != Impl::kSimt && device_has_mma(q.get_device());

  AT_DISPATCH_SWITCH(
      q.scalar_type(), "sparse_query_attention_cuda",
      AT_DISPATCH_CASE(at::kFloat,
                       [&] {
                         AT_DISPATCH_INDEX_TYPES(q_pos.scalar_type(), "sparse_query_attention_cuda", [&] {
                           launch<scalar_t, index_t>(args, q_pos.data_ptr<index_t>(), use_mma, impl, q, stream);
                         });
                       })
      AT_DISPATCH_CASE(at::kHalf,
                       [&] {
                         AT_DISPATCH_INDEX_TYPES(q_pos.scalar_type(), "sparse_query_attention_cuda", [&] {
                           launch<scalar_t, index_t>(args, q_pos.data_ptr<index_t>(), use_mma, impl, q, stream);
                         });
                       })
      AT_DISPATCH_CASE(at::kBFloat16, [&] {
        AT_DISPATCH_INDEX_TYPES(q_pos.scalar_type(), "sparse_query_attention_cuda", [&] {
          launch<scalar_t, index_t>(args, q_pos.data_ptr<index_t>(), use_mma, impl, q, stream);
        });
      }));
}

}  // namespace cacheblend
