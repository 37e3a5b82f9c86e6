// bilevel_routing: BiFormer bi-level routing attention (BRA) on two random 28 x 28 images of 64
// channels (n_win 7: 49 regions of 4 x 4 pixels, topk 4, 2 heads, 3x3 LePE) with random weights.
// Routing first: each region picks the 4 regions whose mean query and key match best, and its
// pixels attend only to the pixels of those regions. Prints which regions region 0 routes to,
// the share of keys each query sees compared with dense attention, and the region hits (how
// many regions route to each region) as a compact ASCII map; writes them as a heat map,
// bra_region_hits.png, in the directory given as the first argument, else the current one.
// The check: the output and the routing equal BiFormer's forward pass written as naive loops
// in long double (attention/bilevel_routing_ref.hpp); exits 1 otherwise.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <switchyard/attention/bilevel_routing.hpp>
#include <switchyard/attention/bilevel_routing_ref.hpp>
#include <vector>

#include "support/draw.hpp"

using namespace switchyard;

namespace {

constexpr std::int64_t N = 2, side = 28, C = 64, heads = 2, n_win = 7, topk = 4;

// Heat map of the region hits, one 7 x 7 panel per image, the count in each cell; in image 0
// region 0 is framed white and the regions it routes to red. A colour bar gives the scale.
bool write_heatmap(const std::string& path, const attention::BiLevelRoutingPlan& plan,
                   const std::vector<std::int64_t>& hits, std::int64_t most) {
  using namespace example;
  const int cell = 44, panel = int(n_win) * cell, top = 64, left = 16, gap = 40;
  Image img(left + int(N) * (panel + gap) + 70, top + panel + 44);
  text(img, left, 8, "BRA region hits: how many regions route to each region", black, 2);
  text(img, left, 30,
       "7 x 7 regions of 4 x 4 pixels, each routes to its top-4; white frame: region 0 of "
       "image 0, red: the 4 regions it routes to",
       grey);
  for (std::int64_t n = 0; n < N; ++n) {
    const int x0 = left + int(n) * (panel + gap);
    text(img, x0, top - 14, "image " + std::to_string(n), black);
    for (std::int64_t r = 0; r < plan.regions(); ++r) {
      const std::int64_t h = hits[std::size_t(n * plan.regions() + r)];
      const Rgb c = colour_map(double(h) / double(most));
      const int cx = x0 + int(r % n_win) * cell, cy = top + int(r / n_win) * cell;
      fill_rect(img, cx, cy, cell, cell, c);
      const std::string label = std::to_string(h);
      text(img, cx + (cell - text_width(label, 2)) / 2, cy + cell / 2 - 7, label, ink_on(c), 2);
    }
    outline(img, x0 - 1, top - 1, panel + 2, panel + 2, grey);
  }
  for (std::int64_t i = 0; i < topk; ++i) {  // region 0's routing, in image 0
    const std::int64_t r = plan.routed(0, 0, i);
    const int cx = left + int(r % n_win) * cell, cy = top + int(r / n_win) * cell;
    for (int t = 0; t < 3; ++t) outline(img, cx + t, cy + t, cell - 2 * t, cell - 2 * t, red);
  }
  for (int t = 0; t < 3; ++t) outline(img, left + t, top + t, cell - 2 * t, cell - 2 * t, white);
  // colour bar: 0 at the bottom, the most hits at the top
  const int bx = left + int(N) * (panel + gap), bh = panel;
  for (int y = 0; y < bh; ++y) fill_rect(img, bx, top + y, 16, 1, colour_map(1.0 - y / (bh - 1.0)));
  text(img, bx + 22, top, std::to_string(most), black);
  text(img, bx + 22, top + bh - 7, "0", black);
  text(img, left, top + panel + 14,
       "mean hits per region = topk = 4; 0 = no region routes there, so its pixels are never "
       "attended to (LePE aside)",
       grey);
  return write_png(path, img);
}

}  // namespace

