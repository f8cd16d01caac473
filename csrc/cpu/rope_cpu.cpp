// CPU implementation of rope_reposition: tokens in parallel, math from kernels/rope.h.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <vector>

#include "kernels/rope.h"
#include "ops/rope.h"

namespace cacheblend {

void rope_reposition_cpu(const at::Tensor& key, const at::Tensor& out, const at::Tensor& src_pos,
                         const at::Tensor& dst_pos, const at::Tensor& cos_sin_cache, bool is_neox) {
  const int64_t num_tokens = key.size(0), num_heads = key.size(1), head_dim = key.size(2);
  const int64_t max_pos = cos_sin_cache.size(0);
  const int rotary_dim = static_cast<int>(cos_sin_cache.size(1)), half = rotary_dim / 2;
  const float* table = cos_sin_cache.data_ptr<float>();

  AT_DISPATCH_INDEX_TYPES(src_pos.scalar_type(), "rope_reposition_cpu", [&] {
    const index_t* src = src_pos.data_ptr<index_t>();
    const index_t* dst = dst_pos.data_ptr<index_t>();
    check_positions_in_range(src, num_tokens, max_pos, "src_pos", "cos_sin_cache rows");
    check_positions_in_range(dst, num_tokens, max_pos, "dst_pos", "cos_sin_cache rows");
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, key.scalar_type(), "rope_reposition_cpu", [&] {
      const scalar_t* in_base = key.data_ptr<scalar_t>();
      scalar_t* out_base = out.data_ptr<scalar_t>();
      at::parallel_for(0, num_tokens, 16, [&](int64_t begin, int64_t end) {
        std::vector<rope::Rotation> rotations(half);
        for (int64_t t = begin; t < end; ++t) {
          rope::token_rotations(table, rotary_dim, src[t], dst[t], rotations.data());
          for (int64_t h = 0; h < num_heads; ++h) {
            rope::reposition_head(in_base + t * key.stride(0) + h * key.stride(1),
                                  out_base + t * out.stride(0) + h * out.stride(1), rotations.data(), rotary_dim,
                                  static_cast<int>(head_dim), is_neox);
          }
        }
      });
    });
  });
}

}  // namespace cacheblend
