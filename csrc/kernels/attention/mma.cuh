// sparse_query_attention tensor-core kernel (mma_v1, the default for fp16 / bf16 with
// head_dim 64 / 128): flash-attention-2 style, one block per (row tile, kv head), no key
// split. Built on primitives.cuh (fragment layouts there).
//
// S = Q K^T (per warp: its 16 rows x 64 keys = 8 n-tiles, D / 16 k-steps):
//   A = Q tile in shared memory, row-major [row][d]: a0 is the 32-bit word at
//       sQK[row g][16 kk + 2t] (two consecutive d), etc.; loaded once into registers.
//   B[k = d][n = key] = K[key][d]: with K stored row-major [key][d] in shared memory,
//       b0 = the word at sK[8 nt + g][16 kk + 2t], b1 = the word 8 elements further.
// O += P V (per warp: 16 rows x D = D / 8 n-tiles, 64 keys = 4 k-steps):
//   A = P: the S accumulators of n-tiles 2kk and 2kk+1 are exactly the A fragment of
//       k-step kk (keys 16kk + 2t.. come from n-tile 2kk, keys 16kk + 8 + 2t.. from
//       n-tile 2kk+1; c0,c1 are row g, c2,c3 row g+8), so
//       a0 = pack(S[2kk][0], S[2kk][1])     a1 = pack(S[2kk][2], S[2kk][3])
//       a2 = pack(S[2kk+1][0], S[2kk+1][1]) a3 = pack(S[2kk+1][2], S[2kk+1][3]).
//   B[k = key][n = d] = V[key][d]: V is stored transposed in shared memory,
//       sVt[d][key], so b0 = the word at sVt[8 dn + g][16 kk + 2t] (two consecutive
//       keys), b1 = the word 8 keys further.
// Each thread owns two rows of its warp's 16: g (accumulator elements 0, 1) and g + 8
// (elements 2, 3); a row's scores are spread over the 4 threads of a quad (same g), so
// row maxima and sums are reduced with __shfl_xor over lane bits 0 and 1.
//
// Shared memory row strides are padded by 8 elements (16 bytes): rows stay 16-byte
// aligned for the vector stores, and the fragment reads (8 rows g x 4 words t) hit 32
// distinct banks (row stride in words = 4 mod 32 for D + 8 = 72 / 136 and 64 + 8 = 72).
#pragma once

#include <cstdint>

#include "kernels/attention/params.h"
#include "kernels/attention/primitives.cuh"
#include "kernels/attention/ragged.cuh"
#include "kernels/common.h"

