// Warp-level building blocks of the tensor-core sparse_query_attention kernels (mma.cuh,
// split.cuh): the sm_80+ PTX operations they use (mma.sync m16n8k16, ldmatrix, cp.async),
// the fp16 / bf16 fragment operations on top of them, the Q fragment load and the
// online softmax.
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
// ldmatrix.sync.aligned.m8n8.x4{.trans}.shared.b16 (PTX ISA): lanes 8i .. 8i + 7 give the
// shared addresses of rows 0 .. 7 of matrix i (16 bytes each: 8 consecutive 16-bit
// elements); register ri receives matrix i. Without .trans lane (g, t) receives row g,
// elements 2t and 2t + 1 of the matrix; with .trans it receives element g of rows 2t and
// 2t + 1 (the transposed matrix's row g, columns 2t, 2t + 1). Low half = first element.
#pragma once

#include <cstdint>

#include "kernels/attention/params.h"
#include "kernels/common.h"
#include "kernels/dtypes.h"

namespace cacheblend {

// The PTX operations. They run on sm_80+ (the host picks the kernels that use them only
// there). A host build of the kernels supplies functions of the same names and
// signatures instead (see kernels/common.h).
namespace ptx {
#if !defined(CB_HOST_CUDA)
CB_DEVICE uint32_t shared_address(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }

CB_DEVICE void mma_m16n8k16_f16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
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

CB_DEVICE void mma_m16n8k16_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
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

// ldmatrix.sync.aligned.m8n8.x4{.trans}.shared.b16 (layouts in the comment above).
template <bool kTransposed>
CB_DEVICE void ldmatrix_x4(uint32_t (&r)[4], const uint16_t* p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
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
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(shared_address(dst)), "l"(src) : "memory");
#else
  __trap();
#endif
}

CB_DEVICE void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
CB_DEVICE void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// 2^x with the special-function unit (ex2.approx.ftz.f32: 2 ulp; 2^-inf = +0).
CB_DEVICE float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}
#endif  // !defined(CB_HOST_CUDA)
}  // namespace ptx

namespace attention {

// mma.sync and A-fragment packing for one 16-bit format.
template <typename T>
struct MmaOps;

template <>
struct MmaOps<half_t> {
  static CB_DEVICE uint32_t pack(float lo, float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);  // .x (low 16 bits) = lo, round to nearest even
    return *reinterpret_cast<const uint32_t*>(&h);
  }
  static CB_DEVICE void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    ptx::mma_m16n8k16_f16(c, a, b0, b1);
  }
};

template <>
struct MmaOps<bfloat16_t> {
  static CB_DEVICE uint32_t pack(float lo, float hi) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);  // .x (low 16 bits) = lo, round to nearest even
    return *reinterpret_cast<const uint32_t*>(&h);
  }
  static CB_DEVICE void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    ptx::mma_m16n8k16_bf16(c, a, b0, b1);
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

}  // namespace attention
}  // namespace cacheblend
