// CPU implementation of sparse_query_attention: flash-style tiling with an online softmax.
//
// Work items are (request, kv head, query block). A query block is up to kRowsPerBlock
// rows, each row one (query token, query head of the kv head's group) pair, so every K/V
// tile serves all query heads of the group. Within a request, queries are visited in
// position order, so a block covers a narrow range of positions: key tiles past the
// block's largest position are never touched and tiles wholly before its smallest
// position need no mask. Per work item the memory is O(rows * (D + tile)); no M x N
// matrix exists. The two matrix products of a tile run as BLAS GEMMs on views of
// per-item buffers (fp32 math; fp16/bf16 K/V tiles are converted to fp32 first), and
// the softmax updates use ATen's vectorised CPU kernels on the same views (ATen ops run
// single-threaded inside the parallel region). Work items are handed out dynamically,
// most expensive first, since an item's cost grows with its positions.
//
// Both ops run this code: sparse_query_attention with each request's keys as rows of
// k / v (ContiguousRows: a tile's rows are equally spaced, so fp32 tiles are read by BLAS
// in place), sparse_query_attention_paged with keys found through the page table
// (PagedRows: a tile's rows are gathered, page by page, into the per-item fp32 buffers,
// as fp16 / bf16 tiles are anyway). No other copy of K or V is made.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/amax.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#include "kernels/common.h"
#include "ops/attention.h"

