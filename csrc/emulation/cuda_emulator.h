// A small host emulator of the CUDA execution model: enough of it to run this project's
// tensor-core attention kernels (kernels/attention/) *unchanged* on the CPU, so
// their index math, fragment layouts, barriers and cp.async pipelining are tested where
// no GPU is available. Test infrastructure only; never part of the built extension.
//
// The kernels do not know this file: a host build of them force-includes it (g++
// -include emulation/cuda_emulator.h) so it comes before any kernel header. It defines
// CB_HOST_CUDA and supplies what nvcc would (see kernels/common.h): the CUDA built-ins,
// the 16-bit float types, CB_DEVICE_CHECK, CB_DYNAMIC_SHARED and the PTX operations of
// namespace cacheblend::ptx. Kernels start with emulation::launch() -- or
// EmulatedLauncher (emulated_launcher.h) through the same host launch code the CUDA
// build uses (cuda/launch.h).
//
// Model:
//  * Blocks run one after another. The threads of a block are cooperative fibers
//    (ucontext) on the calling OS thread, so runs are deterministic. A fiber runs until
//    it reaches a barrier (block-wide __syncthreads, or the implicit warp-wide one of a
//    collective) and is resumed once every participant has arrived; blocks take turns
//    at three orders of resuming threads (see Schedule) to expose missing barriers. A barrier that can
//    never complete (threads of a block diverging at __syncthreads, a thread exiting
//    before it) is reported as a deadlock instead of hanging.
//  * `__shared__` arrays declared in a kernel become function-local statics (one copy
//    per kernel instantiation, reused block after block: the contents of shared memory
//    carry over between blocks, as they may on a GPU). Dynamic shared memory is filled
//    with 0xFF bytes (NaN in every float format) before each block.
//  * Warp collectives (shuffles, mma.sync m16n8k16, ldmatrix x4 / x4.trans) exchange
//    operands through per-lane slots and compute each lane's result with the data
//    layouts of the PTX ISA. mma accumulates in double and rounds once to fp32.
//  * cp.async copies are deferred: the destination is poisoned when the copy is issued
//    and filled when cp.async.wait_group retires its group. A kernel that reads it before
//    waiting, or issues the copy while other threads still read the old contents (a
//    missing barrier), reads NaNs and fails its test.
//  * A failed device-side check or a trap stops the launch; launch() then throws
//    std::runtime_error with the message.
//  * Mutation testing: disable_sync_at(file, line) turns the __syncthreads, __syncwarp
//    or cp.async.wait_group at that source line into a no-op, so a test can show that
//    the kernels' tests fail without it (python_tests/test_attention_emulated.py).
#pragma once

// This build supplies the CUDA device API on the host (kernels/common.h).
#define CB_HOST_CUDA 1
// A failed device-side check stops the launch.
#define CB_DEVICE_CHECK(cond, msg)                                                      \
  do {                                                                                  \
    if (!(cond)) ::cacheblend::emulation::device_check_failed(msg, __FILE__, __LINE__); \
  } while (0)
#define CB_DYNAMIC_SHARED(type, name) type* const name = ::cacheblend::emulation::dynamic_shared<type>()

#include <ucontext.h>

#include <source_location>
#include <string_view>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <deque>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/common.h"

// --- CUDA keywords and vector types --------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned int x, y;
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

