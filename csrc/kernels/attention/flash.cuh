// sparse_query_attention's tensor-core kernel, FlashAttention-2 style, for contiguous and
// paged K / V (the default for fp16 / bf16 with head_dim 64 / 128), and the combine
// kernel of its key splits. Tile shapes and the reasons for them: params.h
// (FlashTraits); fragment layouts of mma.sync / ldmatrix: primitives.cuh.
//
// A block owns one kv head and kRows "rows" (64 or 128, FlashTraits), each row one (query
// token, query head of that kv head's group) pair, so every K / V tile it loads serves the
// whole GQA group. Warp w owns rows w * kRowsPerWarp .. as one or two m16 tiles. Per key
// tile j of kKeys keys (ldmatrix K, and Q from registers or ldmatrix; mask only on
// straddling tiles; base-2 online softmax; ldmatrix.trans V), with kStages = 1 (K and V
// single-buffered, one cp.async group each, FlashAttention-2's schedule):
//
//   wait K_j; barrier | issue V_j | S = Q K_j^T | wait V_j; barrier | issue K_{j+1} |
//   softmax | O += P V_j
//
// so V_j's load overlaps the first GEMM and K_{j+1}'s the softmax and the second; the
// barriers also tell every warp that nobody reads V_{j-1} (first) or K_j (second) any
// more. With kStages >= 2 (K and V together in stages, tiles j + 1 .. j + kStages - 1
// already loading):
//
//   wait tile j; barrier | issue tile j + kStages - 1 into the stage tile j - 1 used |
//   S = Q K_j^T | softmax | O += P V_j
//
// Shared memory holds Q [kRows][D] and max(kStages, 1) x (K, V) [kKeys][D] as rows of
// 16-byte chunks, chunk
// c of row r stored at chunk c ^ (r & 7) (swizzle): the 8 rows an ldmatrix phase reads
// at one logical chunk land on 8 distinct 16-byte bank groups, and the loads stay 16-byte
// cp.async copies, consecutive threads on consecutive chunks of a row (coalesced).
//
// The mask is the staircase of sorted positions: a key tile wholly at or before the
// block's smallest position needs no mask, tiles past its largest are never visited, and
// only the tiles in between compare keys with positions (int32: a request has fewer than
// 2^31 keys, checked on the host).
//
// Work distribution (cuda/launch.h: plan_flash): the grid is one-dimensional, row tiles
// from the last (the heaviest when positions are sorted) to the first, kv heads, then key
// splits; a split past the block's largest position returns at once. See FlashSplit
// (params.h) for what each split writes; the epilogue stages direct outputs through
// shared memory for 16-byte coalesced stores.
//
// Ragged batches without a host sync: a block finds the requests of its rows by binary
// search in q_indptr and, when its rows span several requests, runs the tile loop once per
// request with the other rows inactive (zero Q, never written).
#pragma once

#include <cstdint>
#include <type_traits>

#include "kernels/attention/params.h"
#include "kernels/attention/primitives.cuh"
#include "kernels/attention/ragged.cuh"
#include "kernels/common.h"

