// sparse_query_attention split-key tensor-core kernel (CACHEBLEND_ATTENTION_IMPL=split /
// split_sync) and the combine kernel that merges its partial results. Built on
// primitives.cuh (mma and ldmatrix fragment layouts there).
//
// Same row tiles, mma fragments and online softmax as the mma_v1 kernel (mma.cuh), with
// three changes:
//  * The key range is split across blocks (flash-decoding style): blockIdx.z = split s
//    covers key tiles [s * tiles_per_split, (s + 1) * tiles_per_split) (the last split
//    also takes anything beyond), clipped to the tiles at or before the block's largest
//    position. With several splits every block writes a normalised fp32 partial output
//    and its base-2 log-sum-exp per active row to a workspace (lse = -inf and no output
//    for a row that sees no key of the split), and
//    sparse_query_attention_combine_kernel merges them. With one split (gridDim.z == 1)
//    the block writes out / lse directly.
//  * K and V tiles are loaded coalesced (consecutive threads read consecutive 16-byte
//    chunks of one key row) and both stored row-major [key][d]; the B fragments are read
//    with ldmatrix (K: non-transposed; V: .trans).
//  * Row tiles and splits are visited in reverse order (blockIdx.x = 0 takes the last row
//    tile, blockIdx.z = 0 the last split): with sorted positions the last row tiles walk
//    the most keys, so they start first, and the short blocks (split 0 of the first row
//    tiles) come last.
//
// B fragments through ldmatrix x4 (its layouts: primitives.cuh):
// K (S = Q K^T, B[k = d][n = key] = K[key][d], sK row-major [key][d]):
//   b0(kk) = {K[8 nt + g][16 kk + 2t], K[8 nt + g][16 kk + 2t + 1]} is exactly the
//   non-transposed fragment of the 8x8 matrix with rows = keys 8 nt .. 8 nt + 7 and
//   columns = d 16 kk .. 16 kk + 7; b1(kk) the same with d + 8. One x4 load serves two
//   k-steps: matrix i = lane / 8 covers keys 8 nt + (lane % 8), d = 16 kk + 8 i, so
//   r0 = b0(kk), r1 = b1(kk), r2 = b0(kk + 1), r3 = b1(kk + 1).
// V (O += P V, B[k = key][n = d] = V[key][d], sV row-major [key][d]):
//   b0(dn) = {V[16 kk + 2t][8 dn + g], V[16 kk + 2t + 1][8 dn + g]} is the .trans
//   fragment of the 8x8 matrix with rows = keys 16 kk .. 16 kk + 7 and columns =
//   d 8 dn .. 8 dn + 7; b1(dn) the same with keys + 8. One x4.trans load serves two
//   n-tiles: lane supplies key 16 kk + (lane % 16), d = 8 dn + 8 (lane / 16), so
//   matrix 0 = (keys +0, d +0) -> b0(dn), 1 = (keys +8, d +0) -> b1(dn),
//   2 = (keys +0, d +8) -> b0(dn + 1), 3 = (keys +8, d +8) -> b1(dn + 1).
// Bank conflicts: each 8-row phase of ldmatrix reads 8 rows x 16 bytes at a row stride
// of D + 8 elements (36 or 68 words, = 4 mod 32), so the 8 rows cover 32 distinct banks.
#pragma once

#include <cstdint>

#include "kernels/attention/params.h"
#include "kernels/attention/primitives.cuh"
#include "kernels/attention/ragged.cuh"
#include "kernels/common.h"

