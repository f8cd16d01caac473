// RoPE re-positioning math shared by the CPU and CUDA kernels.
//
// cos_sin_cache layout (vLLM / FlashInfer): row p is [cos(p*f_0..f_{h-1}), sin(...)]
// with h = rotary_dim / 2, possibly multiplied by a scaling factor m (YaRN's attention
// factor). A cached key was rotated by m*R(src); the key a full prefill would hold is
// m*R(dst). The map between them, R(dst) * R(src)^-1 = R(dst - src), is a pure
// rotation whatever m is, so its coefficients are normalised by the src entry's norm:
//   c = (cos_d*cos_s + sin_d*sin_s) / (cos_s^2 + sin_s^2)
//   s = (sin_d*cos_s - cos_d*sin_s) / (cos_s^2 + sin_s^2)
// This covers every scaling scheme that only changes frequencies or the factor m.
//
// Pair layout inside a head: NeoX (half split) rotates (x[i], x[i + h]);
// GPT-J (interleaved) rotates (x[2i], x[2i + 1]). Dims past rotary_dim pass through.
#pragma once

#include "kernels/common.h"

namespace cacheblend {
namespace rope {

struct Rotation {
  float cos;
  float sin;
};

// Arguments of the CUDA kernel (rope_cuda.cuh).
struct RopeKernelArgs {
  const void* in;
  void* out;
  int64_t in_token_stride, in_head_stride;    // in elements
  int64_t out_token_stride, out_head_stride;  // in elements
  const float* cos_sin_cache;
  int64_t max_pos;
  int num_heads, head_dim, rotary_dim;
};

// Rotation taking frequency `i` of a key at `src_row` to `dst_row` (rows of the table).
CB_HOST_DEVICE Rotation reposition_rotation(const float* src_row, const float* dst_row,
                                            int half, int i) {
  const float cs = src_row[i], ss = src_row[half + i];
  const float cd = dst_row[i], sd = dst_row[half + i];
  const float inv_norm = 1.0f / (cs * cs + ss * ss);
  return {(cd * cs + sd * ss) * inv_norm, (sd * cs - cd * ss) * inv_norm};
}

// All `rotary_dim / 2` rotations of one token (CPU path; the CUDA kernels split the
// loop over threads).
inline void token_rotations(const float* table, int rotary_dim, int64_t src, int64_t dst, Rotation* out) {
  const int half = rotary_dim / 2;
  for (int i = 0; i < half; ++i) out[i] = reposition_rotation(table + src * rotary_dim, table + dst * rotary_dim, half, i);
}

CB_HOST_DEVICE void rotate(float& x, float& y, Rotation r) {
  const float nx = x * r.cos - y * r.sin;
  const float ny = y * r.cos + x * r.sin;
  x = nx;
  y = ny;
}

// Offsets of the two elements of pair `i` within a head.
CB_HOST_DEVICE void pair_offsets(bool is_neox, int half, int i, int& a, int& b) {
  if (is_neox) {
    a = i;
    b = i + half;
  } else {
    a = 2 * i;
    b = 2 * i + 1;
  }
}

// Re-position one head of one token: `in` and `out` may alias (in-place).
// `rotations` holds the `half` rotations of this token (shared by all its heads). The
// style is a template parameter so the CPU loops vectorise (contiguous halves for NeoX).
template <bool NEOX, typename T>
CB_HOST_DEVICE void reposition_head(const T* in, T* out, const Rotation* rotations, int rotary_dim, int head_dim) {
  const int half = rotary_dim / 2;
  for (int i = 0; i < half; ++i) {
    int a, b;
    pair_offsets(NEOX, half, i, a, b);
    float x = to_float(in[a]), y = to_float(in[b]);
    rotate(x, y, rotations[i]);
    out[a] = from_float<T>(x);
    out[b] = from_float<T>(y);
  }
  if (in != out) {
    for (int d = rotary_dim; d < head_dim; ++d) out[d] = in[d];
  }
}

template <typename T>
CB_HOST_DEVICE void reposition_head(const T* in, T* out, const Rotation* rotations, int rotary_dim, int head_dim,
                                    bool is_neox) {
  if (is_neox) {
    reposition_head<true>(in, out, rotations, rotary_dim, head_dim);
  } else {
    reposition_head<false>(in, out, rotations, rotary_dim, head_dim);
  }
}

}  // namespace rope
}  // namespace cacheblend
