// ATen side of sparse_query_attention's CUDA launch: tensors to kernel arguments, the
// kernel choice (the requested kernel, dtype, head dim, alignment, device), the key-split
// plan and its workspace, for any launcher (cuda/ops_cuda.cpp, the tests' host emulator;
// `uninitialized(launcher, ...)` allocates what the kernels fill). No CUDA runtime calls,
// no device reads. Arguments are validated by the caller (ops/attention.h).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>

#include "cuda/dispatch_utils.h"
#include "cuda/launch.h"

namespace cacheblend {

// The query side of the arguments, shared by the contiguous and the paged op: queries,
// outputs, heads (num_kv_heads from the keys), scale and the request offsets q_ind (int64,
// or undefined for one request). The caller fills in where the keys live.
inline attention::AttentionArgs query_args(const at::Tensor& q, const at::Tensor& out,
                                           const std::optional<at::Tensor>& lse, const at::Tensor& q_ind,
                                           int64_t num_kv_heads, double scale) {
  attention::AttentionArgs args{};
  args.q = q.data_ptr();
  args.out = out.data_ptr();
  args.lse = lse.has_value() ? lse->data_ptr<float>() : nullptr;
  args.q_indptr = q_ind.defined() ? q_ind.data_ptr<int64_t>() : nullptr;
  args.q_s0 = q.stride(0);
  args.q_s1 = q.stride(1);
  args.o_s0 = out.stride(0);
  args.o_s1 = out.stride(1);
  args.lse_s0 = lse.has_value() ? lse->stride(0) : 0;
  args.lse_s1 = lse.has_value() ? lse->stride(1) : 0;
  args.num_q = q.size(0);
  args.num_requests = q_ind.defined() ? static_cast<int>(q_ind.size(0) - 1) : 1;
  args.hq = static_cast<int>(q.size(1));
  args.hkv = static_cast<int>(num_kv_heads);
  args.group = args.hq / args.hkv;
  args.head_dim = static_cast<int>(q.size(2));
  args.scale_log2 = static_cast<float>(scale) * attention::kLog2e;
  return args;
}

// q_ind / kv_ind: the request offsets as int64, or undefined tensors for one request.
inline attention::AttentionArgs make_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                    const at::Tensor& q_ind, const at::Tensor& kv_ind, double scale,
                                                    const at::Tensor& out, const std::optional<at::Tensor>& lse) {
  attention::AttentionArgs args = query_args(q, out, lse, q_ind, k.size(1), scale);
  args.k = k.data_ptr();
  args.v = v.data_ptr();
  args.kv_indptr = q_ind.defined() ? kv_ind.data_ptr<int64_t>() : nullptr;
  args.k_s0 = k.stride(0);
  args.k_s1 = k.stride(1);
  args.v_s0 = v.stride(0);
  args.v_s1 = v.stride(1);
  args.num_k = k.size(0);
  return args;
}

// Kernel choice for fp16 / bf16: the flash kernel (default: 16 rows per warp, K and V
// single-buffered, FlashAttention-2's schedule; the fastest 16-rows shape measured on a
// GPU), its 2- and 3-stage K / V pipelines (flash_s2, flash_s3; not yet run on a GPU), its
// 32-rows-per-warp shape (flash_m32) or the SIMT kernel; tiles_per_split > 0 fixes the flash
// kernel's key split instead of plan_flash's choice.
enum class AttentionImpl { kFlash, kFlashS2, kFlashS3, kFlashM32, kSimt };

struct AttentionKernelChoice {
  AttentionImpl impl = AttentionImpl::kFlash;
  int tiles_per_split = 0;
};

// nullptr or "" -> the default (flash).
inline AttentionImpl parse_attention_impl(const char* name) {
  if (name == nullptr || name[0] == '\0' || std::strcmp(name, "flash") == 0) return AttentionImpl::kFlash;
  if (std::strcmp(name, "flash_s2") == 0) return AttentionImpl::kFlashS2;
  if (std::strcmp(name, "flash_s3") == 0) return AttentionImpl::kFlashS3;
  if (std::strcmp(name, "flash_m32") == 0) return AttentionImpl::kFlashM32;
  if (std::strcmp(name, "simt") == 0) return AttentionImpl::kSimt;
  TORCH_CHECK(false, "attention kernel must be flash, flash_s2, flash_s3, flash_m32 or simt (or unset: flash), got '",
              name, "'");
}