namespace cacheblend {
namespace {

constexpr int64_t kRowsPerBlock = 128;  // (token, head) rows per work item
constexpr int64_t kKeysPerTile = 256;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

std::vector<int64_t> read_index_vector(const at::Tensor& t) {
  std::vector<int64_t> values(t.size(0));
  AT_DISPATCH_INDEX_TYPES(t.scalar_type(), "sparse_query_attention_cpu", [&] {
    const index_t* p = t.data_ptr<index_t>();
    for (size_t i = 0; i < values.size(); ++i) values[i] = static_cast<int64_t>(p[i]);
  });
  return values;
}

struct Block {
  int64_t request, first, count;  // rows order[first, first + count) of the request
};

// Where key j of request b (kv head hk) lives, in elements from the tensor's data pointer.
struct ContiguousRows {
  static constexpr bool kStrided = true;  // a tile's rows are row_stride apart
  const std::vector<int64_t>* begin;      // request b's first row: kv_indptr[b]
  int64_t row_stride, head_stride;
  int64_t offset(int64_t b, int64_t j, int64_t hk) const {
    return ((*begin)[b] + j) * row_stride + hk * head_stride;
  }
};

struct PagedRows {
  static constexpr bool kStrided = false;
  const std::vector<int64_t>* page_begin;  // kv_indptr: request b's first entry of pages
  const std::vector<int64_t>* pages;       // kv_indices
  int64_t page_size, page_stride, offset_stride, head_stride;
  int64_t offset(int64_t b, int64_t j, int64_t hk) const {
    const int64_t page = (*pages)[(*page_begin)[b] + j / page_size];
    return page * page_stride + (j % page_size) * offset_stride + hk * head_stride;
  }
};

void check_query_offsets(const std::vector<int64_t>& qind, int64_t num_q) {
  TORCH_CHECK(qind.front() == 0 && qind.back() == num_q, "q_indptr must start at 0 and end at num_queries (",
              num_q, "), got ", qind.front(), " and ", qind.back());
  for (size_t b = 0; b + 1 < qind.size(); ++b)
    TORCH_CHECK(qind[b] <= qind[b + 1], "q_indptr must be non-decreasing, got q_indptr[", b, "] = ", qind[b],
                " > q_indptr[", b + 1, "] = ", qind[b + 1]);
}

// The attention itself, for validated arguments: kv_len[b] keys per request, checked
// positions. K rows at k_base + k_rows.offset(b, j, hk), V rows likewise.
template <typename scalar_t, typename Rows>
void attend(const at::Tensor& q, const std::vector<int64_t>& pos, const std::vector<int64_t>& qind,
            const std::vector<int64_t>& kv_len, int64_t hkv, const scalar_t* k_base, const Rows& k_rows,
            const scalar_t* v_base, const Rows& v_rows, double scale, const at::Tensor& out,
            const std::optional<at::Tensor>& lse) {
  const int64_t num_q = q.size(0), hq = q.size(1), dim = q.size(2);
  const int64_t group = hq / hkv;
  const int64_t num_requests = static_cast<int64_t>(qind.size()) - 1;
  if (num_q == 0) return;

  // Queries of each request in position order, cut into blocks.
  std::vector<int64_t> order(num_q);
  std::iota(order.begin(), order.end(), 0);
  std::vector<Block> blocks;
  const int64_t tokens_per_block = std::max<int64_t>(1, kRowsPerBlock / group);
  for (int64_t b = 0; b < num_requests; ++b) {
    std::stable_sort(order.begin() + qind[b], order.begin() + qind[b + 1],
                     [&](int64_t x, int64_t y) { return pos[x] < pos[y]; });
    for (int64_t i = qind[b]; i < qind[b + 1]; i += tokens_per_block)
      blocks.push_back({b, i, std::min(tokens_per_block, qind[b + 1] - i)});
  }
  const auto block_cost = [&](const Block& blk) { return (pos[order[blk.first + blk.count - 1]] + 1) * blk.count; };
  std::stable_sort(blocks.begin(), blocks.end(),
                   [&](const Block& x, const Block& y) { return block_cost(x) > block_cost(y); });

  const float scale_log2 = static_cast<float>(scale) * kLog2e;
  float* lse_ptr = lse.has_value() ? lse->data_ptr<float>() : nullptr;
  const int64_t lse_s0 = lse.has_value() ? lse->stride(0) : 0, lse_s1 = lse.has_value() ? lse->stride(1) : 0;
  const auto f32 = at::TensorOptions().dtype(at::kFloat);

  // fp32 K / V tiles with equally spaced rows are read in place; others are gathered.
  constexpr bool kInPlace = std::is_same_v<scalar_t, float> && Rows::kStrided;
  const scalar_t* q_base = q.data_ptr<scalar_t>();
  scalar_t* o_base = out.data_ptr<scalar_t>();
  const int64_t num_items = static_cast<int64_t>(blocks.size()) * hkv;
  // Dynamic scheduling, largest items first: an item's cost grows with its largest
  // position, so a static split of the item range would leave threads idle.
  std::atomic<int64_t> next_item{0};
  const int64_t num_workers = std::min<int64_t>(at::get_num_threads(), num_items);
  at::parallel_for(0, num_workers, 1, [&](int64_t, int64_t) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const int64_t max_rows = tokens_per_block * group;
    std::vector<float> qbuf(max_rows * dim), obuf(max_rows * dim), sbuf(max_rows * kKeysPerTile);
    std::vector<float> row_max(max_rows), row_sum(max_rows), alpha(max_rows), tile_max(max_rows),
        tile_sum(max_rows);
    std::vector<int64_t> row_pos(max_rows);
    std::vector<float> kbuf(kInPlace ? 0 : kKeysPerTile * dim), vbuf(kInPlace ? 0 : kKeysPerTile * dim);

    for (int64_t item; (item = next_item.fetch_add(1)) < num_items;) {
      const Block& blk = blocks[item / hkv];
      const int64_t hk = item % hkv;
      const int64_t rows = blk.count * group, req = blk.request;
      int64_t min_pos = std::numeric_limits<int64_t>::max(), max_pos = -1;
      // Row r: token order[first + r / group], query head hk * group + r % group.
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t tok = order[blk.first + r / group], head = hk * group + r % group;
        const scalar_t* src = q_base + tok * q.stride(0) + head * q.stride(1);
        float* dst = qbuf.data() + r * dim;
        for (int64_t d = 0; d < dim; ++d) dst[d] = static_cast<float>(src[d]) * scale_log2;
        row_pos[r] = pos[tok];
        min_pos = std::min(min_pos, pos[tok]);
        max_pos = std::max(max_pos, pos[tok]);
      }
      std::fill(obuf.begin(), obuf.begin() + rows * dim, 0.f);
      std::fill(row_max.begin(), row_max.begin() + rows, kNegInf);
      std::fill(row_sum.begin(), row_sum.begin() + rows, 0.f);
      const at::Tensor q_t = at::from_blob(qbuf.data(), {rows, dim}, f32);
      at::Tensor o_t = at::from_blob(obuf.data(), {rows, dim}, f32);
      const at::Tensor max_t = at::from_blob(row_max.data(), {rows}, f32);
      const at::Tensor alpha_t = at::from_blob(alpha.data(), {rows}, f32);
      at::Tensor tmax_t = at::from_blob(tile_max.data(), {rows}, f32);
      at::Tensor tsum_t = at::from_blob(tile_sum.data(), {rows}, f32);

      // Only keys 0 .. max_pos of the request can be visible to this block.
      for (int64_t n0 = 0; n0 <= max_pos; n0 += kKeysPerTile) {
        const int64_t bn = std::min(kKeysPerTile, max_pos + 1 - n0);
        at::Tensor k_t, v_t;
        if constexpr (kInPlace) {
          k_t = at::from_blob(const_cast<scalar_t*>(k_base + k_rows.offset(req, n0, hk)), {bn, dim},
                              {k_rows.row_stride, 1}, f32);
          v_t = at::from_blob(const_cast<scalar_t*>(v_base + v_rows.offset(req, n0, hk)), {bn, dim},
                              {v_rows.row_stride, 1}, f32);
        } else {
          for (int64_t j = 0; j < bn; ++j) {
            const scalar_t* ks = k_base + k_rows.offset(req, n0 + j, hk);
            const scalar_t* vs = v_base + v_rows.offset(req, n0 + j, hk);
            float* kd = kbuf.data() + j * dim;
            float* vd = vbuf.data() + j * dim;
            for (int64_t d = 0; d < dim; ++d) kd[d] = static_cast<float>(ks[d]);
            for (int64_t d = 0; d < dim; ++d) vd[d] = static_cast<float>(vs[d]);
          }
          k_t = at::from_blob(kbuf.data(), {bn, dim}, f32);
          v_t = at::from_blob(vbuf.data(), {bn, dim}, f32);
        }
        // S = (scale * log2 e) Q K^T, [rows, bn].
        at::Tensor s_t = at::from_blob(sbuf.data(), {rows, bn}, f32);
        at::mm_out(s_t, q_t, k_t.t());
        // The tile is wholly visible to every row when its last key <= min_pos.
        const bool unmasked = n0 + bn - 1 <= min_pos;
        if (!unmasked) {
          // Visible keys of row r form the prefix n0 .. row_pos[r] of the tile.
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t visible = std::clamp<int64_t>(row_pos[r] - n0 + 1, 0, bn);
            std::fill(sbuf.data() + r * bn + visible, sbuf.data() + (r + 1) * bn, kNegInf);
          }
        }
        // Online softmax over the tile with ATen's vectorised CPU kernels. Every row
        // sees key 0 in the first tile, so the running maxima are finite from then on
        // and masked scores become exp2(-inf) = 0.
        at::amax_out(tmax_t, s_t, 1);
        for (int64_t r = 0; r < rows; ++r) {
          const float old_max = row_max[r], new_max = std::max(old_max, tile_max[r]);
          alpha[r] = old_max == kNegInf ? 0.f : std::exp2(old_max - new_max);
          row_max[r] = new_max;
        }
        s_t.sub_(max_t.unsqueeze(1)).exp2_();
        at::sum_out(tsum_t, s_t, 1);
        for (int64_t r = 0; r < rows; ++r) row_sum[r] = row_sum[r] * alpha[r] + tile_sum[r];
        if (n0 > 0) o_t.mul_(alpha_t.unsqueeze(1));
        // O += P V.
        o_t.addmm_(s_t, v_t);
      }

      for (int64_t r = 0; r < rows; ++r) {
        const int64_t tok = order[blk.first + r / group], head = hk * group + r % group;
        const float inv = 1.f / row_sum[r];
        const float* o = obuf.data() + r * dim;
        scalar_t* dst = o_base + tok * out.stride(0) + head * out.stride(1);
        for (int64_t d = 0; d < dim; ++d) dst[d] = static_cast<scalar_t>(o[d] * inv);
        if (lse_ptr != nullptr)
          lse_ptr[tok * lse_s0 + head * lse_s1] = (row_max[r] + std::log2(row_sum[r])) * kLn2;
      }
    }
  });
}

