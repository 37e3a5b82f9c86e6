// Mixture-of-Depths (moe/mixture_of_depths.hpp): expert-choice and threshold plans against a
// naive double reference, hand-worked cases and ties, causality of the threshold router,
// apply() against a naive gather / block / scatter (a simple block, and causal attention + FFN),
// statistics, errors and thread-count invariance.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <span>
#include <vector>

#include "support/compare.hpp"
#include "switchyard/attention/dense.hpp"
#include "switchyard/core/gemm.hpp"
#include "switchyard/core/tensor.hpp"
#include "switchyard/moe/mixture_of_depths.hpp"

using Catch::Contains;
using switchyard::ConstView;
using switchyard::Tensor;
using switchyard::View;
using switchyard::moe::depth_capacity;
using switchyard::moe::DepthPlan;
using switchyard::moe::DepthRouting;
using switchyard::moe::MixtureOfDepthsConfig;
using switchyard::moe::MixtureOfDepthsRouter;
using switchyard::moe::ScoreActivation;

namespace {

// Naive reference plan in double: per sequence, stable-sort the routed tokens by score
// (descending; a stable sort keeps equal scores in index order), take k, sort ascending.
struct RefPlan {
  std::vector<std::int64_t> offsets{0};
  std::vector<std::int64_t> tokens;
  std::vector<double> weights;
  double mean_score = 0, mean_kept = 0;
  std::int64_t routed = 0;
};

double ref_activation(double s, ScoreActivation a) {
  return a == ScoreActivation::sigmoid ? 1.0 / (1.0 + std::exp(-s)) : s;
}

template <class T>
T stored_weight(T s, ScoreActivation a) {
  return static_cast<T>(ref_activation(static_cast<double>(s), a));
}

template <class T>
RefPlan reference_expert_choice(const Tensor<T>& scores, double fraction, ScoreActivation act,
                                const std::vector<std::int64_t>& lengths = {}) {
  RefPlan r;
  const std::int64_t B = scores.extent(0), Tn = scores.extent(1);
  double sum = 0, kept_sum = 0;
  for (std::int64_t b = 0; b < B; ++b) {
    const std::int64_t len = lengths.empty() ? Tn : lengths[b];
    std::vector<std::int64_t> order(len);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](std::int64_t a, std::int64_t c) {
      return double(scores(b, a)) > double(scores(b, c));
    });
    // k = ceil(fraction * len), at least 1 (exact products: the tests use fractions like
    // 0.25 whose products are exact or far from integers).
    std::int64_t k = len == 0 ? 0
                              : std::max<std::int64_t>(
                                    1, std::llround(std::ceil(fraction * double(len) - 1e-9)));
    k = std::min(k, len);
    order.resize(k);
    std::sort(order.begin(), order.end());
    for (std::int64_t t : order) {
      r.tokens.push_back(t);
      r.weights.push_back(double(stored_weight(scores(b, t), act)));
      kept_sum += r.weights.back();
    }
    for (std::int64_t t = 0; t < len; ++t) sum += double(stored_weight(scores(b, t), act));
    r.routed += len;
    r.offsets.push_back(std::int64_t(r.tokens.size()));
  }
  if (r.routed) r.mean_score = sum / double(r.routed);
  if (!r.tokens.empty()) r.mean_kept = kept_sum / double(r.tokens.size());
  return r;
}

template <class T>
RefPlan reference_threshold(const Tensor<T>& scores, double threshold, ScoreActivation act,
                            const std::vector<std::int64_t>& lengths = {}) {
  RefPlan r;
  double sum = 0, kept_sum = 0;
  for (std::int64_t b = 0; b < scores.extent(0); ++b) {
    const std::int64_t len = lengths.empty() ? scores.extent(1) : lengths[b];
    for (std::int64_t t = 0; t < len; ++t) {
      const double w = double(stored_weight(scores(b, t), act));
      sum += w;
      if (w > threshold) {
        r.tokens.push_back(t);
        r.weights.push_back(w);
        kept_sum += w;
      }
    }
    r.routed += len;
    r.offsets.push_back(std::int64_t(r.tokens.size()));
  }
  if (r.routed) r.mean_score = sum / double(r.routed);
  if (!r.tokens.empty()) r.mean_kept = kept_sum / double(r.tokens.size());
  return r;
}

template <class T>
void require_plan_equals(const DepthPlan<T>& p, const RefPlan& r) {
  REQUIRE_NOTHROW(p.check());
  REQUIRE(p.offsets == r.offsets);
  REQUIRE(p.token_index == r.tokens);
  REQUIRE(p.weight.size() == r.weights.size());
  for (std::size_t i = 0; i < r.weights.size(); ++i) REQUIRE(double(p.weight[i]) == r.weights[i]);
  REQUIRE(p.stats.routed_tokens == r.routed);
  REQUIRE(p.stats.kept_tokens == std::int64_t(r.tokens.size()));
  REQUIRE(p.stats.fraction_kept ==
          Approx(r.routed ? double(r.tokens.size()) / double(r.routed) : 0.0));
  REQUIRE(p.stats.mean_score == Approx(r.mean_score).margin(1e-12));
  REQUIRE(p.stats.mean_kept_score == Approx(r.mean_kept).margin(1e-12));
}

template <class T>
void require_same_plan(const DepthPlan<T>& a, const DepthPlan<T>& b) {
  REQUIRE(a.batch == b.batch);
  REQUIRE(a.num_tokens == b.num_tokens);
  REQUIRE(a.offsets == b.offsets);
  REQUIRE(a.token_index == b.token_index);
  REQUIRE(a.weight == b.weight);
  REQUIRE(a.stats.mean_score == b.stats.mean_score);
  REQUIRE(a.stats.mean_kept_score == b.stats.mean_kept_score);
}