namespace cacheblend {
namespace attention {

// Requires: group <= kMmaRows; q, k, v rows 16-byte aligned (data pointer and the token /
// head strides multiples of 8 elements); sm_80+.
template <typename scalar_t, typename pos_t, int D>
__global__ void __launch_bounds__(kMmaThreads)
    sparse_query_attention_mma_kernel(const AttentionArgs a, const pos_t* __restrict__ q_pos) {
  static_assert(D % 16 == 0 && D <= 256, "head_dim must be a multiple of 16");
  constexpr int kStride = D + 8;             // sQK row stride (elements)
  constexpr int kVtStride = kMmaKeys + 8;    // sVt row stride (elements)
  constexpr int kChunks = D / 8;             // 16-byte chunks per row
  using Ops = MmaOps<scalar_t>;

  __shared__ __align__(16) uint16_t sQK[kMmaRows * kStride];  // Q tile, then K tiles [key][d]
  __shared__ __align__(16) uint16_t sVt[D * kVtStride];       // V tile transposed [d][key]
  __shared__ int64_t sPos[kMmaRows];                          // row position; -1: inactive row

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  const int group = a.group;
  const int tokens_per_block = kMmaRows / group;
  const int rows_used = tokens_per_block * group;
  const int kv_head = blockIdx.y;
  const int64_t tok_begin = static_cast<int64_t>(blockIdx.x) * tokens_per_block;
  const int64_t tok_end = min(a.num_q, tok_begin + tokens_per_block);
  if (tok_begin >= tok_end) return;  // uniform over the block

  const uint16_t* q_base = static_cast<const uint16_t*>(a.q);
  const uint16_t* k_base = static_cast<const uint16_t*>(a.k);
  const uint16_t* v_base = static_cast<const uint16_t*>(a.v);
  const int row0 = warp * 16 + g, row1 = row0 + 8;  // this thread's two rows

  const int b_first = find_request(a, tok_begin), b_last = find_request(a, tok_end - 1);
  for (int b = b_first; b <= b_last; ++b) {
    const Request req = request_bounds(a, b);
    const int64_t lo = max(tok_begin, req.q_begin), hi = min(tok_end, req.q_end);
    if (lo >= hi) continue;  // a request without queries; uniform over the block
    __syncthreads();         // earlier readers of sPos / sQK / sVt are done

    // Row r: token tok_begin + r / group, query head kv_head * group + r % group;
    // active when the token belongs to request b.
    for (int r = tid; r < kMmaRows; r += kMmaThreads) {
      const int64_t tok = tok_begin + r / group;
      sPos[r] = (r < rows_used && tok >= lo && tok < hi) ? load_position(q_pos, tok, req) : -1;
    }
    for (int i = tid; i < kMmaRows * kChunks; i += kMmaThreads) {
      const int r = i / kChunks, c = i % kChunks;
      const int64_t tok = tok_begin + r / group;
      uint4 val = make_uint4(0u, 0u, 0u, 0u);  // inactive rows: zeros
      if (r < rows_used && tok >= lo && tok < hi) {
        const int head = kv_head * group + r % group;
        val = *reinterpret_cast<const uint4*>(q_base + tok * a.q_s0 + head * a.q_s1 + c * 8);
      }
      *reinterpret_cast<uint4*>(&sQK[r * kStride + c * 8]) = val;
    }
    __syncthreads();

    const int64_t pos0 = sPos[row0], pos1 = sPos[row1];
    int64_t min_pos = INT64_MAX, max_pos = -1;
    for (int r = 0; r < kMmaRows; ++r) {
      const int64_t p = sPos[r];
      if (p >= 0) {
        min_pos = min(min_pos, p);
        max_pos = max(max_pos, p);
      }
    }
    uint32_t qf[D / 16][4];  // A fragments of Q, all k-steps
    load_q_fragments<D>(qf, sQK, kStride, row0, row1, t);
    __syncthreads();  // sQK now holds K tiles

    OnlineSoftmax<D> acc;

    // Keys 0 .. max_pos of the request; max_pos >= 0 (at least one active row).
    const int64_t num_tiles = (max_pos + kMmaKeys) / kMmaKeys;
    for (int64_t tile = 0; tile < num_tiles; ++tile) {
      const int64_t n0 = tile * kMmaKeys;
      // K tile, row-major [key][d] (consecutive threads read consecutive chunks of a key).
      // Keys past the request are zero-filled: they are masked, and zeros keep
      // 0 * V finite.
      for (int i = tid; i < kMmaKeys * kChunks; i += kMmaThreads) {
        const int j = i / kChunks, c = i % kChunks;
        uint4 val = make_uint4(0u, 0u, 0u, 0u);
        if (n0 + j < req.kv_len)
          val = *reinterpret_cast<const uint4*>(k_base + (req.kv_begin + n0 + j) * a.k_s0 + kv_head * a.k_s1 + c * 8);
        *reinterpret_cast<uint4*>(&sQK[j * kStride + c * 8]) = val;
      }
      // V tile, transposed into sVt[d][key] (consecutive threads take consecutive keys,
      // so each 16-bit store of a warp lands in distinct words / banks).
      for (int i = tid; i < kMmaKeys * kChunks; i += kMmaThreads) {
        const int j = i % kMmaKeys, c = i / kMmaKeys;
        uint4 val = make_uint4(0u, 0u, 0u, 0u);
        if (n0 + j < req.kv_len)
          val = *reinterpret_cast<const uint4*>(v_base + (req.kv_begin + n0 + j) * a.v_s0 + kv_head * a.v_s1 + c * 8);
        const uint16_t* e = reinterpret_cast<const uint16_t*>(&val);
#pragma unroll
        for (int x = 0; x < 8; ++x) sVt[(c * 8 + x) * kVtStride + j] = e[x];
      }
      __syncthreads();

      // S = Q K^T: 16 rows x 64 keys per warp.
      float s[kMmaKeys / 8][4];
#pragma unroll
      for (int nt = 0; nt < kMmaKeys / 8; ++nt) {
        s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
          const uint16_t* kr = &sQK[(nt * 8 + g) * kStride + kk * 16 + 2 * t];
          Ops::mma(s[nt], qf[kk], load_word(kr), load_word(kr + 8));
        }
      }

      // Scale, mask, online softmax (s becomes P).
      acc.absorb(s, n0, /*unmasked=*/n0 + kMmaKeys - 1 <= min_pos, pos0, pos1, t, a.scale_log2);

      // O += P V.
#pragma unroll
      for (int kk = 0; kk < kMmaKeys / 16; ++kk) {
        uint32_t pa[4];
        pack_probabilities<Ops>(pa, s, kk);
#pragma unroll
        for (int dn = 0; dn < D / 8; ++dn) {
          const uint16_t* vr = &sVt[(dn * 8 + g) * kVtStride + kk * 16 + 2 * t];
          Ops::mma(acc.o[dn], pa, load_word(vr), load_word(vr + 8));
        }
      }
      __syncthreads();  // before the next tile overwrites sQK / sVt
    }

    acc.finish();  // full row sums, then write the active rows
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = half == 0 ? row0 : row1;
      const int64_t p = half == 0 ? pos0 : pos1;
      if (p < 0) continue;  // inactive: padding or another request's token
      const float l = half == 0 ? acc.l0 : acc.l1, m = half == 0 ? acc.m0 : acc.m1;
      const int64_t tok = tok_begin + row / group;
      const int head = kv_head * group + row % group;
      const float inv = 1.f / l;  // l >= 1: the row maximum's own term
      scalar_t* op = static_cast<scalar_t*>(a.out) + tok * a.o_s0 + head * a.o_s1;
#pragma unroll
      for (int dn = 0; dn < D / 8; ++dn) {
        op[dn * 8 + 2 * t] = from_float<scalar_t>(acc.o[dn][2 * half] * inv);
        op[dn * 8 + 2 * t + 1] = from_float<scalar_t>(acc.o[dn][2 * half + 1] * inv);
      }
      if (a.lse != nullptr && t == 0) a.lse[tok * a.lse_s0 + head * a.lse_s1] = (m + log2f(l)) * kLn2;
    }
  }
}

}  // namespace attention
}  // namespace cacheblend
