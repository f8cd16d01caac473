// CUDA kernels of sparse_query_attention (exact position-causal mask, GQA, ragged batches).
//
// Kernels:
//  * sparse_query_attention_simt_kernel: one warp per (query, query head), keys visited
//    one by one with an online softmax in fp32. Simple and obviously correct; used for
//    fp32 inputs, head dims other than 64 / 128, unaligned inputs, GPUs before sm_80,
//    and on request (CACHEBLEND_ATTENTION_IMPL=simt) so both kernels can be compared.
//  * sparse_query_attention_mma_kernel: flash-attention-2 style for fp16 / bf16 with
//    tensor cores (mma.sync m16n8k16, fp32 accumulation). A block owns one kv head and
//    64 "rows", each row one (query token, query head of that kv head's group) pair, so
//    every K/V tile loaded into shared memory serves the whole group. Key tiles past the
//    block's largest query position are never visited; tiles wholly at or before its
//    smallest position skip the mask. The default for fp16 / bf16 with head_dim 64 / 128
//    (verified on an H100; CACHEBLEND_ATTENTION_IMPL=mma_v1 names it explicitly).
//  * sparse_query_attention_split_kernel (+ sparse_query_attention_combine_kernel): the
//    same row tiles and fragments, with the key range split across blocks, coalesced
//    K / V loads read through ldmatrix, and cp.async double-buffering of the K / V tiles
//    (CACHEBLEND_ATTENTION_IMPL=split, or split_sync without cp.async). Passes the
//    attention tests in the host CUDA emulator (python_tests/test_attention_emulated.py)
//    and compiles for sm_80..90; not yet run on a GPU, so not the default.
//
// All three tensor-core kernels also compile for the host under
// CACHEBLEND_CUDA_EMULATION (emulation/cuda_emulator.h supplies the CUDA built-ins and
// the PTX operations), which is how the tests run them without a GPU.
//
// Ragged batches without a host sync: the grid covers the flat query range; a block
// finds the requests its rows belong to by binary search in q_indptr and, when its rows
// span several requests, runs the tile loop once per request with the other rows
// inactive. Index values (positions, offsets) are checked on the device.
#pragma once

#if !defined(CACHEBLEND_CUDA_EMULATION)  // emulated host builds: see kernels/common.h
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

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
#if defined(CACHEBLEND_CUDA_EMULATION)
    return c10::Half(lo).x | (static_cast<uint32_t>(c10::Half(hi).x) << 16);  // round to nearest even
#else
    const __half2 h = __floats2half2_rn(lo, hi);  // .x (low 16 bits) = lo
    return *reinterpret_cast<const uint32_t*>(&h);
#endif
  }
  static CB_DEVICE void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(CACHEBLEND_CUDA_EMULATION)
    emulation::mma_m16n8k16<c10::Half>(c, a, b0, b1);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
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
#if defined(CACHEBLEND_CUDA_EMULATION)
    return c10::BFloat16(lo).x | (static_cast<uint32_t>(c10::BFloat16(hi).x) << 16);  // round to nearest even
#else
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);  // .x (low 16 bits) = lo
    return *reinterpret_cast<const uint32_t*>(&h);
#endif
  }
  static CB_DEVICE void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(CACHEBLEND_CUDA_EMULATION)
    emulation::mma_m16n8k16<c10::BFloat16>(c, a, b0, b1);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
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

// A fragments of a 64-row Q tile in shared memory (row-major, row stride `stride`), all
// D / 16 k-steps, for this thread's rows row0 / row1.
template <int D>
CB_DEVICE void load_q_fragments(uint32_t (&qf)[D / 16][4], const uint16_t* sQ, int stride, int row0, int row1, int t) {
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    qf[kk][0] = load_word(&sQ[row0 * stride + kk * 16 + 2 * t]);
    qf[kk][1] = load_word(&sQ[row1 * stride + kk * 16 + 2 * t]);
    qf[kk][2] = load_word(&sQ[row0 * stride + kk * 16 + 8 + 2 * t]);
    qf[kk][3] = load_word(&sQ[row1 * stride + kk * 16 + 8 + 2 * t]);
  }
}

// One thread's part of a warp's flash-attention state: the output accumulators of its
// rows row0 (elements 0, 1) and row1 (elements 2, 3), their running maxima (base-2
// scaled scores) and its part of their running sums (a row's scores are spread over
// the 4 threads of a quad). Shared by the mma_v1 and split kernels.
template <int D>
struct OnlineSoftmax {
  float o[D / 8][4];
  float m0 = -INFINITY, m1 = -INFINITY;
  float l0 = 0.f, l1 = 0.f;