inline const char* attention_impl_name(AttentionImpl impl) {
  switch (impl) {
    case AttentionImpl::kFlash: return "flash";
    case AttentionImpl::kFlashS2: return "flash_s2";
    case AttentionImpl::kFlashS3: return "flash_s3";
    case AttentionImpl::kFlashM32: return "flash_m32";
    case AttentionImpl::kSimt: return "simt";
  }
  return "?";
}

// What the launch code needs to know of the device (read once per device by the caller).
struct AttentionDevice {
  bool tensor_cores;  // sm_80+: mma.sync, ldmatrix, cp.async
  int num_sms;
};

template <typename scalar_t, typename pos_t, int D, int kRowsPerWarp, int kStages, typename Keys, typename Launcher>
void run_attention_flash_shape(const attention::AttentionArgs& args, const attention::PagedKV& paged,
                               const pos_t* q_pos, int64_t max_keys, const at::TensorOptions& options,
                               const AttentionKernelChoice& choice, const AttentionDevice& device,
                               const Launcher& launcher) {
  const FlashPlan plan = plan_flash<attention::FlashTraits<D, kRowsPerWarp, kStages>>(
      args, max_keys, device.num_sms, choice.tiles_per_split);
  TORCH_CHECK(plan.row_tiles * args.hkv * plan.splits < (int64_t{1} << 31),
              "sparse_query_attention: too many (query, head) rows for one launch");
  attention::FlashSplit split{nullptr, nullptr, plan.splits, plan.tiles_per_split};
  at::Tensor part_o, part_lse;
  if (plan.splits > 1) {
    const auto f32 = options.dtype(at::kFloat);
    part_o = uninitialized(launcher, {plan.splits, args.num_q, args.hq, args.head_dim}, f32);
    part_lse = uninitialized(launcher, {plan.splits, args.num_q, args.hq}, f32);
    split.part_o = part_o.data_ptr<float>();
    split.part_lse = part_lse.data_ptr<float>();
  }
  launch_attention_flash<scalar_t, pos_t, D, kRowsPerWarp, kStages, Keys>(args, paged, q_pos, plan, split, launcher);
}

// The flash kernel of the chosen shape with its key split; max_keys bounds any request's
// keys.
template <typename scalar_t, typename pos_t, int D, typename Keys, typename Launcher>
void run_attention_flash(const attention::AttentionArgs& args, const attention::PagedKV& paged, const pos_t* q_pos,
                         int64_t max_keys, const at::TensorOptions& options, const AttentionKernelChoice& choice,
                         const AttentionDevice& device, const Launcher& launcher) {
  switch (choice.impl) {
#if defined(CACHEBLEND_ATTENTION_VARIANTS)  // built for benchmarking (see set_attention_kernel)
    case AttentionImpl::kFlashM32:
      return run_attention_flash_shape<scalar_t, pos_t, D, 32, 1, Keys>(args, paged, q_pos, max_keys, options, choice,
                                                                       device, launcher);
    case AttentionImpl::kFlashS2:
      return run_attention_flash_shape<scalar_t, pos_t, D, 16, 2, Keys>(args, paged, q_pos, max_keys, options, choice,
                                                                       device, launcher);
    case AttentionImpl::kFlashS3:
      return run_attention_flash_shape<scalar_t, pos_t, D, 16, 3, Keys>(args, paged, q_pos, max_keys, options, choice,
                                                                       device, launcher);
#endif
    default:
      return run_attention_flash_shape<scalar_t, pos_t, D, 16, 1, Keys>(args, paged, q_pos, max_keys, options, choice,
                                                                       device, launcher);
  }
}

// Calls fn(std::integral_constant<int, D>) for head_dim 64 or 128.
template <typename Fn>
void with_tensor_core_head_dim(int head_dim, Fn&& fn) {
  if (head_dim == 64)
    fn(std::integral_constant<int, 64>{});
  else
    fn(std::integral_constant<int, 128>{});
}

