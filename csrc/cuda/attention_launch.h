// Host launch code of sparse_query_attention (kernels/attention_cuda.cuh): kernel choice,
// argument packing, key-split planning and launches, for any launcher
// (cuda/cuda_launcher.cuh or the tests' CUDA emulator). No CUDA runtime calls, no device
// reads. Arguments are validated by the caller.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>

#include "cuda/dispatch_utils.h"

#include "kernels/attention_cuda.cuh"

namespace cacheblend {

// q_ind / kv_ind: the request offsets as int64, or undefined tensors for one request.
inline attention::AttentionArgs make_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                    const at::Tensor& q_ind, const at::Tensor& kv_ind, double scale,
                                                    const at::Tensor& out, const std::optional<at::Tensor>& lse) {
  attention::AttentionArgs args{};
  args.q = q.data_ptr();
  args.k = k.data_ptr();
  args.v = v.data_ptr();
  args.out = out.data_ptr();
  args.lse = lse.has_value() ? lse->data_ptr<float>() : nullptr;
  args.q_indptr = q_ind.defined() ? q_ind.data_ptr<int64_t>() : nullptr;
  args.kv_indptr = q_ind.defined() ? kv_ind.data_ptr<int64_t>() : nullptr;
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
  args.num_q = q.size(0);
  args.num_k = k.size(0);
  args.num_requests = q_ind.defined() ? static_cast<int>(q_ind.size(0) - 1) : 1;
  args.hq = static_cast<int>(q.size(1));
  args.hkv = static_cast<int>(k.size(1));
  args.group = args.hq / args.hkv;
  args.head_dim = static_cast<int>(q.size(2));
  args.scale_log2 = static_cast<float>(scale) * attention::kLog2e;
  return args;
}

// Grid of the split kernel: row tiles x kv heads x key splits.
struct SplitPlan {
  int64_t row_tiles;
  int splits;
  int tiles_per_split;  // key tiles per split (the last split takes the rest)
};

// Key splits from the shapes only (no device reads): enough blocks for about four waves
// of two blocks on a 132-SM GPU, at least kSplitMinTiles key tiles per split.
// force_splits > 0 overrides the choice (tests).
inline SplitPlan plan_split(const attention::AttentionArgs& args, int force_splits = 0) {
  const int64_t row_tiles = ceil_div(args.num_q, int64_t{attention::kMmaRows / args.group});
  const int64_t key_tiles = std::max<int64_t>(ceil_div(args.num_k, int64_t{attention::kMmaKeys}), 1);
  int64_t splits = ceil_div(int64_t{attention::kSplitTargetBlocks}, row_tiles * args.hkv);
  splits = std::min(splits, key_tiles / attention::kSplitMinTiles);
  splits = std::min<int64_t>(splits, attention::kSplitMaxSplits);
  splits = std::max<int64_t>(splits, 1);
  if (force_splits > 0) splits = force_splits;
  TORCH_CHECK(splits == 1 || ceil_div(args.num_q * args.hq, int64_t{attention::kCombineWarps}) <=
                                 std::numeric_limits<int32_t>::max(),
              "sparse_query_attention: too many (query, head) rows: ", args.num_q * args.hq);
  return {row_tiles, static_cast<int>(splits), static_cast<int>(ceil_div(key_tiles, splits))};
}

// Kernel choice for fp16 / bf16 (CACHEBLEND_ATTENTION_IMPL, see attention_cuda.cu).
enum class AttentionImpl { kMmaV1, kSplit, kSplitSync, kSimt };

// nullptr or "" -> the default (mma_v1).
inline AttentionImpl parse_attention_impl(const char* name) {
  if (name == nullptr || name[0] == '\0' || std::strcmp(name, "mma_v1") == 0) return AttentionImpl::kMmaV1;
  if (std::strcmp(name, "split") == 0) return AttentionImpl::kSplit;
  if (std::strcmp(name, "split_sync") == 0) return AttentionImpl::kSplitSync;
  if (std::strcmp(name, "simt") == 0) return AttentionImpl::kSimt;
  TORCH_CHECK(false, "CACHEBLEND_ATTENTION_IMPL must be unset, mma_v1, split, split_sync or simt, got '", name, "'");
}

