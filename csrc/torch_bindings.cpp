// The one registration file: every cacheblend op's schema, and its CPU / CUDA kernels.
// Python-side fake (meta) implementations and typed wrappers live in cacheblend_ext/ops.py.
#include <torch/library.h>

#include "ops/attention.h"
#include "ops/rope.h"

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

// In-place entry point: key is both input and output.
void rope_reposition_inplace_cpu(const at::Tensor& key, const at::Tensor& src_pos,
                                 const at::Tensor& dst_pos, const at::Tensor& cos_sin_cache,
                                 bool is_neox) {
  rope_reposition_cpu(key, key, src_pos, dst_pos, cos_sin_cache, is_neox);
}

#ifdef CACHEBLEND_WITH_CUDA
void rope_reposition_inplace_cuda(const at::Tensor& key, const at::Tensor& src_pos,
                                  const at::Tensor& dst_pos, const at::Tensor& cos_sin_cache,
                                  bool is_neox) {
  rope_reposition_cuda(key, key, src_pos, dst_pos, cos_sin_cache, is_neox);
}
#endif

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

  // ---- sparse_query_attention ----
  // Selected queries q [M, Hq, D] at positions q_pos [M] against keys/values [N, Hkv, D]
  // with the exact position-causal mask (key j visible iff j <= q_pos); ragged batches
  // through q_indptr / kv_indptr [B + 1]. Writes out [M, Hq, D] and, if given, lse [M, Hq].
  m.def(
      "sparse_query_attention(Tensor q, Tensor k, Tensor v, Tensor q_pos, Tensor? q_indptr, "
      "Tensor? kv_indptr, float scale, Tensor(a!) out, Tensor(b!)? lse) -> ()");
}

TORCH_LIBRARY_IMPL(cacheblend, CPU, m) {
  m.impl("rope_reposition", &rope_reposition_inplace_cpu);
  m.impl("rope_reposition_out", [](const at::Tensor& key, const at::Tensor& src_pos,
                                   const at::Tensor& dst_pos, const at::Tensor& cos_sin_cache,
                                   bool is_neox, const at::Tensor& out) {
    rope_reposition_cpu(key, out, src_pos, dst_pos, cos_sin_cache, is_neox);
  });

  // ---- sparse_query_attention ----
  m.impl("sparse_query_attention", &sparse_query_attention_cpu);
}

#ifdef CACHEBLEND_WITH_CUDA
TORCH_LIBRARY_IMPL(cacheblend, CUDA, m) {
  m.impl("rope_reposition", &rope_reposition_inplace_cuda);
  m.impl("rope_reposition_out", [](const at::Tensor& key, const at::Tensor& src_pos,
                                   const at::Tensor& dst_pos, const at::Tensor& cos_sin_cache,
                                   bool is_neox, const at::Tensor& out) {
    rope_reposition_cuda(key, out, src_pos, dst_pos, cos_sin_cache, is_neox);
  });

  // ---- sparse_query_attention ----
  m.impl("sparse_query_attention", &sparse_query_attention_cuda);
}
#endif

}  // namespace cacheblend