// CUDA's 16-bit float types and the conversions the kernels use: c10's host types, whose
// float conversions round to nearest even like __float2half / __float2bfloat16.
using __half = c10::Half;
using __nv_bfloat16 = c10::BFloat16;
struct alignas(4) __half2 {
  __half x, y;
};
struct alignas(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
};
inline __half2 __floats2half2_rn(float lo, float hi) { return {__half(lo), __half(hi)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) { return {__nv_bfloat16(lo), __nv_bfloat16(hi)}; }

// Device code calls the overloaded min / max of CUDA's math library unqualified.
template <typename T>
inline T min(T a, T b) {
  return b < a ? b : a;
}
template <typename T>
inline T max(T a, T b) {
  return a < b ? b : a;
}

namespace cacheblend {
namespace emulation {

constexpr int kWarpSize = 32;
constexpr int kSlotWords = 8;  // 32-bit words a lane contributes to one collective

struct Barrier {
  int participants = 0;
  int arrived = 0;
  uint64_t generation = 0;
};

struct CopyGroup {
  std::vector<std::array<const void*, 2>> copies;  // {dst, src}, 16 bytes each
};

struct Thread {
  ucontext_t context;
  Dim3 index;
  bool done = false;
  const uint64_t* wait_on = nullptr;  // blocked until *wait_on != wait_generation
  uint64_t wait_generation = 0;
  CopyGroup open_group;               // cp.async copies not yet committed
  std::deque<CopyGroup> committed;    // oldest first
  int collective = 0;                 // collectives this thread has entered (slot parity)
};

struct State {
  Dim3 grid, block, block_index;
  std::vector<Thread> threads;
  std::vector<std::vector<char>> stacks;
  Barrier block_barrier;
  std::vector<Barrier> warp_barriers;
  // slots[parity][thread][word]: operands of a warp collective. Two sets alternate, so
  // one barrier per collective suffices (a lane can only reuse a set after every lane
  // has passed the next collective's barrier, i.e. finished reading this one).
  std::vector<std::array<uint32_t, kSlotWords>> slots[2];
  std::vector<unsigned char> dynamic_shared;
  ucontext_t scheduler;
  int current = -1;
  const std::function<void()>* body = nullptr;
  std::string error;
};

inline State& state() {
  static State s;
  return s;
}

inline Thread& self() { return state().threads[state().current]; }

[[noreturn]] inline void fail(const std::string& message) { throw std::runtime_error(message); }

inline void block_until_changed(const Barrier& barrier, uint64_t generation) {
  Thread& t = self();
  t.wait_on = &barrier.generation;
  t.wait_generation = generation;
  swapcontext(&t.context, &state().scheduler);
}

inline void arrive_and_wait(Barrier& barrier) {
  const uint64_t generation = barrier.generation;
  if (++barrier.arrived == barrier.participants) {
    barrier.arrived = 0;
    ++barrier.generation;
    return;
  }
  block_until_changed(barrier, generation);
}

inline int lane() { return state().current % kWarpSize; }

// Publishes this lane's operands, waits for the whole warp, and returns the slot set
// holding every lane's operands (indexed by lane).
inline const std::array<uint32_t, kSlotWords>* exchange(const uint32_t* words, int count) {
  State& s = state();
  Thread& t = self();
  auto& slots = s.slots[t.collective++ & 1];
  std::memcpy(slots[s.current].data(), words, sizeof(uint32_t) * count);
  arrive_and_wait(s.warp_barriers[s.current / kWarpSize]);
  return &slots[s.current - lane()];
}

// __shfl_sync and friends: every lane publishes `value` and reads the value of lane
// source(lane); a source outside the warp reads the lane's own value (as __shfl_up_sync
// does below lane `delta`).
template <typename T, typename Source>
T shuffle(unsigned mask, T value, Source source) {
  static_assert(sizeof(T) == 4, "32-bit shuffles only");
  if (mask != 0xffffffffu) fail("emulator: only full-warp shuffles are supported");
  uint32_t word;
  std::memcpy(&word, &value, 4);
  const auto* warp = exchange(&word, 1);
  const int from = source(lane());
  const uint32_t other = from >= 0 && from < kWarpSize ? warp[from][0] : word;
  T result;
  std::memcpy(&result, &other, 4);
  return result;
}

template <typename T>  // c10::Half or c10::BFloat16
float half_to_float(uint32_t word, int half) {
  T x;
  x.x = static_cast<uint16_t>(half == 0 ? word & 0xffffu : word >> 16);
  return static_cast<float>(x);
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.f32 with the fragment layouts of the
// PTX ISA (g = lane / 4, t = lane % 4; low 16 bits = lower column / k index):
//   A: a0 = A[g][2t, 2t+1], a1 = A[g+8][2t, 2t+1], a2 = A[g][2t+8, 2t+9], a3 = A[g+8][2t+8, 2t+9]
//   B: b0 = B[2t, 2t+1][g], b1 = B[2t+8, 2t+9][g]
//   C: c0, c1 = C[g][2t, 2t+1], c2, c3 = C[g+8][2t, 2t+1]
template <typename T>
void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  const uint32_t mine[6] = {a[0], a[1], a[2], a[3], b0, b1};
  const auto* warp = exchange(mine, 6);
  float A[16][16], B[16][8];
  for (int l = 0; l < kWarpSize; ++l) {
    const int g = l / 4, t = l % 4;
    const auto& w = warp[l];
    for (int h = 0; h < 2; ++h) {
      A[g][2 * t + h] = half_to_float<T>(w[0], h);
      A[g + 8][2 * t + h] = half_to_float<T>(w[1], h);
      A[g][2 * t + 8 + h] = half_to_float<T>(w[2], h);
      A[g + 8][2 * t + 8 + h] = half_to_float<T>(w[3], h);
      B[2 * t + h][g] = half_to_float<T>(w[4], h);
      B[2 * t + 8 + h][g] = half_to_float<T>(w[5], h);
    }
  }
  const int g = lane() / 4, t = lane() % 4;
  for (int e = 0; e < 4; ++e) {
    const int row = g + (e >= 2 ? 8 : 0), col = 2 * t + (e & 1);
    double acc = c[e];
    for (int k = 0; k < 16; ++k) acc += static_cast<double>(A[row][k]) * B[k][col];
    c[e] = static_cast<float>(acc);
  }
}

// ldmatrix.sync.aligned.m8n8.x4{.trans}.shared.b16: lane 8i + r gives the address of row r
// of matrix i (16 bytes, 16-byte aligned); register i of lane (g, t) receives matrix i's
// row g, elements 2t and 2t+1 -- or, with .trans, element g of rows 2t and 2t+1.
inline void ldmatrix_x4(uint32_t (&r)[4], const uint16_t* address, bool transposed) {
  if (reinterpret_cast<uintptr_t>(address) % 16 != 0) fail("emulator: ldmatrix row address not 16-byte aligned");
  uint32_t words[2];
  std::memcpy(words, &address, sizeof(address));
  static_assert(sizeof(address) == 8, "64-bit host pointers");
  const auto* warp = exchange(words, 2);
  auto row_of = [&](int matrix, int row) {
    const uint16_t* p;
    std::memcpy(&p, warp[matrix * 8 + row].data(), sizeof(p));
    return p;
  };
  const int g = lane() / 4, t = lane() % 4;
  for (int i = 0; i < 4; ++i) {
    uint16_t lo, hi;
    if (transposed) {
      lo = row_of(i, 2 * t)[g];
      hi = row_of(i, 2 * t + 1)[g];
    } else {
      lo = row_of(i, g)[2 * t];
      hi = row_of(i, g)[2 * t + 1];
    }
    r[i] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  }
}

inline void cp_async16(void* dst, const void* src) {
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0 || reinterpret_cast<uintptr_t>(src) % 16 != 0)
    fail("emulator: cp.async addresses must be 16-byte aligned");
  // The destination is undefined while the copy is in flight: poison it now, fill it
  // when the group retires. Readers before the wait and writers still reading the old
  // contents (a missing barrier before the copy) then both see NaNs.
  std::memset(dst, 0xFF, 16);
  self().open_group.copies.push_back({dst, src});
}

inline void cp_async_commit() {
  Thread& t = self();
  t.committed.push_back(std::move(t.open_group));
  t.open_group = CopyGroup{};
}

inline void cp_async_wait(int max_pending) {
  Thread& t = self();
  while (static_cast<int>(t.committed.size()) > max_pending) {
    for (const auto& copy : t.committed.front().copies) std::memcpy(const_cast<void*>(copy[0]), copy[1], 16);
    t.committed.pop_front();
  }
}

// The synchronisation point (barrier or cp.async wait) that mutation tests disable:
// a source line, and a suffix of its file's path.
struct DisabledSync {
  std::string file_suffix;
  unsigned line = 0;
};

inline DisabledSync& disabled_sync() {
  static DisabledSync d;
  return d;
}

// Disables the synchronisation at `file_suffix`:`line` (line 0: none).
inline void disable_sync_at(const std::string& file_suffix, unsigned line) { disabled_sync() = {file_suffix, line}; }

inline bool is_disabled(const std::source_location& where) {
  const DisabledSync& d = disabled_sync();
  if (d.line == 0 || where.line() != d.line) return false;
  const std::string_view file = where.file_name();
  return file.size() >= d.file_suffix.size() && file.substr(file.size() - d.file_suffix.size()) == d.file_suffix;
}

inline void syncthreads() { arrive_and_wait(state().block_barrier); }

inline void syncwarp() { arrive_and_wait(state().warp_barriers[state().current / kWarpSize]); }

inline void device_check_failed(const char* message, const char* file, int line) {
  fail(std::string("device-side check failed: ") + message + " (" + file + ":" + std::to_string(line) + ")");
}

template <typename T>
T* dynamic_shared() {
  return reinterpret_cast<T*>(state().dynamic_shared.data());
}

inline void fiber_entry() {
  State& s = state();
  try {
    (*s.body)();
  } catch (const std::exception& e) {
    if (s.error.empty()) s.error = e.what();
  }
  self().done = true;  // returning resumes the scheduler (uc_link)
}

// Which runnable thread a block resumes next. Round-robin keeps the warps in step;
// lowest-first runs warp 0 as far as it can get before warp 1 starts, highest-first the
// reverse, so a barrier a kernel is missing lets one warp overwrite or read shared data
// another warp has not finished with -- and the test sees it.
enum class Schedule { kRoundRobin, kLowestFirst, kHighestFirst };

inline void run_block(Schedule schedule) {
  State& s = state();
  const int n = static_cast<int>(s.threads.size());
  auto runnable = [&](int i) {
    const Thread& t = s.threads[i];
    return !t.done && (t.wait_on == nullptr || *t.wait_on != t.wait_generation);
  };
  int finished = 0, cursor = 0;
  while (finished < n) {
    int pick = -1;
    for (int step = 0; step < n && pick < 0; ++step) {
      const int i = schedule == Schedule::kLowestFirst    ? step
                    : schedule == Schedule::kHighestFirst ? n - 1 - step
                                                          : (cursor + step) % n;
      if (runnable(i)) pick = i;
    }
    if (pick < 0)
      fail("emulator: deadlock in block (" + std::to_string(s.block_index.x) + ", " +
           std::to_string(s.block_index.y) + ", " + std::to_string(s.block_index.z) +
           "): threads wait at a barrier that others never reach");
    Thread& t = s.threads[pick];
    t.wait_on = nullptr;
    s.current = pick;
    swapcontext(&s.scheduler, &t.context);
    if (!s.error.empty()) fail(s.error);
    if (t.done) ++finished;
    cursor = pick + 1;
  }
}

// Runs body() as every thread of every block of the grid. dynamic_shared_bytes: the
// kernel's dynamic shared memory. Throws std::runtime_error on a failed device check,
// a trap or a deadlock.
inline void launch(Dim3 grid, Dim3 block, size_t dynamic_shared_bytes, const std::function<void()>& body) {
  constexpr size_t kStackBytes = 64 * 1024;
  State& s = state();
  const int num_threads = static_cast<int>(block.x * block.y * block.z);
  if (num_threads % kWarpSize != 0) fail("emulator: the block size must be a multiple of 32");
  s.grid = grid;
  s.block = block;
  s.body = &body;
  s.error.clear();
  s.threads.assign(num_threads, Thread{});
  s.stacks.resize(num_threads);
  for (auto& stack : s.stacks) stack.resize(kStackBytes);
  for (auto& slots : s.slots) slots.assign(num_threads, {});
  s.warp_barriers.assign(num_threads / kWarpSize, Barrier{kWarpSize, 0, 0});

  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        s.block_index = {bx, by, bz};
        s.block_barrier = Barrier{num_threads, 0, 0};
        for (auto& b : s.warp_barriers) b = Barrier{kWarpSize, 0, 0};
        s.dynamic_shared.assign(dynamic_shared_bytes, 0xFF);
        for (int i = 0; i < num_threads; ++i) {
          Thread& t = s.threads[i];
          t = Thread{};
          t.index = {static_cast<unsigned>(i % block.x), static_cast<unsigned>(i / block.x % block.y),
                     static_cast<unsigned>(i / (block.x * block.y))};
          getcontext(&t.context);
          t.context.uc_stack.ss_sp = s.stacks[i].data();
          t.context.uc_stack.ss_size = kStackBytes;
          t.context.uc_link = &s.scheduler;
          makecontext(&t.context, fiber_entry, 0);
        }
        run_block(static_cast<Schedule>((bx + by + bz) % 3));
      }
  s.current = -1;
}

inline const Dim3& thread_idx() { return self().index; }
inline const Dim3& block_idx() { return state().block_index; }
inline const Dim3& grid_dim() { return state().grid; }
inline const Dim3& block_dim() { return state().block; }

}  // namespace emulation
}  // namespace cacheblend

