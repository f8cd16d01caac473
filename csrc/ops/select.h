// cacheblend::kv_deviation* and cacheblend::select_hkvd*: the argument contracts that
// every entry point checks (torch_bindings.cpp for the CPU and CUDA kernels, the tests'
// emulated kernels), and the declarations of the implementations, which trust them.
#pragma once

#include <optional>
#include <tuple>

#include "checks.h"

namespace cacheblend {

// fresh: [M, H, D], reused: [N, H, D] (same dtype, last dim contiguous, other strides
// free). token_index: [M] int32/int64 rows of reused (None: M == N, row i vs row i).
// The inputs of kv_deviation and kv_deviation_out.
inline void validate_kv_deviation_inputs(const at::Tensor& fresh, const at::Tensor& reused,
                                         const std::optional<at::Tensor>& token_index) {
  check_float_storage(fresh, "fresh");
  TORCH_CHECK(fresh.dim() == 3, "fresh must be [num_tokens, num_heads, head_dim], got shape ", fresh.sizes());
  TORCH_CHECK(reused.dim() == 3, "reused must be [num_tokens, num_heads, head_dim], got shape ",
              reused.sizes());
  TORCH_CHECK(reused.scalar_type() == fresh.scalar_type(), "reused must have the dtype of fresh (",
              fresh.scalar_type(), "), got ", reused.scalar_type());
  TORCH_CHECK(reused.size(1) == fresh.size(1) && reused.size(2) == fresh.size(2),
              "reused must have the heads and head_dim of fresh ", fresh.sizes(), ", got ", reused.sizes());
  check_same_device(reused, fresh, "reused", "fresh");
  check_last_dim_contiguous(fresh, "fresh");
  check_last_dim_contiguous(reused, "reused");
  TORCH_CHECK(fresh.size(1) * fresh.size(2) < (int64_t{1} << 31), "fresh: num_heads * head_dim must be < 2^31, got ",
              fresh.size(1) * fresh.size(2));
  if (token_index.has_value()) {
    check_index_tensor(*token_index, "token_index");
    TORCH_CHECK(token_index->size(0) == fresh.size(0), "token_index must have one entry per fresh token (",
                fresh.size(0), "), got ", token_index->size(0));
    check_same_device(*token_index, fresh, "token_index", "fresh");
  } else {
    TORCH_CHECK(reused.size(0) == fresh.size(0),
                "without token_index, fresh and reused must have the same number of tokens, got ",
                fresh.size(0), " and ", reused.size(0));
  }
}

// kv_deviation_out: the inputs, and out [M] float32, contiguous.
inline void validate_kv_deviation(const at::Tensor& fresh, const at::Tensor& reused,
                                  const std::optional<at::Tensor>& token_index, const at::Tensor& out) {
  validate_kv_deviation_inputs(fresh, reused, token_index);
  TORCH_CHECK(out.scalar_type() == at::kFloat, "out must be float32, got ", out.scalar_type());
  TORCH_CHECK(out.dim() == 1 && out.size(0) == fresh.size(0), "out must be [", fresh.size(0), "], got shape ",
              out.sizes());
  TORCH_CHECK(out.is_contiguous(), "out must be contiguous");
  check_same_device(out, fresh, "out", "fresh");
}

// deviation: [total] float32 contiguous, total < 2^32 - 1; forced / candidates: optional
// [total] bool masks.
inline void check_deviation_and_masks(const at::Tensor& deviation, const std::optional<at::Tensor>& forced,
                                      const std::optional<at::Tensor>& candidates) {
  TORCH_CHECK(deviation.scalar_type() == at::kFloat, "deviation must be float32, got ", deviation.scalar_type());
  TORCH_CHECK(deviation.dim() == 1, "deviation must be 1-D [total_tokens], got shape ", deviation.sizes());
  TORCH_CHECK(deviation.is_contiguous(), "deviation must be contiguous");
  TORCH_CHECK(deviation.size(0) < (int64_t{1} << 32) - 1, "deviation: at most 2^32 - 2 tokens, got ",
              deviation.size(0));
  for (auto [mask, name] : {std::pair{&forced, "forced"}, std::pair{&candidates, "candidates"}}) {
    if (!mask->has_value()) continue;
    const at::Tensor& m = **mask;
    TORCH_CHECK(m.scalar_type() == at::kBool, name, " must be a bool mask, got ", m.scalar_type());
    TORCH_CHECK(m.dim() == 1 && m.size(0) == deviation.size(0), name, " must be [", deviation.size(0),
                "] like deviation, got shape ", m.sizes());
    TORCH_CHECK(m.is_contiguous(), name, " must be contiguous");
    check_same_device(m, deviation, name, "deviation");
  }
}

// select_hkvd_batched. indptr: [B + 1] int32/int64 (request b owns
// deviation[indptr[b] : indptr[b + 1]]), B < 2^31; k: [B] int32/int64; max_selected >= 0.
inline void validate_select_hkvd(const at::Tensor& deviation, const at::Tensor& indptr, const at::Tensor& k,
                                 const std::optional<at::Tensor>& forced,
                                 const std::optional<at::Tensor>& candidates, int64_t max_selected) {
  check_deviation_and_masks(deviation, forced, candidates);
  check_index_tensor(indptr, "indptr");
  TORCH_CHECK(indptr.size(0) >= 1, "indptr must have num_requests + 1 >= 1 entries, got ", indptr.size(0));
  TORCH_CHECK(indptr.size(0) - 1 <= 0x7FFFFFFF, "indptr: at most 2^31 - 1 requests, got ", indptr.size(0) - 1);
  check_same_device(indptr, deviation, "indptr", "deviation");
  check_index_tensor(k, "k");
  TORCH_CHECK(k.size(0) == indptr.size(0) - 1, "k must have one entry per request (", indptr.size(0) - 1,
              "), got ", k.size(0));
  check_same_device(k, deviation, "k", "deviation");
  TORCH_CHECK(max_selected >= 0, "max_selected must be >= 0, got ", max_selected);
}

// select_hkvd (one request): deviation [N], k >= 0, the masks.
inline void validate_select_hkvd_single(const at::Tensor& deviation, int64_t k, const std::optional<at::Tensor>& forced,
                                        const std::optional<at::Tensor>& candidates) {
  TORCH_CHECK(k >= 0, "k must be >= 0, got ", k);
  check_deviation_and_masks(deviation, forced, candidates);
}

// Implementations: they assume validated arguments (torch_bindings.cpp validates first).
void kv_deviation_cpu(const at::Tensor& fresh, const at::Tensor& reused, const std::optional<at::Tensor>& token_index,
                      bool accumulate, const at::Tensor& out);
std::tuple<at::Tensor, at::Tensor> select_hkvd_batched_cpu(const at::Tensor& deviation, const at::Tensor& indptr,
                                                           const at::Tensor& k, const std::optional<at::Tensor>& forced,
                                                           const std::optional<at::Tensor>& candidates,
                                                           int64_t max_selected);
#ifdef CACHEBLEND_WITH_CUDA
void kv_deviation_cuda(const at::Tensor& fresh, const at::Tensor& reused,
                       const std::optional<at::Tensor>& token_index, bool accumulate, const at::Tensor& out);
std::tuple<at::Tensor, at::Tensor> select_hkvd_batched_cuda(const at::Tensor& deviation, const at::Tensor& indptr,
                                                            const at::Tensor& k,
                                                            const std::optional<at::Tensor>& forced,
                                                            const std::optional<at::Tensor>& candidates,
                                                            int64_t max_selected);
#endif

}  // namespace cacheblend
