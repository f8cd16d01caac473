// Host launch code of the CUDA kernels: kernel choice, grids and kernel arguments of every
// op. ATen-free: it takes the kernels' own argument structs, raw pointers and the CUDA
// storage types (kernels/dtypes.h), and launches through a launcher -- CudaLauncher
// (cuda/cuda_launcher.h, a CUDA stream) in the extension, a host emulator of the CUDA
// execution model in the tests -- so both run the same decisions.
//
// Declared here (host-compilable) for the ATen side (cuda/*_dispatch.h: tensors to
// arguments, dtype dispatch, scratch memory); defined in cuda/*_launch.cuh and
// instantiated for CudaLauncher in one translation unit per op -- per head dim and dtype
// for the tensor-core attention kernels -- which nvcc compiles in parallel and without
// any torch header. Arguments are validated before they get here (ops/*.h).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "kernels/attention/params.h"
#include "kernels/common.h"
#include "kernels/dtypes.h"
#include "kernels/kv_concat.h"
#include "kernels/rope.h"
#include "kernels/select.h"

namespace cacheblend {

// True when the address and every given stride (in elements of T) keep 16-byte alignment.
template <typename T>
inline bool is_aligned16(const void* p, std::initializer_list<int64_t> strides) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  constexpr int64_t kVec = 16 / static_cast<int64_t>(sizeof(T));
  for (int64_t s : strides)
    if (s % kVec != 0) return false;
  return true;
}

// Calls launch(std::integral_constant<int, V>, std::bool_constant<NEOX>) with V = kVec
// when the 16-byte vector path applies (else 1) and NEOX = is_neox.
template <int kVec, typename Launch>
inline void dispatch_vec_and_style(bool vec_ok, bool is_neox, Launch&& launch) {
  if (vec_ok) {
    is_neox ? launch(std::integral_constant<int, kVec>{}, std::true_type{})
            : launch(std::integral_constant<int, kVec>{}, std::false_type{});
  } else {
    is_neox ? launch(std::integral_constant<int, 1>{}, std::true_type{})
            : launch(std::integral_constant<int, 1>{}, std::false_type{});
  }
}

// ---- rope_reposition (cuda/rope_launch.cuh) ----
// One block per token; the 16-byte vector path when every vector stays inside one half /
// pair group and every row starts on a 16-byte boundary.
template <typename T, typename index_t, typename Launcher>
void launch_rope_reposition(const rope::RopeKernelArgs& args, int64_t num_tokens, const index_t* src_pos,
                            const index_t* dst_pos, bool is_neox, const Launcher& launcher);

// ---- fused_kv_concat (cuda/kv_concat_launch.cuh) ----
// One source chunk [L, 2, T, H, D]: its data and strides (elements).
struct KvConcatChunk {
  const void* base;
  int64_t layer_stride, kv_stride, token_stride, head_stride, num_tokens;
};

// The destination: per-layer K and V caches of one geometry (slot s at
// (s / block_size) * block_stride + (s % block_size) * offset_stride).
struct KvConcatCaches {
  void* const* k;
  void* const* v;
  int64_t num_layers;
  int64_t num_slots, block_size, block_stride, offset_stride, head_stride;
};

// Up to kv_concat::kMaxChunks chunks x kMaxLayers layers per launch (one launch for
// typical requests). `problem.token_offset` is ignored (set per launch).
template <typename T, typename index_t, typename Launcher>
void launch_fused_kv_concat(const KvConcatChunk* chunks, int64_t num_chunks, const KvConcatCaches& caches,
                            kv_concat::Problem problem, const index_t* src_pos, const index_t* dst_pos,
                            const index_t* slot_mapping, bool is_neox, const Launcher& launcher);

// ---- kv_deviation, select_hkvd_batched (cuda/select_launch.cuh) ----
// token_index: nullptr compares row i with row i (then index_t is int64_t).
template <typename T, typename index_t, typename Launcher>
void launch_kv_deviation(const select::DeviationArgs& args, const index_t* token_index, const Launcher& launcher);

// args.indices / args.counts: outputs [num_requests, max_selected] / [num_requests].
template <typename indptr_t, typename k_t, typename Launcher>
void launch_select_hkvd_batched(const select::SelectArgs& args, int64_t num_requests, const indptr_t* indptr,
                                const k_t* k, const Launcher& launcher);

// ---- sparse_query_attention (cuda/attention_launch.cuh) ----
// The flash kernel's grid: row tiles x kv heads x key splits (one dimension), and the key
// split (see attention::FlashSplit).
struct FlashPlan {
  int64_t row_tiles;
  int splits;
  int tiles_per_split;
};