namespace cacheblend {
namespace attention {

// The swizzle of a tile of D columns, on element offsets: chunk bits 3..5 XOR row bits
// 0..2. It is an XOR with bits of the row, so with the row fixed it commutes with any
// XOR or disjoint OR of chunk bits, and adding whole groups of 8 rows leaves it
// unchanged: every ldmatrix address below is one per-lane base, an XOR with a constant
// (the k-step's chunk) and an immediate offset (the tile row group).
template <int D>
CB_DEVICE int swizzle(int offset) {
  constexpr int kRowShift = D == 64 ? 6 : 7;  // log2(D)
  static_assert((1 << kRowShift) == D, "D must be 64 or 128");
  return offset ^ (((offset >> kRowShift) & 7) << 3);
}

// Element offset of chunk `chunk` (8 elements) of row `row` in a swizzled tile.
template <int D>
CB_DEVICE int swizzled(int row, int chunk) {
  return swizzle<D>(row * D + chunk * 8);
}

// Splits in which a row at position `pos` sees keys: 0 .. result - 1 (the last split
// takes every tile beyond the others).
CB_HOST_DEVICE int flash_splits_of_row(int pos, const FlashSplit& split, int keys_per_tile) {
  const int n = pos / (split.tiles_per_split * keys_per_tile) + 1;
  return n < split.splits ? n : split.splits;
}

// Key j of one request (0 <= j < kv_len): offsets (elements) of its K and V rows from the
// caches' data pointers, kv head applied, or -1 for a key that cannot be read (a page id
// outside the cache). Only the per-request value lives in registers; strides come from
// the kernel parameters (constant memory), which keeps registers for the accumulators.
// check() reports a bad key once, after the key loop: a device-side assert inside the
// loop is a call, whose caller-saved registers spill.
struct ContiguousKeys {
  int64_t kv_begin;  // the request's first key in k / v
  CB_DEVICE int64_t k_row(const AttentionArgs& a, const PagedKV&, int kv_head, int j) {
    return (kv_begin + j) * a.k_s0 + kv_head * a.k_s1;
  }
  CB_DEVICE int64_t v_row(const AttentionArgs& a, const PagedKV&, int kv_head, int j) {
    return (kv_begin + j) * a.v_s0 + kv_head * a.v_s1;
  }
  CB_DEVICE void check() const {}
};

struct PagedKeys {
  const int64_t* pages;  // the request's page ids (kv_indices + kv_indptr[b])
  bool bad_page = false;
  // Key j's page, -1 when the id is outside the cache. 32-bit division: a request's keys
  // (and so page_size) are below 2^31 (checked on the host); a 64-bit division would be a
  // slow, register-hungry subroutine.
  CB_DEVICE int64_t page_of(const PagedKV& p, int j) {
    const int64_t page = pages[j / static_cast<int>(p.page_size)];
    const bool ok = page >= 0 && page < p.num_pages;
    bad_page |= !ok;
    return ok ? page : -1;
  }
  CB_DEVICE int64_t k_row(const AttentionArgs& a, const PagedKV& p, int kv_head, int j, int64_t page) const {
    return page < 0 ? -1
                    : page * p.k_page_stride + (j % static_cast<int>(p.page_size)) * p.k_offset_stride +
                          kv_head * a.k_s1;
  }
  CB_DEVICE int64_t v_row(const AttentionArgs& a, const PagedKV& p, int kv_head, int j, int64_t page) const {
    return page < 0 ? -1
                    : page * p.v_page_stride + (j % static_cast<int>(p.page_size)) * p.v_offset_stride +
                          kv_head * a.v_s1;
  }
  CB_DEVICE void check() const {
    CB_DEVICE_CHECK(!bad_page, "sparse_query_attention_paged: kv_indices entry outside the cache's pages");
  }
};

// Request b's queries and keys.
template <typename Keys>
struct RequestKeys {
  int64_t q_begin, q_end;
  int kv_len;
  Keys keys;
};

CB_DEVICE RequestKeys<ContiguousKeys> request_keys(const AttentionArgs& a, const PagedKV&, int b, ContiguousKeys*) {
  const Request r = request_bounds(a, b);
  return {r.q_begin, r.q_end, static_cast<int>(r.kv_len), ContiguousKeys{r.kv_begin}};
}

CB_DEVICE RequestKeys<PagedKeys> request_keys(const AttentionArgs& a, const PagedKV& p, int b, PagedKeys*) {
  const int64_t q0 = a.q_indptr[b], q1 = a.q_indptr[b + 1];
  CB_DEVICE_CHECK(q0 <= q1, "sparse_query_attention_paged: q_indptr must be non-decreasing");
  const int64_t p0 = p.page_indptr[b], p1 = p.page_indptr[b + 1];
  CB_DEVICE_CHECK(p0 >= 0 && p0 <= p1 && p1 <= p.num_indices,
                  "sparse_query_attention_paged: kv_indptr must be non-decreasing within [0, kv_indices.size(0)]");
  int64_t kv_len = 0;
  if (p1 > p0) {  // a request without pages has no keys; its kv_last_page_len is not read
    const int64_t last = p.last_page_len[b];
    CB_DEVICE_CHECK(last >= 1 && last <= p.page_size,
                    "sparse_query_attention_paged: kv_last_page_len outside [1, page_size]");
    kv_len = (p1 - p0 - 1) * p.page_size + last;
  }
  return {q0, q1, static_cast<int>(kv_len), PagedKeys{p.indices + p0}};
}

// One thread's share of a warp's flash-attention state for its 4 rows: (m-tile mt, half
// h) is row 32 w + 16 mt + 8 h + g; accumulator elements 2 h, 2 h + 1 of an n-tile belong
// to half h. Running maxima are base-2 scaled scores; a row's sum is spread over the 4
// threads of its quad until finish().
template <int D, int kMTiles, int kKeys>
struct FlashAccumulator {
  float o[kMTiles][D / 8][4];
  float m[kMTiles][2];
  float l[kMTiles][2];