// q_indptr / kv_indptr: the request offsets (int32 / int64) or nullopt for one request.
template <typename Launcher>
void dispatch_sparse_query_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const at::Tensor& q_pos, const std::optional<at::Tensor>& q_indptr,
                                     const std::optional<at::Tensor>& kv_indptr, double scale, const at::Tensor& out,
                                     const std::optional<at::Tensor>& lse, const AttentionKernelChoice& choice,
                                     const AttentionDevice& device, const Launcher& launcher) {
  if (q.size(0) == 0) return;
  // Offsets as int64 (an on-device conversion when they are int32; no host sync).
  const at::Tensor q_ind = q_indptr.has_value() ? q_indptr->to(at::kLong) : at::Tensor();
  const at::Tensor kv_ind = kv_indptr.has_value() ? kv_indptr->to(at::kLong) : at::Tensor();
  const attention::AttentionArgs args = make_attention_args(q, k, v, q_ind, kv_ind, scale, out, lse);
  CB_DISPATCH_FLOAT_TYPES(q.scalar_type(), "sparse_query_attention", [&] {
    AT_DISPATCH_INDEX_TYPES(q_pos.scalar_type(), "sparse_query_attention", [&] {
      const index_t* pos = q_pos.data_ptr<index_t>();
      if constexpr (kIsHalfOrBFloat16<scalar_t>) {
        if (choice.impl != AttentionImpl::kSimt && device.tensor_cores && attention_tensor_core_ok<scalar_t>(args)) {
          with_tensor_core_head_dim(args.head_dim, [&](auto d_tag) {
            run_attention_flash<scalar_t, index_t, decltype(d_tag)::value, attention::ContiguousKeys>(
                args, attention::PagedKV{}, pos, args.num_k, q.options(), choice, device, launcher);
          });
          return;
        }
      }
      launch_attention_simt<scalar_t, index_t>(args, pos, launcher);
    });
  });
}

// sparse_query_attention_paged: the flash kernel reading K / V through the page table for
// fp16 / bf16, else the paged SIMT kernel. The page table and the request offsets travel as int64 (an on-device
// conversion when they are int32; no host sync).
template <typename Launcher>
void dispatch_sparse_query_attention_paged(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                           const at::Tensor& q_pos, const at::Tensor& q_indptr,
                                           const at::Tensor& kv_indptr, const at::Tensor& kv_indices,
                                           const at::Tensor& kv_last_page_len, double scale, const at::Tensor& out,
                                           const std::optional<at::Tensor>& lse, const AttentionKernelChoice& choice,
                                           const AttentionDevice& device, const Launcher& launcher) {
  if (q.size(0) == 0) return;
  const at::Tensor q_ind = q_indptr.to(at::kLong), page_ind = kv_indptr.to(at::kLong);
  const at::Tensor indices = kv_indices.to(at::kLong), last = kv_last_page_len.to(at::kLong);
  attention::AttentionArgs args = query_args(q, out, lse, q_ind, k_cache.size(2), scale);
  args.k = k_cache.data_ptr();
  args.v = v_cache.data_ptr();
  args.kv_indptr = nullptr;  // the page table below
  args.k_s1 = k_cache.stride(2);
  args.v_s1 = v_cache.stride(2);
  const attention::PagedKV paged{page_ind.data_ptr<int64_t>(), indices.data_ptr<int64_t>(),
                                 last.data_ptr<int64_t>(),     indices.size(0),
                                 k_cache.size(0),              k_cache.size(1),
                                 k_cache.stride(0),            k_cache.stride(1),
                                 v_cache.stride(0),            v_cache.stride(1)};
  const int64_t max_keys = indices.size(0) * k_cache.size(1);  // a request holds at most every page
  CB_DISPATCH_FLOAT_TYPES(q.scalar_type(), "sparse_query_attention_paged", [&] {
    AT_DISPATCH_INDEX_TYPES(q_pos.scalar_type(), "sparse_query_attention_paged", [&] {
      const index_t* pos = q_pos.data_ptr<index_t>();
      if constexpr (kIsHalfOrBFloat16<scalar_t>) {
        if (choice.impl != AttentionImpl::kSimt && device.tensor_cores &&
            paged_attention_tensor_core_ok<scalar_t>(args, paged)) {
          with_tensor_core_head_dim(args.head_dim, [&](auto d_tag) {
            run_attention_flash<scalar_t, index_t, decltype(d_tag)::value, attention::PagedKeys>(
                args, paged, pos, max_keys, q.options(), choice, device, launcher);
          });
          return;
        }
      }
      launch_attention_paged_simt<scalar_t, index_t>(args, paged, pos, launcher);
    });
  });
}

}  // namespace cacheblend
