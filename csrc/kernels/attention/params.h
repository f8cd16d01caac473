// CUDA kernels of sparse_query_attention (exact position-causal mask, GQA, ragged batches):
// their arguments and tile shapes, shared by the kernels and their host launch code
// (this header is host-compilable: no device code).
//
// One header per kernel family, on top of ragged.cuh (request lookup) and, for the
// tensor-core kernels, primitives.cuh (mma.sync, ldmatrix, cp.async):
//  * flash.cuh, sparse_query_attention_flash_kernel (+ its combine kernel): the
//    default for fp16 / bf16 with head_dim 64 / 128 on sm_80+, for contiguous and paged
//    K / V alike. FlashAttention-2 style: 128-row tiles of (query, query head) pairs of
//    one kv head, so a K / V tile serves the whole GQA group; K and V through a cp.async
//    pipeline into swizzled shared memory, ldmatrix fragments, mma.sync m16n8k16 with
//    fp32 accumulation, base-2 online softmax, the mask only on tiles that straddle a
//    row's position, key splits sized from the SM count, heaviest row tiles first.
//  * simt.cuh, sparse_query_attention_simt_kernel: one warp per (query, query head),
//    keys visited one by one with an online softmax in fp32. Simple and obviously
//    correct; used for fp32 inputs, head dims other than 64 / 128, unaligned inputs and
//    GPUs before sm_80. paged.cuh runs the same per-row loop through a page table.
// CACHEBLEND_ATTENTION_IMPL (flash, flash_s2, flash_s3, flash_m32, simt) or
// cacheblend_ext.ops.attention_kernel picks one for fp16 / bf16 (cuda/attention_dispatch.h).
//
// All the kernels also compile for the host in a build that supplies the CUDA built-ins
// and the PTX operations (kernels/common.h), which is how the tests run them without a
// GPU.
//
// Ragged batches without a host sync: the grid covers the flat query range; a block
// finds the requests its rows belong to by binary search in q_indptr and, when its rows
// span several requests, runs the tile loop once per request with the other rows
// inactive. Index values (positions, offsets) are checked on the device.
#pragma once

#include <cstdint>

