// CPU implementations of kv_deviation and select_hkvd_batched.
//   kv_deviation: one fused pass (no temporaries), tokens in parallel; an AVX2/F16C row
//   kernel when the CPU has it.
//   select_hkvd_batched: requests in parallel; per request the top-k candidates are
//   found with nth_element under the strict order (key desc, index asc), then the
//   selection is written in position order.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <type_traits>
#include <limits>
#include <vector>

#include "kernels/select.h"
#include "ops/select.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define CB_X86_AVX2_PATH 1
#endif

namespace cacheblend {

namespace {

#ifdef CB_X86_AVX2_PATH
// AVX2 + FMA + F16C version of select::squared_diff_sum, chosen at run time when the CPU
// has them (the extension itself is compiled for baseline x86-64). fp16 converts with
// F16C, bf16 by widening the bits; two accumulators of 8 lanes.
template <typename T>
__attribute__((target("avx2,fma,f16c"))) inline __m256 load8_as_float(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm256_loadu_ps(p);
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  } else {
    static_assert(std::is_same_v<T, c10::BFloat16>, "fp32, fp16 or bf16");
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
  }
}

template <typename T>
__attribute__((target("avx2,fma,f16c"))) float squared_diff_sum_avx2(const T* a, const T* b, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m256 d0 = _mm256_sub_ps(load8_as_float<T>(a + j), load8_as_float<T>(b + j));
    const __m256 d1 = _mm256_sub_ps(load8_as_float<T>(a + j + 8), load8_as_float<T>(b + j + 8));
    acc0 = _mm256_fmadd_ps(d0, d0, acc0);
    acc1 = _mm256_fmadd_ps(d1, d1, acc1);
  }
  for (; j + 8 <= n; j += 8) {
    const __m256 d0 = _mm256_sub_ps(load8_as_float<T>(a + j), load8_as_float<T>(b + j));
    acc0 = _mm256_fmadd_ps(d0, d0, acc0);
  }
  const __m256 acc = _mm256_add_ps(acc0, acc1);
  __m128 v = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  v = _mm_add_ps(v, _mm_movehl_ps(v, v));
  v = _mm_add_ss(v, _mm_shuffle_ps(v, v, 1));
  float sum = _mm_cvtss_f32(v);
  for (; j < n; ++j) {
    const float d = to_float(a[j]) - to_float(b[j]);
    sum += d * d;
  }
  return sum;
}

bool cpu_has_avx2_fma_f16c() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c");
  return has;
}
#endif

// The fastest squared-difference kernel this CPU runs for storage type T.
template <typename T>
auto squared_diff_sum_for_cpu() -> float (*)(const T*, const T*, int64_t) {
#ifdef CB_X86_AVX2_PATH
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>) {
    if (cpu_has_avx2_fma_f16c()) return &squared_diff_sum_avx2<T>;
  }
#endif
  return &select::squared_diff_sum<T>;
}

}  // namespace

void kv_deviation_cpu(const at::Tensor& fresh, const at::Tensor& reused, const std::optional<at::Tensor>& token_index,
                      bool accumulate, const at::Tensor& out) {
  const int64_t num_rows = fresh.size(0), num_reused = reused.size(0);
  const int64_t num_heads = fresh.size(1), head_dim = fresh.size(2);
  const int64_t fs0 = fresh.stride(0), fs1 = fresh.stride(1), rs0 = reused.stride(0), rs1 = reused.stride(1);
  float* out_ptr = out.data_ptr<float>();
  // Heads stored back to back form one contiguous run per token.
  const bool flat = fs1 == head_dim && rs1 == head_dim;

  auto run = [&](auto index_tag, const auto* index) {
    using index_t = decltype(index_tag);
    if (index != nullptr) check_positions_in_range(index, num_rows, num_reused, "token_index", "reused rows");
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, fresh.scalar_type(), "kv_deviation_cpu", [&] {
      const scalar_t* f_base = fresh.data_ptr<scalar_t>();
      const scalar_t* r_base = reused.data_ptr<scalar_t>();
      const auto row_sum = squared_diff_sum_for_cpu<scalar_t>();
      at::parallel_for(0, num_rows, 32, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
          const int64_t src = index != nullptr ? static_cast<int64_t>(static_cast<index_t>(index[t])) : t;
          const scalar_t* f = f_base + t * fs0;
          const scalar_t* r = r_base + src * rs0;
          float acc = 0.f;
          if (flat) {
            acc = row_sum(f, r, num_heads * head_dim);
          } else {
            for (int64_t h = 0; h < num_heads; ++h) acc += row_sum(f + h * fs1, r + h * rs1, head_dim);
          }
          out_ptr[t] = accumulate ? out_ptr[t] + acc : acc;
        }
      });
    });
  };
  if (!token_index.has_value()) {
    run(int64_t{0}, static_cast<const int64_t*>(nullptr));
  } else {
    AT_DISPATCH_INDEX_TYPES(token_index->scalar_type(), "kv_deviation_cpu", [&] {
      run(index_t{0}, token_index->data_ptr<index_t>());
    });
  }
}

