// ATen side of sparse_query_attention's CUDA launch: tensors to kernel arguments, the
// kernel choice (CACHEBLEND_ATTENTION_IMPL, dtype, head dim, alignment), the key-split
// plan and its workspace, for any launcher (cuda/ops_cuda.cpp, the tests' host emulator;
// `uninitialized(launcher, ...)` allocates what the kernels fill). No CUDA runtime calls,
// no device reads. Arguments are validated by the caller (ops/attention.h).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>

#include "cuda/dispatch_utils.h"
#include "cuda/launch.h"

namespace cacheblend {

// The query side of the arguments, shared by the contiguous and the paged op: queries,
// outputs, heads (num_kv_heads from the keys), scale and the request offsets q_ind (int64,
// or undefined for one request). The caller fills in where the keys live.
inline attention::AttentionArgs query_args(const at::Tensor& q, const at::Tensor& out,
                                           const std::optional<at::Tensor>& lse, const at::Tensor& q_ind,
                                           int64_t num_kv_heads, double scale) {
  attention::AttentionArgs args{};
  args.q = q.data_ptr();
  args.out = out.data_ptr();
  args.lse = lse.has_value() ? lse->data_ptr<float>() : nullptr;
  args.q_indptr = q_ind.defined() ? q_ind.data_ptr<int64_t>() : nullptr;
  args.q_s0 = q.stride(0);
  args.q_s1 = q.stride(1);
  args.o_s0 = out.stride(0);
  args.o_s1 = out.stride(1);
  args.lse_s0 = lse.has_value() ? lse->stride(0) : 0;
  args.lse_s1 = lse.has_value() ? lse->stride(1) : 0;
  args.num_q = q.size(0);
  args.num_requests = q_ind.defined() ? static_cast<int>(q_ind.size(0) - 1) : 1;
  args.hq = static_cast<int>(q.size(1));
  args.hkv = static_cast<int>(num_kv_heads);
  args.group = args.hq / args.hkv;
  args.head_dim = static_cast<int>(q.size(2));
  args.scale_log2 = static_cast<float>(scale) * attention::kLog2e;
  return args;
}

// q_ind / kv_ind: the request offsets as int64, or undefined tensors for one request.
inline attention::AttentionArgs make_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                    const at::Tensor& q_ind, const at::Tensor& kv_ind, double scale,
                                                    const at::Tensor& out, const std::optional<at::Tensor>& lse) {
  attention::AttentionArgs args = query_args(q, out, lse, q_ind, k.size(1), scale);
  args.k = k.data_ptr();
  args.v = v.data_ptr();
  args.kv_indptr = q_ind.defined() ? kv_ind.data_ptr<int64_t>() : nullptr;
  args.k_s0 = k.stride(0);
  args.k_s1 = k.stride(1);
  args.v_s0 = v.stride(0);
  args.v_s1 = v.stride(1);
  args.num_k = k.size(0);
  return args;
}

// Kernel choice for fp16 / bf16 (CACHEBLEND_ATTENTION_IMPL, see cuda/ops_cuda.cpp).
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
void dispatch_attention_split(const attention::AttentionArgs& args, const pos_t* q_pos,
                              const at::TensorOptions& options, int force_splits, const Launcher& launcher) {
  const SplitPlan plan = plan_split(args, force_splits);
  attention::SplitWorkspace ws{nullptr, nullptr, plan.tiles_per_split};
  at::Tensor part_o, part_lse;
  if (plan.splits > 1) {
    const auto f32 = options.dtype(at::kFloat);
    part_o = uninitialized(launcher, {plan.splits, args.num_q, args.hq, args.head_dim}, f32);
    part_lse = uninitialized(launcher, {plan.splits, args.num_q, args.hq}, f32);
    ws.part_o = part_o.data_ptr<float>();
    ws.part_lse = part_lse.data_ptr<float>();
  }
  launch_attention_split<scalar_t, pos_t, D, kPipelined>(args, q_pos, plan, ws, launcher);
  if (plan.splits > 1) launch_attention_combine<scalar_t>(args, ws, plan.splits, launcher);
}

