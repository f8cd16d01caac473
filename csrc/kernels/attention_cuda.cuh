// CUDA kernels of sparse_query_attention (exact position-causal mask, GQA, ragged batches).
//
// Two kernels:
//  * sparse_query_attention_simt_kernel: one warp per (query, query head), keys visited
//    one by one with an online softmax in fp32. Simple and obviously correct; used for
//    fp32 inputs, head dims other than 64 / 128, unaligned inputs, GPUs before sm_80,
//    and on request (CACHEBLEND_ATTENTION_IMPL=simt) so both kernels can be compared.
//  * sparse_query_attention_mma_kernel: flash-attention-2 style for fp16 / bf16 with
//    tensor cores (mma.sync m16n8k16, fp32 accumulation). A block owns one kv head and
//    64 "rows", each row one (query token, query head of that kv head's group) pair, so
//    every K/V tile loaded into shared memory serves the whole group. Key tiles past the
//    block's largest query position are never visited; tiles wholly at or before its
//    smallest position skip the mask.
//
// Ragged batches without a host sync: the grid covers the flat query range; a block
// finds the requests its rows belong to by binary search in q_indptr and, when its rows
// span several requests, runs the tile loop once per request with the other rows
// inactive. Index values (positions, offsets) are checked on the device.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "kernels/common.h"

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

// ---------------------------------------------------------------------------------------
// SIMT kernel: block = kSimtWarps warps = kSimtWarps query heads of one query token.
// Lane `lane` holds elements d = lane + 32 * i (i < kSimtMaxPerLane) of q and of the
// output accumulator, so head_dim <= 256.
// ---------------------------------------------------------------------------------------
constexpr int kSimtWarps = 4;
constexpr int kSimtMaxPerLane = 8;

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
  const int dim = a.head_dim;

  const scalar_t* qp = static_cast<const scalar_t*>(a.q) + row * a.q_s0 + head * a.q_s1;
  const scalar_t* kp = static_cast<const scalar_t*>(a.k) + req.kv_begin * a.k_s0 + kv_head * a.k_s1;
  const scalar_t* vp = static_cast<const scalar_t*>(a.v) + req.kv_begin * a.v_s0 + kv_head * a.v_s1;
  float qv[kSimtMaxPerLane], acc[kSimtMaxPerLane];
#pragma unroll
  for (int i = 0; i < kSimtMaxPerLane; ++i) {
    const int d = lane + 32 * i;
    qv[i] = d < dim ? to_float(qp[d]) * a.scale_log2 : 0.f;
    acc[i] = 0.f;
  }
  float run_max = -INFINITY, run_sum = 0.f;
  for (int64_t j = 0; j <= pos; ++j) {  // exactly the visible keys 0 .. pos
    const scalar_t* kj = kp + j * a.k_s0;
    const scalar_t* vj = vp + j * a.v_s0;
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < kSimtMaxPerLane; ++i) {
      const int d = lane + 32 * i;
      if (d < dim) s += qv[i] * to_float(kj[d]);
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
      if (d < dim) acc[i] = acc[i] * alpha + p * to_float(vj[d]);
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

// ---------------------------------------------------------------------------------------
// Tensor-core kernel.
//
// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: D[16x8] = A[16x16] * B[16x8] + C.
// With g = lane / 4 (the "group") and t = lane % 4 (thread in group), the PTX ISA
// fragment layouts are (each 32-bit A/B register holds two 16-bit elements, the lower
// column / k index in the low half):
//   A (row-major 16x16):  a0 = A[g    ][2t, 2t+1]    a1 = A[g + 8][2t, 2t+1]
//                         a2 = A[g    ][2t+8, 2t+9]  a3 = A[g + 8][2t+8, 2t+9]
//   B (16x8, "col"):      b0 = B[2t, 2t+1  ][g]      b1 = B[2t+8, 2t+9][g]
//   C/D (16x8 fp32):      c0, c1 = C[g][2t, 2t+1]    c2, c3 = C[g + 8][2t, 2t+1]
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
// ---------------------------------------------------------------------------------------
constexpr int kMmaRows = 64;  // rows per block: 4 warps x 16
constexpr int kMmaKeys = 64;  // keys per K/V tile
constexpr int kMmaThreads = 128;

template <typename T>
struct MmaOps;

template <>
struct MmaOps<c10::Half> {
  static CB_DEVICE uint32_t pack(float lo, float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);  // .x (low 16 bits) = lo
    return *reinterpret_cast<const uint32_t*>(&h);
  }
  static CB_DEVICE void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    __trap();  // the host selects this kernel only on sm_80+
#endif
  }
};

template <>
struct MmaOps<c10::BFloat16> {
  static CB_DEVICE uint32_t pack(float lo, float hi) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);  // .x (low 16 bits) = lo
    return *reinterpret_cast<const uint32_t*>(&h);
  }
  static CB_DEVICE void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    __trap();
#endif
  }
};