// Every query's position inside its request's keys [0, kv_len[b]).
void check_query_positions_in_requests(const std::vector<int64_t>& pos, const std::vector<int64_t>& qind,
                                       const std::vector<int64_t>& kv_len) {
  for (size_t b = 0; b + 1 < qind.size(); ++b)
    for (int64_t i = qind[b]; i < qind[b + 1]; ++i)
      TORCH_CHECK(pos[i] >= 0 && pos[i] < kv_len[b], "q_pos[", i, "] = ", pos[i], " is outside request ", b,
                  "'s keys [0, ", kv_len[b], ")");
}

// Calls fn(scalar_t{}) with the storage type of t.
template <typename Fn>
void dispatch_storage(const at::Tensor& t, Fn&& fn) {
  AT_DISPATCH_SWITCH(t.scalar_type(), "sparse_query_attention_cpu",
                     AT_DISPATCH_CASE(at::kFloat, [&] { fn(scalar_t{}); })
                     AT_DISPATCH_CASE(at::kHalf, [&] { fn(scalar_t{}); })
                     AT_DISPATCH_CASE(at::kBFloat16, [&] { fn(scalar_t{}); }));
}

}  // namespace

void sparse_query_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& q_pos, const std::optional<at::Tensor>& q_indptr,
                                const std::optional<at::Tensor>& kv_indptr, double scale, const at::Tensor& out,
                                const std::optional<at::Tensor>& lse) {
  const int64_t num_q = q.size(0), num_k = k.size(0);

  // Request offsets and positions, checked on the host.
  std::vector<int64_t> qind{0, num_q}, kvind{0, num_k};
  if (q_indptr.has_value()) {
    qind = read_index_vector(*q_indptr);
    kvind = read_index_vector(*kv_indptr);
  }
  const int64_t num_requests = static_cast<int64_t>(qind.size()) - 1;
  check_query_offsets(qind, num_q);
  std::vector<int64_t> kv_len(num_requests);
  for (int64_t b = 0; b < num_requests; ++b) {
    TORCH_CHECK(kvind[b] >= 0 && kvind[b] <= kvind[b + 1] && kvind[b + 1] <= num_k,
                "kv_indptr must be non-decreasing within [0, num_keys = ", num_k, "], got kv_indptr[", b,
                "] = ", kvind[b], ", kv_indptr[", b + 1, "] = ", kvind[b + 1]);
    kv_len[b] = kvind[b + 1] - kvind[b];
  }
  const std::vector<int64_t> pos = read_index_vector(q_pos);
  check_query_positions_in_requests(pos, qind, kv_len);
  dispatch_storage(q, [&](auto tag) {
    using scalar_t = decltype(tag);
    attend<scalar_t>(q, pos, qind, kv_len, k.size(1), k.data_ptr<scalar_t>(),
                     ContiguousRows{&kvind, k.stride(0), k.stride(1)}, v.data_ptr<scalar_t>(),
                     ContiguousRows{&kvind, v.stride(0), v.stride(1)}, scale, out, lse);
  });
}