namespace cacheblend {
namespace attention {

// Dynamic shared memory of the split kernel: kBuffers x (K tile, V tile), each
// kMmaKeys x (D + 8) 16-bit elements.
template <int D, bool kPipelined>
constexpr int split_kernel_smem_bytes() {
  return (kPipelined ? 2 : 1) * 2 * kMmaKeys * (D + 8) * 2;
}

// kPipelined: K / V tiles are double-buffered with cp.async (tile i + 1 is in flight
// while tile i is computed); otherwise one buffer with plain loads.
// Requires: group <= kMmaRows; q, k, v rows 16-byte aligned; sm_80+; launched with
// split_kernel_smem_bytes<D, kPipelined>() bytes of dynamic shared memory.
template <typename scalar_t, typename pos_t, int D, bool kPipelined>
__global__ void __launch_bounds__(kMmaThreads)
    sparse_query_attention_split_kernel(const AttentionArgs a, const pos_t* __restrict__ q_pos,
                                        const SplitWorkspace ws) {
  static_assert(D % 32 == 0 && D <= 256, "head_dim must be a multiple of 32");
  constexpr int kStride = D + 8;  // sK / sV row stride (elements)
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  using Ops = MmaOps<scalar_t>;

  constexpr int kTileElems = kMmaKeys * kStride;
  // Buffer b: K tile at smem + 2 b kTileElems, V tile right after it, both [key][d].
  // The Q tile is staged in buffer 0's K tile.
  CB_DYNAMIC_SHARED(uint16_t, smem);
  __shared__ int64_t sPos[kMmaRows];  // row position; -1: inactive row
  static_assert(kMmaKeys >= kMmaRows, "the Q tile is staged in a K tile");
  uint16_t* const sQ = smem;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  const int group = a.group;
  const int tokens_per_block = kMmaRows / group;
  const int rows_used = tokens_per_block * group;
  const int kv_head = blockIdx.y;
  // Splits in reverse launch order too: the last blocks to start are then split 0's
  // lowest row tiles, the shortest work when positions are sorted.
  const int num_splits = gridDim.z, split = num_splits - 1 - static_cast<int>(blockIdx.z);
  const int64_t row_tile = static_cast<int64_t>(gridDim.x) - 1 - blockIdx.x;
  const int64_t tok_begin = row_tile * tokens_per_block;
  const int64_t tok_end = min(a.num_q, tok_begin + tokens_per_block);
  if (tok_begin >= tok_end) return;  // uniform over the block

  const uint16_t* q_base = static_cast<const uint16_t*>(a.q);
  const uint16_t* k_base = static_cast<const uint16_t*>(a.k);
  const uint16_t* v_base = static_cast<const uint16_t*>(a.v);
  const int row0 = warp * 16 + g, row1 = row0 + 8;  // this thread's two rows
  // ldmatrix lane offsets (elements) within a tile, see the header comment.
  const int k_lane_off = (lane % 8) * kStride + (lane / 8) * 8;
  const int v_lane_off = (lane % 16) * kStride + (lane / 16) * 8;

  const int64_t split_first_tile = static_cast<int64_t>(split) * ws.tiles_per_split;

  const int b_first = find_request(a, tok_begin), b_last = find_request(a, tok_end - 1);
  for (int b = b_first; b <= b_last; ++b) {
    const Request req = request_bounds(a, b);
    const int64_t lo = max(tok_begin, req.q_begin), hi = min(tok_end, req.q_end);
    if (lo >= hi) continue;  // a request without queries; uniform over the block
    __syncthreads();         // earlier readers of sPos / sK / sV are done

    for (int r = tid; r < kMmaRows; r += kMmaThreads) {
      const int64_t tok = tok_begin + r / group;
      sPos[r] = (r < rows_used && tok >= lo && tok < hi) ? load_position(q_pos, tok, req) : -1;
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
    // This split's tiles among those holding keys 0 .. max_pos (max_pos >= 0). A split
    // wholly past max_pos skips the Q load and only writes lse = -inf below.
    const int64_t num_tiles = (max_pos + kMmaKeys) / kMmaKeys;
    const int64_t tile_begin = split_first_tile;
    const int64_t tile_end =
        split == num_splits - 1 ? num_tiles : min(num_tiles, split_first_tile + ws.tiles_per_split);

    uint32_t qf[D / 16][4];  // A fragments of Q, all k-steps
    if (tile_begin < tile_end) {  // uniform over the block
      for (int i = tid; i < kMmaRows * kChunks; i += kMmaThreads) {
        const int r = i / kChunks, c = i % kChunks;
        const int64_t tok = tok_begin + r / group;
        uint4 val = make_uint4(0u, 0u, 0u, 0u);  // inactive rows: zeros
        if (r < rows_used && tok >= lo && tok < hi) {
          const int head = kv_head * group + r % group;
          val = *reinterpret_cast<const uint4*>(q_base + tok * a.q_s0 + head * a.q_s1 + c * 8);
        }
        *reinterpret_cast<uint4*>(&sQ[r * kStride + c * 8]) = val;
      }
      __syncthreads();
      load_q_fragments<D>(qf, sQ, kStride, row0, row1, t);
      __syncthreads();  // buffer 0 now takes K / V tiles
    }

    OnlineSoftmax<D> acc;

    // K and V tiles into buffer `buf`, row-major [key][d]: consecutive threads read
    // consecutive 16-byte chunks of one key row. Keys past the request are zero-filled
    // (plain stores): they are masked, and zeros keep 0 * V finite.
    auto load_tile = [&](int64_t tile, int buf) {
      const int64_t n0 = tile * kMmaKeys;
      uint16_t* const dK = smem + buf * 2 * kTileElems;
      uint16_t* const dV = dK + kTileElems;
      for (int i = tid; i < kMmaKeys * kChunks; i += kMmaThreads) {
        const int j = i / kChunks, c = i % kChunks;
        uint16_t* const dk = dK + j * kStride + c * 8;
        uint16_t* const dv = dV + j * kStride + c * 8;
        if (n0 + j < req.kv_len) {
          const int64_t key = req.kv_begin + n0 + j;
          const uint16_t* const sk = k_base + key * a.k_s0 + kv_head * a.k_s1 + c * 8;
          const uint16_t* const sv = v_base + key * a.v_s0 + kv_head * a.v_s1 + c * 8;
          if constexpr (kPipelined) {
            ptx::cp_async16(dk, sk);
            ptx::cp_async16(dv, sv);
          } else {
            *reinterpret_cast<uint4*>(dk) = *reinterpret_cast<const uint4*>(sk);
            *reinterpret_cast<uint4*>(dv) = *reinterpret_cast<const uint4*>(sv);
          }
        } else {
          *reinterpret_cast<uint4*>(dk) = make_uint4(0u, 0u, 0u, 0u);
          *reinterpret_cast<uint4*>(dv) = make_uint4(0u, 0u, 0u, 0u);
        }
      }
    };

    // Pipelined: tile i + 1 is copied into buffer (i + 1) & 1 while tile i is computed
    // from buffer i & 1. The barrier at the end of iteration i - 1 guarantees nobody still
    // reads the buffer that iteration i starts overwriting; wait_group + the barrier
    // below make tile i's copies (all threads') visible before it is read.
    if (kPipelined && tile_begin < tile_end) {
      load_tile(tile_begin, 0);
      ptx::cp_async_commit();
    }
    for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
      const int64_t n0 = tile * kMmaKeys;
      int buf = 0;
      if constexpr (kPipelined) {
        buf = static_cast<int>((tile - tile_begin) & 1);
        if (tile + 1 < tile_end) {
          load_tile(tile + 1, buf ^ 1);
          ptx::cp_async_commit();
          ptx::cp_async_wait<1>();  // tile's group is complete; tile + 1's may be in flight
        } else {
          ptx::cp_async_wait<0>();
        }
      } else {
        load_tile(tile, 0);
      }
      __syncthreads();
      const uint16_t* const sK = smem + buf * 2 * kTileElems;
      const uint16_t* const sV = sK + kTileElems;

      // S = Q K^T: 16 rows x 64 keys per warp.
      float s[kMmaKeys / 8][4];
#pragma unroll
      for (int nt = 0; nt < kMmaKeys / 8; ++nt) {
        s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; kk += 2) {
          uint32_t kb[4];
          ptx::ldmatrix_x4<false>(kb, &sK[nt * 8 * kStride + kk * 16 + k_lane_off]);
          Ops::mma(s[nt], qf[kk], kb[0], kb[1]);
          Ops::mma(s[nt], qf[kk + 1], kb[2], kb[3]);
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
        for (int dn = 0; dn < D / 8; dn += 2) {
          uint32_t vb[4];
          ptx::ldmatrix_x4<true>(vb, &sV[kk * 16 * kStride + dn * 8 + v_lane_off]);
          Ops::mma(acc.o[dn], pa, vb[0], vb[1]);
          Ops::mma(acc.o[dn + 1], pa, vb[2], vb[3]);
        }
      }
      __syncthreads();  // before the next load overwrites this buffer
    }

    acc.finish();
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = half == 0 ? row0 : row1;
      const int64_t p = half == 0 ? pos0 : pos1;
      if (p < 0) continue;  // inactive: padding or another request's token
      const float l = half == 0 ? acc.l0 : acc.l1, m = half == 0 ? acc.m0 : acc.m1;
      const int64_t tok = tok_begin + row / group;
      const int head = kv_head * group + row % group;
      if (num_splits == 1) {
        // Split 0 holds key 0, visible to every row: l >= 1.
        const float inv = 1.f / l;
        scalar_t* op = static_cast<scalar_t*>(a.out) + tok * a.o_s0 + head * a.o_s1;
#pragma unroll
        for (int dn = 0; dn < D / 8; ++dn) {
          op[dn * 8 + 2 * t] = from_float<scalar_t>(acc.o[dn][2 * half] * inv);
          op[dn * 8 + 2 * t + 1] = from_float<scalar_t>(acc.o[dn][2 * half + 1] * inv);
        }
        if (a.lse != nullptr && t == 0) a.lse[tok * a.lse_s0 + head * a.lse_s1] = (m + log2f(l)) * kLn2;
      } else {
        const int64_t idx = (static_cast<int64_t>(split) * a.num_q + tok) * a.hq + head;
        if (l > 0.f) {  // l >= 1 once any key of the split is visible to the row
          const float inv = 1.f / l;
          float* op = ws.part_o + idx * D;
#pragma unroll
          for (int dn = 0; dn < D / 8; ++dn)
            *reinterpret_cast<float2*>(op + dn * 8 + 2 * t) =
                make_float2(acc.o[dn][2 * half] * inv, acc.o[dn][2 * half + 1] * inv);
        }
        if (t == 0) ws.part_lse[idx] = l > 0.f ? m + log2f(l) : -INFINITY;
      }
    }
  }
}

// Merges the split kernel's partials: one warp per (query, query head) row; lane covers
// d = 4 lane + 128 i. Splits with lse = -inf (no visible key; their part_o was never
// written) are skipped. Split 0 always holds key 0, so the maximum is finite.
template <typename scalar_t>
__global__ void __launch_bounds__(kCombineWarps * 32)
    sparse_query_attention_combine_kernel(const AttentionArgs a, const float* __restrict__ part_o,
                                          const float* __restrict__ part_lse, int num_splits) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kCombineWarps + warp;  // tok * hq + head
  if (row >= a.num_q * a.hq) return;  // whole warps leave together
  const int64_t tok = row / a.hq;
  const int head = static_cast<int>(row % a.hq);
  const int64_t split_stride = a.num_q * a.hq;
  float mx = -INFINITY;
  for (int s = 0; s < num_splits; ++s) mx = fmaxf(mx, part_lse[s * split_stride + row]);
  scalar_t* op = static_cast<scalar_t*>(a.out) + tok * a.o_s0 + head * a.o_s1;
  if (mx == -INFINITY) {  // unreachable for valid inputs: every row sees key 0
    for (int d = lane; d < a.head_dim; d += 32) op[d] = from_float<scalar_t>(NAN);
    if (a.lse != nullptr && lane == 0) a.lse[tok * a.lse_s0 + head * a.lse_s1] = NAN;
    return;
  }
  float sum = 0.f;
  for (int s = 0; s < num_splits; ++s) {
    const float x = part_lse[s * split_stride + row];
    if (x != -INFINITY) sum += exp2f(x - mx);
  }
  const float inv = 1.f / sum;  // sum >= 1: the maximum's own term
  for (int d = 4 * lane; d < a.head_dim; d += 128) {  // head_dim is a multiple of 4
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int s = 0; s < num_splits; ++s) {
      const float x = part_lse[s * split_stride + row];
      if (x == -INFINITY) continue;
      const float w = exp2f(x - mx) * inv;
      const float4 val = *reinterpret_cast<const float4*>(part_o + (s * split_stride + row) * a.head_dim + d);
      acc.x += w * val.x;
      acc.y += w * val.y;
      acc.z += w * val.z;
      acc.w += w * val.w;
    }
    op[d] = from_float<scalar_t>(acc.x);
    op[d + 1] = from_float<scalar_t>(acc.y);
    op[d + 2] = from_float<scalar_t>(acc.z);
    op[d + 3] = from_float<scalar_t>(acc.w);
  }
  if (a.lse != nullptr && lane == 0) a.lse[tok * a.lse_s0 + head * a.lse_s1] = (mx + log2f(sum)) * kLn2;
}

}  // namespace attention
}  // namespace cacheblend