namespace cacheblend {
namespace attention {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

struct AttentionArgs {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;                  // nullptr: not requested
  const int64_t* q_indptr;     // [num_requests + 1]; nullptr: one request (all queries, all keys)
  const int64_t* kv_indptr;    // [num_requests + 1]
  int64_t q_s0, q_s1, k_s0, k_s1, v_s0, v_s1, o_s0, o_s1;  // strides in elements
  int64_t lse_s0, lse_s1;
  int64_t num_q, num_k;
  int num_requests, hq, hkv, group, head_dim;
  float scale_log2;  // softmax scale * log2(e): scores live in base 2
};

struct Request {
  int64_t q_begin, q_end, kv_begin, kv_len;
};

// sparse_query_attention_paged (paged.cuh): where the keys live. The kernel also takes
// an AttentionArgs for the query side, with k / v the caches' data, k_s1 / v_s1 their
// head strides, q_indptr the request offsets of the queries (kv_indptr, k_s0, v_s0 and
// num_k unused). Key j of request b sits in page indices[page_indptr[b] + j / page_size]
// at offset j % page_size.
struct PagedKV {
  const int64_t* page_indptr;    // [num_requests + 1] into indices
  const int64_t* indices;        // page ids
  const int64_t* last_page_len;  // [num_requests]: keys in each request's last page
  int64_t num_indices, num_pages, page_size;
  int64_t k_page_stride, k_offset_stride, v_page_stride, v_offset_stride;  // elements
};

// The largest GQA group the tensor-core kernel takes: a group's rows must fit in one row
// tile (64 rows with 16 rows per warp).
constexpr int kMaxTensorCoreGroup = 64;

// Tile shapes of the flash kernel (flash.cuh), per head dim and rows per warp. Two
// shapes, because only a GPU run can choose between them (mma.sync m16n8k16 on sm_80 /
// sm_90; "B / kFLOP": shared-memory bytes read per kFLOP of MMA work):
//  * 16 rows per warp ("flash"): 4 warps x 16 = 64 (query, head) rows per block, the Q
//    tile's A fragments held in registers for the whole key loop (32 registers at
//    D = 128). O and S take 64 + 32 more; two blocks (8 warps) per SM. 64-row tiles also
//    give small problems twice the blocks. Each K / V fragment read from shared memory feeds one m16 tile: 61 B / kFLOP,
//    which at 128 B / clock / SM caps the MMAs at ~2.1 kFLOP / clock / SM (~55% of an
//    H100's dense bf16 peak; mma.sync itself reaches ~65%).
//  * 32 rows per warp ("flash_m32", FlashAttention-2's shape): 128 rows per block, two m16
//    tiles per warp, so every K / V fragment feeds two MMAs: 38 B / kFLOP with Q re-read
//    from shared memory per k-step, above mma.sync's own rate. Q cannot stay in
//    registers (O alone is 128 registers at D = 128), and at D = 128 a 64-key S tile
//    (64 more) leaves too few registers for the rest: the key tile is 32 keys there,
//    64 at D = 64. Two blocks (8 warps) per SM.
// K and V go through kStages shared-memory stages. One stage is FlashAttention-2's
// schedule: V_j loads while S = Q K_j^T is computed, K_{j+1} while the softmax and O += P V_j
// are (measured on an H200, bench/results/2026-12-04-h200). With kStages >= 2, while tile j
// is computed, tiles j + 1 .. j + kStages - 1 load, so a load has kStages - 1 tiles of MMA
// work to hide behind (not yet measured on a GPU). Shared memory per block: Q [kRows][D] +
// kStages x (K + V) [kKeys][D], 16-bit. At D = 128 with 16 rows per warp: 48 KB with one
// stage, 80 KB with 2, 112 KB with 3 (two blocks per SM fit on sm_90's 228 KB; on sm_80's
// 164 KB with up to 2 stages; one block per SM on sm_86 / sm_89's 100 KB from 2 stages).
template <int D, int kRowsPerWarp_, int kStages_ = 1>
struct FlashTraits {
  static_assert(D == 64 || D == 128, "the flash kernel is built for head_dim 64 and 128");
  static_assert(kRowsPerWarp_ == 16 || kRowsPerWarp_ == 32, "16 or 32 rows per warp");
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kRowsPerWarp = kRowsPerWarp_;
  static constexpr int kMTiles = kRowsPerWarp / 16;
  static constexpr int kRows = kWarps * kRowsPerWarp;
  static constexpr bool kQInRegisters = kMTiles == 1;
  static constexpr int kKeys = kMTiles == 2 && D == 128 ? 32 : 64;
  static constexpr int kChunks = D / 8;  // 16-byte chunks per row of Q, K or V
  // __launch_bounds__ minimum (a register cap of 65536 / (kThreads x kBlocksPerSm) = 255);
  // the split plan counts on it. Three blocks (a cap of 168) spill in the paged kernel.
  static constexpr int kBlocksPerSm = 2;
  // K / V pipeline depth (see flash.cuh): 1, K and V single-buffered and loaded at
  // different times (FlashAttention-2's schedule); >= 2, while tile j is computed, tiles
  // j + 1 .. j + kStages - 1 load.
  static constexpr int kStages = kStages_;
  static_assert(kStages >= 1, "at least one stage");
  static constexpr int kSmemBytes = (kRows + 2 * kKeys * kStages) * D * 2;
};

// Key splits of the flash kernel (chosen on the host from the shapes and the SM count,
// see cuda/launch.h: plan_flash): at most kFlashMaxSplits, each at least
// kFlashMinTilesPerSplit key tiles.
constexpr int kFlashMaxSplits = 16;
constexpr int kFlashMinTilesPerSplit = 2;

// The flash kernel's key split (cuda/launch.h: plan_flash). Split s of a row tile covers
// key tiles [s * tiles_per_split, (s + 1) * tiles_per_split) of its request; the last
// split also takes any tiles beyond. A row at position p sees keys in splits
// 0 .. p / (tiles_per_split * kKeys) only (see flash_splits_of_row): a row with one such
// split gets its output written directly; the others write a normalised fp32 partial
// output and its base-2 log-sum-exp per split to part_o [splits, num_q, hq, D] /
// part_lse [splits, num_q, hq], merged by the combine kernel.
struct FlashSplit {
  float* part_o;    // nullptr when splits == 1
  float* part_lse;
  int splits;
  int tiles_per_split;
};

// Where the flash kernel finds a request's keys (flash.cuh): a contiguous [N, Hkv, D]
// tensor with request offsets, or a paged cache through its page table.
struct ContiguousKeys;
struct PagedKeys;

// Warps per block of the combine kernel (flash.cuh).
constexpr int kCombineWarps = 4;

}  // namespace attention
}  // namespace cacheblend