// Split kernel (+ combine kernel when the keys are split).
template <typename scalar_t, typename pos_t, int D, bool kPipelined, typename Launcher>
void launch_attention_split(const attention::AttentionArgs& args, const pos_t* q_pos, const at::TensorOptions& options,
                            int force_splits, const Launcher& launcher) {
  const SplitPlan plan = plan_split(args, force_splits);
  attention::SplitWorkspace ws{nullptr, nullptr, plan.tiles_per_split};
  at::Tensor part_o, part_lse;
  if (plan.splits > 1) {
    const auto f32 = options.dtype(at::kFloat);
    part_o = launcher.uninitialized({plan.splits, args.num_q, args.hq, args.head_dim}, f32);
    part_lse = launcher.uninitialized({plan.splits, args.num_q, args.hq}, f32);
    ws.part_o = part_o.data_ptr<float>();
    ws.part_lse = part_lse.data_ptr<float>();
  }
  launcher(attention::sparse_query_attention_split_kernel<scalar_t, pos_t, D, kPipelined>,
           Dim3{static_cast<unsigned>(plan.row_tiles), static_cast<unsigned>(args.hkv),
                static_cast<unsigned>(plan.splits)},
           Dim3{attention::kMmaThreads}, attention::split_kernel_smem_bytes<D, kPipelined>(), args, q_pos, ws);
  if (plan.splits > 1) {
    const int64_t rows = args.num_q * args.hq;
    launcher(attention::sparse_query_attention_combine_kernel<scalar_t>,
             Dim3{static_cast<unsigned>(ceil_div(rows, int64_t{attention::kCombineWarps}))},
             Dim3{attention::kCombineWarps * 32}, 0, args, static_cast<const float*>(ws.part_o),
             static_cast<const float*>(ws.part_lse), plan.splits);
  }
}

// q_ind / kv_ind: the request offsets as int64 (undefined for one request).
// tensor_cores: the device runs mma.sync (sm_80+). force_splits > 0 overrides the split
// kernel's split count (tests).
template <typename Launcher>
void launch_sparse_query_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const at::Tensor& q_pos, const at::Tensor& q_ind, const at::Tensor& kv_ind,
                                   double scale, const at::Tensor& out, const std::optional<at::Tensor>& lse,
                                   AttentionImpl impl, bool tensor_cores, int force_splits, const Launcher& launcher) {
  const int64_t num_q = q.size(0);
  TORCH_CHECK(num_q < (int64_t{1} << 31), "sparse_query_attention: at most 2^31 - 1 queries, got ", num_q);
  TORCH_CHECK(k.size(1) <= 65535, "sparse_query_attention: at most 65535 kv heads, got ", k.size(1));
  if (num_q == 0) return;
  const attention::AttentionArgs args = make_attention_args(q, k, v, q_ind, kv_ind, scale, out, lse);
  const bool use_mma = q.scalar_type() != at::kFloat && (args.head_dim == 64 || args.head_dim == 128) &&
                       args.group <= attention::kMmaRows && is_aligned16(q, {q.stride(0), q.stride(1)}) &&
                       is_aligned16(k, {k.stride(0), k.stride(1)}) && is_aligned16(v, {v.stride(0), v.stride(1)}) &&
                       impl != AttentionImpl::kSimt && tensor_cores;
  const Dim3 mma_block{attention::kMmaThreads};
  CB_DISPATCH_FLOAT_TYPES(q.scalar_type(), "sparse_query_attention", [&] {
    AT_DISPATCH_INDEX_TYPES(q_pos.scalar_type(), "sparse_query_attention", [&] {
      const index_t* pos = q_pos.data_ptr<index_t>();
      if constexpr (!std::is_same_v<scalar_t, float>) {
        if (use_mma) {
          auto with_head_dim = [&](auto d_tag) {
            constexpr int D = decltype(d_tag)::value;
            if (impl == AttentionImpl::kSplit) {
              launch_attention_split<scalar_t, index_t, D, true>(args, pos, q.options(), force_splits, launcher);
            } else if (impl == AttentionImpl::kSplitSync) {
              launch_attention_split<scalar_t, index_t, D, false>(args, pos, q.options(), force_splits, launcher);
            } else {
              const Dim3 grid{static_cast<unsigned>(ceil_div(args.num_q, int64_t{attention::kMmaRows / args.group})),
                              static_cast<unsigned>(args.hkv)};
              launcher(attention::sparse_query_attention_mma_kernel<scalar_t, index_t, D>, grid, mma_block, 0, args,
                       pos);
            }
          };
          if (args.head_dim == 64)
            with_head_dim(std::integral_constant<int, 64>{});
          else
            with_head_dim(std::integral_constant<int, 128>{});
          return;
        }
      }
      launcher(attention::sparse_query_attention_simt_kernel<scalar_t, index_t>,
               Dim3{static_cast<unsigned>(args.num_q), static_cast<unsigned>(ceil_div(args.hq, attention::kSimtWarps))},
               Dim3{attention::kSimtWarps * 32}, 0, args, pos);
    });
  });
}

}  // namespace cacheblend
