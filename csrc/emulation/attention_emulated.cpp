// The sparse_query_attention tensor-core kernels (kernels/attention_cuda.cuh), compiled
// for the host and run in the CUDA emulator (cuda_emulator.h) on CPU tensors. Built by
// python_tests/test_attention_emulated.py with torch.utils.cpp_extension.load and
// -DCACHEBLEND_CUDA_EMULATION; not part of the installed extension.
//
// The launch sequence mirrors csrc/cuda/attention_cuda.cu: the same argument packing and
// split planning (cuda/attention_plan.h), the same grids, the same workspace, which is
// NaN-poisoned here so that a partial the combine kernel reads without a split having
// written it shows up in the output.
#include <torch/extension.h>

#include <cmath>
#include <optional>
#include <string>

#include "cuda/attention_plan.h"
#include "ops/attention.h"

namespace cacheblend {
namespace {

namespace emu = emulation;
using attention::AttentionArgs;

template <typename scalar_t, typename pos_t, int D>
void run(const std::string& impl, const AttentionArgs& args, const pos_t* q_pos, int force_splits,
         const at::TensorOptions& options) {
  const emu::Dim3 block{attention::kMmaThreads, 1, 1};
  if (impl == "mma_v1") {
    const emu::Dim3 grid{static_cast<unsigned>(ceil_div(args.num_q, int64_t{attention::kMmaRows / args.group})),
                         static_cast<unsigned>(args.hkv), 1};
    emu::launch(grid, block, 0,
                [&] { attention::sparse_query_attention_mma_kernel<scalar_t, pos_t, D>(args, q_pos); });
    return;
  }
  TORCH_CHECK(impl == "split" || impl == "split_sync", "impl must be mma_v1, split or split_sync, got '", impl,
              "'");
  const bool pipelined = impl == "split";
  const SplitPlan plan = plan_split(args, force_splits);
  attention::SplitWorkspace ws{nullptr, nullptr, plan.tiles_per_split};
  at::Tensor part_o, part_lse;
  if (plan.splits > 1) {
    std::tie(part_o, part_lse) = allocate_split_workspace(args, plan, options);
    part_o.fill_(NAN);
    part_lse.fill_(NAN);
    ws.part_o = part_o.data_ptr<float>();
    ws.part_lse = part_lse.data_ptr<float>();
  }
  const emu::Dim3 grid{static_cast<unsigned>(plan.row_tiles), static_cast<unsigned>(args.hkv),
                       static_cast<unsigned>(plan.splits)};
  if (pipelined)
    emu::launch(grid, block, attention::split_kernel_smem_bytes<D, true>(), [&] {
      attention::sparse_query_attention_split_kernel<scalar_t, pos_t, D, true>(args, q_pos, ws);
    });
  else
    emu::launch(grid, block, attention::split_kernel_smem_bytes<D, false>(), [&] {
      attention::sparse_query_attention_split_kernel<scalar_t, pos_t, D, false>(args, q_pos, ws);
    });
  if (plan.splits > 1) {
    const emu::Dim3 cgrid{
        static_cast<unsigned>(ceil_div(args.num_q * args.hq, int64_t{attention::kCombineWarps})), 1, 1};
    emu::launch(cgrid, {attention::kCombineWarps * 32, 1, 1}, 0, [&] {
      attention::sparse_query_attention_combine_kernel<scalar_t>(args, ws.part_o, ws.part_lse, plan.splits);
    });
  }
}

template <typename scalar_t, typename pos_t>
void run_head_dim(const std::string& impl, const AttentionArgs& args, const pos_t* q_pos, int force_splits,
                  const at::TensorOptions& options) {
  if (args.head_dim == 64)
    run<scalar_t, pos_t, 64>(impl, args, q_pos, force_splits, options);
  else
    run<scalar_t, pos_t, 128>(impl, args, q_pos, force_splits, options);
}

// Writes `out` (and `lse` when given) like torch.ops.cacheblend.sparse_query_attention_out
// would on a GPU. force_splits > 0 overrides the split kernel's split count.
void sparse_query_attention_emulated(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const at::Tensor& q_pos, const std::optional<at::Tensor>& q_indptr,
                                     const std::optional<at::Tensor>& kv_indptr, double scale, const at::Tensor& out,
                                     const std::optional<at::Tensor>& lse, const std::string& impl,
                                     int64_t force_splits) {
  validate_sparse_query_attention(q, k, v, q_pos, q_indptr, kv_indptr, scale, out, lse);
  TORCH_CHECK(q.device().is_cpu(), "the emulator runs on CPU tensors");
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "the tensor-core kernels take float16 or bfloat16, got ", q.scalar_type());
  TORCH_CHECK(q.size(2) == 64 || q.size(2) == 128, "the tensor-core kernels take head_dim 64 or 128, got ",
              q.size(2));
  TORCH_CHECK(q.size(1) / k.size(1) <= attention::kMmaRows, "GQA group larger than ", attention::kMmaRows);
  for (const at::Tensor* t : {&q, &k, &v})
    TORCH_CHECK(reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0 && t->stride(0) % 8 == 0 &&
                    t->stride(1) % 8 == 0,
                "the tensor-core kernels need 16-byte aligned rows");
  if (q.size(0) == 0) return;
  const at::Tensor q_ind = q_indptr.has_value() ? q_indptr->to(at::kLong) : at::Tensor();
  const at::Tensor kv_ind = kv_indptr.has_value() ? kv_indptr->to(at::kLong) : at::Tensor();
  const AttentionArgs args = make_attention_args(q, k, v, q_ind, kv_ind, scale, out, lse);
  const int splits = static_cast<int>(force_splits);
  AT_DISPATCH_SWITCH(q.scalar_type(), "sparse_query_attention_emulated",
                     AT_DISPATCH_CASE(at::kHalf,
                                      [&] {
                                        AT_DISPATCH_INDEX_TYPES(q_pos.scalar_type(), "emulated", [&] {
                                          run_head_dim<scalar_t, index_t>(impl, args, q_pos.data_ptr<index_t>(),
                                                                          splits, q.options());
                                        });
                                      })
                         AT_DISPATCH_CASE(at::kBFloat16, [&] {
                           AT_DISPATCH_INDEX_TYPES(q_pos.scalar_type(), "emulated", [&] {
                             run_head_dim<scalar_t, index_t>(impl, args, q_pos.data_ptr<index_t>(), splits,
                                                             q.options());
                           });
                         }));
}

}  // namespace
}  // namespace cacheblend

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sparse_query_attention", &cacheblend::sparse_query_attention_emulated, "emulated CUDA kernels",
        pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("q_pos"),
        pybind11::arg("q_indptr"), pybind11::arg("kv_indptr"), pybind11::arg("scale"), pybind11::arg("out"),
        pybind11::arg("lse"), pybind11::arg("impl"), pybind11::arg("force_splits") = 0);
}
