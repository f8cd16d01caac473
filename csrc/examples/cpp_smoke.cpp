// A C++ consumer of libcacheblend_ops: calls cacheblend::rope_reposition through the
// dispatcher (as a serving engine written in C++ would) and checks that re-rotating
// src -> dst -> src gives the keys back. Exit code 0 on success.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <iostream>

int main() {
  const int64_t tokens = 7, heads = 2, head_dim = 64, max_pos = 128;
  auto freqs = 1.0 / at::pow(10000.0, at::arange(0, head_dim, 2, at::kDouble) / head_dim);
  auto angles = at::arange(max_pos, at::kDouble).unsqueeze(1) * freqs.unsqueeze(0);
  auto table = at::cat({angles.cos(), angles.sin()}, 1).to(at::kFloat).contiguous();
  auto key = at::randn({tokens, heads, head_dim});
  auto original = key.clone();
  auto src = at::arange(tokens, at::kLong);
  auto dst = src + 40;

  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("cacheblend::rope_reposition", "")
                .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, bool)>();
  op.call(key, src, dst, table, true);
  const double moved = (key - original).abs().max().item<double>();
  op.call(key, dst, src, table, true);
  const double err = (key - original).abs().max().item<double>();
  std::cout << "cacheblend::rope_reposition from C++: moved " << moved << ", round-trip error " << err << "\n";
  return (moved > 1e-2 && err < 1e-4) ? 0 : 1;
}
