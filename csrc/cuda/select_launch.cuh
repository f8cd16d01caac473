// Host launch code of kv_deviation and select_hkvd_batched (kernels/select_cuda.cuh),
// declared in cuda/launch.h. Each launches one kernel and never synchronises with the
// host.
#pragma once

#include <type_traits>

#include "cuda/launch.h"
#include "kernels/select_cuda.cuh"

namespace cacheblend {

template <typename T, typename index_t, typename Launcher>
void launch_kv_deviation(const select::DeviationArgs& args, const index_t* token_index, const Launcher& launcher) {
  if (args.num_rows == 0) return;
  constexpr int kThreads = 256;  // 8 warps = 8 token rows per block
  const Dim3 grid{static_cast<unsigned>(ceil_div(args.num_rows, kThreads / 32))}, block{kThreads};
  constexpr int kVec = kVec16<T>;
  const bool vec_ok = args.head_dim % kVec == 0 &&
                      is_aligned16<T>(args.fresh, {args.fresh_token_stride, args.fresh_head_stride}) &&
                      is_aligned16<T>(args.reused, {args.reused_token_stride, args.reused_head_stride});
  auto launch = [&](auto vec_tag) {
    constexpr int V = decltype(vec_tag)::value;
    if (token_index != nullptr) {
      launcher(select::kv_deviation_kernel<T, index_t, V, true>, grid, block, 0, args, token_index);
    } else {
      launcher(select::kv_deviation_kernel<T, int64_t, V, false>, grid, block, 0, args,
               static_cast<const int64_t*>(nullptr));
    }
  };
  if (vec_ok) {
    launch(std::integral_constant<int, kVec>{});
  } else {
    launch(std::integral_constant<int, 1>{});
  }
}

template <typename indptr_t, typename k_t, typename Launcher>
void launch_select_hkvd_batched(const select::SelectArgs& args, int64_t num_requests, const indptr_t* indptr,
                                const k_t* k, const Launcher& launcher) {
  if (num_requests == 0) return;
  constexpr int kThreads = 512;
  launcher(select::select_hkvd_kernel<indptr_t, k_t, kThreads>, Dim3{static_cast<unsigned>(num_requests)},
           Dim3{kThreads}, 0, args, indptr, k);
}

}  // namespace cacheblend
