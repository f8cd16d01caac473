// Host-side planning for the sparse_query_attention tensor-core kernels, shared by the
// CUDA wrapper (attention_cuda.cu) and the host emulator the tests run them in
// (emulation/attention_emulated.cpp): packing validated tensors into AttentionArgs and
// choosing the key splits of the split kernel. No CUDA runtime calls, no device reads.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>

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

// part_o [splits, num_q, hq, D] and part_lse [splits, num_q, hq], fp32.
inline std::tuple<at::Tensor, at::Tensor> allocate_split_workspace(const attention::AttentionArgs& args,
                                                                    const SplitPlan& plan,
                                                                    const at::TensorOptions& options) {
  const auto opts = options.dtype(at::kFloat);
  return {at::empty({plan.splits, args.num_q, args.hq, args.head_dim}, opts),
          at::empty({plan.splits, args.num_q, args.hq}, opts)};
}

}  // namespace cacheblend