template <class T>
bool bitwise_equal(const Tensor<T>& a, const Tensor<T>& b) {
  return a.numel() == b.numel() && std::equal(a.begin(), a.end(), b.begin());
}

// Scores on a grid of 1/4, so equal values are exact ties.
template <class T>
Tensor<T> grid_scores(std::int64_t B, std::int64_t Tn, std::uint32_t seed) {
  Tensor<T> s({B, Tn});
  std::mt19937 gen(seed);
  std::normal_distribution<double> nd(0.0, 1.5);
  for (auto& v : s) v = T(std::round(nd(gen) * 4.0) / 4.0);
  return s;
}

// out[b, t] = x[b, t] + r_t * y[row of (b, t)], naive and in double, from an explicit gather.
template <class T>
std::vector<double> naive_scatter(const DepthPlan<T>& plan, const Tensor<T>& x,
                                  const std::vector<double>& y) {
  const std::int64_t B = x.extent(0), Tn = x.extent(1), d = x.extent(2);
  std::vector<double> out(x.begin(), x.end());
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t i = plan.offsets[b]; i < plan.offsets[b + 1]; ++i) {
      const std::int64_t t = plan.token_index[i];
      for (std::int64_t c = 0; c < d; ++c)
        out[(b * Tn + t) * d + c] += double(plan.weight[i]) * y[i * d + c];
    }
  return out;
}

// The kept rows of x, [N, d], sequence-major: an explicit gather.
template <class T>
Tensor<T> naive_gather(const DepthPlan<T>& plan, const Tensor<T>& x) {
  const std::int64_t d = x.extent(2), n = plan.num_kept();
  Tensor<T> g({n, d});
  for (std::int64_t b = 0; b < plan.batch; ++b)
    for (std::int64_t i = plan.offsets[b]; i < plan.offsets[b + 1]; ++i)
      for (std::int64_t c = 0; c < d; ++c) g(i, c) = x(b, plan.token_index[i], c);
  return g;
}

// A transformer block's residual branch on the tokens it is given, causal inside:
//   a = Attn(in) (QKV and output projections, causal DenseAttention, H heads),
//   f = a + FFN(in + a),  FFN(h) = relu(h W1^T) W2^T.
template <class T>
struct AttnFfn {
  std::int64_t d, H;
  Tensor<T> wqkv, wo, w1, w2;  // [3d, d], [d, d], [F, d], [d, F]

  AttnFfn(std::int64_t d_, std::int64_t heads, std::uint32_t seed) : d(d_), H(heads) {
    const double s = 1.0 / std::sqrt(double(d));
    wqkv = test_support::random_tensor<T>({3 * d, d}, seed, s);
    wo = test_support::random_tensor<T>({d, d}, seed + 1, s);
    w1 = test_support::random_tensor<T>({4 * d, d}, seed + 2, s);
    w2 = test_support::random_tensor<T>({d, 4 * d}, seed + 3, 0.5 * s);
  }

  // in, out: [B, n, d] contiguous.
  void operator()(ConstView<T, 3> in, View<T, 3> out) const {
    using switchyard::core::Trans;
    const std::int64_t B = in.extent(0), n = in.extent(1), D = d / H, rows = B * n;
    const ConstView<T, 2> x2(in.data(), {rows, d});
    Tensor<T> qkv({rows, 3 * d});
    switchyard::core::gemm<T>(x2, Trans::no, wqkv, Trans::yes, qkv.template view<2>());
    const auto part = [&](std::int64_t p) {
      return ConstView<T, 4>(qkv.data() + p * d, {B, n, H, D}, {n * 3 * d, 3 * d, D, 1});
    };
    Tensor<T> heads({B, n, H, D});
    const switchyard::attention::DenseAttention<T> attn;
    attn.forward(part(0), part(1), part(2), heads.template view<4>(),
                 switchyard::attention::CausalMask{});
    const View<T, 2> o2(out.data(), {rows, d});
    switchyard::core::gemm<T>(ConstView<T, 2>(heads.data(), {rows, d}), Trans::no, wo, Trans::yes,
                              o2);  // o = a
    Tensor<T> h({rows, d});
    for (std::int64_t i = 0; i < rows * d; ++i) h[i] = in.data()[i] + out.data()[i];
    Tensor<T> hidden({rows, 4 * d});
    switchyard::core::gemm<T>(h, Trans::no, w1, Trans::yes, hidden.template view<2>());
    for (auto& v : hidden) v = std::max(v, T(0));
    switchyard::core::gemm<T>(hidden, Trans::no, w2, Trans::yes, o2, T(1), T(1));  // o = a + m
  }
};

}  // namespace

TEST_CASE("MixtureOfDepths: capacity is ceil(fraction * T), at least 1",
          "[moe][mixture_of_depths][capacity]") {
  REQUIRE(depth_capacity(16, 0.25) == 4);
  REQUIRE(depth_capacity(16, 0.125) == 2);
  REQUIRE(depth_capacity(10, 0.7) == 7);  // 0.7 * 10 = 7.000000000000001 counts as 7
  REQUIRE(depth_capacity(10, 0.3) == 3);  // 0.3 * 10 = 3.0000000000000004
  REQUIRE(depth_capacity(7, 0.5) == 4);
  REQUIRE(depth_capacity(3, 0.1) == 1);
  REQUIRE(depth_capacity(1, 1e-9) == 1);
  REQUIRE(depth_capacity(5, 1.0) == 5);
  REQUIRE(depth_capacity(0, 0.5) == 0);
  const MixtureOfDepthsRouter<float> router({.capacity_fraction = 0.25});
  REQUIRE(router.capacity(17) == 5);
  REQUIRE(router.capacity(0) == 0);
}

