// bilevel_routing: BiFormer bi-level routing attention on a random 2 x 28 x 28 x 64 image (n_win 7,
// topk 4, 2 heads, 3x3 LePE) with random weights. Prints the routing plan: which regions region 0
// routes to, how often each region is routed to (region hits, as a 7 x 7 grid per image), how many
// regions route to themselves, and the share of keys each query sees compared with dense attention.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <switchyard/attention/bilevel_routing.hpp>

int main() {
  using namespace switchyard;
  const std::int64_t N = 2, side = 28, C = 64, heads = 2, n_win = 7, topk = 4;
  std::mt19937 gen(0);
  std::normal_distribution<float> nd(0.0f, 1.0f / std::sqrt(float(C)));
  auto random = [&](std::initializer_list<std::int64_t> shape, float scale = 1.0f) {
    Tensor<float> t(shape);
    for (auto& v : t) v = nd(gen) * scale;
    return t;
  };
  const auto qkv_w = random({3 * C, C}), qkv_b = random({3 * C}), wo_w = random({C, C}),
             wo_b = random({C}), lepe_w = random({C, 1, 3, 3}), lepe_b = random({C});
  // a smooth image (sums of a few random waves), so neighbouring regions look alike
  Tensor<float> x({N, side, side, C});
  std::uniform_real_distribution<float> ud(0.0f, 6.28f);
  for (std::int64_t n = 0; n < N; ++n)
    for (std::int64_t c = 0; c < C; ++c) {
      const float fy = ud(gen) / 8, fx = ud(gen) / 8, ph = ud(gen);
      for (std::int64_t y = 0; y < side; ++y)
        for (std::int64_t xx = 0; xx < side; ++xx)
          x(n, y, xx, c) = std::sin(fy * float(y) + fx * float(xx) + ph);
    }

  const attention::BiLevelRoutingWeights<float> w{qkv_w, qkv_b, wo_w, wo_b, lepe_w.view<4>(),
                                                  lepe_b};
  const attention::BiLevelRoutingAttention<float> bra(
      {.dim = C, .num_heads = heads, .n_win = n_win, .topk = topk, .side_dwconv = 3});
  const auto plan = bra.route(x, w);
  const std::int64_t R = plan.regions(), w2 = plan.window_height() * plan.window_width();
  std::printf(
      "BRA: %lld images %lldx%lld, C %lld, %lld heads, %lldx%lld regions of %lld pixels, "
      "top-%lld\n",
      (long long)N, (long long)side, (long long)side, (long long)C, (long long)heads,
      (long long)n_win, (long long)n_win, (long long)w2, (long long)topk);
  std::printf("region 0 of image 0 routes to:");
  for (std::int64_t i = 0; i < topk; ++i) std::printf(" %lld", (long long)plan.routed(0, 0, i));
  std::printf("\n");
  const auto hits = plan.region_hits();
  for (std::int64_t n = 0; n < N; ++n) {
    std::int64_t self = 0, unused = 0, most = 0;
    for (std::int64_t r = 0; r < R; ++r) {
      for (std::int64_t i = 0; i < topk; ++i) self += plan.routed(n, r, i) == r;
      unused += hits[std::size_t(n * R + r)] == 0;
      most = std::max(most, hits[std::size_t(n * R + r)]);
    }
    std::printf("image %lld region hits (how many regions route to each region):\n", (long long)n);
    for (std::int64_t j = 0; j < n_win; ++j) {
      std::printf("  ");
      for (std::int64_t i = 0; i < n_win; ++i)
        std::printf("%3lld", (long long)hits[std::size_t(n * R + j * n_win + i)]);
      std::printf("\n");
    }
    std::printf(
        "  self-routed regions %lld of %lld, never routed to %lld, most hits %lld "
        "(mean %lld)\n",
        (long long)self, (long long)R, (long long)unused, (long long)most, (long long)topk);
  }
  std::printf("keys per query: %lld of %lld (%.1f%% of dense attention)\n", (long long)(topk * w2),
              (long long)(side * side), 100.0 * double(topk * w2) / double(side * side));
  Tensor<float> y({N, side, side, C});
  bra.execute(plan, x, w, y.view<4>());
  double sum2 = 0;
  for (const float v : y) sum2 += double(v) * v;
  std::printf("output [%lld, %lld, %lld, %lld], rms %.4f\n", (long long)N, (long long)side,
              (long long)side, (long long)C, std::sqrt(sum2 / double(y.numel())));
  return 0;
}
