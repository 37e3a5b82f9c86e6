// mixture_of_depths: Mixture-of-Depths token skipping (Raposo et al. 2024) on a small random
// input (2 sequences of 16 tokens, d = 32). A linear router scores every token; per sequence the
// top 25% go through a transformer block's residual branch f (causal attention with 4 heads, then
// a ReLU MLP), and the others skip it:
//   out[t] = x[t] + r_t * f(x)[t] for kept tokens,   out[t] = x[t] otherwise.
// Prints which tokens went through the block, the share of block FLOPs saved, the causal
// threshold routing used for decoding (MindSkip-style sigmoid > 0.5), and, as the check, the
// largest difference between apply() and a naive gather / block / scatter of the same block.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <span>
#include <string>
#include <switchyard/attention/dense.hpp>
#include <switchyard/core/gemm.hpp>
#include <switchyard/core/rng.hpp>
#include <switchyard/moe/mixture_of_depths.hpp>

using namespace switchyard;

namespace {

constexpr std::int64_t B = 2, T = 16, d = 32, H = 4, F = 4 * d;

struct Block {
  Tensor<float> wqkv{3 * d, d}, wo{d, d}, w1{F, d}, w2{d, F};  // nn.Linear layout [out, in]

  // f on one batch of token rows, causal inside: a = Attn(x), f = a + MLP(x + a).
  // in, out: [B', n, d] contiguous.
  void operator()(ConstView<float, 3> in, View<float, 3> out) const {
    using core::Trans;
    const std::int64_t b = in.extent(0), n = in.extent(1), rows = b * n, D = d / H;
    const ConstView<float, 2> x2(in.data(), {rows, d});
    const View<float, 2> o2(out.data(), {rows, d});
    Tensor<float> qkv({rows, 3 * d}), heads({b, n, H, D}), h({rows, d}), hidden({rows, F});
    core::gemm<float>(x2, Trans::no, wqkv, Trans::yes, qkv.view<2>());
    const auto part = [&](std::int64_t p) {
      return ConstView<float, 4>(qkv.data() + p * d, {b, n, H, D}, {n * 3 * d, 3 * d, D, 1});
    };
    attention::DenseAttention<float>().forward(part(0), part(1), part(2), heads.view<4>(),
                                               attention::CausalMask{});
    core::gemm<float>(ConstView<float, 2>(heads.data(), {rows, d}), Trans::no, wo, Trans::yes, o2);
    for (std::int64_t i = 0; i < rows * d; ++i) h[i] = in.data()[i] + out.data()[i];
    core::gemm<float>(h, Trans::no, w1, Trans::yes, hidden.view<2>());
    for (auto& v : hidden) v = std::max(v, 0.0f);
    core::gemm<float>(hidden, Trans::no, w2, Trans::yes, o2, 1.0f, 1.0f);
  }
};

// FLOPs of f on a sequence of n tokens: projections and MLP grow with n, causal attention
// (q . k and p . v over n(n+1)/2 pairs) with n^2.
double block_flops(std::int64_t n) {
  return 2.0 * n * d * (3 * d + d) + 2.0 * 2.0 * n * d * F + 2.0 * d * n * (n + 1);
}

void print_rows(const moe::DepthPlan<float>& plan) {
  for (std::int64_t b = 0; b < plan.batch; ++b) {
    std::string row(static_cast<std::size_t>(T), '.');
    for (const std::int64_t t : plan.kept(b)) row[static_cast<std::size_t>(t)] = '#';
    std::printf("  sequence %lld  %s  (%lld of %lld)\n", (long long)b, row.c_str(),
                (long long)plan.num_kept(b), (long long)T);
  }
}

}  // namespace