TEST_CASE("MixtureOfDepths: hand-worked expert-choice and threshold plans",
          "[moe][mixture_of_depths][hand]") {
  // One sequence of 8 scores. capacity 0.5 -> k = 4: the largest are 3 (t5), then three 2s
  // (t1, t3, t6), all kept; listed ascending: 1, 3, 5, 6.
  Tensor<double> s({1, 8});
  const double v[8] = {0.5, 2, -1, 2, 0, 3, 2, -3};
  std::copy(v, v + 8, s.begin());
  {
    const MixtureOfDepthsRouter<double> router({.capacity_fraction = 0.5});
    const auto plan = router.route(s);
    REQUIRE_NOTHROW(plan.check());
    REQUIRE(plan.token_index == std::vector<std::int64_t>{1, 3, 5, 6});
    REQUIRE(plan.weight == std::vector<double>{2, 2, 3, 2});  // raw logits (Raposo)
    REQUIRE(plan.uniform());
    REQUIRE(plan.stats.fraction_kept == 0.5);
    REQUIRE(plan.stats.mean_score == Approx(5.5 / 8));
    REQUIRE(plan.stats.mean_kept_score == Approx(9.0 / 4));
    REQUIRE(plan.keep_mask() == std::vector<std::uint8_t>{0, 1, 0, 1, 0, 1, 1, 0});
  }
  {
    // capacity 0.375 -> k = 3: t5 (3), then of the tied 2s the two lowest indices t1, t3.
    const MixtureOfDepthsRouter<double> router({.capacity_fraction = 0.375});
    REQUIRE(router.route(s).token_index == std::vector<std::int64_t>{1, 3, 5});
    // capacity 0.2 -> k = ceil(1.6) = 2: t5 and t1 (the first of the tied 2s).
    const MixtureOfDepthsRouter<double> r2({.capacity_fraction = 0.2});
    REQUIRE(r2.route(s).token_index == std::vector<std::int64_t>{1, 5});
    // A tiny fraction still keeps one token: the maximum.
    const MixtureOfDepthsRouter<double> r3({.capacity_fraction = 1e-6});
    REQUIRE(r3.route(s).token_index == std::vector<std::int64_t>{5});
  }
  {
    // sigmoid weights; threshold 0.5 keeps s > 0: t0, t1, t3, t5, t6 (t4 = 0 gives exactly 0.5).
    const MixtureOfDepthsRouter<double> router(
        {.capacity_fraction = 0.25, .activation = ScoreActivation::sigmoid, .threshold = 0.5});
    const auto plan = router.route_threshold(s);
    REQUIRE(plan.token_index == std::vector<std::int64_t>{0, 1, 3, 5, 6});
    REQUIRE(plan.weight[0] == Approx(1.0 / (1.0 + std::exp(-0.5))));
    REQUIRE(plan.weight[3] == Approx(1.0 / (1.0 + std::exp(-3.0))));
    // Expert choice with sigmoid ranks exactly as with raw logits: k = 2 -> t1, t5.
    const auto ec = router.route(s);
    REQUIRE(ec.token_index == std::vector<std::int64_t>{1, 5});
    REQUIRE(ec.weight[1] == Approx(1.0 / (1.0 + std::exp(-3.0))));
  }
  {
    // Logits the float sigmoid rounds to the same value (1.0f) still rank by logit, ties to
    // the lower index: 40 and 50 both give 1.0f; k = 1 takes t2 (50), not t1.
    Tensor<float> f({1, 3});
    f[0] = 0.0f;
    f[1] = 40.0f;
    f[2] = 50.0f;
    const MixtureOfDepthsRouter<float> router(
        {.capacity_fraction = 0.3, .activation = ScoreActivation::sigmoid});
    const auto plan = router.route(f);
    REQUIRE(plan.token_index == std::vector<std::int64_t>{2});
    REQUIRE(plan.weight[0] == 1.0f);
  }
  {
    // Two sequences of equal scores (-0 == +0): the first k tokens of each are kept.
    Tensor<double> flat({2, 5});
    flat.fill(0.0);
    flat(1, 0) = -0.0;
    const MixtureOfDepthsRouter<double> router({.capacity_fraction = 0.4});
    const auto plan = router.route(flat);
    REQUIRE(plan.offsets == std::vector<std::int64_t>{0, 2, 4});
    REQUIRE(plan.token_index == std::vector<std::int64_t>{0, 1, 0, 1});
    REQUIRE(std::vector<std::int64_t>(plan.kept(1).begin(), plan.kept(1).end()) ==
            std::vector<std::int64_t>{0, 1});
    REQUIRE(plan.weights(1).size() == 2);
  }
}