  CB_DEVICE OnlineSoftmax() {
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) o[dn][0] = o[dn][1] = o[dn][2] = o[dn][3] = 0.f;
  }

  // Takes the raw scores s of the key tile starting at n0 and leaves probabilities in s
  // (relative to the new running maxima), rescaling o and the sums. Key
  // n0 + 8 nt + 2t + (e & 1) is visible to a row iff key <= its position; `unmasked`:
  // the whole tile is visible to every active row (inactive rows are never written).
  CB_DEVICE void absorb(float (&s)[kMmaKeys / 8][4], int64_t n0, bool unmasked, int64_t pos0, int64_t pos1, int t,
                        float scale_log2) {
#pragma unroll
    for (int nt = 0; nt < kMmaKeys / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t key = n0 + nt * 8 + 2 * t + (e & 1);
        const int64_t p = e < 2 ? pos0 : pos1;
        const float x = s[nt][e] * scale_log2;
        s[nt][e] = (unmasked || key <= p) ? x : -INFINITY;
      }
    }
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
  }

  // After the last tile: full row sums over the quad.
  CB_DEVICE void finish() {
#pragma unroll
    for (int off = 1; off <= 2; off *= 2) {
      l0 += __shfl_xor_sync(0xffffffffu, l0, off);
      l1 += __shfl_xor_sync(0xffffffffu, l1, off);
    }
  }
};

// The A fragment of P for k-step kk of O += P V: the probabilities of n-tiles 2kk and
// 2kk + 1 (see the layout comment above).
template <typename Ops>
CB_DEVICE void pack_probabilities(uint32_t (&pa)[4], const float (&s)[kMmaKeys / 8][4], int kk) {
  pa[0] = Ops::pack(s[2 * kk][0], s[2 * kk][1]);
  pa[1] = Ops::pack(s[2 * kk][2], s[2 * kk][3]);
  pa[2] = Ops::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
  pa[3] = Ops::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
}

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


// ---------------------------------------------------------------------------------------
// Split-key tensor-core kernel (CACHEBLEND_ATTENTION_IMPL=split / split_sync).
//
// Same row tiles, mma fragments and online softmax as the kernel above, with three
// changes:
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
// ldmatrix.sync.aligned.m8n8.x4{.trans}.shared.b16 (PTX ISA): lanes 8i .. 8i + 7 give the
// shared addresses of rows 0 .. 7 of matrix i (16 bytes each: 8 consecutive 16-bit
// elements); register ri receives matrix i. Without .trans lane (g, t) receives row g,
// elements 2t and 2t + 1 of the matrix; with .trans it receives element g of rows 2t and
// 2t + 1 (the transposed matrix's row g, columns 2t, 2t + 1). Low half = first element.
//
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
// ---------------------------------------------------------------------------------------
constexpr int kSplitTargetBlocks = 1056;  // host: aim at ~4 waves of 2 blocks on 132 SMs
constexpr int kSplitMinTiles = 4;         // host: at least 4 key tiles (256 keys) per split
constexpr int kSplitMaxSplits = 64;

// The PTX wrappers below run on sm_80+ (the host picks these kernels only there); under
// CACHEBLEND_CUDA_EMULATION they call the host emulator instead.
#if !defined(CACHEBLEND_CUDA_EMULATION)
CB_DEVICE uint32_t shared_address(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }
#endif

// ldmatrix.sync.aligned.m8n8.x4{.trans}.shared.b16 (layouts in the comment above).
template <bool kTransposed>
CB_DEVICE void ldmatrix_x4(uint32_t (&r)[4], const uint16_t* p) {
#if defined(CACHEBLEND_CUDA_EMULATION)
  emulation::ldmatrix_x4(r, p, kTransposed);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (kTransposed)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared_address(p))
                 : "memory");
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared_address(p))
                 : "memory");
#else
  __trap();
#endif
}

// 16-byte asynchronous global -> shared copy (L2 only), and its group fences.
CB_DEVICE void cp_async16(uint16_t* dst, const uint16_t* src) {
#if defined(CACHEBLEND_CUDA_EMULATION)
  emulation::cp_async16(dst, src);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(shared_address(dst)), "l"(src) : "memory");
#else
  __trap();
#endif
}

CB_DEVICE void cp_async_commit() {
#if defined(CACHEBLEND_CUDA_EMULATION)
  emulation::cp_async_commit();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
CB_DEVICE void cp_async_wait() {
#if defined(CACHEBLEND_CUDA_EMULATION)
  emulation::cp_async_wait(N);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// Workspace of the split kernel (unused with one split): part_o [splits, num_q, hq, D]
// fp32 (normalised partial outputs), part_lse [splits, num_q, hq] fp32 (base-2 lse of
// the split's visible scores, -inf when the row sees none of its keys).
struct SplitWorkspace {
  float* part_o;
  float* part_lse;
  int tiles_per_split;
};

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
            cp_async16(dk, sk);
            cp_async16(dv, sv);
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
      cp_async_commit();
    }
    for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
      const int64_t n0 = tile * kMmaKeys;
      int buf = 0;
      if constexpr (kPipelined) {
        buf = static_cast<int>((tile - tile_begin) & 1);
        if (tile + 1 < tile_end) {
          load_tile(tile + 1, buf ^ 1);
          cp_async_commit();
          cp_async_wait<1>();  // tile's group is complete; tile + 1's may be in flight
        } else {
          cp_async_wait<0>();
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
          ldmatrix_x4<false>(kb, &sK[nt * 8 * kStride + kk * 16 + k_lane_off]);
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
          ldmatrix_x4<true>(vb, &sV[kk * 16 * kStride + dn * 8 + v_lane_off]);
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
constexpr int kCombineWarps = 4;

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
