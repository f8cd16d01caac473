// sparse_query_attention_paged SIMT kernel: the SIMT kernel's per-row loop
// (simt.cuh: one warp per (query, query head), fp32 online softmax) with each key's K and
// V rows found through a FlashInfer-style page table (params.h: PagedKV), read in place
// from the cache whatever its strides. Page ids and page-table offsets are checked on the
// device, where they are read.
#pragma once

#include <cstdint>

#include "kernels/attention/params.h"
#include "kernels/attention/ragged.cuh"
#include "kernels/attention/simt.cuh"
#include "kernels/common.h"

namespace cacheblend {
namespace attention {

// Request b's first page-table entry and its number of keys.
struct PagedRequest {
  int64_t page_begin, kv_len;
};

CB_DEVICE PagedRequest paged_request(const PagedKV& p, int b) {
  const int64_t p0 = p.page_indptr[b], p1 = p.page_indptr[b + 1];
  CB_DEVICE_CHECK(p0 >= 0 && p0 <= p1 && p1 <= p.num_indices,
                  "sparse_query_attention_paged: kv_indptr must be non-decreasing within [0, kv_indices.size(0)]");
  if (p1 == p0) return {p0, 0};  // no pages, no keys; kv_last_page_len[b] is not read
  const int64_t last = p.last_page_len[b];
  CB_DEVICE_CHECK(last >= 1 && last <= p.page_size,
                  "sparse_query_attention_paged: kv_last_page_len outside [1, page_size]");
  return {p0, (p1 - p0 - 1) * p.page_size + last};
}

template <typename scalar_t, typename pos_t>
__global__ void __launch_bounds__(kSimtWarps * 32)
    sparse_query_attention_paged_simt_kernel(const AttentionArgs a, const PagedKV p,
                                             const pos_t* __restrict__ q_pos) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row = blockIdx.x;
  const int head = blockIdx.y * kSimtWarps + warp;
  // Whole warps leave together; no block-level barrier follows.
  if (row >= a.num_q || head >= a.hq) return;
  const int b = find_request(a, row);
  const PagedRequest req = paged_request(p, b);
  const int64_t pos = load_position(q_pos, row, Request{0, 0, 0, req.kv_len});
  const int kv_head = head / a.group;
  const scalar_t* kh = static_cast<const scalar_t*>(a.k) + kv_head * a.k_s1;
  const scalar_t* vh = static_cast<const scalar_t*>(a.v) + kv_head * a.v_s1;
  simt_attend_row<scalar_t>(a, row, head, pos, lane, [&](int64_t j) {
    const int64_t page = p.indices[req.page_begin + j / p.page_size];
    CB_DEVICE_CHECK(page >= 0 && page < p.num_pages,
                    "sparse_query_attention_paged: kv_indices entry outside the cache's pages");
    const int64_t offset = j % p.page_size;
    return KvRow<scalar_t>{kh + page * p.k_page_stride + offset * p.k_offset_stride,
                           vh + page * p.v_page_stride + offset * p.v_offset_stride};
  });
}

}  // namespace attention
}  // namespace cacheblend
