// Host launch code of sparse_query_attention (kernels/attention/), declared in
// cuda/launch.h: one function per kernel family, so each family / head dim / dtype is
// instantiated in its own translation unit (cuda/attention/*.cu).
#pragma once

#include "cuda/launch.h"
#include "kernels/attention/mma.cuh"
#include "kernels/attention/paged.cuh"
#include "kernels/attention/simt.cuh"
#include "kernels/attention/split.cuh"

namespace cacheblend {

template <typename T, typename pos_t, typename Launcher>
void launch_attention_simt(const attention::AttentionArgs& args, const pos_t* q_pos, const Launcher& launcher) {
  launcher(attention::sparse_query_attention_simt_kernel<T, pos_t>,
           Dim3{static_cast<unsigned>(args.num_q), static_cast<unsigned>(ceil_div(args.hq, attention::kSimtWarps))},
           Dim3{attention::kSimtWarps * 32}, 0, args, q_pos);
}

template <typename T, typename pos_t, typename Launcher>
void launch_attention_paged_simt(const attention::AttentionArgs& args, const attention::PagedKV& paged,
                                 const pos_t* q_pos, const Launcher& launcher) {
  launcher(attention::sparse_query_attention_paged_simt_kernel<T, pos_t>,
           Dim3{static_cast<unsigned>(args.num_q), static_cast<unsigned>(ceil_div(args.hq, attention::kSimtWarps))},
           Dim3{attention::kSimtWarps * 32}, 0, args, paged, q_pos);
}

template <typename T, typename pos_t, int D, typename Launcher>
void launch_attention_mma(const attention::AttentionArgs& args, const pos_t* q_pos, const Launcher& launcher) {
  const Dim3 grid{static_cast<unsigned>(ceil_div(args.num_q, int64_t{attention::kMmaRows / args.group})),
                  static_cast<unsigned>(args.hkv)};
  launcher(attention::sparse_query_attention_mma_kernel<T, pos_t, D>, grid, Dim3{attention::kMmaThreads}, 0, args,
           q_pos);
}

template <typename T, typename pos_t, int D, bool kPipelined, typename Launcher>
void launch_attention_split(const attention::AttentionArgs& args, const pos_t* q_pos, const SplitPlan& plan,
                            const attention::SplitWorkspace& ws, const Launcher& launcher) {
  launcher(attention::sparse_query_attention_split_kernel<T, pos_t, D, kPipelined>,
           Dim3{static_cast<unsigned>(plan.row_tiles), static_cast<unsigned>(args.hkv),
                static_cast<unsigned>(plan.splits)},
           Dim3{attention::kMmaThreads}, attention::split_kernel_smem_bytes<D, kPipelined>(), args, q_pos, ws);
}

template <typename T, typename Launcher>
void launch_attention_combine(const attention::AttentionArgs& args, const attention::SplitWorkspace& ws, int splits,
                              const Launcher& launcher) {
  const int64_t rows = args.num_q * args.hq;
  launcher(attention::sparse_query_attention_combine_kernel<T>,
           Dim3{static_cast<unsigned>(ceil_div(rows, int64_t{attention::kCombineWarps}))},
           Dim3{attention::kCombineWarps * 32}, 0, args, static_cast<const float*>(ws.part_o),
           static_cast<const float*>(ws.part_lse), splits);
}

}  // namespace cacheblend