TEST_CASE("MixtureOfDepths: route matches a naive double reference",
          "[moe][mixture_of_depths][property]") {
  const double fractions[] = {0.125, 0.25, 0.5, 0.3, 1.0, 0.01};
  std::uint32_t seed = 1;
  for (const std::int64_t B : {1, 3}) {
    for (const std::int64_t Tn : {0, 1, 2, 7, 16, 64, 300}) {
      for (const double f : fractions) {
        for (const auto act : {ScoreActivation::none, ScoreActivation::sigmoid}) {
          ++seed;
          INFO("B=" << B << " T=" << Tn << " f=" << f << " act=" << int(act));
          const MixtureOfDepthsConfig cfg{.capacity_fraction = f, .activation = act};
          // Continuous scores (no ties) in double and float, tie-heavy grid scores in float.
          const auto sd = test_support::random_tensor<double>({B, Tn}, seed);
          require_plan_equals(MixtureOfDepthsRouter<double>(cfg).route(sd),
                              reference_expert_choice(sd, f, act));
          const auto sf = grid_scores<float>(B, Tn, seed);
          const auto plan = MixtureOfDepthsRouter<float>(cfg).route(sf);
          require_plan_equals(plan, reference_expert_choice(sf, f, act));
          REQUIRE(plan.uniform());
          for (std::int64_t b = 0; b < B; ++b) REQUIRE(plan.num_kept(b) == depth_capacity(Tn, f));
        }
      }
    }
  }
  // lengths: padding tokens (here NaN, never read) are never kept; k per sequence from its
  // length; the plan is ragged.
  auto s = grid_scores<float>(3, 40, 9);
  const std::vector<std::int64_t> lengths{40, 0, 13};
  for (std::int64_t t = 13; t < 40; ++t) s(2, t) = std::numeric_limits<float>::quiet_NaN();
  for (std::int64_t t = 0; t < 40; ++t) s(1, t) = std::numeric_limits<float>::infinity();
  const MixtureOfDepthsRouter<float> router({.capacity_fraction = 0.25});
  const auto plan = router.route(s, lengths);
  require_plan_equals(plan, reference_expert_choice(s, 0.25, ScoreActivation::none, lengths));
  REQUIRE(plan.offsets == std::vector<std::int64_t>{0, 10, 10, 14});
  REQUIRE_FALSE(plan.uniform());
}

TEST_CASE("MixtureOfDepths: route_threshold matches a naive reference",
          "[moe][mixture_of_depths][threshold]") {
  std::uint32_t seed = 100;
  for (const std::int64_t Tn : {0, 1, 9, 128}) {
    for (const double thr : {-0.5, 0.0, 0.5, 0.8, 2.0}) {
      for (const auto act : {ScoreActivation::none, ScoreActivation::sigmoid}) {
        ++seed;
        INFO("T=" << Tn << " threshold=" << thr << " act=" << int(act));
        const MixtureOfDepthsConfig cfg{.activation = act, .threshold = thr};
        const auto sf = grid_scores<float>(4, Tn, seed);
        require_plan_equals(MixtureOfDepthsRouter<float>(cfg).route_threshold(sf),
                            reference_threshold(sf, thr, act));
        const auto sd = test_support::random_tensor<double>({2, Tn}, seed);
        const std::vector<std::int64_t> lengths{Tn, Tn / 2};
        require_plan_equals(MixtureOfDepthsRouter<double>(cfg).route_threshold(sd, lengths),
                            reference_threshold(sd, thr, act, lengths));
      }
    }
  }
  // +-inf thresholds keep nothing / everything.
  const auto s = grid_scores<double>(2, 10, 3);
  const double inf = std::numeric_limits<double>::infinity();
  REQUIRE(MixtureOfDepthsRouter<double>({.threshold = inf}).route_threshold(s).num_kept() == 0);
  REQUIRE(MixtureOfDepthsRouter<double>({.threshold = -inf}).route_threshold(s).num_kept() == 20);
}

TEST_CASE("MixtureOfDepths: the threshold router never looks at future tokens",
          "[moe][mixture_of_depths][threshold][causal]") {
  // Scores from x [1, T, d] and a router weight. For every t, replacing all tokens after t
  // (features, hence scores) must not change whether tokens 0..t are kept, nor their weights.
  // The same check on the expert-choice router must find a violation: it ranks the whole
  // sequence, so this test can tell a causal router from one that is not.
  const std::int64_t Tn = 48, d = 16;
  const auto x = test_support::random_tensor<float>({1, Tn, d}, 7);
  const auto w = test_support::random_tensor<float>({d}, 8, 0.5);
  const MixtureOfDepthsRouter<float> router(
      {.capacity_fraction = 0.25, .activation = ScoreActivation::sigmoid, .threshold = 0.5});
  const auto prefix = [&](const DepthPlan<float>& p, std::int64_t t) {
    std::vector<std::pair<std::int64_t, float>> v;
    for (std::int64_t i = 0; i < p.num_kept(); ++i)
      if (p.token_index[i] <= t) v.emplace_back(p.token_index[i], p.weight[i]);
    return v;
  };
  const auto base_thr = router.route_threshold(router.scores(x, w));
  const auto base_ec = router.route(router.scores(x, w));
  REQUIRE(base_thr.num_kept() > 0);
  REQUIRE(base_thr.num_kept() < Tn);
  bool expert_choice_changed = false;
  std::mt19937 gen(11);
  std::normal_distribution<float> nd(0.0f, 3.0f);
  for (std::int64_t t = 0; t < Tn; ++t) {
    for (int rep = 0; rep < 3; ++rep) {
      Tensor<float> x2 = x;
      for (std::int64_t u = t + 1; u < Tn; ++u)
        for (std::int64_t c = 0; c < d; ++c) x2(0, u, c) = nd(gen);
      const auto s2 = router.scores(x2, w);
      INFO("t=" << t << " rep=" << rep);
      REQUIRE(prefix(router.route_threshold(s2), t) == prefix(base_thr, t));
      if (prefix(router.route(s2), t) != prefix(base_ec, t)) expert_choice_changed = true;
    }
  }
  REQUIRE(expert_choice_changed);
}

