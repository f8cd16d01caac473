// Warp-level building blocks of the tensor-core sparse_query_attention kernel (flash.cuh):
// the sm_80+ PTX operations it uses (mma.sync m16n8k16, ldmatrix, cp.async, ex2.approx) and
// the fp16 / bf16 fragment operations on top of them.
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

}  // namespace attention
}  // namespace cacheblend
