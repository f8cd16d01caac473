// cacheblend::sparse_query_attention: the argument contract that every entry point checks
// (torch_bindings.cpp for the CPU and CUDA kernels, the tests' emulated kernels), and
// the declarations of the implementations, which trust it.
//
// q [M, Hq, D] at absolute positions q_pos [M] (int32/int64, position within its request),
// k, v [N, Hkv, D] (key j of a request sits at position j), Hq a multiple of Hkv (GQA).
// Key j of a request is visible to query i iff j <= q_pos[i]. Ragged batches: q_indptr and
// kv_indptr [B + 1] (both or neither) split q / q_pos and k / v into B requests.
// out [M, Hq, D] in q's dtype; lse [M, Hq] fp32 natural-log log-sum-exp (optional).
#pragma once

#include <cmath>
#include <optional>
#include <string>
#include <tuple>

#include "checks.h"

namespace cacheblend {

// Head dims every path accepts. 64 and 128 run the tensor-core kernel on CUDA for
// fp16/bf16; other supported dims run the SIMT kernel.
inline bool attention_head_dim_supported(int64_t d) { return d >= 8 && d <= 256 && d % 8 == 0; }

// The query side shared by both ops: head dims, GQA, scale and the CUDA grid limits
// (hkv / kv_head_dim: the keys' heads and head dim, k_name: the key tensor's name).
inline void check_attention_heads(const at::Tensor& q, int64_t hkv, int64_t kv_head_dim, const char* k_name,
                                  double scale) {
  const int64_t m = q.size(0), hq = q.size(1), d = q.size(2);
  TORCH_CHECK(kv_head_dim == d, k_name, " head_dim (", kv_head_dim, ") must equal q head_dim (", d, ")");
  TORCH_CHECK(attention_head_dim_supported(d), "head_dim ", d,
              " is not supported (supported: multiples of 8 from 8 to 256; 64 and 128 use tensor cores "
              "on CUDA)");
  TORCH_CHECK(hkv > 0 && hq > 0 && hq % hkv == 0, "num_q_heads (", hq,
              ") must be a positive multiple of num_kv_heads (", hkv, ")");
  TORCH_CHECK(std::isfinite(scale), "scale must be finite, got ", scale);
  // Grid limits of the CUDA kernels (a block row per query, a grid row per kv head, a
  // combine warp per (query, head) row).
  TORCH_CHECK(m < (int64_t{1} << 31), "q: at most 2^31 - 1 queries, got ", m);
  TORCH_CHECK(hkv <= 65535, k_name, ": at most 65535 kv heads, got ", hkv);
  TORCH_CHECK(m * hq <= (int64_t{1} << 33) - 4, "q: at most 2^33 - 4 (query, head) rows, got ", m * hq);
}

inline void check_query_positions(const at::Tensor& q, const at::Tensor& q_pos) {
  check_index_tensor(q_pos, "q_pos");
  TORCH_CHECK(q_pos.size(0) == q.size(0), "q_pos must have one entry per query (", q.size(0), "), got ",
              q_pos.size(0));
  check_same_device(q_pos, q, "q_pos", "q");
}

inline void check_attention_outputs(const at::Tensor& q, const at::Tensor& out, const std::optional<at::Tensor>& lse) {
  const int64_t m = q.size(0), hq = q.size(1);
  TORCH_CHECK(out.sizes() == q.sizes(), "out must have the shape of q ", q.sizes(), ", got ", out.sizes());
  TORCH_CHECK(out.scalar_type() == q.scalar_type(), "out must have the dtype of q (", q.scalar_type(),
              "), got ", out.scalar_type());
  check_last_dim_contiguous(out, "out");
  check_same_device(out, q, "out", "q");
  if (lse.has_value()) {
    TORCH_CHECK(lse->scalar_type() == at::kFloat, "lse must be float32, got ", lse->scalar_type());
    TORCH_CHECK(lse->dim() == 2 && lse->size(0) == m && lse->size(1) == hq, "lse must be [", m, ", ", hq,
                "] (num_queries, num_q_heads), got ", lse->sizes());
    check_same_device(*lse, q, "lse", "q");
  }
}

inline void validate_sparse_query_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                            const at::Tensor& q_pos,
                                            const std::optional<at::Tensor>& q_indptr,
                                            const std::optional<at::Tensor>& kv_indptr, double scale,
                                            const at::Tensor& out, const std::optional<at::Tensor>& lse) {
  check_float_storage(q, "q");
  TORCH_CHECK(q.dim() == 3, "q must be [num_queries, num_q_heads, head_dim], got shape ", q.sizes());
  TORCH_CHECK(k.dim() == 3, "k must be [num_keys, num_kv_heads, head_dim], got shape ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), "v must have the shape of k ", k.sizes(), ", got ", v.sizes());
  for (auto [t, name] : {std::pair{&k, "k"}, std::pair{&v, "v"}}) {
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), name, " must have the dtype of q (", q.scalar_type(),
                "), got ", t->scalar_type());
    check_same_device(*t, q, name, "q");
  }
  for (auto [t, name] : {std::pair{&q, "q"}, std::pair{&k, "k"}, std::pair{&v, "v"}})
    check_last_dim_contiguous(*t, name);
  check_attention_heads(q, k.size(1), k.size(2), "k", scale);
  TORCH_CHECK(k.size(0) < (int64_t{1} << 31), "k: at most 2^31 - 1 keys, got ", k.size(0));
  check_query_positions(q, q_pos);

  TORCH_CHECK(q_indptr.has_value() == kv_indptr.has_value(),
              "q_indptr and kv_indptr must be given together (or both omitted)");
  if (q_indptr.has_value()) {
    check_index_tensor(*q_indptr, "q_indptr");
    check_index_tensor(*kv_indptr, "kv_indptr");
    TORCH_CHECK(q_indptr->size(0) >= 2, "q_indptr must be [num_requests + 1] with at least one request, got ",
                q_indptr->sizes());
    TORCH_CHECK(kv_indptr->size(0) == q_indptr->size(0), "kv_indptr must have the length of q_indptr (",
                q_indptr->size(0), "), got ", kv_indptr->size(0));
    check_same_device(*q_indptr, q, "q_indptr", "q");
    check_same_device(*kv_indptr, q, "kv_indptr", "q");
  }
  check_attention_outputs(q, out, lse);
}