// Key splits from the shapes and the SM count only (no device reads): the host cannot see
// the positions, so it assumes the engine's case, sorted positions spread over the keys,
// where row tile i walks about (i + 1) / row_tiles of the key tiles. The blocks then hold
// about blocks * key_tiles / 2 tile steps; with S splits about blocks * S / 2 of them have
// work, so S = 2 * slots / blocks fills the device's block slots (SMs x blocks per SM)
// about once, with pieces of equal length. Rows that see a single split are written
// directly; the others go through the combine kernel, whose traffic bounds S from above.
// max_keys: an upper bound on any request's keys. force_tiles_per_split > 0 overrides the
// choice (tests, benchmarks).
template <typename Traits>
inline FlashPlan plan_flash(const attention::AttentionArgs& a, int64_t max_keys, int num_sms,
                            int force_tiles_per_split = 0) {
  const int64_t row_tiles = ceil_div(a.num_q, int64_t{Traits::kRows / a.group});
  const int64_t key_tiles = std::max<int64_t>(ceil_div(max_keys, int64_t{Traits::kKeys}), 1);
  const int64_t blocks = row_tiles * a.hkv;
  const int64_t slots = int64_t{std::max(num_sms, 1)} * Traits::kBlocksPerSm;
  int64_t splits = (2 * slots + blocks / 2) / blocks;  // round(2 * slots / blocks)
  splits = std::min<int64_t>(splits, key_tiles / attention::kFlashMinTilesPerSplit);
  splits = std::clamp<int64_t>(splits, 1, attention::kFlashMaxSplits);
  int64_t tiles_per_split = ceil_div(key_tiles, splits);
  if (force_tiles_per_split > 0)
    tiles_per_split = std::max<int64_t>(force_tiles_per_split, ceil_div(key_tiles, 4 * attention::kFlashMaxSplits));
  splits = ceil_div(key_tiles, tiles_per_split);
  return {row_tiles, static_cast<int>(splits), static_cast<int>(tiles_per_split)};
}

// Whether the tensor-core kernels take these arguments: fp16 / bf16 (checked by the
// caller), head_dim 64 or 128, the GQA group within one row tile, q and out rows 16-byte
// aligned (data pointers and token / head strides). The keys' alignment is checked by the
// caller (contiguous or paged strides).
template <typename T>
inline bool attention_tensor_core_query_ok(const attention::AttentionArgs& a) {
  return (a.head_dim == 64 || a.head_dim == 128) && a.group <= attention::kMaxTensorCoreGroup &&
         is_aligned16<T>(a.q, {a.q_s0, a.q_s1}) && is_aligned16<T>(a.out, {a.o_s0, a.o_s1});
}

template <typename T>
inline bool attention_tensor_core_ok(const attention::AttentionArgs& a) {
  return attention_tensor_core_query_ok<T>(a) && is_aligned16<T>(a.k, {a.k_s0, a.k_s1}) &&
         is_aligned16<T>(a.v, {a.v_s0, a.v_s1});
}

template <typename T>
inline bool paged_attention_tensor_core_ok(const attention::AttentionArgs& a, const attention::PagedKV& p) {
  return attention_tensor_core_query_ok<T>(a) &&
         is_aligned16<T>(a.k, {p.k_page_stride, p.k_offset_stride, a.k_s1}) &&
         is_aligned16<T>(a.v, {p.v_page_stride, p.v_offset_stride, a.v_s1});
}

// The SIMT kernel (any storage type, head_dim up to 256).
template <typename T, typename pos_t, typename Launcher>
void launch_attention_simt(const attention::AttentionArgs& args, const pos_t* q_pos, const Launcher& launcher);

// sparse_query_attention_paged's SIMT kernel (any storage type, head_dim up to 256):
// the query side in args, the keys through the page table in paged.
template <typename T, typename pos_t, typename Launcher>
void launch_attention_paged_simt(const attention::AttentionArgs& args, const attention::PagedKV& paged,
                                 const pos_t* q_pos, const Launcher& launcher);

// The flash tensor-core kernel (T = half_t / bfloat16_t, D = 64 / 128, 16 or 32 rows per
// warp, kStages pipeline stages; Keys = attention::ContiguousKeys or attention::PagedKeys, `paged` used only by the
// latter), and its combine kernel when plan.splits > 1 (split.part_o / part_lse then hold
// [splits, num_q, hq, D] / [splits, num_q, hq] fp32).
template <typename T, typename pos_t, int D, int kRowsPerWarp, int kStages, typename Keys, typename Launcher>
void launch_attention_flash(const attention::AttentionArgs& args, const attention::PagedKV& paged, const pos_t* q_pos,
                            const FlashPlan& plan, const attention::FlashSplit& split, const Launcher& launcher);

}  // namespace cacheblend