CB_DEVICE uint32_t load_word(const uint16_t* p) { return *reinterpret_cast<const uint32_t*>(p); }

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
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      qf[kk][0] = load_word(&sQK[row0 * kStride + kk * 16 + 2 * t]);
      qf[kk][1] = load_word(&sQK[row1 * kStride + kk * 16 + 2 * t]);
      qf[kk][2] = load_word(&sQK[row0 * kStride + kk * 16 + 8 + 2 * t]);
      qf[kk][3] = load_word(&sQK[row1 * kStride + kk * 16 + 8 + 2 * t]);
    }
    __syncthreads();  // sQK now holds K tiles

    float o[D / 8][4];
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) o[dn][0] = o[dn][1] = o[dn][2] = o[dn][3] = 0.f;
    float m0 = -INFINITY, m1 = -INFINITY;  // running max (base-2 scaled scores) of rows row0 / row1
    float l0 = 0.f, l1 = 0.f;              // this thread's part of the running sums

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

      // Scale to base 2 and apply the mask: key n0 + 8 nt + 2t + (e & 1) is visible to
      // the row iff key <= its position. The whole tile is visible to every active
      // row when its last key <= min_pos (inactive rows are never written).
      const bool unmasked = n0 + kMmaKeys - 1 <= min_pos;
#pragma unroll
      for (int nt = 0; nt < kMmaKeys / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int64_t key = n0 + nt * 8 + 2 * t + (e & 1);
          const int64_t p = e < 2 ? pos0 : pos1;
          const float x = s[nt][e] * a.scale_log2;
          s[nt][e] = (unmasked || key <= p) ? x : -INFINITY;
        }
      }

      // Online softmax of rows row0 (elements 0, 1) and row1 (elements 2, 3).
      float mx0 = m0, mx1 = m1;
#pragma unroll
      for (int nt = 0; nt < kMmaKeys / 8; ++nt) {
        mx0 = fmaxf(mx0, fmaxf(s[nt][0], s[nt][1]));
        mx1 = fmaxf(mx1, fmaxf(s[nt][2], s[nt][3]));
      }
#pragma unroll
      for (int off = 1; off <= 2; off *= 2) {
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
      }
      // A row with nothing visible yet keeps max -inf: subtract 0 instead so that
      // exp2(-inf - base) = 0 rather than NaN.
      const float base0 = mx0 == -INFINITY ? 0.f : mx0;
      const float base1 = mx1 == -INFINITY ? 0.f : mx1;
      const float alpha0 = exp2f(m0 - base0), alpha1 = exp2f(m1 - base1);  // 0 while m = -inf
      m0 = mx0;
      m1 = mx1;
      float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
      for (int nt = 0; nt < kMmaKeys / 8; ++nt) {
        s[nt][0] = exp2f(s[nt][0] - base0);
        s[nt][1] = exp2f(s[nt][1] - base0);
        s[nt][2] = exp2f(s[nt][2] - base1);
        s[nt][3] = exp2f(s[nt][3] - base1);
        sum0 += s[nt][0] + s[nt][1];
        sum1 += s[nt][2] + s[nt][3];
      }
      l0 = l0 * alpha0 + sum0;  // alpha is uniform over the quad, so partial sums stay consistent
      l1 = l1 * alpha1 + sum1;
#pragma unroll
      for (int dn = 0; dn < D / 8; ++dn) {
        o[dn][0] *= alpha0;
        o[dn][1] *= alpha0;
        o[dn][2] *= alpha1;
        o[dn][3] *= alpha1;
      }

      // O += P V.
#pragma unroll
      for (int kk = 0; kk < kMmaKeys / 16; ++kk) {
        const uint32_t pa[4] = {Ops::pack(s[2 * kk][0], s[2 * kk][1]), Ops::pack(s[2 * kk][2], s[2 * kk][3]),
                                Ops::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                Ops::pack(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
        for (int dn = 0; dn < D / 8; ++dn) {
          const uint16_t* vr = &sVt[(dn * 8 + g) * kVtStride + kk * 16 + 2 * t];
          Ops::mma(o[dn], pa, load_word(vr), load_word(vr + 8));
        }
      }
      __syncthreads();  // before the next tile overwrites sQK / sVt
    }

    // Full row sums over the quad, then write the active rows.
#pragma unroll
    for (int off = 1; off <= 2; off *= 2) {
      l0 += __shfl_xor_sync(0xffffffffu, l0, off);
      l1 += __shfl_xor_sync(0xffffffffu, l1, off);
    }
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = half == 0 ? row0 : row1;
      const int64_t p = half == 0 ? pos0 : pos1;
      if (p < 0) continue;  // inactive: padding or another request's token
      const float l = half == 0 ? l0 : l1, m = half == 0 ? m0 : m1;
      const int64_t tok = tok_begin + row / group;
      const int head = kv_head * group + row % group;
      const float inv = 1.f / l;  // l >= 1: the row maximum's own term
      scalar_t* op = static_cast<scalar_t*>(a.out) + tok * a.o_s0 + head * a.o_s1;
#pragma unroll
      for (int dn = 0; dn < D / 8; ++dn) {
        op[dn * 8 + 2 * t] = from_float<scalar_t>(o[dn][2 * half] * inv);
        op[dn * 8 + 2 * t + 1] = from_float<scalar_t>(o[dn][2 * half + 1] * inv);
      }
      if (a.lse != nullptr && t == 0) a.lse[tok * a.lse_s0 + head * a.lse_s1] = (m + log2f(l)) * kLn2;
    }
  }
}

}  // namespace attention
}  // namespace cacheblend
