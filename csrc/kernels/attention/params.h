// CUDA kernels of sparse_query_attention (exact position-causal mask, GQA, ragged batches):
// their arguments and tile shapes, shared by the kernels and their host launch code
// (this header is host-compilable: no device code).
//
// One header per kernel family, on top of ragged.cuh (request lookup) and, for the
// tensor-core kernels, primitives.cuh (mma.sync, ldmatrix, cp.async, online softmax):
//  * simt.cuh, sparse_query_attention_simt_kernel: one warp per (query, query head),
//    keys visited one by one with an online softmax in fp32. Simple and obviously
//    correct; used for fp32 inputs, head dims other than 64 / 128, unaligned inputs,
//    GPUs before sm_80, and on request (CACHEBLEND_ATTENTION_IMPL=simt) so both kernels
//    can be compared. paged.cuh runs the same per-row loop through a page table
//    (sparse_query_attention_paged).
//  * mma.cuh, sparse_query_attention_mma_kernel: flash-attention-2 style for fp16 /
//    bf16 with tensor cores (mma.sync m16n8k16, fp32 accumulation). A block owns one kv
//    head and 64 "rows", each row one (query token, query head of that kv head's group)
//    pair, so every K/V tile loaded into shared memory serves the whole group. Key tiles
//    past the block's largest query position are never visited; tiles wholly at or
//    before its smallest position skip the mask. The default for fp16 / bf16 with
//    head_dim 64 / 128 (verified on an H100; CACHEBLEND_ATTENTION_IMPL=mma_v1 names it
//    explicitly).
//  * split.cuh, sparse_query_attention_split_kernel (+
//    sparse_query_attention_combine_kernel): the same row tiles and fragments, with the
//    key range split across blocks, coalesced K / V loads read through ldmatrix, and
//    cp.async double-buffering of the K / V tiles (CACHEBLEND_ATTENTION_IMPL=split, or
//    split_sync without cp.async). Passes the attention tests in the host CUDA emulator
//    (python_tests/test_attention_emulated.py) and compiles for sm_80..90; not yet run on
//    a GPU, so not the default.
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

// Tile shape of the tensor-core kernels (mma.cuh, split.cuh): a block is kMmaThreads
// threads = 4 warps; each warp owns 16 of the block's kMmaRows (query, head) rows, and
// K / V are visited in tiles of kMmaKeys keys.
constexpr int kMmaRows = 64;  // rows per block: 4 warps x 16
constexpr int kMmaKeys = 64;  // keys per K/V tile
constexpr int kMmaThreads = 128;

// Key splits of the split kernel (split.cuh), chosen on the host from the shapes only.
constexpr int kSplitTargetBlocks = 1056;  // host: aim at ~4 waves of 2 blocks on 132 SMs
constexpr int kSplitMinTiles = 4;         // host: at least 4 key tiles (256 keys) per split
constexpr int kSplitMaxSplits = 64;

// Warps per block of the split kernel's combine kernel (split.cuh).
constexpr int kCombineWarps = 4;

// Workspace of the split kernel (unused with one split): part_o [splits, num_q, hq, D]
// fp32 (normalised partial outputs), part_lse [splits, num_q, hq] fp32 (base-2 lse of
// the split's visible scores, -inf when the row sees none of its keys).
struct SplitWorkspace {
  float* part_o;
  float* part_lse;
  int tiles_per_split;
};

}  // namespace attention
}  // namespace cacheblend