// q_indptr / kv_indptr: the request offsets (int32 / int64) or nullopt for one request.
// tensor_cores: the device runs mma.sync (sm_80+). force_splits > 0 overrides the split
// kernel's split count (tests).
template <typename Launcher>
void dispatch_sparse_query_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const at::Tensor& q_pos, const std::optional<at::Tensor>& q_indptr,
                                     const std::optional<at::Tensor>& kv_indptr, double scale, const at::Tensor& out,
                                     const std::optional<at::Tensor>& lse, AttentionImpl impl, bool tensor_cores,
                                     int force_splits, const Launcher& launcher) {
  if (q.size(0) == 0) return;
  // Offsets as int64 (an on-device conversion when they are int32; no host sync).
  const at::Tensor q_ind = q_indptr.has_value() ? q_indptr->to(at::kLong) : at::Tensor();
  const at::Tensor kv_ind = kv_indptr.has_value() ? kv_indptr->to(at::kLong) : at::Tensor();
  const attention::AttentionArgs args = make_attention_args(q, k, v, q_ind, kv_ind, scale, out, lse);
  CB_DISPATCH_FLOAT_TYPES(q.scalar_type(), "sparse_query_attention", [&] {
    AT_DISPATCH_INDEX_TYPES(q_pos.scalar_type(), "sparse_query_attention", [&] {
      const index_t* pos = q_pos.data_ptr<index_t>();
      if constexpr (kIsHalfOrBFloat16<scalar_t>) {
        if (impl != AttentionImpl::kSimt && tensor_cores && attention_tensor_core_ok<scalar_t>(args)) {
          auto with_head_dim = [&](auto d_tag) {
            constexpr int D = decltype(d_tag)::value;
            if (impl == AttentionImpl::kSplit) {
              dispatch_attention_split<scalar_t, index_t, D, true>(args, pos, q.options(), force_splits, launcher);
            } else if (impl == AttentionImpl::kSplitSync) {
              dispatch_attention_split<scalar_t, index_t, D, false>(args, pos, q.options(), force_splits, launcher);
            } else {
              launch_attention_mma<scalar_t, index_t, D>(args, pos, launcher);
            }
          };
          if (args.head_dim == 64)
            with_head_dim(std::integral_constant<int, 64>{});
          else
            with_head_dim(std::integral_constant<int, 128>{});
          return;
        }
      }
      launch_attention_simt<scalar_t, index_t>(args, pos, launcher);
    });
  });
}

// sparse_query_attention_paged: the paged SIMT kernel. The page table and the request
// offsets travel as int64 (an on-device conversion when they are int32; no host sync).
template <typename Launcher>
void dispatch_sparse_query_attention_paged(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                           const at::Tensor& q_pos, const at::Tensor& q_indptr,
                                           const at::Tensor& kv_indptr, const at::Tensor& kv_indices,
                                           const at::Tensor& kv_last_page_len, double scale, const at::Tensor& out,
                                           const std::optional<at::Tensor>& lse, const Launcher& launcher) {
  if (q.size(0) == 0) return;
  const at::Tensor q_ind = q_indptr.to(at::kLong), page_ind = kv_indptr.to(at::kLong);
  const at::Tensor indices = kv_indices.to(at::kLong), last = kv_last_page_len.to(at::kLong);
  attention::AttentionArgs args = query_args(q, out, lse, q_ind, k_cache.size(2), scale);
  args.k = k_cache.data_ptr();
  args.v = v_cache.data_ptr();
  args.kv_indptr = nullptr;  // the page table below
  args.k_s1 = k_cache.stride(2);
  args.v_s1 = v_cache.stride(2);
  const attention::PagedKV paged{page_ind.data_ptr<int64_t>(), indices.data_ptr<int64_t>(),
                                 last.data_ptr<int64_t>(),     indices.size(0),
                                 k_cache.size(0),              k_cache.size(1),
                                 k_cache.stride(0),            k_cache.stride(1),
                                 v_cache.stride(0),            v_cache.stride(1)};
  CB_DISPATCH_FLOAT_TYPES(q.scalar_type(), "sparse_query_attention_paged", [&] {
    AT_DISPATCH_INDEX_TYPES(q_pos.scalar_type(), "sparse_query_attention_paged", [&] {
      launch_attention_paged_simt<scalar_t, index_t>(args, paged, q_pos.data_ptr<index_t>(), launcher);
    });
  });
}

}  // namespace cacheblend