  CB_DEVICE FlashAccumulator() {
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
      for (int dn = 0; dn < D / 8; ++dn) o[mt][dn][0] = o[mt][dn][1] = o[mt][dn][2] = o[mt][dn][3] = 0.f;
      m[mt][0] = m[mt][1] = -INFINITY;
      l[mt][0] = l[mt][1] = 0.f;
    }
  }

  // Raw scores s of the tile starting at key n0 in, probabilities (relative to the new
  // running maxima) out; rescales o and the sums. Key n0 + 8 nt + 2 t + (e & 1) is
  // visible to a row iff key <= its position; `masked`: some row may not see the whole
  // tile (otherwise every active row sees all of it; inactive rows are never written).
  // row_pos: the positions of the warp's rows (shared memory; read only when masked).
  CB_DEVICE void absorb(float (&s)[kMTiles][kKeys / 8][4], int n0, bool masked, const int* row_pos, int g, int t,
                        float scale_log2) {
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
      for (int nt = 0; nt < kKeys / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[mt][nt][e] *= scale_log2;
    if (masked) {
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int last = row_pos[mt * 16 + h * 8 + g] - n0 - 2 * t;  // visible: 8 nt + (e & 1) <= last
#pragma unroll
          for (int nt = 0; nt < kKeys / 8; ++nt) {
            if (nt * 8 > last) s[mt][nt][2 * h] = -INFINITY;
            if (nt * 8 + 1 > last) s[mt][nt][2 * h + 1] = -INFINITY;
          }
        }
      }
    }
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float mx = m[mt][h];
#pragma unroll
        for (int nt = 0; nt < kKeys / 8; ++nt) mx = fmaxf(mx, fmaxf(s[mt][nt][2 * h], s[mt][nt][2 * h + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        // A row with nothing visible yet keeps max -inf: subtract 0 instead, so that
        // exp2(-inf - base) = 0 rather than NaN.
        const float base = mx == -INFINITY ? 0.f : mx;
        const float alpha = ptx::exp2_approx(m[mt][h] - base);  // 0 while m = -inf
        m[mt][h] = mx;
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < kKeys / 8; ++nt) {
          s[mt][nt][2 * h] = ptx::exp2_approx(s[mt][nt][2 * h] - base);
          s[mt][nt][2 * h + 1] = ptx::exp2_approx(s[mt][nt][2 * h + 1] - base);
          sum += s[mt][nt][2 * h] + s[mt][nt][2 * h + 1];
        }
        l[mt][h] = l[mt][h] * alpha + sum;  // alpha is uniform over the quad
#pragma unroll
        for (int dn = 0; dn < D / 8; ++dn) {
          o[mt][dn][2 * h] *= alpha;
          o[mt][dn][2 * h + 1] *= alpha;
        }
      }
    }
  }

  // After the last tile: full row sums over the quad.
  CB_DEVICE void finish() {
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        l[mt][h] += __shfl_xor_sync(0xffffffffu, l[mt][h], 1);
        l[mt][h] += __shfl_xor_sync(0xffffffffu, l[mt][h], 2);
      }
    }
  }
};

