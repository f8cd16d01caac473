// Every CUDA kernel of the extension, compiled for the host and run in the CUDA emulator
// (cuda_emulator.h) on CPU tensors, through the same launch code as the CUDA build (the
// ATen side, cuda/*_dispatch.h, and the host launch code, cuda/*_launch.cuh) with an
// EmulatedLauncher in place of CudaLauncher. Built by the tests
// (python_tests/conftest.py: emulated_kernels) with torch.utils.cpp_extension.load and
// `-include emulation/cuda_emulator.h`; not part of the installed extension. Each
// function validates its arguments with the op's contract (ops/*.h), like the
// registered op.
#if !defined(CB_HOST_CUDA)
#error "build with -include emulation/cuda_emulator.h (see python_tests/conftest.py)"
#endif
#include <torch/extension.h>

#include <optional>
#include <string>
#include <tuple>

#include "cuda/attention_dispatch.h"
#include "cuda/attention_launch.cuh"
#include "cuda/kv_concat_dispatch.h"
#include "cuda/kv_concat_launch.cuh"
#include "cuda/rope_dispatch.h"
#include "cuda/rope_launch.cuh"
#include "cuda/select_dispatch.h"
#include "cuda/select_launch.cuh"
#include "emulation/emulated_launcher.h"
#include "ops/attention.h"
#include "ops/kv_concat.h"
#include "ops/rope.h"
#include "ops/select.h"

namespace cacheblend {
namespace {

void rope_reposition(const at::Tensor& key, const at::Tensor& src_pos, const at::Tensor& dst_pos,
                     const at::Tensor& cos_sin_cache, bool is_neox, const at::Tensor& out) {
  validate_rope_reposition(key, out, src_pos, dst_pos, cos_sin_cache);
  dispatch_rope_reposition(key, out, src_pos, dst_pos, cos_sin_cache, is_neox, EmulatedLauncher{});
}

void fused_kv_concat(std::vector<at::Tensor> chunks, const at::Tensor& src_pos, const at::Tensor& dst_pos,
                     const at::Tensor& slot_mapping, const at::Tensor& cos_sin_cache, bool is_neox,
                     std::vector<at::Tensor> k_caches, std::vector<at::Tensor> v_caches) {
  validate_fused_kv_concat(chunks, src_pos, dst_pos, slot_mapping, cos_sin_cache, k_caches, v_caches);
  dispatch_fused_kv_concat(chunks, src_pos, dst_pos, slot_mapping, cos_sin_cache, is_neox, k_caches, v_caches,
                         EmulatedLauncher{});
}

void kv_deviation(const at::Tensor& fresh, const at::Tensor& reused, const std::optional<at::Tensor>& token_index,
                  bool accumulate, const at::Tensor& out) {
  validate_kv_deviation(fresh, reused, token_index, out);
  dispatch_kv_deviation(fresh, reused, token_index, accumulate, out, EmulatedLauncher{});
}

std::tuple<at::Tensor, at::Tensor> select_hkvd_batched(const at::Tensor& deviation, const at::Tensor& indptr,
                                                       const at::Tensor& k, const std::optional<at::Tensor>& forced,
                                                       const std::optional<at::Tensor>& candidates,
                                                       int64_t max_selected) {
  validate_select_hkvd(deviation, indptr, k, forced, candidates, max_selected);
  return dispatch_select_hkvd_batched(deviation, indptr, k, forced, candidates, max_selected, EmulatedLauncher{});
}

// impl: "flash" (the default), "flash_s2", "flash_s3", "flash_m32" or "simt", as
// set_attention_kernel;
// tiles_per_split > 0 fixes the flash kernel's key split; num_sms: the device the split
// plan assumes.
AttentionKernelChoice kernel_choice(const std::string& impl, int64_t tiles_per_split) {
  return {parse_attention_impl(impl.c_str()), static_cast<int>(tiles_per_split)};
}

void sparse_query_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& q_pos,
                            const std::optional<at::Tensor>& q_indptr, const std::optional<at::Tensor>& kv_indptr,
                            double scale, const at::Tensor& out, const std::optional<at::Tensor>& lse,
                            const std::string& impl, int64_t tiles_per_split, int64_t num_sms) {
  validate_sparse_query_attention(q, k, v, q_pos, q_indptr, kv_indptr, scale, out, lse);
  dispatch_sparse_query_attention(q, k, v, q_pos, q_indptr, kv_indptr, scale, out, lse,
                                  kernel_choice(impl, tiles_per_split),
                                  AttentionDevice{/*tensor_cores=*/true, static_cast<int>(num_sms)}, EmulatedLauncher{});
}

void sparse_query_attention_paged(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& q_pos, const at::Tensor& q_indptr, const at::Tensor& kv_indptr,
                                  const at::Tensor& kv_indices, const at::Tensor& kv_last_page_len, double scale,
                                  const at::Tensor& out, const std::optional<at::Tensor>& lse, const std::string& impl,
                                  int64_t tiles_per_split, int64_t num_sms) {
  validate_sparse_query_attention_paged(q, k_cache, v_cache, q_pos, q_indptr, kv_indptr, kv_indices,
                                        kv_last_page_len, scale, out, lse);
  dispatch_sparse_query_attention_paged(q, k_cache, v_cache, q_pos, q_indptr, kv_indptr, kv_indices,
                                        kv_last_page_len, scale, out, lse, kernel_choice(impl, tiles_per_split),
                                        AttentionDevice{/*tensor_cores=*/true, static_cast<int>(num_sms)},
                                        EmulatedLauncher{});
}

}  // namespace
}  // namespace cacheblend

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.def("rope_reposition", &cacheblend::rope_reposition, py::arg("key"), py::arg("src_pos"), py::arg("dst_pos"),
        py::arg("cos_sin_cache"), py::arg("is_neox"), py::arg("out"));
  m.def("fused_kv_concat", &cacheblend::fused_kv_concat, py::arg("chunks"), py::arg("src_pos"), py::arg("dst_pos"),
        py::arg("slot_mapping"), py::arg("cos_sin_cache"), py::arg("is_neox"), py::arg("k_caches"),
        py::arg("v_caches"));
  m.def("kv_deviation", &cacheblend::kv_deviation, py::arg("fresh"), py::arg("reused"), py::arg("token_index"),
        py::arg("accumulate"), py::arg("out"));
  m.def("select_hkvd_batched", &cacheblend::select_hkvd_batched, py::arg("deviation"), py::arg("indptr"),
        py::arg("k"), py::arg("forced"), py::arg("candidates"), py::arg("max_selected"));
  m.def("sparse_query_attention", &cacheblend::sparse_query_attention, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("q_pos"), py::arg("q_indptr"), py::arg("kv_indptr"), py::arg("scale"), py::arg("out"),
        py::arg("lse"), py::arg("impl") = "flash", py::arg("tiles_per_split") = 0, py::arg("num_sms") = 132);
  m.def("sparse_query_attention_paged", &cacheblend::sparse_query_attention_paged, py::arg("q"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("q_pos"), py::arg("q_indptr"), py::arg("kv_indptr"), py::arg("kv_indices"),
        py::arg("kv_last_page_len"), py::arg("scale"), py::arg("out"), py::arg("lse"), py::arg("impl") = "flash",
        py::arg("tiles_per_split") = 0, py::arg("num_sms") = 132);
  // Mutation tests: the barrier or cp.async wait at that source line becomes a no-op
  // (line 0: none).
  m.def("disable_sync_at", &cacheblend::emulation::disable_sync_at, py::arg("file_suffix"), py::arg("line"));
}
