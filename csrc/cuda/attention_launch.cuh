// Host launch code of sparse_query_attention (kernels/attention/), declared in
// cuda/launch.h: one function per kernel family. The tensor-core kernels are instantiated
// per head dim, dtype and key layout in their own translation unit, generated at build
// time from cuda/attention/tensor_core_instance.cu.in (setup.py, CMakeLists.txt), so nvcc
// builds them in parallel.
#pragma once

#include "cuda/launch.h"
#include "kernels/attention/flash.cuh"
#include "kernels/attention/paged.cuh"
#include "kernels/attention/simt.cuh"

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

template <typename T, typename pos_t, int D, int kRowsPerWarp, int kStages, typename Keys, typename Launcher>
void launch_attention_flash(const attention::AttentionArgs& args, const attention::PagedKV& paged, const pos_t* q_pos,
                            const FlashPlan& plan, const attention::FlashSplit& split, const Launcher& launcher) {
  using Traits = attention::FlashTraits<D, kRowsPerWarp, kStages>;
  const int64_t blocks = plan.row_tiles * args.hkv * plan.splits;
  launcher(attention::sparse_query_attention_flash_kernel<T, pos_t, D, kRowsPerWarp, kStages, Keys>,
           Dim3{static_cast<unsigned>(blocks)}, Dim3{Traits::kThreads}, Traits::kSmemBytes, args, paged, q_pos, split);
  if (plan.splits > 1) {
    const int64_t rows = args.num_q * args.hq;
    launcher(attention::sparse_query_attention_flash_combine_kernel<T, pos_t, D, Traits::kKeys>,
             Dim3{static_cast<unsigned>(ceil_div(rows, int64_t{attention::kCombineWarps}))},
             Dim3{attention::kCombineWarps * 32}, 0, args, q_pos, split);
  }
}

// The tensor-core kernels of one dtype, head dim and key layout (Keys: ContiguousKeys or
// PagedKeys), for both position types and every flash shape (rows per warp, pipeline
// stages) that cuda/attention_dispatch.h offers.
#define CB_INSTANTIATE_ATTENTION_FLASH(T, P, D, M, S, KEYS, LAUNCHER)                                           \
  template void launch_attention_flash<T, P, D, M, S, attention::KEYS, LAUNCHER>(                               \
      const attention::AttentionArgs&, const attention::PagedKV&, const P*, const FlashPlan&,                   \
      const attention::FlashSplit&, const LAUNCHER&);
// The default shape always; the variants a GPU run still has to choose between
// (flash_s2, flash_s3, flash_m32) only in builds with CACHEBLEND_ATTENTION_VARIANTS=1 (they
// triple the compile time).
#if defined(CACHEBLEND_ATTENTION_VARIANTS)
#define CB_INSTANTIATE_ATTENTION_FLASH_VARIANTS(T, P, D, KEYS, LAUNCHER) \
  CB_INSTANTIATE_ATTENTION_FLASH(T, P, D, 16, 2, KEYS, LAUNCHER)         \
  CB_INSTANTIATE_ATTENTION_FLASH(T, P, D, 16, 3, KEYS, LAUNCHER)         \
  CB_INSTANTIATE_ATTENTION_FLASH(T, P, D, 32, 1, KEYS, LAUNCHER)
#else
#define CB_INSTANTIATE_ATTENTION_FLASH_VARIANTS(T, P, D, KEYS, LAUNCHER)
#endif
#define CB_INSTANTIATE_ATTENTION_FLASH_SHAPES(T, P, D, KEYS, LAUNCHER) \
  CB_INSTANTIATE_ATTENTION_FLASH(T, P, D, 16, 1, KEYS, LAUNCHER)       \
  CB_INSTANTIATE_ATTENTION_FLASH_VARIANTS(T, P, D, KEYS, LAUNCHER)
#define CB_INSTANTIATE_ATTENTION_TENSOR_CORES(T, D, KEYS, LAUNCHER)     \
  CB_INSTANTIATE_ATTENTION_FLASH_SHAPES(T, int32_t, D, KEYS, LAUNCHER) \
  CB_INSTANTIATE_ATTENTION_FLASH_SHAPES(T, int64_t, D, KEYS, LAUNCHER)

}  // namespace cacheblend