// Requires (checked on the host, cuda/launch.h: attention_tensor_core_ok): group <= kRows;
// q, k, v and out rows 16-byte aligned; sm_80+; kSmemBytes of dynamic shared memory.
// Keys: ContiguousKeys (sparse_query_attention; `paged` unused) or PagedKeys
// (sparse_query_attention_paged: a.kv_indptr unused, the page table in `paged`).
template <typename scalar_t, typename pos_t, int D, int kRowsPerWarp, int kStages, typename Keys>
__global__ void __launch_bounds__(FlashTraits<D, kRowsPerWarp, kStages>::kThreads,
                                  FlashTraits<D, kRowsPerWarp, kStages>::kBlocksPerSm)
    sparse_query_attention_flash_kernel(const AttentionArgs a, const PagedKV paged, const pos_t* __restrict__ q_pos,
                                        const FlashSplit split) {
  using Traits = FlashTraits<D, kRowsPerWarp, kStages>;
  constexpr int kRows = Traits::kRows, kKeys = Traits::kKeys, kChunks = Traits::kChunks;
  constexpr int kMTiles = Traits::kMTiles, kThreads = Traits::kThreads;
  constexpr int kRowsPerPass = kThreads / kChunks;  // tile rows one pass of the block loads
  static_assert(kRows <= kThreads, "a thread per row for the positions");
  using Ops = MmaOps<scalar_t>;

  CB_DYNAMIC_SHARED(uint16_t, smem);
  // Q [kRows][D], then kStages stages of (K [kKeys][D], V [kKeys][D]).
  uint16_t* const sQ = smem;
  uint16_t* const sStages = sQ + kRows * D;
  constexpr int kStageElems = 2 * kKeys * D;
  __shared__ int sPos[kRows];  // row position; -1: inactive row
  __shared__ int sWarpMin[Traits::kWarps], sWarpMax[Traits::kWarps];

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  const int group = a.group;
  const int tokens_per_block = kRows / group;
  const int rows_used = tokens_per_block * group;
  // Block order: the last row tile first (see the header comment), then kv head, split.
  const int64_t row_tiles = ceil_div(a.num_q, int64_t{tokens_per_block});
  const int64_t block = blockIdx.x;
  const int s = static_cast<int>(block % split.splits);
  const int kv_head = static_cast<int>((block / split.splits) % a.hkv);
  const int64_t row_tile = row_tiles - 1 - block / (static_cast<int64_t>(split.splits) * a.hkv);
  const int64_t tok_begin = row_tile * tokens_per_block;
  const int64_t tok_end = min(a.num_q, tok_begin + tokens_per_block);
  const int warp_row0 = warp * kRowsPerWarp;

  // The tile rows and the 16-byte chunk this thread copies in every load pass (pass i:
  // row copy_row + i * kRowsPerPass, a multiple of 8 rows further: the same swizzle).
  const int copy_chunk = tid % kChunks, copy_row = tid / kChunks;
  const int copy_offset = swizzled<D>(copy_row, copy_chunk);
  // ldmatrix lane addresses (see primitives.cuh for the fragments): swizzled offsets of
  // this lane's row and chunk at m-tile / n-tile pair 0 and k-step 0. Later tiles add
  // 16 rows (an immediate), later k-steps XOR 2 chunks (16 elements) per step.
  const int q_lane = swizzled<D>(warp_row0 + (lane & 15), lane >> 4);                // + 16 D mt, ^ 16 kk
  const int k_lane = swizzled<D>((lane & 7) + ((lane >> 4) << 3), (lane >> 3) & 1);  // + 16 D np, ^ 16 kk
  const int v_lane = swizzled<D>((lane & 7) + (((lane >> 3) & 1) << 3), lane >> 4);  // + 16 D kk, ^ 16 dp

  const int b_first = find_request(a, tok_begin), b_last = find_request(a, tok_end - 1);
  for (int b = b_first; b <= b_last; ++b) {
    RequestKeys<Keys> req = request_keys(a, paged, b, static_cast<Keys*>(nullptr));
    const int64_t lo = max(tok_begin, req.q_begin), hi = min(tok_end, req.q_end);
    if (lo >= hi) continue;  // a request without queries here; uniform over the block
    __syncthreads();         // earlier readers of sPos and the tiles are done

    // Row r < kRows (thread r): token tok_begin + r / group, query head
    // kv_head * group + r % group; active when the token belongs to request b.
    {
      const int64_t tok = tok_begin + tid / group;
      const bool active = tid < rows_used && tok >= lo && tok < hi;
      const int p =
          active ? static_cast<int>(load_position(q_pos, tok, Request{req.q_begin, req.q_end, 0, req.kv_len})) : -1;
      if (tid < kRows) sPos[tid] = p;
      int lo_p = active ? p : INT32_MAX, hi_p = p;
#pragma unroll
      for (int off = 16; off > 0; off /= 2) {
        lo_p = min(lo_p, __shfl_xor_sync(0xffffffffu, lo_p, off));
        hi_p = max(hi_p, __shfl_xor_sync(0xffffffffu, hi_p, off));
      }
      if (lane == 0) {
        sWarpMin[warp] = lo_p;
        sWarpMax[warp] = hi_p;
      }
    }
    __syncthreads();
    int min_pos = INT32_MAX, max_pos = -1;
#pragma unroll
    for (int w = 0; w < Traits::kWarps; ++w) {
      min_pos = min(min_pos, sWarpMin[w]);
      max_pos = max(max_pos, sWarpMax[w]);
    }
    // This split's key tiles among those holding keys 0 .. max_pos (max_pos >= 0: at
    // least one row is active). A split wholly past max_pos has nothing to write: its
    // rows' outputs come from the other splits (flash_splits_of_row).
    const int num_tiles = max_pos / kKeys + 1;
    const int tile_begin = s * split.tiles_per_split;
    const int tile_end = s == split.splits - 1 ? num_tiles : min(num_tiles, tile_begin + split.tiles_per_split);
    if (tile_begin >= tile_end) continue;  // uniform over the block

    // Q tile (inactive rows: zeros), then K tile `tile_begin`: one cp.async group each.
#pragma unroll
    for (int i = 0; i < (kRows + kRowsPerPass - 1) / kRowsPerPass; ++i) {
      const int r = copy_row + i * kRowsPerPass;
      if (r >= kRows) break;
      uint16_t* const dst = sQ + copy_offset + i * kRowsPerPass * D;
      const int64_t tok = tok_begin + r / group;
      if (r < rows_used && tok >= lo && tok < hi) {
        const int head = kv_head * group + r % group;
        ptx::cp_async16(dst, static_cast<const uint16_t*>(a.q) + tok * a.q_s0 + head * a.q_s1 + copy_chunk * 8);
      } else {
        *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
      }
    }
    ptx::cp_async_commit();
    // The K and V tiles of key tile `tile` into stage `stage`, one cp.async group (committed
    // even when empty, so that group counts stay uniform). Keys past the request (and
    // unreadable ones, reported after the loop) are zero-filled (plain stores): they are
    // masked, and zeros keep 0 * V finite.
    // with_k / with_v: which of the two (kStages == 1 loads them at different times).
    auto load_tiles = [&](int tile, int stage, bool with_k = true, bool with_v = true) {
      if (tile < tile_end) {
        uint16_t* const dK = sStages + stage * kStageElems + copy_offset;
        uint16_t* const dV = dK + kKeys * D;
        auto copy_row_pair = [&](int i, int64_t k_row, int64_t v_row) {
          const int off = i * kRowsPerPass * D;
          if (with_k && k_row >= 0)
            ptx::cp_async16(dK + off, static_cast<const uint16_t*>(a.k) + k_row + copy_chunk * 8);
          else if (with_k)
            *reinterpret_cast<uint4*>(dK + off) = make_uint4(0u, 0u, 0u, 0u);
          if (with_v && v_row >= 0)
            ptx::cp_async16(dV + off, static_cast<const uint16_t*>(a.v) + v_row + copy_chunk * 8);
          else if (with_v)
            *reinterpret_cast<uint4*>(dV + off) = make_uint4(0u, 0u, 0u, 0u);
        };
        constexpr int kPasses = kKeys / kRowsPerPass;
        if constexpr (std::is_same_v<Keys, PagedKeys>) {
          // Every row's page id is loaded first, then the copies issued: one wait for the
          // page table per tile instead of one per row.
          int64_t pages[kPasses];
#pragma unroll
          for (int i = 0; i < kPasses; ++i) {
            const int key = tile * kKeys + copy_row + i * kRowsPerPass;
            pages[i] = key < req.kv_len ? req.keys.page_of(paged, key) : -1;
          }
#pragma unroll
          for (int i = 0; i < kPasses; ++i) {
            const int key = tile * kKeys + copy_row + i * kRowsPerPass;
            copy_row_pair(i, req.keys.k_row(a, paged, kv_head, key, pages[i]),
                          req.keys.v_row(a, paged, kv_head, key, pages[i]));
          }
        } else {
          // Not unrolled: unrolled, the compiler keeps one 64-bit address per row live
          // across the tile loop, and those registers are what the accumulators need
          // (spills); the address math is a few integer instructions per 16-byte copy.
#pragma unroll 1
          for (int i = 0; i < kPasses; ++i) {
            const int key = tile * kKeys + copy_row + i * kRowsPerPass;
            const bool in = key < req.kv_len;
            copy_row_pair(i, in ? req.keys.k_row(a, paged, kv_head, key) : -1,
                          in ? req.keys.v_row(a, paged, kv_head, key) : -1);
          }
        }
      }
      ptx::cp_async_commit();
    };
    // Pipeline prologue: tiles tile_begin .. tile_begin + kStages - 2 in flight; with one
    // stage, K of the first tile.
    if constexpr (kStages == 1) {
      load_tiles(tile_begin, 0, true, false);
    } else {
#pragma unroll
      for (int st = 0; st < kStages - 1; ++st) load_tiles(tile_begin + st, st);
    }
    constexpr int kGroupsAfterQ = kStages == 1 ? 1 : kStages - 1;

    // 16 rows per warp: the Q tile's A fragments stay in registers for the whole loop.
    uint32_t qf[Traits::kQInRegisters ? D / 16 : 1][4];
    if constexpr (Traits::kQInRegisters) {
      ptx::cp_async_wait<kGroupsAfterQ>();  // Q landed (the tiles may be in flight) ...
      __syncthreads();                      // ... for every thread
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) ptx::ldmatrix_x4<false>(qf[kk], sQ + (q_lane ^ (16 * kk)));
    }

    FlashAccumulator<D, kMTiles, kKeys> acc;
    for (int tile = tile_begin; tile < tile_end; ++tile) {
      const int n0 = tile * kKeys;
      const int stage = (tile - tile_begin) % kStages;
      if constexpr (kStages == 1) {
        ptx::cp_async_wait<0>();  // K_j (and Q) landed ...
        __syncthreads();          // ... for every thread; nobody reads V_{j-1} any more
        load_tiles(tile, 0, false, true);
      } else {
        ptx::cp_async_wait<kStages - 2>();  // this tile (and Q) landed, later ones may be in flight ...
        __syncthreads();                    // ... for every thread; nobody reads the previous tile's stage
        load_tiles(tile + kStages - 1, (stage + kStages - 1) % kStages);
      }
      const uint16_t* const sK = sStages + stage * kStageElems;
      const uint16_t* const sV = sK + kKeys * D;

      // S = Q K^T: per warp kRowsPerWarp rows x kKeys keys; one Q fragment per m-tile and
      // k-step, one ldmatrix.x4 of K per pair of n-tiles and k-step.
      float sc[kMTiles][kKeys / 8][4];
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
        for (int nt = 0; nt < kKeys / 8; ++nt) sc[mt][nt][0] = sc[mt][nt][1] = sc[mt][nt][2] = sc[mt][nt][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t qa[kMTiles][4];
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          if constexpr (Traits::kQInRegisters) {
#pragma unroll
            for (int x = 0; x < 4; ++x) qa[mt][x] = qf[kk][x];
          } else {
            ptx::ldmatrix_x4<false>(qa[mt], sQ + ((q_lane + 16 * D * mt) ^ (16 * kk)));
          }
        }
#pragma unroll
        for (int np = 0; np < kKeys / 16; ++np) {
          uint32_t kb[4];
          ptx::ldmatrix_x4<false>(kb, sK + ((k_lane + 16 * D * np) ^ (16 * kk)));
#pragma unroll
          for (int mt = 0; mt < kMTiles; ++mt) {
            Ops::mma(sc[mt][2 * np], qa[mt], kb[0], kb[1]);
            Ops::mma(sc[mt][2 * np + 1], qa[mt], kb[2], kb[3]);
          }
        }
      }

      if constexpr (kStages == 1) {
        ptx::cp_async_wait<0>();  // V_j landed ...
        __syncthreads();          // ... for every thread; nobody reads K_j any more
        load_tiles(tile + 1, 0, true, false);
      }

      acc.absorb(sc, n0, /*masked=*/n0 + kKeys - 1 > min_pos, sPos + warp_row0, g, t, a.scale_log2);

      // O += P V: the probabilities of n-tiles 2 kk, 2 kk + 1 are the A fragment of
      // k-step kk, packed to 16 bits at once (half the registers of the fp32 scores);
      // one ldmatrix.x4.trans of V per pair of d n-tiles.
      uint32_t pa[kKeys / 16][kMTiles][4];
#pragma unroll
      for (int kk = 0; kk < kKeys / 16; ++kk) {
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          pa[kk][mt][0] = Ops::pack(sc[mt][2 * kk][0], sc[mt][2 * kk][1]);
          pa[kk][mt][1] = Ops::pack(sc[mt][2 * kk][2], sc[mt][2 * kk][3]);
          pa[kk][mt][2] = Ops::pack(sc[mt][2 * kk + 1][0], sc[mt][2 * kk + 1][1]);
          pa[kk][mt][3] = Ops::pack(sc[mt][2 * kk + 1][2], sc[mt][2 * kk + 1][3]);
        }
      }