int main() {
  const auto start = std::chrono::steady_clock::now();
  Tensor<float> x({B, T, d}), w_r({d});
  Block block;
  core::fill_normal(x, /*seed=*/1);
  core::fill_normal(w_r, /*seed=*/2);
  for (auto& v : w_r) v /= std::sqrt(float(d));  // router logits of unit scale
  int seed = 3;
  for (Tensor<float>* w : {&block.wqkv, &block.wo, &block.w1, &block.w2}) {
    core::fill_normal(*w, seed++);
    for (auto& v : *w) v /= std::sqrt(float(w->extent(1)));
  }

  std::printf(
      "Mixture-of-Depths: B = %lld sequences of T = %lld tokens, d = %lld; the block is\n"
      "causal attention (%lld heads) + ReLU MLP (%lld), run only on the routed tokens.\n",
      (long long)B, (long long)T, (long long)d, (long long)H, (long long)F);

  // Route: scores = x . w_r; expert choice keeps the top 25% of each sequence (k = 4 of 16),
  // listed in token order so attention inside the block stays causal.
  const moe::MixtureOfDepthsRouter<float> router({.capacity_fraction = 0.25});
  const Tensor<float> scores = router.scores(x, w_r);
  const moe::DepthPlan<float> plan = router.route(scores);
  std::printf("\nexpert-choice routing, capacity 0.25 ('#' = through the block, '.' = skipped):\n");
  print_rows(plan);

  // Execute: the block runs once on the [B, k, d] gathered tokens.
  Tensor<float> out({B, T, d});
  router.apply(plan, x, block, out.view<3>());

  double routed = 0;
  for (std::int64_t b = 0; b < B; ++b) routed += block_flops(plan.num_kept(b));
  const double full = double(B) * block_flops(T);
  std::printf("block FLOPs: %.3f M routed vs %.3f M for every token: %.1f%% saved\n", routed * 1e-6,
              full * 1e-6, 100.0 * (1.0 - routed / full));
  std::printf("kept %.0f%% of tokens, mean router score %.3f (kept tokens %.3f)\n",
              100.0 * plan.stats.fraction_kept, plan.stats.mean_score, plan.stats.mean_kept_score);

  // Decoding cannot rank a whole sequence; the threshold router decides each token from its own
  // score: sigmoid(score) > 0.5. Counts differ per sequence, so the block gets ragged rows.
  const moe::MixtureOfDepthsRouter<float> causal(
      {.activation = moe::ScoreActivation::sigmoid, .threshold = 0.5});
  const moe::DepthPlan<float> thr = causal.route_threshold(scores);
  std::printf("\nthreshold routing, sigmoid(score) > 0.5 (causal, for decoding):\n");
  print_rows(thr);
  const auto ragged = [&](ConstView<float, 2> rows, std::span<const std::int64_t> offsets,
                          View<float, 2> y) {
    for (std::int64_t b = 0; b < B; ++b) {
      const std::int64_t n = offsets[b + 1] - offsets[b];
      if (n > 0)
        block(ConstView<float, 3>(rows.data() + offsets[b] * d, {1, n, d}),
              View<float, 3>(y.data() + offsets[b] * d, {1, n, d}));
    }
  };
  Tensor<float> out_thr({B, T, d});
  causal.apply(thr, x, ragged, out_thr.view<3>());

  // Check: a naive gather / block / scatter, sequence by sequence, for both plans.
  double max_diff = 0;
  for (const auto* run : {&plan, &thr}) {
    const Tensor<float>& got = run == &plan ? out : out_thr;
    for (std::int64_t b = 0; b < B; ++b) {
      const auto kept = run->kept(b);
      const auto n = static_cast<std::int64_t>(kept.size());
      Tensor<float> g({1, std::max<std::int64_t>(n, 1), d}),
          y({1, std::max<std::int64_t>(n, 1), d});
      for (std::int64_t i = 0; i < n; ++i)
        for (std::int64_t c = 0; c < d; ++c) g(0, i, c) = x(b, kept[i], c);
      if (n > 0)
        block(ConstView<float, 3>(g.data(), {1, n, d}), View<float, 3>(y.data(), {1, n, d}));
      for (std::int64_t t = 0, i = 0; t < T; ++t) {
        const bool through = i < n && kept[i] == t;
        for (std::int64_t c = 0; c < d; ++c) {
          double want = x(b, t, c);
          if (through) want += double(run->weights(b)[i]) * double(y(0, i, c));
          max_diff = std::max(max_diff, std::abs(double(got(b, t, c)) - want));
        }
        i += through;
      }
    }
  }
  const double ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  std::printf("\nmax |apply - naive gather/block/scatter| = %.3g (%.1f ms)\n", max_diff, ms);
  return max_diff < 1e-4 ? 0 : 1;
}