// cacheblend::sparse_query_attention_paged: the same attention with K and V read in place
// from a paged cache through a FlashInfer-style page table.
//
// k_cache, v_cache [num_pages, page_size, Hkv, D] (one shape and dtype; last dim
// contiguous, other strides free and possibly different for K and V: an HND cache is a
// transposed view, K and V of one [num_pages, 2, ...] tensor or side by side in one last
// dimension are strided views, a token pool [num_slots, Hkv, D] is page_size 1).
// Request b (q_indptr [B + 1] splits q / q_pos) owns the pages
// kv_indices[kv_indptr[b] : kv_indptr[b + 1]] in order; its last page holds
// kv_last_page_len[b] keys (1 .. page_size; ignored for a request without pages), so its
// key j (at position j) is page kv_indices[kv_indptr[b] + j / page_size], offset
// j % page_size. Masks and outputs as sparse_query_attention.
inline void validate_sparse_query_attention_paged(const at::Tensor& q, const at::Tensor& k_cache,
                                                  const at::Tensor& v_cache, const at::Tensor& q_pos,
                                                  const at::Tensor& q_indptr, const at::Tensor& kv_indptr,
                                                  const at::Tensor& kv_indices, const at::Tensor& kv_last_page_len,
                                                  double scale, const at::Tensor& out,
                                                  const std::optional<at::Tensor>& lse) {
  check_float_storage(q, "q");
  TORCH_CHECK(q.dim() == 3, "q must be [num_queries, num_q_heads, head_dim], got shape ", q.sizes());
  TORCH_CHECK(k_cache.dim() == 4,
              "k_cache must be [num_pages, page_size, num_kv_heads, head_dim] (an HND cache as its transposed "
              "view), got shape ", k_cache.sizes());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), "v_cache must have the shape of k_cache ", k_cache.sizes(),
              ", got ", v_cache.sizes());
  for (auto [t, name] : {std::pair{&k_cache, "k_cache"}, std::pair{&v_cache, "v_cache"}}) {
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), name, " must have the dtype of q (", q.scalar_type(),
                "), got ", t->scalar_type());
    check_same_device(*t, q, name, "q");
  }
  for (auto [t, name] : {std::pair{&q, "q"}, std::pair{&k_cache, "k_cache"}, std::pair{&v_cache, "v_cache"}})
    check_last_dim_contiguous(*t, name);
  TORCH_CHECK(k_cache.size(1) >= 1, "k_cache page_size (size(1)) must be at least 1, got ", k_cache.size(1));
  check_attention_heads(q, k_cache.size(2), k_cache.size(3), "k_cache", scale);
  check_query_positions(q, q_pos);

  for (auto [t, name] : {std::pair{&q_indptr, "q_indptr"}, std::pair{&kv_indptr, "kv_indptr"},
                         std::pair{&kv_indices, "kv_indices"}, std::pair{&kv_last_page_len, "kv_last_page_len"}}) {
    check_index_tensor(*t, name);
    check_same_device(*t, q, name, "q");
  }
  TORCH_CHECK(q_indptr.size(0) >= 2, "q_indptr must be [num_requests + 1] with at least one request, got ",
              q_indptr.sizes());
  TORCH_CHECK(kv_indptr.size(0) == q_indptr.size(0), "kv_indptr must have the length of q_indptr (",
              q_indptr.size(0), "), got ", kv_indptr.size(0));
  TORCH_CHECK(kv_last_page_len.size(0) == q_indptr.size(0) - 1, "kv_last_page_len must have one entry per request (",
              q_indptr.size(0) - 1, "), got ", kv_last_page_len.size(0));
  TORCH_CHECK(kv_indices.size(0) * k_cache.size(1) < (int64_t{1} << 31),
              "kv_indices: the page table may address at most 2^31 - 1 keys (kv_indices.size(0) x page_size), got ",
              kv_indices.size(0), " x ", k_cache.size(1));
  check_attention_outputs(q, out, lse);
}