TEST_CASE("MixtureOfDepths: scores are x . w_r + bias", "[moe][mixture_of_depths][scores]") {
  const std::int64_t B = 2, Tn = 300, d = 37;
  const auto x = test_support::random_tensor<double>({B, Tn, d}, 21);
  const auto w = test_support::random_tensor<double>({d}, 22);
  const auto s = switchyard::moe::mixture_of_depths_scores<double>(x, w, 0.25);
  const auto s_scalar =
      switchyard::moe::mixture_of_depths_scores<double, switchyard::simd::scalar>(x, w, 0.25);
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t t = 0; t < Tn; ++t) {
      double want = 0.25;
      for (std::int64_t c = 0; c < d; ++c) want += x(b, t, c) * w[c];
      REQUIRE(s(b, t) == Approx(want).epsilon(1e-12).margin(1e-12));
      REQUIRE(s_scalar(b, t) == Approx(want).epsilon(1e-12).margin(1e-12));
    }
  // Strided scores output: a column-major [B, T] view.
  Tensor<double> store({Tn, B});
  const View<double, 2> cm(store.data(), {B, Tn}, {1, B});
  switchyard::moe::mixture_of_depths_scores<double>(x, w, cm, 0.25);
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t t = 0; t < Tn; ++t) REQUIRE(store(t, b) == s(b, t));
}

TEST_CASE("MixtureOfDepths: apply with a simple block equals a naive loop",
          "[moe][mixture_of_depths][apply]") {
  const std::int64_t B = 3, Tn = 37, d = 19;
  const auto x = test_support::random_tensor<float>({B, Tn, d}, 31);
  const auto scores = test_support::random_tensor<float>({B, Tn}, 32);
  const MixtureOfDepthsRouter<float> router(
      {.capacity_fraction = 0.3, .activation = ScoreActivation::sigmoid, .threshold = 0.6});
  const auto block_values = [](const DepthPlan<float>& plan, const Tensor<float>& x_) {
    const Tensor<float> g = naive_gather(plan, x_);
    std::vector<double> y(g.begin(), g.end());
    for (auto& v : y) v = double(2.0f * float(v) + 1.0f);
    return y;
  };
  int calls = 0;
  const auto uniform_into = [&](ConstView<float, 3> in, View<float, 3> out) {
    ++calls;
    REQUIRE(in.extent(0) == B);
    REQUIRE(in.extent(2) == d);
    REQUIRE(out.shape() == in.shape());
    for (std::int64_t i = 0; i < in.numel(); ++i) out.data()[i] = 2.0f * in.data()[i] + 1.0f;
  };
  const auto uniform_returning = [&](ConstView<float, 3> in) {
    ++calls;
    Tensor<float> out({in.extent(0), in.extent(1), in.extent(2)});
    for (std::int64_t i = 0; i < in.numel(); ++i) out[i] = 2.0f * in.data()[i] + 1.0f;
    return out;
  };
  const auto ragged_into = [&](ConstView<float, 2> rows, std::span<const std::int64_t> offsets,
                               View<float, 2> out) {
    ++calls;
    REQUIRE(std::int64_t(offsets.size()) == B + 1);
    REQUIRE(offsets.back() == rows.extent(0));
    for (std::int64_t i = 0; i < rows.numel(); ++i) out.data()[i] = 2.0f * rows.data()[i] + 1.0f;
  };
  const auto ragged_returning = [&](ConstView<float, 2> rows, std::span<const std::int64_t>) {
    ++calls;
    Tensor<float> out({rows.extent(0), rows.extent(1)});
    for (std::int64_t i = 0; i < rows.numel(); ++i) out[i] = 2.0f * rows.data()[i] + 1.0f;
    return out;
  };
  for (const bool threshold : {false, true}) {
    const auto plan = threshold ? router.route_threshold(scores) : router.route(scores);
    INFO("threshold=" << threshold << " kept=" << plan.num_kept());
    REQUIRE(plan.num_kept() > 0);
    REQUIRE(plan.num_kept() < B * Tn);
    const auto want = naive_scatter(plan, x, block_values(plan, x));
    const auto check = [&](const Tensor<float>& got) {
      REQUIRE(test_support::max_rel_err(test_support::to_double(got), want, 1.0) < 1e-6);
    };
    const auto run_all = [&](auto&& block) {
      calls = 0;
      check(router.apply(plan, x, block));  // allocating out
      Tensor<float> out({B, Tn, d});
      out.fill(std::numeric_limits<float>::quiet_NaN());  // every element is written
      router.apply(plan, x, block, out.view<3>());
      check(out);
      Tensor<float> inplace = x;  // out = x itself
      router.apply(plan, inplace, block, inplace.view<3>());
      check(inplace);
      std::vector<std::byte> ws(router.workspace_bytes(plan, d));
      router.apply(plan, x, block, out.view<3>(), ws);
      check(out);
      REQUIRE(calls == 4);  // one call per apply
    };
    run_all(ragged_into);
    run_all(ragged_returning);
    if (!threshold) {
      run_all(uniform_into);
      run_all(uniform_returning);
    }
    // A scalar-arch router gives the same result up to rounding.
    const MixtureOfDepthsRouter<float, switchyard::simd::scalar> scalar_router(router.config());
    check(scalar_router.apply(plan, x, ragged_into));
  }
  // Strided x and out (token-major storage with padding between rows).
  const auto plan = router.route(scores);
  Tensor<float> xs({B, Tn, d + 5}), os({B, Tn, d + 3});
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t t = 0; t < Tn; ++t)
      for (std::int64_t c = 0; c < d; ++c) xs(b, t, c) = x(b, t, c);
  const ConstView<float, 3> xv = xs.view<3>().slice(2, 0, d);
  const View<float, 3> ov = os.view<3>().slice(2, 0, d);
  router.apply(plan, xv, uniform_into, ov);
  const auto want = naive_scatter(plan, x, block_values(plan, x));
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t t = 0; t < Tn; ++t)
      for (std::int64_t c = 0; c < d; ++c)
        REQUIRE(os(b, t, c) == Approx(want[(b * Tn + t) * d + c]).epsilon(1e-6).margin(1e-6));
}