#pragma unroll
      for (int kk = 0; kk < kKeys / 16; ++kk) {
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
          uint32_t vb[4];
          ptx::ldmatrix_x4<true>(vb, sV + ((v_lane + 16 * D * kk) ^ (16 * dp)));
#pragma unroll
          for (int mt = 0; mt < kMTiles; ++mt) {
            Ops::mma(acc.o[mt][2 * dp], pa[kk][mt], vb[0], vb[1]);
            Ops::mma(acc.o[mt][2 * dp + 1], pa[kk][mt], vb[2], vb[3]);
          }
        }
      }
    }

    req.keys.check();

    // Epilogue. Direct rows (every key they see is in this split, which is then split 0)
    // are normalised, rounded and staged in this warp's own rows of sQ (no other warp
    // reads them; this warp's reads of Q are done), then stored as 16-byte chunks. Rows
    // of several splits write their fp32 partial output and base-2 log-sum-exp; rows that
    // see no key of this split write nothing.
    acc.finish();
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = warp_row0 + mt * 16 + h * 8 + g;
        const int p = sPos[row];
        if (p < 0) continue;  // inactive: padding or another request's token
        const int splits_of_row = flash_splits_of_row(p, split, kKeys);
        if (s >= splits_of_row) continue;  // sees no key of this split
        const float l = acc.l[mt][h], m = acc.m[mt][h];
        const float inv = 1.f / l;  // l >= 1: the row sees at least one key here (its maximum's term)
        const int64_t tok = tok_begin + row / group;
        const int head = kv_head * group + row % group;
        if (splits_of_row == 1) {
#pragma unroll
          for (int dn = 0; dn < D / 8; ++dn)
            *reinterpret_cast<uint32_t*>(sQ + swizzled<D>(row, dn) + 2 * t) =
                Ops::pack(acc.o[mt][dn][2 * h] * inv, acc.o[mt][dn][2 * h + 1] * inv);
          if (a.lse != nullptr && t == 0) a.lse[tok * a.lse_s0 + head * a.lse_s1] = (m + log2f(l)) * kLn2;
        } else {
          const int64_t idx = (static_cast<int64_t>(s) * a.num_q + tok) * a.hq + head;
          float* const op = split.part_o + idx * D;
#pragma unroll
          for (int dn = 0; dn < D / 8; ++dn)
            *reinterpret_cast<float2*>(op + dn * 8 + 2 * t) =
                make_float2(acc.o[mt][dn][2 * h] * inv, acc.o[mt][dn][2 * h + 1] * inv);
          if (t == 0) split.part_lse[idx] = m + log2f(l);
        }
      }
    }
    __syncwarp();  // this warp's staged rows are complete
    constexpr int kRowsPerStore = 32 / kChunks;
    for (int r = lane / kChunks; r < kRowsPerWarp; r += kRowsPerStore) {
      const int row = warp_row0 + r;
      const int p = sPos[row];
      if (p < 0 || s != 0 || flash_splits_of_row(p, split, kKeys) != 1) continue;
      const int64_t tok = tok_begin + row / group;
      const int head = kv_head * group + row % group;
      const int c = lane % kChunks;
      *reinterpret_cast<uint4*>(static_cast<uint16_t*>(a.out) + tok * a.o_s0 + head * a.o_s1 + c * 8) =
          *reinterpret_cast<const uint4*>(sQ + swizzled<D>(row, c));
    }
  }
}