void sparse_query_attention_paged_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                      const at::Tensor& q_pos, const at::Tensor& q_indptr, const at::Tensor& kv_indptr,
                                      const at::Tensor& kv_indices, const at::Tensor& kv_last_page_len, double scale,
                                      const at::Tensor& out, const std::optional<at::Tensor>& lse) {
  const int64_t num_q = q.size(0), num_pages = k_cache.size(0), page_size = k_cache.size(1);
  const std::vector<int64_t> qind = read_index_vector(q_indptr);
  const std::vector<int64_t> page_ind = read_index_vector(kv_indptr);
  const std::vector<int64_t> pages = read_index_vector(kv_indices);
  const std::vector<int64_t> last = read_index_vector(kv_last_page_len);
  const int64_t num_requests = static_cast<int64_t>(qind.size()) - 1;
  const int64_t num_indices = static_cast<int64_t>(pages.size());
  check_query_offsets(qind, num_q);
  std::vector<int64_t> kv_len(num_requests, 0);
  for (int64_t b = 0; b < num_requests; ++b) {
    TORCH_CHECK(page_ind[b] >= 0 && page_ind[b] <= page_ind[b + 1] && page_ind[b + 1] <= num_indices,
                "kv_indptr must be non-decreasing within [0, kv_indices.size(0) = ", num_indices, "], got kv_indptr[",
                b, "] = ", page_ind[b], ", kv_indptr[", b + 1, "] = ", page_ind[b + 1]);
    const int64_t n = page_ind[b + 1] - page_ind[b];
    if (n == 0) continue;  // no pages: no keys, kv_last_page_len[b] is not read
    TORCH_CHECK(last[b] >= 1 && last[b] <= page_size, "kv_last_page_len[", b, "] = ", last[b],
                " is outside [1, page_size = ", page_size, "] (request ", b, " has ", n, " pages)");
    kv_len[b] = (n - 1) * page_size + last[b];
    for (int64_t i = page_ind[b]; i < page_ind[b + 1]; ++i)
      TORCH_CHECK(pages[i] >= 0 && pages[i] < num_pages, "kv_indices[", i, "] = ", pages[i],
                  " is outside [0, num_pages = ", num_pages, ") (pages of k_cache)");
  }
  const std::vector<int64_t> pos = read_index_vector(q_pos);
  check_query_positions_in_requests(pos, qind, kv_len);
  dispatch_storage(q, [&](auto tag) {
    using scalar_t = decltype(tag);
    attend<scalar_t>(q, pos, qind, kv_len, k_cache.size(2), k_cache.data_ptr<scalar_t>(),
                     PagedRows{&page_ind, &pages, page_size, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2)},
                     v_cache.data_ptr<scalar_t>(),
                     PagedRows{&page_ind, &pages, page_size, v_cache.stride(0), v_cache.stride(1), v_cache.stride(2)},
                     scale, out, lse);
  });
}

}  // namespace cacheblend
