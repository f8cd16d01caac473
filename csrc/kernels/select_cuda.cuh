// CUDA kernels of kv_deviation and select_hkvd_batched.
//
// kv_deviation_kernel: one warp per token row; lanes stride over the row's H * D / VEC
// 16-byte vectors of fresh and reused, accumulate (a - b)^2 in fp32, and reduce with
// warp shuffles. One pass over the inputs.
//
// select_hkvd_kernel: one block per request.
//   1. Radix select of the k-th largest order key among the request's non-forced
//      candidates: 4 passes of 8 bits, a 256-bin shared-memory histogram per pass; warp
//      0 scans the bins from the top and fixes the next digit of the threshold key T.
//      The result: T and `take_equal`, how many candidates with key == T are selected
//      (those with key > T are all selected).
//   2. Ordered compaction in tiles of blockDim tokens: a block scan numbers the key == T
//      candidates (lowest positions win the tie), a second block scan gives each
//      selected token its output slot, so the indices come out ascending.
// No host sync, no global scratch, output shapes fixed by the arguments.
#pragma once

#include <cstdint>

#include "kernels/common.h"
#include "kernels/select.h"

namespace cacheblend {
namespace select {

constexpr unsigned kFullMask = 0xFFFFFFFFu;

template <typename T>
CB_DEVICE T warp_sum(T x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
}

// Inclusive prefix sum across the 32 lanes of a warp (all lanes must call).
CB_DEVICE unsigned warp_inclusive_scan(unsigned x) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const unsigned y = __shfl_up_sync(kFullMask, x, offset);
    if (lane >= offset) x += y;
  }
  return x;
}

// Launch with blockDim.x a multiple of 32; warp w of the grid handles row w.
template <typename T, typename index_t, int VEC, bool HAS_INDEX>
__global__ void kv_deviation_kernel(DeviationArgs args, const index_t* __restrict__ token_index) {
  const int lane = threadIdx.x & 31;
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  if (row >= args.num_rows) return;  // uniform across the warp
  int64_t src = row;
  if constexpr (HAS_INDEX) {
    src = static_cast<int64_t>(token_index[row]);
    CB_DEVICE_CHECK(src >= 0 && src < args.num_reused, "kv_deviation: token_index outside [0, reused rows)");
  }
  using V = Array<T, VEC>;
  const T* f = static_cast<const T*>(args.fresh) + row * args.fresh_token_stride;
  const T* r = static_cast<const T*>(args.reused) + src * args.reused_token_stride;
  const int vecs_per_head = args.head_dim / VEC;
  const int num_vecs = args.num_heads * vecs_per_head;
  // kUnroll vectors of each input per lane are loaded before any is used, so every lane
  // keeps 2 * kUnroll 16-byte loads in flight (8 x 128 bf16 heads: one batch per row).
  constexpr int kUnroll = 4;
  float acc = 0.f;
  for (int base = lane; base < num_vecs; base += 32 * kUnroll) {
    V a[kUnroll], b[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int v = base + 32 * u;
      if (v < num_vecs) {
        const int h = v / vecs_per_head;
        const int d = (v - h * vecs_per_head) * VEC;
        a[u] = *reinterpret_cast<const V*>(f + h * args.fresh_head_stride + d);
        b[u] = *reinterpret_cast<const V*>(r + h * args.reused_head_stride + d);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (base + 32 * u < num_vecs) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const float x = to_float(a[u].v[e]) - to_float(b[u].v[e]);
          acc = fmaf(x, x, acc);
        }
      }
    }
  }
  acc = warp_sum(acc);
  if (lane == 0) args.out[row] = args.accumulate ? args.out[row] + acc : acc;
}

// Exclusive prefix sum of v over the block (tile order = thread order); *total gets the
// block sum. All threads must call; s_warp holds kThreads / 32 entries.
template <int kThreads>
CB_DEVICE unsigned block_exclusive_scan(unsigned v, unsigned* s_warp, unsigned* total) {
  constexpr int kWarps = kThreads / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const unsigned incl = warp_inclusive_scan(v);
  if (lane == 31) s_warp[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    const unsigned w = lane < kWarps ? s_warp[lane] : 0u;
    const unsigned w_incl = warp_inclusive_scan(w);
    if (lane < kWarps) s_warp[lane] = w_incl;
  }
  __syncthreads();
  const unsigned before = warp > 0 ? s_warp[warp - 1] : 0u;
  *total = s_warp[kWarps - 1];
  __syncthreads();  // s_warp is reused by the next call
  return before + incl - v;
}