TEST_CASE(
    "MixtureOfDepths: apply with causal attention + FFN equals the block on the gathered "
    "tokens",
    "[moe][mixture_of_depths][apply][attention]") {
  const std::int64_t B = 2, Tn = 40, d = 32, H = 4;
  const AttnFfn<float> block(d, H, 50);
  const auto x = test_support::random_tensor<float>({B, Tn, d}, 51);
  const auto w_r = test_support::random_tensor<float>({d}, 52, 1.0 / std::sqrt(double(d)));
  const MixtureOfDepthsRouter<float> router({.capacity_fraction = 0.25});
  const auto plan = router.route(router.scores(x, w_r));
  const std::int64_t k = depth_capacity(Tn, 0.25);
  REQUIRE(plan.num_kept() == B * k);

  // Capture what the block is given, and run apply.
  Tensor<float> seen({B, k, d});
  const auto uniform = [&](ConstView<float, 3> in, View<float, 3> out) {
    std::copy_n(in.data(), in.numel(), seen.begin());
    block(in, out);
  };
  const Tensor<float> got = router.apply(plan, x, uniform);

  // Explicit gather: the block sees the kept tokens of each sequence in order.
  const Tensor<float> g = naive_gather(plan, x);
  REQUIRE(std::equal(g.begin(), g.end(), seen.begin()));
  Tensor<float> y({B, k, d});
  block(ConstView<float, 3>(g.data(), {B, k, d}), y.view<3>());
  const auto want = naive_scatter(plan, x, test_support::to_double(y));
  REQUIRE(test_support::max_rel_err(test_support::to_double(got), want, 1.0) < 1e-6);

  // The same block as a ragged callable (attention per sequence) gives the same bits.
  const auto ragged = [&](ConstView<float, 2> rows, std::span<const std::int64_t> offsets,
                          View<float, 2> out) {
    for (std::size_t b = 0; b + 1 < offsets.size(); ++b) {
      const std::int64_t n = offsets[b + 1] - offsets[b];
      block(ConstView<float, 3>(rows.data() + offsets[b] * d, {1, n, d}),
            View<float, 3>(out.data() + offsets[b] * d, {1, n, d}));
    }
  };
  REQUIRE(bitwise_equal(router.apply(plan, x, ragged), got));

  // Causal inside the block: changing the last kept token of sequence 0 changes no output of
  // an earlier token (the plan is held fixed).
  Tensor<float> x2 = x;
  const std::int64_t last = plan.kept(0).back();
  for (std::int64_t c = 0; c < d; ++c) x2(0, last, c) += 1.0f;
  const Tensor<float> got2 = router.apply(plan, x2, uniform);
  for (std::int64_t t = 0; t < Tn; ++t)
    for (std::int64_t c = 0; c < d; ++c) {
      if (t < last) REQUIRE(got2(0, t, c) == got(0, t, c));
      REQUIRE(got2(1, t, c) == got(1, t, c));
    }
  REQUIRE(got2(0, last, 0) != got(0, last, 0));

  // forward = scores + route + apply.
  Tensor<float> out({B, Tn, d});
  const auto fplan = router.forward(x, w_r, uniform, out.view<3>());
  require_same_plan(fplan, plan);
  REQUIRE(bitwise_equal(out, got));
  // Threshold routing through forward with the ragged block.
  const MixtureOfDepthsRouter<float> thr_router({.threshold = 0.0});
  const auto tplan = thr_router.forward(x, w_r, ragged, out.view<3>(), DepthRouting::threshold);
  REQUIRE_FALSE(tplan.uniform());
  Tensor<float> yt({tplan.num_kept(), d});
  ragged(naive_gather(tplan, x), tplan.offsets, yt.view<2>());
  REQUIRE(test_support::max_rel_err(test_support::to_double(out),
                                    naive_scatter(tplan, x, test_support::to_double(yt)),
                                    1.0) < 1e-6);
}

TEST_CASE("MixtureOfDepths: capacity 1.0 runs every token through the block",
          "[moe][mixture_of_depths][apply]") {
  const std::int64_t B = 2, Tn = 24, d = 16;
  const AttnFfn<double> block(d, 2, 60);
  const auto x = test_support::random_tensor<double>({B, Tn, d}, 61);
  const auto scores = test_support::random_tensor<double>({B, Tn}, 62);
  const MixtureOfDepthsRouter<double> router({.capacity_fraction = 1.0});
  const auto plan = router.route(scores);
  REQUIRE(plan.num_kept() == B * Tn);
  REQUIRE(plan.stats.fraction_kept == 1.0);
  const Tensor<double> got = router.apply(plan, x, block);
  Tensor<double> y({B, Tn, d});
  block(x, y.view<3>());  // the whole sequence, no routing
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t t = 0; t < Tn; ++t)
      for (std::int64_t c = 0; c < d; ++c)
        REQUIRE(got(b, t, c) ==
                Approx(x(b, t, c) + scores(b, t) * y(b, t, c)).epsilon(1e-12).margin(1e-12));
}

