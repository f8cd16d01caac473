// ATen wrapper of the sparse_query_attention CUDA kernels (kernels/attention_cuda.cuh):
// picks the split-key tensor-core kernel (default), the first tensor-core kernel or the
// SIMT kernel and launches on the current stream.
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
#include "kernels/attention_cuda.cuh"
#include "ops/attention.h"

namespace cacheblend {
namespace {

using attention::AttentionArgs;

// CACHEBLEND_ATTENTION_IMPL selects the kernel for fp16 / bf16 (read per call, so tests
// and benchmarks can switch it):
//   unset / "mma_v1": the tensor-core kernel verified on an H100 (one block per row tile
//                     and kv head, no key split) -- the default;
//   "split":          the split-key tensor-core kernel with cp.async double-buffering
//                     and a combine kernel (compile-checked and emulated; not yet run on
//                     a GPU, hence not the default);
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

// Key splits of the split kernel, from the shapes only (no device reads): enough blocks
// for about four waves of two blocks on a 132-SM GPU, at least kSplitMinTiles key tiles
// per split.
int choose_splits(int64_t num_row_tiles, int64_t num_k, int hkv) {
  const int64_t base_blocks = num_row_tiles * hkv;
  const int64_t key_tiles = ceil_div(num_k, int64_t{attention::kMmaKeys});
  int64_t splits = ceil_div(int64_t{attention::kSplitTargetBlocks}, base_blocks);
  splits = std::min(splits, key_tiles / attention::kSplitMinTiles);
  splits = std::min<int64_t>(splits, attention::kSplitMaxSplits);
  return static_cast<int>(std::max<int64_t>(splits, 1));
}

template <typename scalar_t, typename pos_t, int D, bool kPipelined>
void launch_split(const AttentionArgs& args, const pos_t* q_pos, const at::Tensor& q, cudaStream_t stream) {
  const int tokens_per_block = attention::kMmaRows / args.group;
  const int64_t row_tiles = ceil_div(args.num_q, int64_t{tokens_per_block});
  const int splits = choose_splits(row_tiles, args.num_k, args.hkv);
  const int64_t key_tiles = std::max<int64_t>(ceil_div(args.num_k, int64_t{attention::kMmaKeys}), 1);
  attention::SplitWorkspace ws{nullptr, nullptr, static_cast<int>(ceil_div(key_tiles, int64_t{splits}))};
  at::Tensor part_o, part_lse;
  if (splits > 1) {
    TORCH_CHECK(ceil_div(args.num_q * args.hq, int64_t{attention::kCombineWarps}) <= std::numeric_limits<int32_t>::max(),
                "sparse_query_attention: too many (query, head) rows: ", args.num_q * args.hq);
    // Sizes from the shapes only: safe under CUDA-graph capture (caching allocator).
    const auto opts = q.options().dtype(at::kFloat);
    part_o = at::empty({splits, args.num_q, args.hq, D}, opts);
    part_lse = at::empty({splits, args.num_q, args.hq}, opts);
    ws.part_o = part_o.data_ptr<float>();
    ws.part_lse = part_lse.data_ptr<float>();
  }
  const dim3 grid(static_cast<unsigned>(row_tiles), static_cast<unsigned>(args.hkv), static_cast<unsigned>(splits));
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
  at::Tensor q_ind, kv_ind;
  if (q_indptr.has_value()) {
    q_ind = q_indptr->to(at::kLong);
    kv_ind = kv_indptr->to(at::kLong);
  }

  AttentionArgs args{};
  args.q = q.data_ptr();
  args.k = k.data_ptr();
  args.v = v.data_ptr();
  args.out = out.data_ptr();
  args.lse = lse.has_value() ? lse->data_ptr<float>() : nullptr;
  args.q_indptr = q_indptr.has_value() ? q_ind.data_ptr<int64_t>() : nullptr;
  args.kv_indptr = q_indptr.has_value() ? kv_ind.data_ptr<int64_t>() : nullptr;
  args.q_s0 = q.stride(0);
  args.q_s1 = q.stride(1);
  args.k_s0 = k.stride(0);
  args.k_s1 = k.stride(1);
  args.v_s0 = v.stride(0);
  args.v_s1 = v.stride(1);
  args.o_s0 = out.stride(0);
  args.o_s1 = out.stride(1);
  args.lse_s0 = lse.has_value() ? lse->stride(0) : 0;
  args.lse_s1 = lse.has_value() ? lse->stride(1) : 0;
  args.num_q = num_q;
  args.num_k = k.size(0);
  args.num_requests = q_indptr.has_value() ? static_cast<int>(q_indptr->size(0) - 1) : 1;
  args.hq = static_cast<int>(q.size(1));
  args.hkv = static_cast<int>(k.size(1));
  args.group = args.hq / args.hkv;
  args.head_dim = static_cast<int>(q.size(2));
  args.scale_log2 = static_cast<float>(scale) * attention::kLog2e;

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