// Merges the flash kernel's key splits: one warp per (query, query head) row with more
// than one split (the others were written directly); lane covers d = 4 lane .. 4 lane + 3.
template <typename scalar_t, typename pos_t, int D, int kKeys>
__global__ void __launch_bounds__(kCombineWarps * 32)
    sparse_query_attention_flash_combine_kernel(const AttentionArgs a, const pos_t* __restrict__ q_pos,
                                                const FlashSplit split) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kCombineWarps + warp;  // tok * hq + head
  if (row >= a.num_q * a.hq) return;  // whole warps leave together
  const int64_t tok = row / a.hq;
  const int head = static_cast<int>(row % a.hq);
  // The main kernel checked every position against its request.
  const int n = flash_splits_of_row(static_cast<int>(q_pos[tok]), split, kKeys);
  if (n == 1) return;
  const int64_t split_stride = a.num_q * a.hq;
  float mx = -INFINITY;
  for (int i = 0; i < n; ++i) mx = fmaxf(mx, split.part_lse[i * split_stride + row]);
  float sum = 0.f;
  for (int i = 0; i < n; ++i) sum += ptx::exp2_approx(split.part_lse[i * split_stride + row] - mx);
  const float inv = 1.f / sum;  // sum >= 1: the maximum's own term
  if (4 * lane < D) {
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int i = 0; i < n; ++i) {
      const float w = ptx::exp2_approx(split.part_lse[i * split_stride + row] - mx) * inv;
      const float4 x = *reinterpret_cast<const float4*>(split.part_o + (i * split_stride + row) * D + 4 * lane);
      acc.x += w * x.x;
      acc.y += w * x.y;
      acc.z += w * x.z;
      acc.w += w * x.w;
    }
    using Ops = MmaOps<scalar_t>;
    const uint2 packed = make_uint2(Ops::pack(acc.x, acc.y), Ops::pack(acc.z, acc.w));
    *reinterpret_cast<uint2*>(static_cast<uint16_t*>(a.out) + tok * a.o_s0 + head * a.o_s1 + 4 * lane) = packed;
  }
  if (a.lse != nullptr && lane == 0) a.lse[tok * a.lse_s0 + head * a.lse_s1] = (mx + log2f(sum)) * kLn2;
}

}  // namespace attention
}  // namespace cacheblend