// Implementations: they assume validated arguments (torch_bindings.cpp validates first).
void sparse_query_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& q_pos, const std::optional<at::Tensor>& q_indptr,
                                const std::optional<at::Tensor>& kv_indptr, double scale, const at::Tensor& out,
                                const std::optional<at::Tensor>& lse);
#ifdef CACHEBLEND_WITH_CUDA
void sparse_query_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& q_pos, const std::optional<at::Tensor>& q_indptr,
                                 const std::optional<at::Tensor>& kv_indptr, double scale, const at::Tensor& out,
                                 const std::optional<at::Tensor>& lse);
#endif
void sparse_query_attention_paged_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                      const at::Tensor& q_pos, const at::Tensor& q_indptr, const at::Tensor& kv_indptr,
                                      const at::Tensor& kv_indices, const at::Tensor& kv_last_page_len, double scale,
                                      const at::Tensor& out, const std::optional<at::Tensor>& lse);
#ifdef CACHEBLEND_WITH_CUDA
// The CUDA kernel for fp16 / bf16 ("flash", "flash_s2", "flash_s3", "flash_m32" or "simt") and the flash kernel's key
// split (tiles_per_split > 0 fixes it; 0: planned), for every later call in the process.
void set_attention_kernel_cuda(const std::string& impl, int64_t tiles_per_split);
std::tuple<std::string, int64_t> attention_kernel_cuda();
void sparse_query_attention_paged_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                       const at::Tensor& q_pos, const at::Tensor& q_indptr,
                                       const at::Tensor& kv_indptr, const at::Tensor& kv_indices,
                                       const at::Tensor& kv_last_page_len, double scale, const at::Tensor& out,
                                       const std::optional<at::Tensor>& lse);
#endif

}  // namespace cacheblend