namespace {

// Selection of one request of n tokens (local indices 0..n-1); writes the first
// max_selected selected indices ascending into out_row, pads with -1, returns the count.
int64_t select_one(const float* dev, const bool* forced, const bool* cand, int64_t n, int64_t k,
                   int64_t max_selected, int64_t* out_row, std::vector<uint64_t>& scratch,
                   std::vector<uint8_t>& take) {
  // (key, ~index) packed so that a larger value means "ranks higher": larger key first,
  // then lower index first. Distinct for distinct tokens: a strict total order.
  scratch.clear();
  take.assign(n, 0);
  for (int64_t i = 0; i < n; ++i) {
    if (forced != nullptr && forced[i]) {
      take[i] = 1;
    } else if (cand == nullptr || cand[i]) {
      const uint64_t key = select::order_key(dev[i]);
      scratch.push_back((key << 32) | (0xFFFFFFFFu - static_cast<uint32_t>(i)));
    }
  }
  const int64_t num_cand = static_cast<int64_t>(scratch.size());
  const int64_t keep = std::min(k, num_cand);
  if (keep > 0 && keep < num_cand) {
    std::nth_element(scratch.begin(), scratch.begin() + (keep - 1), scratch.end(), std::greater<uint64_t>());
  }
  for (int64_t j = 0; j < keep; ++j) take[0xFFFFFFFFu - static_cast<uint32_t>(scratch[j] & 0xFFFFFFFFu)] = 1;
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (take[i]) {
      if (count < max_selected) out_row[count] = i;
      ++count;
    }
  }
  for (int64_t p = count; p < max_selected; ++p) out_row[p] = -1;
  return count;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> select_hkvd_batched_cpu(const at::Tensor& deviation, const at::Tensor& indptr,
                                                           const at::Tensor& k, const std::optional<at::Tensor>& forced,
                                                           const std::optional<at::Tensor>& candidates,
                                                           int64_t max_selected) {
  const int64_t num_requests = indptr.size(0) - 1, total = deviation.size(0);
  at::Tensor indices = at::empty({num_requests, max_selected}, deviation.options().dtype(at::kLong));
  at::Tensor counts = at::empty({num_requests}, deviation.options().dtype(at::kInt));
  std::vector<int64_t> start(num_requests), stop(num_requests), kk(num_requests);
  AT_DISPATCH_INDEX_TYPES(indptr.scalar_type(), "select_hkvd_batched_cpu", [&] {
    const index_t* p = indptr.data_ptr<index_t>();
    TORCH_CHECK(p[0] >= 0, "indptr[0] must be >= 0, got ", static_cast<int64_t>(p[0]));
    for (int64_t b = 0; b < num_requests; ++b) {
      start[b] = p[b];
      stop[b] = p[b + 1];
      TORCH_CHECK(stop[b] >= start[b], "indptr must be non-decreasing, got indptr[", b, "] = ", start[b],
                  " > indptr[", b + 1, "] = ", stop[b]);
    }
    const int64_t last = p[num_requests];
    TORCH_CHECK(last <= total, "indptr[-1] = ", last, " exceeds the number of tokens in deviation (", total, ")");
  });
  AT_DISPATCH_INDEX_TYPES(k.scalar_type(), "select_hkvd_batched_cpu", [&] {
    const index_t* kp = k.data_ptr<index_t>();
    for (int64_t b = 0; b < num_requests; ++b) {
      kk[b] = kp[b];
      TORCH_CHECK(kk[b] >= 0, "k must be >= 0, got k[", b, "] = ", kk[b]);
    }
  });
  const float* dev = deviation.data_ptr<float>();
  const bool* forced_ptr = forced.has_value() ? forced->data_ptr<bool>() : nullptr;
  const bool* cand_ptr = candidates.has_value() ? candidates->data_ptr<bool>() : nullptr;
  int64_t* idx_ptr = indices.data_ptr<int64_t>();
  int32_t* count_ptr = counts.data_ptr<int32_t>();
  at::parallel_for(0, num_requests, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint64_t> scratch;
    std::vector<uint8_t> take;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t s = start[b];
      const int64_t count =
          select_one(dev + s, forced_ptr ? forced_ptr + s : nullptr, cand_ptr ? cand_ptr + s : nullptr,
                     stop[b] - s, kk[b], max_selected, idx_ptr + b * max_selected, scratch, take);
      count_ptr[b] = static_cast<int32_t>(std::min<int64_t>(count, std::numeric_limits<int32_t>::max()));
    }
  });
  return {indices, counts};
}

}  // namespace cacheblend