TEST_CASE("MixtureOfDepths: empty plans and sequences", "[moe][mixture_of_depths][edge]") {
  const MixtureOfDepthsRouter<float> router({.capacity_fraction = 0.5, .threshold = 100.0});
  int calls = 0;
  const auto ragged = [&](ConstView<float, 2>, std::span<const std::int64_t>, View<float, 2>) {
    ++calls;
  };
  const auto x = test_support::random_tensor<float>({2, 6, 4}, 70);
  const auto scores = test_support::random_tensor<float>({2, 6}, 71);
  // Nothing above the threshold: the block is not called and out = x.
  const auto none = router.route_threshold(scores);
  REQUIRE(none.num_kept() == 0);
  REQUIRE(none.stats.mean_kept_score == 0.0);
  REQUIRE(bitwise_equal(router.apply(none, x, ragged), x));
  REQUIRE(calls == 0);
  // T = 0 and B = 0.
  const std::vector<std::pair<std::int64_t, std::int64_t>> shapes{{2, 0}, {0, 5}};
  for (const auto& shape : shapes) {
    Tensor<float> s({shape.first, shape.second});
    Tensor<float> xe({shape.first, shape.second, 4});
    const auto plan = router.route(s);
    REQUIRE_NOTHROW(plan.check());
    REQUIRE(plan.num_kept() == 0);
    REQUIRE(plan.stats.routed_tokens == 0);
    REQUIRE(plan.stats.fraction_kept == 0.0);
    REQUIRE(router.apply(plan, xe, ragged).numel() == 0);
  }
  REQUIRE(calls == 0);
  // d = 0: the block is called with zero-width rows.
  Tensor<float> x0({2, 6, 0});
  REQUIRE(router.apply(router.route(scores), x0, ragged).numel() == 0);
  REQUIRE(calls == 1);
}

TEST_CASE("MixtureOfDepths: results do not depend on the thread count",
          "[moe][mixture_of_depths][threads]") {
  const std::int64_t B = 3, Tn = 700, d = 24;
  const auto x = test_support::random_tensor<float>({B, Tn, d}, 80);
  const auto w_r = test_support::random_tensor<float>({d}, 81, 0.3);
  const AttnFfn<float> block(d, 3, 82);
  const auto ragged = [&](ConstView<float, 2> rows, std::span<const std::int64_t> offsets,
                          View<float, 2> out) {
    for (std::size_t b = 0; b + 1 < offsets.size(); ++b) {
      const std::int64_t n = offsets[b + 1] - offsets[b];
      block(ConstView<float, 3>(rows.data() + offsets[b] * d, {1, n, d}),
            View<float, 3>(out.data() + offsets[b] * d, {1, n, d}));
    }
  };
  const MixtureOfDepthsRouter<float> router(
      {.capacity_fraction = 0.3, .activation = ScoreActivation::sigmoid, .threshold = 0.55});
  struct Run {
    Tensor<float> scores, out_ec, out_thr;
    DepthPlan<float> ec, thr;
  };
  const auto run = [&](int threads) {
    switchyard::ScopedNumThreads scope(threads);
    Run r;
    r.scores = router.scores(x, w_r);
    r.ec = router.route(r.scores);
    r.thr = router.route_threshold(r.scores);
    r.out_ec = router.apply(r.ec, x, ragged);
    r.out_thr = router.apply(r.thr, x, ragged);
    return r;
  };
  const Run one = run(1);
  for (const int threads : {2, 3}) {
    INFO("threads=" << threads);
    const Run many = run(threads);
    REQUIRE(bitwise_equal(one.scores, many.scores));
    require_same_plan(one.ec, many.ec);
    require_same_plan(one.thr, many.thr);
    REQUIRE(bitwise_equal(one.out_ec, many.out_ec));
    REQUIRE(bitwise_equal(one.out_thr, many.out_thr));
  }
}