int main(int argc, char** argv) {
  std::mt19937 gen(0);
  std::normal_distribution<float> nd(0.0f, 1.0f / std::sqrt(float(C)));
  auto random = [&](std::initializer_list<std::int64_t> shape) {
    Tensor<float> t(shape);
    for (auto& v : t) v = nd(gen);
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
  const attention::BiLevelRoutingConfig cfg{
      .dim = C, .num_heads = heads, .n_win = n_win, .topk = topk, .side_dwconv = 3};
  const attention::BiLevelRoutingAttention<float> bra(cfg);
  const auto plan = bra.route(x, w);  // routing only: which regions each region attends to
  const std::int64_t R = plan.regions(), w2 = plan.window_height() * plan.window_width();
  std::printf(
      "bilevel_routing: BiFormer bi-level routing attention, %lld images %lldx%lld, C "
      "%lld, %lld heads,\n%lldx%lld regions of %lld pixels, each attending to its top-%lld "
      "regions\n",
      (long long)N, (long long)side, (long long)side, (long long)C, (long long)heads,
      (long long)n_win, (long long)n_win, (long long)w2, (long long)topk);
  std::printf("region 0 of image 0 routes to regions:");
  for (std::int64_t i = 0; i < topk; ++i) std::printf(" %lld", (long long)plan.routed(0, 0, i));
  std::printf("\nkeys per query: %lld of %lld (%.1f%% of dense attention)\n\n",
              (long long)(topk * w2), (long long)(side * side),
              100.0 * double(topk * w2) / double(side * side));

  // Region hits as a compact picture: one character pair per region, more ink = more hits.
  const auto hits = plan.region_hits();
  const std::int64_t most = *std::max_element(hits.begin(), hits.end());
  const std::string ramp = " .:-=+*#%@";
  std::printf("region hits (how many regions route to each; ' ' = 0 ... '@' = %lld):\n",
              (long long)most);
  std::printf("   %-16s   %s\n", "image 0", "image 1");
  for (std::int64_t j = 0; j < n_win; ++j) {
    std::string line = " ";
    for (std::int64_t n = 0; n < N; ++n) {
      line += "  |";
      for (std::int64_t i = 0; i < n_win; ++i) {
        const std::int64_t h = hits[std::size_t(n * R + j * n_win + i)];
        const char c = ramp[std::size_t(std::lround(double(h) / double(most) * 9))];
        line += std::string(2, c);
      }
      line += "|";
    }
    std::printf("%s\n", line.c_str());
  }
  for (std::int64_t n = 0; n < N; ++n) {
    std::int64_t self = 0, unused = 0, n_most = 0;
    for (std::int64_t r = 0; r < R; ++r) {
      for (std::int64_t i = 0; i < topk; ++i) self += plan.routed(n, r, i) == r;
      unused += hits[std::size_t(n * R + r)] == 0;
      n_most = std::max(n_most, hits[std::size_t(n * R + r)]);
    }
    std::printf(
        "  image %lld: %lld of %lld regions route to themselves, %lld are never routed "
        "to, most hits %lld (mean %lld)\n",
        (long long)n, (long long)self, (long long)R, (long long)unused, (long long)n_most,
        (long long)topk);
  }

  const auto png = example::output_path(argc, argv, "bra_region_hits.png");
  if (!write_heatmap(png.string(), plan, hits, most)) {
    std::printf("could not write %s\n", png.string().c_str());
    return 1;
  }
  std::printf("wrote the region hits as a heat map: %s\n\n", png.string().c_str());

  // Execute the plan (the expensive part), then the check against the naive reference.
  Tensor<float> y({N, side, side, C});
  bra.execute(plan, x, w, y.view<4>());
  const auto ref = attention::ref::bilevel_routing_attention<float>(cfg, x, w);
  double max_err = 0, sum2 = 0;
  for (std::int64_t i = 0; i < y.numel(); ++i) {
    max_err = std::max(max_err, std::abs(double(y[i]) - ref.out[std::size_t(i)]));
    sum2 += double(y[i]) * y[i];
  }
  std::int64_t same_regions = 0;  // routed sets equal, region by region (order aside)
  for (std::int64_t r = 0; r < N * R; ++r) {
    std::vector<std::int64_t> a(plan.r_idx.begin() + r * topk, plan.r_idx.begin() + (r + 1) * topk),
        b(ref.r_idx.begin() + r * topk, ref.r_idx.begin() + (r + 1) * topk);
    std::sort(a.begin(), a.end());
    std::sort(b.begin(), b.end());
    same_regions += a == b;
  }
  std::printf("output [%lld, %lld, %lld, %lld], rms %.4f\n", (long long)N, (long long)side,
              (long long)side, (long long)C, std::sqrt(sum2 / double(y.numel())));
  const double tolerance = 1e-4;
  const bool ok = max_err <= tolerance && same_regions == N * R;
  std::printf("routing: %lld of %lld regions route like the naive long-double reference\n",
              (long long)same_regions, (long long)(N * R));
  std::printf("max error vs naive long-double reference %.2g (tolerance %.0e): %s\n", max_err,
              tolerance, ok ? "OK" : "FAILED");
  return ok ? 0 : 1;
}
