// ATen side of kv_deviation's and select_hkvd_batched's CUDA launches: tensors to kernel
// arguments, dtype dispatch and the outputs, for any launcher (cuda/ops_cuda.cpp, the
// tests' host emulator; `uninitialized(launcher, ...)` allocates what the kernels fill).
// Arguments are validated by the caller (ops/select.h).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include "cuda/dispatch_utils.h"
#include "cuda/launch.h"

namespace cacheblend {

template <typename Launcher>
void dispatch_kv_deviation(const at::Tensor& fresh, const at::Tensor& reused,
                           const std::optional<at::Tensor>& token_index, bool accumulate, const at::Tensor& out,
                           const Launcher& launcher) {
  const select::DeviationArgs args{fresh.data_ptr(),   reused.data_ptr(),  fresh.stride(0),
                                   fresh.stride(1),    reused.stride(0),   reused.stride(1),
                                   fresh.size(0),      reused.size(0),     static_cast<int>(fresh.size(1)),
                                   static_cast<int>(fresh.size(2)), out.data_ptr<float>(), accumulate};
  CB_DISPATCH_FLOAT_TYPES(fresh.scalar_type(), "kv_deviation", [&] {
    if (token_index.has_value()) {
      AT_DISPATCH_INDEX_TYPES(token_index->scalar_type(), "kv_deviation", [&] {
        launch_kv_deviation<scalar_t, index_t>(args, token_index->data_ptr<index_t>(), launcher);
      });
    } else {
      launch_kv_deviation<scalar_t, int64_t>(args, nullptr, launcher);
    }
  });
}

template <typename Launcher>
std::tuple<at::Tensor, at::Tensor> dispatch_select_hkvd_batched(const at::Tensor& deviation, const at::Tensor& indptr,
                                                                const at::Tensor& k,
                                                                const std::optional<at::Tensor>& forced,
                                                                const std::optional<at::Tensor>& candidates,
                                                                int64_t max_selected, const Launcher& launcher) {
  const int64_t num_requests = indptr.size(0) - 1;
  at::Tensor indices = uninitialized(launcher, {num_requests, max_selected}, deviation.options().dtype(at::kLong));
  at::Tensor counts = uninitialized(launcher, {num_requests}, deviation.options().dtype(at::kInt));
  const select::SelectArgs args{deviation.data_ptr<float>(),
                                forced.has_value() ? forced->data_ptr<bool>() : nullptr,
                                candidates.has_value() ? candidates->data_ptr<bool>() : nullptr,
                                deviation.size(0),
                                max_selected,
                                indices.data_ptr<int64_t>(),
                                counts.data_ptr<int32_t>()};
  AT_DISPATCH_INDEX_TYPES(indptr.scalar_type(), "select_hkvd_batched", [&] {
    using indptr_t = index_t;
    AT_DISPATCH_INDEX_TYPES(k.scalar_type(), "select_hkvd_batched", [&] {
      launch_select_hkvd_batched<indptr_t, index_t>(args, num_requests, indptr.data_ptr<indptr_t>(),
                                                    k.data_ptr<index_t>(), launcher);
    });
  });
  return {indices, counts};
}

}  // namespace cacheblend