TEST_CASE("MixtureOfDepths: every documented error is raised", "[moe][mixture_of_depths][errors]") {
  using switchyard::config_error;
  using switchyard::shape_error;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  // Config.
  for (const double f : {0.0, -0.25, 1.5, nan}) {
    INFO("capacity_fraction=" << f);
    REQUIRE_THROWS_AS(MixtureOfDepthsRouter<float>({.capacity_fraction = f}), config_error);
    REQUIRE_THROWS_WITH(MixtureOfDepthsRouter<float>({.capacity_fraction = f}),
                        Contains("MixtureOfDepths") && Contains("capacity_fraction"));
  }
  REQUIRE_THROWS_AS(MixtureOfDepthsRouter<float>({.threshold = nan}), config_error);
  REQUIRE_THROWS_WITH(MixtureOfDepthsRouter<float>({.threshold = nan}),
                      Contains("MixtureOfDepths") && Contains("threshold"));
  REQUIRE_THROWS_WITH(MixtureOfDepthsRouter<float>({.activation = ScoreActivation(7)}),
                      Contains("activation"));

  const MixtureOfDepthsRouter<float> router({.capacity_fraction = 0.5});
  const std::int64_t B = 2, Tn = 8, d = 4;
  auto scores = test_support::random_tensor<float>({B, Tn}, 90);
  const auto x = test_support::random_tensor<float>({B, Tn, d}, 91);
  // Scores: NaN and inf, in either router.
  for (const float bad :
       {std::numeric_limits<float>::quiet_NaN(), -std::numeric_limits<float>::infinity()}) {
    auto s = scores;
    s(1, 3) = bad;
    REQUIRE_THROWS_AS(router.route(s), config_error);
    REQUIRE_THROWS_WITH(router.route(s), Contains("MixtureOfDepthsRouter::route") &&
                                             Contains("scores") && Contains("token 3"));
    REQUIRE_THROWS_AS(router.route_threshold(s), config_error);
    REQUIRE_THROWS_WITH(router.route_threshold(s), Contains("route_threshold"));
  }
  // lengths: wrong count (shape_error) and out of range (config_error).
  const std::vector<std::int64_t> three{1, 2, 3}, too_long{8, 9};
  REQUIRE_THROWS_AS(router.route(scores, three), shape_error);
  REQUIRE_THROWS_WITH(router.route(scores, three), Contains("lengths") && Contains("[B=2]"));
  REQUIRE_THROWS_AS(router.route_threshold(scores, too_long), config_error);
  REQUIRE_THROWS_WITH(router.route(scores, too_long), Contains("lengths[1]"));

  const auto plan = router.route(scores);
  const auto uniform = [](ConstView<float, 3> in, View<float, 3> out) {
    std::copy_n(in.data(), in.numel(), out.data());
  };
  // x and out shapes, strides and aliasing.
  const auto x_short = test_support::random_tensor<float>({B, Tn - 1, d}, 92);
  REQUIRE_THROWS_AS(router.apply(plan, x_short, uniform), shape_error);
  REQUIRE_THROWS_WITH(router.apply(plan, x_short, uniform),
                      Contains("MixtureOfDepthsRouter::apply") && Contains("'x'") &&
                          Contains("[B=2, T=7, d=4]") && Contains("T=8"));
  Tensor<float> out_wrong({B, Tn, d + 1});
  REQUIRE_THROWS_AS(router.apply(plan, x, uniform, out_wrong.view<3>()), shape_error);
  REQUIRE_THROWS_WITH(router.apply(plan, x, uniform, out_wrong.view<3>()),
                      Contains("'out'") && Contains("d=5"));
  Tensor<float> big({B, Tn + 1, d});
  const ConstView<float, 3> xa = big.view<3>().slice(1, 0, Tn);
  const View<float, 3> oa = big.view<3>().slice(1, 1, Tn + 1);  // shifted by one token
  REQUIRE_THROWS_AS(router.apply(plan, xa, uniform, oa), shape_error);
  REQUIRE_THROWS_WITH(router.apply(plan, xa, uniform, oa), Contains("memory shared"));
  Tensor<float> wide({B, Tn, 2 * d});
  const ConstView<float, 3> x_strided(wide.data(), {B, Tn, d}, {Tn * 2 * d, 2 * d, 2});
  REQUIRE_THROWS_WITH(router.apply(plan, x_strided, uniform), Contains("inner stride"));
  // Workspace too small.
  Tensor<float> out({B, Tn, d});
  std::vector<std::byte> small(router.workspace_bytes(plan, d) - 1);
  REQUIRE_THROWS_AS(router.apply(plan, x, uniform, out.view<3>(), small), shape_error);
  REQUIRE_THROWS_WITH(router.apply(plan, x, uniform, out.view<3>(), small), Contains("workspace"));
  // Block output of the wrong shape, and a uniform-only block given a ragged plan.
  const auto short_uniform = [](ConstView<float, 3> in) {
    return Tensor<float>({in.extent(0), in.extent(1), in.extent(2) - 1});
  };
  REQUIRE_THROWS_AS(router.apply(plan, x, short_uniform), shape_error);
  REQUIRE_THROWS_WITH(router.apply(plan, x, short_uniform),
                      Contains("block output") && Contains("[2, 4, 3]") && Contains("[2, 4, 4]"));
  const auto flat_ragged = [](ConstView<float, 2> rows, std::span<const std::int64_t>) {
    return Tensor<float>({rows.numel()});
  };
  REQUIRE_THROWS_AS(router.apply(plan, x, flat_ragged), shape_error);
  const std::vector<std::int64_t> ragged_lengths{8, 5};
  const auto ragged_plan = router.route(scores, ragged_lengths);
  REQUIRE_FALSE(ragged_plan.uniform());
  REQUIRE_THROWS_AS(router.apply(ragged_plan, x, uniform), config_error);
  REQUIRE_THROWS_WITH(router.apply(ragged_plan, x, uniform),
                      Contains("'block'") && Contains("ragged block"));
  // Malformed plans: apply runs plan.check() first.
  const auto broken = [&](auto edit, const char* what) {
    DepthPlan<float> p = plan;
    edit(p);
    INFO(what);
    REQUIRE_THROWS_AS(p.check(), switchyard::error);
    REQUIRE_THROWS_AS(router.apply(p, x, uniform), switchyard::error);
    REQUIRE_THROWS_WITH(router.apply(p, x, uniform),
                        Contains("DepthPlan::check") && Contains(what));
  };
  broken([](DepthPlan<float>& p) { p.offsets.pop_back(); }, "offsets");
  broken([](DepthPlan<float>& p) { p.offsets[1] = 9; }, "offsets decrease");
  broken([](DepthPlan<float>& p) { p.token_index[0] = 8; }, "outside [0, T=8)");
  broken([](DepthPlan<float>& p) { p.token_index[0] = -1; }, "outside");
  broken([](DepthPlan<float>& p) { p.token_index[1] = p.token_index[0]; }, "strictly ascending");
  broken([](DepthPlan<float>& p) { p.weight[2] = std::numeric_limits<float>::infinity(); },
         "not finite");
  broken([](DepthPlan<float>& p) { p.weight.pop_back(); }, "weight has");
  broken([](DepthPlan<float>& p) { p.batch = -1; }, "sizes");
  // The scores helper.
  const auto w_bad = test_support::random_tensor<float>({d + 1}, 93);
  REQUIRE_THROWS_AS(router.scores(x, w_bad), shape_error);
  REQUIRE_THROWS_WITH(router.scores(x, w_bad), Contains("mixture_of_depths_scores") &&
                                                   Contains("router_weight") && Contains("[d=5]") &&
                                                   Contains("[d=4]"));
  const auto w = test_support::random_tensor<float>({d}, 94);
  Tensor<float> s_wrong({B, Tn + 1});
  REQUIRE_THROWS_AS(switchyard::moe::mixture_of_depths_scores<float>(x, w, s_wrong.view<2>()),
                    shape_error);
}
