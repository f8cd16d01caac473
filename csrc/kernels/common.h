// Shared by the CPU (plain C++) and CUDA (nvcc) implementations. ATen-free: only
// plain pointers, integers and float math, so the same formulas run on both paths.
//
// Host builds of the CUDA kernels. These headers also compile with a host compiler for
// a build that supplies the CUDA device API itself (a forced include that defines
// CB_HOST_CUDA before anything else): the built-ins (threadIdx, __syncthreads,
// shuffles, vector and 16-bit float types), CB_DEVICE_CHECK, CB_DYNAMIC_SHARED and the
// PTX operations of namespace cacheblend::ptx (kernels/attention/primitives.cuh). The
// kernels use those names only; they do not know who supplies them.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define CB_HOST_DEVICE __host__ __device__ __forceinline__
#define CB_DEVICE __device__ __forceinline__
#else
#define CB_HOST_DEVICE inline
#define CB_DEVICE inline
#endif

namespace cacheblend {

// Storage types (fp16/bf16/fp32) convert through float; all math is fp32.
template <typename T>
CB_HOST_DEVICE float to_float(T x) {
  return static_cast<float>(x);
}

template <typename T>
CB_HOST_DEVICE T from_float(float x) {
  return static_cast<T>(x);
}

// Elements of T that fit in one 16-byte vector load.
template <typename T>
constexpr int kVec16 = 16 / static_cast<int>(sizeof(T));

template <typename T, int N>
struct alignas(sizeof(T) * N) Array {
  T v[N];
};

CB_HOST_DEVICE int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grid / block shape of a launch, as the host-side launch code hands it to a launcher
// (CudaLauncher: converted to dim3; a host build's launcher: used as is).
struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
};

}  // namespace cacheblend

// Device-side argument check (index values can only be seen on the device without a
// host sync). Like PyTorch's CUDA_KERNEL_ASSERT: the launch fails with "device-side
// assert triggered" and the message names the argument; kernels never read or write
// out of bounds before it fires.
#if !defined(CB_DEVICE_CHECK) && defined(__CUDACC__)
#include <cassert>  // __assert_fail (glibc declares it only without NDEBUG)
#if defined(NDEBUG)
// The same declaration as glibc's (and c10's for NDEBUG builds), usable in device code.
extern "C" {
#if defined(__CUDA_ARCH__)
__host__ __device__
#endif
    void
    __assert_fail(const char* assertion, const char* file, unsigned int line, const char* function) noexcept
    __attribute__((__noreturn__));
}
#endif
#define CB_DEVICE_CHECK(cond, msg)                                 \
  do {                                                             \
    if (!(cond)) __assert_fail(msg, __FILE__, __LINE__, __func__); \
  } while (0)
#endif

// Dynamic shared memory of a kernel: CB_DYNAMIC_SHARED(float, buffer); declares `buffer`.
#if !defined(CB_DYNAMIC_SHARED)
#define CB_DYNAMIC_SHARED(type, name) extern __shared__ __align__(16) type name[]
#endif
