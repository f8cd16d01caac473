// Host launch code of kv_deviation and select_hkvd_batched (kernels/select_cuda.cuh):
// kernel choice and arguments, for any launcher (cuda/cuda_launcher.cuh or the tests'
// CUDA emulator). Both launch one kernel and never synchronise with the host. Arguments
// are validated by the caller.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>
#include <type_traits>

#include "cuda/dispatch_utils.h"
#include "kernels/select_cuda.cuh"

namespace cacheblend {

template <typename Launcher>
void launch_kv_deviation(const at::Tensor& fresh, const at::Tensor& reused, const std::optional<at::Tensor>& token_index,
                         bool accumulate, const at::Tensor& out, const Launcher& launcher) {
  const int64_t num_rows = fresh.size(0);
  if (num_rows == 0) return;
  TORCH_CHECK(fresh.size(1) * fresh.size(2) < (int64_t{1} << 31), "kv_deviation: num_heads * head_dim must be < 2^31");
  select::DeviationArgs args{fresh.data_ptr(),   reused.data_ptr(),  fresh.stride(0),
                             fresh.stride(1),    reused.stride(0),   reused.stride(1),
                             num_rows,           reused.size(0),     static_cast<int>(fresh.size(1)),
                             static_cast<int>(fresh.size(2)), out.data_ptr<float>(), accumulate};
  constexpr int kThreads = 256;  // 8 warps = 8 token rows per block
  const int64_t blocks = ceil_div(num_rows, kThreads / 32);
  CB_DISPATCH_FLOAT_TYPES(fresh.scalar_type(), "kv_deviation", [&] {
    constexpr int kVec = kVec16<scalar_t>;
    const bool vec_ok = args.head_dim % kVec == 0 && is_aligned16(fresh, {fresh.stride(0), fresh.stride(1)}) &&
                        is_aligned16(reused, {reused.stride(0), reused.stride(1)});
    auto launch = [&](auto vec_tag, auto index_tag, const auto* index) {
      constexpr int V = decltype(vec_tag)::value;
      using index_t = decltype(index_tag);
      constexpr bool kHasIndex = !std::is_same_v<std::remove_cv_t<std::remove_pointer_t<decltype(index)>>, void>;
      const Dim3 grid{static_cast<unsigned>(blocks)}, block{kThreads};
      if constexpr (kHasIndex) {
        launcher(select::kv_deviation_kernel<scalar_t, index_t, V, true>, grid, block, 0, args, index);
      } else {
        launcher(select::kv_deviation_kernel<scalar_t, int64_t, V, false>, grid, block, 0, args,
                 static_cast<const int64_t*>(nullptr));
      }
    };
    auto with_vec = [&](auto index_tag, const auto* index) {
      if (vec_ok) {
        launch(std::integral_constant<int, kVec>{}, index_tag, index);
      } else {
        launch(std::integral_constant<int, 1>{}, index_tag, index);
      }
    };
    if (token_index.has_value()) {
      AT_DISPATCH_INDEX_TYPES(token_index->scalar_type(), "kv_deviation", [&] {
        with_vec(index_t{0}, token_index->data_ptr<index_t>());
      });
    } else {
      with_vec(int64_t{0}, static_cast<const void*>(nullptr));
    }
  });
}

template <typename Launcher>
std::tuple<at::Tensor, at::Tensor> launch_select_hkvd_batched(const at::Tensor& deviation, const at::Tensor& indptr,
                                                              const at::Tensor& k,
                                                              const std::optional<at::Tensor>& forced,
                                                              const std::optional<at::Tensor>& candidates,
                                                              int64_t max_selected, const Launcher& launcher) {
  const int64_t num_requests = indptr.size(0) - 1;
  at::Tensor indices = launcher.uninitialized({num_requests, max_selected}, deviation.options().dtype(at::kLong));
  at::Tensor counts = launcher.uninitialized({num_requests}, deviation.options().dtype(at::kInt));
  if (num_requests == 0) return {indices, counts};
  TORCH_CHECK(num_requests <= 0x7FFFFFFF, "select_hkvd_batched: at most 2^31 - 1 requests, got ", num_requests);
  select::SelectArgs args{deviation.data_ptr<float>(),
                          forced.has_value() ? forced->data_ptr<bool>() : nullptr,
                          candidates.has_value() ? candidates->data_ptr<bool>() : nullptr,
                          deviation.size(0),
                          max_selected,
                          indices.data_ptr<int64_t>(),
                          counts.data_ptr<int32_t>()};
  constexpr int kThreads = 512;
  AT_DISPATCH_INDEX_TYPES(indptr.scalar_type(), "select_hkvd_batched", [&] {
    using indptr_t = index_t;
    AT_DISPATCH_INDEX_TYPES(k.scalar_type(), "select_hkvd_batched", [&] {
      launcher(select::select_hkvd_kernel<indptr_t, index_t, kThreads>, Dim3{static_cast<unsigned>(num_requests)},
               Dim3{kThreads}, 0, args, indptr.data_ptr<indptr_t>(), k.data_ptr<index_t>());
    });
  });
  return {indices, counts};
}

}  // namespace cacheblend
