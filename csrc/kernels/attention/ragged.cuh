// sparse_query_attention: ragged batches on the device. A block finds the request that
// owns its rows by binary search in q_indptr; index values (offsets, positions) are
// checked here, on the device, since the host never reads them.
#pragma once

#include <cstdint>

#include "kernels/attention/params.h"
#include "kernels/common.h"

namespace cacheblend {
namespace attention {

CB_DEVICE Request request_bounds(const AttentionArgs& a, int b) {
  if (a.q_indptr == nullptr) return {0, a.num_q, 0, a.num_k};
  const int64_t q0 = a.q_indptr[b], q1 = a.q_indptr[b + 1];
  const int64_t k0 = a.kv_indptr[b], k1 = a.kv_indptr[b + 1];
  CB_DEVICE_CHECK(q0 <= q1, "sparse_query_attention: q_indptr must be non-decreasing");
  CB_DEVICE_CHECK(k0 >= 0 && k0 <= k1 && k1 <= a.num_k,
                  "sparse_query_attention: kv_indptr must be non-decreasing within [0, num_keys]");
  return {q0, q1, k0, k1 - k0};
}

// The request that owns query `row` (0 <= row < num_q): the largest b with
// q_indptr[b] <= row, which skips requests without queries.
CB_DEVICE int find_request(const AttentionArgs& a, int64_t row) {
  if (a.q_indptr == nullptr) return 0;
  CB_DEVICE_CHECK(a.q_indptr[0] == 0 && a.q_indptr[a.num_requests] == a.num_q,
                  "sparse_query_attention: q_indptr must start at 0 and end at num_queries");
  int lo = 0, hi = a.num_requests - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (a.q_indptr[mid] <= row)
      lo = mid;
    else
      hi = mid - 1;
  }
  CB_DEVICE_CHECK(a.q_indptr[lo] <= row && row < a.q_indptr[lo + 1],
                  "sparse_query_attention: q_indptr must be non-decreasing");
  return lo;
}

template <typename pos_t>
CB_DEVICE int64_t load_position(const pos_t* q_pos, int64_t row, const Request& req) {
  const int64_t p = static_cast<int64_t>(q_pos[row]);
  CB_DEVICE_CHECK(p >= 0 && p < req.kv_len, "sparse_query_attention: q_pos outside its request's keys");
  return p;
}
}  // namespace attention
}  // namespace cacheblend
