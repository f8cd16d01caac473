// HKVD selection math shared by the CPU and CUDA implementations: the order key of a
// deviation and the per-row squared difference.
#pragma once

#include <cstdint>
#include <cstring>

#include "kernels/common.h"

namespace cacheblend {
namespace select {

// Monotone map float -> uint32: a > b (as floats) iff order_key(a) > order_key(b).
// -0.0 and +0.0 map to the same key (they tie), and every NaN maps to the largest key
// (a NaN deviation ranks above +inf, so a broken token is recomputed).
CB_HOST_DEVICE uint32_t order_key(float x) {
  if (x != x) return 0xFFFFFFFFu;
  if (x == 0.0f) x = 0.0f;
#if defined(__CUDA_ARCH__)
  const uint32_t bits = __float_as_uint(x);
#else
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
#endif
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// sum_j (a[j] - b[j])^2 over n contiguous elements, fp32. Eight independent partial
// sums so the host compiler vectorises the loop (a single fp32 accumulator is a serial
// dependency chain it may not reorder).
template <typename T>
inline float squared_diff_sum(const T* a, const T* b, int64_t n) {
  float part[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    for (int e = 0; e < 8; ++e) {
      const float d = to_float(a[j + e]) - to_float(b[j + e]);
      part[e] += d * d;
    }
  }
  for (; j < n; ++j) {
    const float d = to_float(a[j]) - to_float(b[j]);
    part[0] += d * d;
  }
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

// Arguments of the CUDA kernels (select_cuda.cuh).
struct DeviationArgs {
  const void* fresh;
  const void* reused;
  int64_t fresh_token_stride, fresh_head_stride;    // in elements
  int64_t reused_token_stride, reused_head_stride;  // in elements
  int64_t num_rows;                                 // M (rows of fresh / out)
  int64_t num_reused;                               // N (rows of reused)
  int num_heads, head_dim;
  float* out;
  bool accumulate;
};

struct SelectArgs {
  const float* deviation;
  const bool* forced;      // may be null
  const bool* candidates;  // may be null
  int64_t total;           // tokens in deviation / the masks
  int64_t max_selected;
  int64_t* indices;  // [B, max_selected]
  int32_t* counts;   // [B]
};

}  // namespace select
}  // namespace cacheblend
