// sparse_query_attention SIMT kernel: one warp per (query, query head), keys visited one
// by one with an online softmax in fp32. fp32 inputs, head dims other than 64 / 128,
// unaligned inputs, GPUs before sm_80, and CACHEBLEND_ATTENTION_IMPL=simt.
#pragma once

#include <cstdint>

#include "kernels/attention/params.h"
#include "kernels/attention/ragged.cuh"
#include "kernels/common.h"

namespace cacheblend {
namespace attention {

// ---------------------------------------------------------------------------------------
// SIMT kernel: block = kSimtWarps warps = kSimtWarps query heads of one query token.
// Lane `lane` holds elements d = lane + 32 * i (i < kSimtMaxPerLane) of q and of the
// output accumulator, so head_dim <= 256.
// ---------------------------------------------------------------------------------------
constexpr int kSimtWarps = 4;
constexpr int kSimtMaxPerLane = 8;

// Key j's K and V rows (head_dim elements each, kv head already applied).
template <typename scalar_t>
struct KvRow {
  const scalar_t* k;
  const scalar_t* v;
};

// One warp computes query `row`, head `head` against the keys 0 .. pos of its request:
// kv_row(j) gives key j's rows (a contiguous request or a page table: the only thing the
// two ops' SIMT kernels do differently). Writes out and lse of that row.
template <typename scalar_t, typename KvRowAt>
CB_DEVICE void simt_attend_row(const AttentionArgs& a, int64_t row, int head, int64_t pos, int lane,
                               const KvRowAt& kv_row) {
  const int dim = a.head_dim;
  const scalar_t* qp = static_cast<const scalar_t*>(a.q) + row * a.q_s0 + head * a.q_s1;
  float qv[kSimtMaxPerLane], acc[kSimtMaxPerLane];
#pragma unroll
  for (int i = 0; i < kSimtMaxPerLane; ++i) {
    const int d = lane + 32 * i;
    qv[i] = d < dim ? to_float(qp[d]) * a.scale_log2 : 0.f;
    acc[i] = 0.f;
  }
  float run_max = -INFINITY, run_sum = 0.f;
  for (int64_t j = 0; j <= pos; ++j) {  // exactly the visible keys 0 .. pos
    const KvRow<scalar_t> kv = kv_row(j);
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < kSimtMaxPerLane; ++i) {
      const int d = lane + 32 * i;
      if (d < dim) s += qv[i] * to_float(kv.k[d]);
    }
#pragma unroll
    for (int off = 16; off > 0; off /= 2) s += __shfl_xor_sync(0xffffffffu, s, off);
    const float new_max = fmaxf(run_max, s);  // finite: s is finite
    const float alpha = exp2f(run_max - new_max);  // 0 on the first key (run_max = -inf)
    const float p = exp2f(s - new_max);
    run_sum = run_sum * alpha + p;
#pragma unroll
    for (int i = 0; i < kSimtMaxPerLane; ++i) {
      const int d = lane + 32 * i;
      if (d < dim) acc[i] = acc[i] * alpha + p * to_float(kv.v[d]);
    }
    run_max = new_max;
  }
  scalar_t* op = static_cast<scalar_t*>(a.out) + row * a.o_s0 + head * a.o_s1;
  const float inv = 1.f / run_sum;  // run_sum >= 1: the maximum's own term
#pragma unroll
  for (int i = 0; i < kSimtMaxPerLane; ++i) {
    const int d = lane + 32 * i;
    if (d < dim) op[d] = from_float<scalar_t>(acc[i] * inv);
  }
  if (a.lse != nullptr && lane == 0) a.lse[row * a.lse_s0 + head * a.lse_s1] = (run_max + log2f(run_sum)) * kLn2;
}

template <typename scalar_t, typename pos_t>
__global__ void __launch_bounds__(kSimtWarps * 32)
    sparse_query_attention_simt_kernel(const AttentionArgs a, const pos_t* __restrict__ q_pos) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row = blockIdx.x;
  const int head = blockIdx.y * kSimtWarps + warp;
  // Whole warps leave together; no block-level barrier follows.
  if (row >= a.num_q || head >= a.hq) return;
  const Request req = request_bounds(a, find_request(a, row));
  const int64_t pos = load_position(q_pos, row, req);
  const int kv_head = head / a.group;
  const scalar_t* kp = static_cast<const scalar_t*>(a.k) + req.kv_begin * a.k_s0 + kv_head * a.k_s1;
  const scalar_t* vp = static_cast<const scalar_t*>(a.v) + req.kv_begin * a.v_s0 + kv_head * a.v_s1;
  simt_attend_row<scalar_t>(a, row, head, pos, lane,
                            [&](int64_t j) { return KvRow<scalar_t>{kp + j * a.k_s0, vp + j * a.v_s0}; });
}

}  // namespace attention
}  // namespace cacheblend
