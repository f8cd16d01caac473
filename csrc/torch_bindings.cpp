// The one registration file: every cacheblend op's schema, its entry point (argument
// validation with the op's contract from ops/*.h, for every dispatch key) and its CPU /
// CUDA implementations.
// Python-side fake (meta) implementations and typed wrappers live in cacheblend_ext/ops.py.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "ops/attention.h"
#include "ops/kv_concat.h"
#include "ops/rope.h"
#include "ops/select.h"

#ifdef CACHEBLEND_PYTHON_MODULE
#include <Python.h>
// An importable (empty) module, so `import cacheblend_ext._C` loads this library and
// runs the registrations below.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
#endif

namespace cacheblend {
namespace {

bool has_cuda_kernels() {
#ifdef CACHEBLEND_WITH_CUDA
  return true;
#else
  return false;
#endif
}

// ---- Entry points ----
// Every op's arguments are validated here, once, with its contract from ops/*.h, for
// every dispatch key; the CPU and CUDA implementations (Impl) trust them.

template <auto Impl>
void rope_reposition_out_entry(const at::Tensor& key, const at::Tensor& src_pos, const at::Tensor& dst_pos,
                               const at::Tensor& cos_sin_cache, bool is_neox, const at::Tensor& out) {
  validate_rope_reposition(key, out, src_pos, dst_pos, cos_sin_cache);
  Impl(key, out, src_pos, dst_pos, cos_sin_cache, is_neox);
}

// In place: key is both input and output.
template <auto Impl>
void rope_reposition_entry(const at::Tensor& key, const at::Tensor& src_pos, const at::Tensor& dst_pos,
                           const at::Tensor& cos_sin_cache, bool is_neox) {
  rope_reposition_out_entry<Impl>(key, src_pos, dst_pos, cos_sin_cache, is_neox, key);
}

template <auto Impl>
void fused_kv_concat_entry(at::TensorList chunks, const at::Tensor& src_pos, const at::Tensor& dst_pos,
                           const at::Tensor& slot_mapping, const at::Tensor& cos_sin_cache, bool is_neox,
                           at::TensorList k_caches, at::TensorList v_caches) {
  validate_fused_kv_concat(chunks, src_pos, dst_pos, slot_mapping, cos_sin_cache, k_caches, v_caches);
  Impl(chunks, src_pos, dst_pos, slot_mapping, cos_sin_cache, is_neox, k_caches, v_caches);
}

template <auto Impl>
void kv_deviation_out_entry(const at::Tensor& fresh, const at::Tensor& reused,
                            const std::optional<at::Tensor>& token_index, bool accumulate, const at::Tensor& out) {
  validate_kv_deviation(fresh, reused, token_index, out);
  Impl(fresh, reused, token_index, accumulate, out);
}

// Functional kv_deviation: allocates out [M] float32 and fills it.
template <auto Impl>
at::Tensor kv_deviation_entry(const at::Tensor& fresh, const at::Tensor& reused,
                              const std::optional<at::Tensor>& token_index) {
  validate_kv_deviation_inputs(fresh, reused, token_index);
  at::Tensor out = at::empty({fresh.size(0)}, fresh.options().dtype(at::kFloat));
  Impl(fresh, reused, token_index, false, out);
  return out;
}

template <auto Impl>
std::tuple<at::Tensor, at::Tensor> select_hkvd_batched_entry(const at::Tensor& deviation, const at::Tensor& indptr,
                                                             const at::Tensor& k,
                                                             const std::optional<at::Tensor>& forced,
                                                             const std::optional<at::Tensor>& candidates,
                                                             int64_t max_selected) {
  validate_select_hkvd(deviation, indptr, k, forced, candidates, max_selected);
  return Impl(deviation, indptr, k, forced, candidates, max_selected);
}

// Single-request select_hkvd on top of the batched implementation: [S] int64 selected
// indices. The selection size lives on the device, so this reads it back (a host sync on
// CUDA).
template <auto Batched>
at::Tensor select_hkvd_entry(const at::Tensor& deviation, int64_t k, const std::optional<at::Tensor>& forced,
                             const std::optional<at::Tensor>& candidates) {
  validate_select_hkvd_single(deviation, k, forced, candidates);
  const int64_t n = deviation.size(0);
  at::Tensor host = at::empty({3}, at::TensorOptions().dtype(at::kLong));
  int64_t* h = host.data_ptr<int64_t>();
  h[0] = 0;               // indptr = [0, n]
  h[1] = n;
  h[2] = std::min(k, n);  // k
  const at::Tensor args = host.to(deviation.device());
  auto [indices, counts] = Batched(deviation, args.narrow(0, 0, 2), args.narrow(0, 2, 1), forced, candidates, n);
  const int64_t count = counts.template item<int32_t>();
  return indices.select(0, 0).narrow(0, 0, count).clone();
}

template <auto Impl>
void sparse_query_attention_entry(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& q_pos, const std::optional<at::Tensor>& q_indptr,
                                  const std::optional<at::Tensor>& kv_indptr, double scale, const at::Tensor& out,
                                  const std::optional<at::Tensor>& lse) {
  validate_sparse_query_attention(q, k, v, q_pos, q_indptr, kv_indptr, scale, out, lse);
  Impl(q, k, v, q_pos, q_indptr, kv_indptr, scale, out, lse);
}

template <auto Impl>
void sparse_query_attention_paged_entry(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                        const at::Tensor& q_pos, const at::Tensor& q_indptr,
                                        const at::Tensor& kv_indptr, const at::Tensor& kv_indices,
                                        const at::Tensor& kv_last_page_len, double scale, const at::Tensor& out,
                                        const std::optional<at::Tensor>& lse) {
  validate_sparse_query_attention_paged(q, k_cache, v_cache, q_pos, q_indptr, kv_indptr, kv_indices,
                                        kv_last_page_len, scale, out, lse);
  Impl(q, k_cache, v_cache, q_pos, q_indptr, kv_indptr, kv_indices, kv_last_page_len, scale, out, lse);
}

}  // namespace

TORCH_LIBRARY(cacheblend, m) {
  // True when this library was compiled with its CUDA kernels.
  m.def("has_cuda_kernels() -> bool", &has_cuda_kernels);

  // Rotate each token of key [T, H, D] from src_pos[t] to dst_pos[t] (in place).
  m.def(
      "rope_reposition(Tensor(a!) key, Tensor src_pos, Tensor dst_pos, Tensor cos_sin_cache, "
      "bool is_neox) -> ()");
  // Same, written into out (key is left unchanged).
  m.def(
      "rope_reposition_out(Tensor key, Tensor src_pos, Tensor dst_pos, Tensor cos_sin_cache, "
      "bool is_neox, *, Tensor(a!) out) -> ()");

  // Gather K and V of many chunks ([L, 2, T_i, H, D] each) for all layers into per-layer
  // caches ([num_slots, H, D] or paged [num_blocks, block_size, H, D]) at slot_mapping
  // (-1 = skip), re-rotating K from src_pos to dst_pos on the way. One launch.
  m.def(
      "fused_kv_concat(Tensor[] chunks, Tensor src_pos, Tensor dst_pos, Tensor slot_mapping, "
      "Tensor cos_sin_cache, bool is_neox, Tensor(a!)[] k_caches, Tensor(b!)[] v_caches) -> ()");

  // ---- HKVD selection ----
  // Per-token deviation [M] float32: sum over heads and dims of (fresh[i] - reused[j])^2
  // in fp32, j = token_index[i] (or i when token_index is None).
  m.def("kv_deviation(Tensor fresh, Tensor reused, Tensor? token_index=None) -> Tensor");
  // Same into out [M] float32; accumulate=True adds to out (K+V deviation = two calls).
  m.def(
      "kv_deviation_out(Tensor fresh, Tensor reused, Tensor? token_index, bool accumulate, *, "
      "Tensor(a!) out) -> ()");
  // Ragged batch of B requests (request b owns deviation[indptr[b]:indptr[b+1]]):
  // every forced token plus the top-k[b] non-forced candidates (ties: lower position),
  // as local positions ascending. Returns (indices [B, max_selected] int64 padded with
  // -1, counts [B] int32 = full selection size; a row keeps its lowest max_selected
  // positions when counts[b] > max_selected). Output shapes depend only on the
  // arguments: no host sync, CUDA-graph safe.
  m.def(
      "select_hkvd_batched(Tensor deviation, Tensor indptr, Tensor k, Tensor? forced, Tensor? candidates, "
      "int max_selected) -> (Tensor indices, Tensor counts)");
  // One request: [S] int64 ascending (forced + top-k candidates). The size is data
  // dependent: reads the count back to the host (not CUDA-graph safe).
  m.def("select_hkvd(Tensor deviation, int k, Tensor? forced=None, Tensor? candidates=None) -> Tensor");

  // ---- sparse_query_attention ----
  // Selected queries q [M, Hq, D] at positions q_pos [M] against keys/values [N, Hkv, D]
  // with the exact position-causal mask (key j visible iff j <= q_pos); ragged batches
  // through q_indptr / kv_indptr [B + 1]. Writes out [M, Hq, D] and, if given, lse [M, Hq].
  m.def(
      "sparse_query_attention(Tensor q, Tensor k, Tensor v, Tensor q_pos, Tensor? q_indptr, "
      "Tensor? kv_indptr, float scale, Tensor(a!) out, Tensor(b!)? lse) -> ()");
  // The same with K and V read in place from a paged cache k_cache / v_cache
  // [num_pages, page_size, Hkv, D] (any strides, last dim contiguous) through a
  // FlashInfer-style page table: request b (queries q_indptr[b]:q_indptr[b+1]) owns pages
  // kv_indices[kv_indptr[b]:kv_indptr[b+1]], the last one holding kv_last_page_len[b]
  // keys; key j sits at position j.
  m.def(
      "sparse_query_attention_paged(Tensor q, Tensor k_cache, Tensor v_cache, Tensor q_pos, Tensor q_indptr, "
      "Tensor kv_indptr, Tensor kv_indices, Tensor kv_last_page_len, float scale, Tensor(a!) out, "
      "Tensor(b!)? lse) -> ()");
#ifdef CACHEBLEND_WITH_CUDA
  // The CUDA kernel both attention ops run for fp16 / bf16 ("flash", the default;
  // "flash_s2", "flash_s3", "flash_m32"; "simt") and the flash kernel's key split (tiles_per_split > 0 fixes it;
  // 0: planned from the shapes and the SM count), for the whole process. Initial values:
  // CACHEBLEND_ATTENTION_IMPL and CACHEBLEND_ATTENTION_TILES_PER_SPLIT.
  m.def("set_attention_kernel(str impl, int tiles_per_split=0) -> ()", &set_attention_kernel_cuda);
  m.def("attention_kernel() -> (str, int)", &attention_kernel_cuda);
#endif
}

TORCH_LIBRARY_IMPL(cacheblend, CPU, m) {
  m.impl("rope_reposition", &rope_reposition_entry<&rope_reposition_cpu>);
  m.impl("rope_reposition_out", &rope_reposition_out_entry<&rope_reposition_cpu>);
  m.impl("fused_kv_concat", &fused_kv_concat_entry<&fused_kv_concat_cpu>);
  // ---- HKVD selection ----
  m.impl("kv_deviation", &kv_deviation_entry<&kv_deviation_cpu>);
  m.impl("kv_deviation_out", &kv_deviation_out_entry<&kv_deviation_cpu>);
  m.impl("select_hkvd_batched", &select_hkvd_batched_entry<&select_hkvd_batched_cpu>);
  m.impl("select_hkvd", &select_hkvd_entry<&select_hkvd_batched_cpu>);

  // ---- sparse_query_attention ----
  m.impl("sparse_query_attention", &sparse_query_attention_entry<&sparse_query_attention_cpu>);
  m.impl("sparse_query_attention_paged", &sparse_query_attention_paged_entry<&sparse_query_attention_paged_cpu>);
}

#ifdef CACHEBLEND_WITH_CUDA
TORCH_LIBRARY_IMPL(cacheblend, CUDA, m) {
  m.impl("rope_reposition", &rope_reposition_entry<&rope_reposition_cuda>);
  m.impl("rope_reposition_out", &rope_reposition_out_entry<&rope_reposition_cuda>);
  m.impl("fused_kv_concat", &fused_kv_concat_entry<&fused_kv_concat_cuda>);
  // ---- HKVD selection ----
  m.impl("kv_deviation", &kv_deviation_entry<&kv_deviation_cuda>);
  m.impl("kv_deviation_out", &kv_deviation_out_entry<&kv_deviation_cuda>);
  m.impl("select_hkvd_batched", &select_hkvd_batched_entry<&select_hkvd_batched_cuda>);
  m.impl("select_hkvd", &select_hkvd_entry<&select_hkvd_batched_cuda>);

  // ---- sparse_query_attention ----
  m.impl("sparse_query_attention", &sparse_query_attention_entry<&sparse_query_attention_cuda>);
  m.impl("sparse_query_attention_paged", &sparse_query_attention_paged_entry<&sparse_query_attention_paged_cuda>);
}
#endif

}  // namespace cacheblend