template <typename indptr_t, typename k_t, int kThreads>
__global__ void __launch_bounds__(kThreads) select_hkvd_kernel(SelectArgs args, const indptr_t* __restrict__ indptr,
                                                                const k_t* __restrict__ k) {
  static_assert(kThreads % 32 == 0 && kThreads <= 1024, "block size");
  __shared__ unsigned s_hist[256];
  __shared__ unsigned s_warp[kThreads / 32];
  __shared__ uint32_t s_prefix;
  __shared__ long long s_remaining;
  __shared__ int s_select_all;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t b = blockIdx.x;
  const int64_t start = static_cast<int64_t>(indptr[b]);
  const int64_t stop = static_cast<int64_t>(indptr[b + 1]);
  CB_DEVICE_CHECK(start >= 0 && start <= stop && stop <= args.total,
                  "select_hkvd_batched: indptr must be non-decreasing within [0, total tokens]");
  const long long kk = static_cast<long long>(k[b]);
  CB_DEVICE_CHECK(kk >= 0, "select_hkvd_batched: k must be >= 0");
  const int64_t n = stop - start;
  const float* dev = args.deviation + start;
  const bool* forced = args.forced != nullptr ? args.forced + start : nullptr;
  const bool* cand = args.candidates != nullptr ? args.candidates + start : nullptr;

  // ---- 1. radix select of the threshold key among the candidates ----
  const bool select_none = kk == 0;
  bool select_all = false;
  uint32_t prefix = 0, mask = 0;
  long long remaining = kk;  // candidates still to take at or below the current prefix
  if (!select_none) {
    for (int pass = 0; pass < 4; ++pass) {
      const int shift = 24 - 8 * pass;
      for (int i = tid; i < 256; i += kThreads) s_hist[i] = 0u;
      __syncthreads();
      // kUnroll tokens per thread are loaded before any is counted (loads in flight).
      constexpr int kUnroll = 4;
      for (int64_t base = tid; base < n; base += static_cast<int64_t>(kThreads) * kUnroll) {
        uint32_t keys[kUnroll];
        bool counted[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t i = base + static_cast<int64_t>(kThreads) * u;
          counted[u] = false;
          keys[u] = 0u;
          if (i < n) {
            const bool is_forced = forced != nullptr && forced[i];
            const bool is_cand = cand == nullptr || cand[i];
            keys[u] = order_key(dev[i]);
            counted[u] = !is_forced && is_cand;
          }
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          if (counted[u] && (keys[u] & mask) == prefix) atomicAdd(&s_hist[(keys[u] >> shift) & 0xFFu], 1u);
        }
      }
      __syncthreads();
      if (warp == 0) {
        // Lane l owns bins 255 - 8l .. 248 - 8l (from the top down).
        unsigned cnt[8];
        unsigned lane_sum = 0;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          cnt[j] = s_hist[255 - 8 * lane - j];
          lane_sum += cnt[j];
        }
        const unsigned incl = warp_inclusive_scan(lane_sum);
        const unsigned tot = __shfl_sync(kFullMask, incl, 31);
        const unsigned excl = incl - lane_sum;
        if (pass == 0 && remaining >= static_cast<long long>(tot)) {
          if (lane == 0) s_select_all = 1;  // k >= number of candidates
        } else {
          if (lane == 0) s_select_all = 0;
          // remaining is in [1, tot]: exactly one lane holds the bin where it is reached.
          if (static_cast<long long>(excl) < remaining && remaining <= static_cast<long long>(incl)) {
            unsigned above = excl;
#pragma unroll
            for (int j = 0; j < 8; ++j) {
              if (static_cast<long long>(above) + cnt[j] >= remaining) {
                const uint32_t bin = 255u - 8u * lane - j;
                s_prefix = prefix | (bin << shift);
                s_remaining = remaining - above;
                break;
              }
              above += cnt[j];
            }
          }
        }
      }
      __syncthreads();
      if (pass == 0 && s_select_all) {
        select_all = true;
        break;
      }
      prefix = s_prefix;
      remaining = s_remaining;
      mask |= 0xFFu << shift;
      __syncthreads();  // everyone has read s_* before the next pass rewrites them
    }
  }
  // Now (unless select_all / select_none): candidates with key > prefix are selected, and
  // the first `remaining` (by position) of those with key == prefix.

  // ---- 2. ordered compaction ----
  int64_t* out_row = args.indices + b * args.max_selected;
  long long selected = 0, equal_seen = 0;
  for (int64_t tile = 0; tile < n; tile += kThreads) {
    const int64_t i = tile + tid;
    bool take = false, equal = false;
    if (i < n) {
      if (forced != nullptr && forced[i]) {
        take = true;
      } else if (cand == nullptr || cand[i]) {
        if (select_all) {
          take = true;
        } else if (!select_none) {
          const uint32_t key = order_key(dev[i]);
          take = key > prefix;
          equal = key == prefix;
        }
      }
    }
    unsigned equal_total;
    const unsigned equal_rank = block_exclusive_scan<kThreads>(equal ? 1u : 0u, s_warp, &equal_total);
    if (equal && equal_seen + static_cast<long long>(equal_rank) < remaining) take = true;
    unsigned take_total;
    const unsigned slot = block_exclusive_scan<kThreads>(take ? 1u : 0u, s_warp, &take_total);
    if (take) {
      const long long pos = selected + static_cast<long long>(slot);
      if (pos < args.max_selected) out_row[pos] = i;
    }
    selected += take_total;
    equal_seen += equal_total;
  }
  for (long long p = selected + tid; p < args.max_selected; p += kThreads) out_row[p] = -1;
  if (tid == 0) args.counts[b] = static_cast<int32_t>(selected < 0x7FFFFFFFLL ? selected : 0x7FFFFFFFLL);
}

}  // namespace select
}  // namespace cacheblend
