// Shared by the CPU (plain C++) and CUDA (nvcc) implementations. ATen-free: only
// plain pointers, integers and float math, so the same formulas run on both paths.
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
// (CudaLauncher: converted to dim3; the CUDA emulator: used as is).
struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
};

}  // namespace cacheblend

#if defined(__CUDACC__)
// Device-side argument check (index values can only be seen on the device without a
// host sync). Like PyTorch's CUDA_KERNEL_ASSERT: the launch fails with "device-side
// assert triggered" and the message names the argument; kernels never read or write
// out of bounds before it fires.
#define CB_DEVICE_CHECK(cond, msg)                                 \
  do {                                                             \
    if (!(cond)) __assert_fail(msg, __FILE__, __LINE__, __func__); \
  } while (0)
#elif defined(CACHEBLEND_CUDA_EMULATION)
// The host emulator of the CUDA kernels (emulation/cuda_emulator.h) stops the launch.
#define CB_DEVICE_CHECK(cond, msg)                                                      \
  do {                                                                                  \
    if (!(cond)) ::cacheblend::emulation::device_check_failed(msg, __FILE__, __LINE__); \
  } while (0)
#endif

// Dynamic shared memory of a kernel: CB_DYNAMIC_SHARED(float, buffer); declares `buffer`.
#if defined(CACHEBLEND_CUDA_EMULATION)
#define CB_DYNAMIC_SHARED(type, name) type* const name = ::cacheblend::emulation::dynamic_shared<type>()
// Host builds of the CUDA kernels for the tests: CUDA built-ins from the emulator.
#include "emulation/cuda_emulator.h"
#else
#define CB_DYNAMIC_SHARED(type, name) extern __shared__ __align__(16) type name[]
#endif