#define threadIdx (::cacheblend::emulation::thread_idx())
#define blockIdx (::cacheblend::emulation::block_idx())
#define gridDim (::cacheblend::emulation::grid_dim())
#define blockDim (::cacheblend::emulation::block_dim())

inline void __syncthreads(std::source_location where = std::source_location::current()) {
  if (!::cacheblend::emulation::is_disabled(where)) ::cacheblend::emulation::syncthreads();
}
inline void __syncwarp(unsigned mask = 0xffffffffu, std::source_location where = std::source_location::current()) {
  if (mask != 0xffffffffu) ::cacheblend::emulation::fail("emulator: only full-warp __syncwarp is supported");
  if (!::cacheblend::emulation::is_disabled(where)) ::cacheblend::emulation::syncwarp();
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask) {
  return ::cacheblend::emulation::shuffle(mask, value, [&](int lane) { return (lane ^ lane_mask) % 32; });
}
template <typename T>
T __shfl_up_sync(unsigned mask, T value, unsigned delta) {
  return ::cacheblend::emulation::shuffle(mask, value, [&](int lane) { return lane - static_cast<int>(delta); });
}
template <typename T>
T __shfl_sync(unsigned mask, T value, int src_lane) {
  return ::cacheblend::emulation::shuffle(mask, value, [&](int) { return src_lane % 32; });
}
// Fibers never interleave inside a call, so a plain read-modify-write is atomic here.
template <typename T>
T atomicAdd(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}
[[noreturn]] inline void __trap() { ::cacheblend::emulation::fail("trap"); }

// The PTX operations of kernels/attention/primitives.cuh.
namespace cacheblend {
namespace ptx {
inline void mma_m16n8k16_f16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  emulation::mma_m16n8k16<c10::Half>(c, a, b0, b1);
}
inline void mma_m16n8k16_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  emulation::mma_m16n8k16<c10::BFloat16>(c, a, b0, b1);
}
template <bool kTransposed>
void ldmatrix_x4(uint32_t (&r)[4], const uint16_t* p) {
  emulation::ldmatrix_x4(r, p, kTransposed);
}
inline void cp_async16(uint16_t* dst, const uint16_t* src) { emulation::cp_async16(dst, src); }
inline void cp_async_commit() { emulation::cp_async_commit(); }
template <int N>
void cp_async_wait(std::source_location where = std::source_location::current()) {
  if (!emulation::is_disabled(where)) emulation::cp_async_wait(N);
}
// ex2.approx.ftz.f32: 2^x (the hardware's approximation is within 2 ulp; exact here).
inline float exp2_approx(float x) { return std::exp2(x); }
}  // namespace ptx
}  // namespace cacheblend
