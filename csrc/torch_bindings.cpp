// The one registration file: every cacheblend op's schema, and its CPU / CUDA kernels.
// Python-side fake (meta) implementations and typed wrappers live in cacheblend_ext/ops.py.
#include <torch/library.h>

#include "ops/kv_concat.h"
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

  // Gather K and V of many chunks ([L, 2, T_i, H, D] each) for all layers into per-layer
  // caches ([num_slots, H, D] or paged [num_blocks, block_size, H, D]) at slot_mapping
  // (-1 = skip), re-rotating K from src_pos to dst_pos on the way. One launch.
  m.def(
      "fused_kv_concat(Tensor[] chunks, Tensor src_pos, Tensor dst_pos, Tensor slot_mapping, "
      "Tensor cos_sin_cache, bool is_neox, Tensor(a!)[] k_caches, Tensor(b!)[] v_caches) -> ()");
}

TORCH_LIBRARY_IMPL(cacheblend, CPU, m) {
  m.impl("rope_reposition", &rope_reposition_inplace_cpu);
  m.impl("rope_reposition_out", [](const at::Tensor& key, const at::Tensor& src_pos,
                                   const at::Tensor& dst_pos, const at::Tensor& cos_sin_cache,
                                   bool is_neox, const at::Tensor& out) {
    rope_reposition_cpu(key, out, src_pos, dst_pos, cos_sin_cache, is_neox);
  });
  m.impl("fused_kv_concat", &fused_kv_concat_cpu);
}

#ifdef CACHEBLEND_WITH_CUDA
TORCH_LIBRARY_IMPL(cacheblend, CUDA, m) {
  m.impl("rope_reposition", &rope_reposition_inplace_cuda);
  m.impl("rope_reposition_out", [](const at::Tensor& key, const at::Tensor& src_pos,
                                   const at::Tensor& dst_pos, const at::Tensor& cos_sin_cache,
                                   bool is_neox, const at::Tensor& out) {
    rope_reposition_cuda(key, out, src_pos, dst_pos, cos_sin_cache, is_neox);
  });
  m.impl("fused_kv_concat", &fused_kv_concat_cuda);
}
#endif

}  // namespace cacheblend
