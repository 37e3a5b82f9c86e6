// GroupedTopKRouter (DeepSeek-V2/V3 gate), BiasBalancer and the sequence-wise balance loss:
// the three DeepSeek-V3 gate fixtures (plan, scores and the MoE layer output), a naive
// double-precision reference on random logits (grid logits, so equal values are exact
// ties), a hand-worked case, masks, scores_out, thread-count independence, every error,
// the bias update rule and its convergence, and the loss by hand.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "support/compare.hpp"
#include "support/fixtures.hpp"
#include "support/moe.hpp"
#include "switchyard/core/parallel_for.hpp"
#include "switchyard/core/simd/arch.hpp"
#include "switchyard/core/tensor.hpp"
#include "switchyard/moe/bias_balancer.hpp"
#include "switchyard/moe/layer.hpp"
#include "switchyard/moe/losses.hpp"
#include "switchyard/moe/router.hpp"
#include "switchyard/moe/router_grouped_topk.hpp"

using namespace switchyard;
using Catch::Contains;
using moe::ScoreFunc;

static_assert(moe::LogitsRouter<moe::GroupedTopKRouter<float>, float>);
static_assert(moe::LogitsRouter<moe::GroupedTopKRouter<double>, double>);

namespace {
using test_support::as_double;
using test_support::close;
using test_support::grid_logits;

using Config = moe::GroupedTopKRouterConfig;

// ---------------------------------------------------------------- reference

struct RefPlan {
  std::vector<std::vector<int>> experts;     // per token, best first (empty if masked)
  std::vector<std::vector<double>> weights;  // matching weights
  std::vector<std::vector<int>> groups;      // kept groups, best first (grouped configs)
  std::vector<std::vector<double>> group_scores;
  std::vector<double> scores;          // [T*E] unbiased, 0 for masked tokens
  std::vector<std::uint8_t> near_tie;  // a near (not exact) tie float may order otherwise
  std::vector<std::int64_t> tokens_per_expert;
  std::vector<double> score_sum, norm_sum;
  std::int64_t routed = 0;
  double aux = 0, z = 0, entropy = 0;
};

// A value built from inputs `key` (logits and biases): equal values with equal keys are
// exact ties in any precision; values closer than tol * (|v| + scale) with different keys
// may be ordered either way in float (rounding, or sums that agree only in exact arithmetic).
struct Keyed {
  double v;
  std::vector<double> key;
};

bool has_near_tie(std::vector<Keyed> items, double tol, double scale) {
  std::sort(items.begin(), items.end(), [](const Keyed& a, const Keyed& b) { return a.v < b.v; });
  for (std::size_t i = 0; i < items.size(); ++i) {
    for (std::size_t j = i + 1; j < items.size(); ++j) {
      if (items[j].v - items[i].v > tol * (std::abs(items[j].v) + scale)) break;
      if (items[j].key != items[i].key) return true;
    }
  }
  return false;
}

// Plain loops in double, straight from Gate.forward: scores, + bias, group scores (max, or
// sum of the top two with a bias), a stable sort of the groups, then of the allowed experts
// by descending selection score (ties to the lower index), unbiased weights.
RefPlan ref_grouped(const std::vector<double>& x, int T, const Config& c,
                    const std::vector<double>* bias, const std::vector<std::uint8_t>& keep,
                    double tie_tol) {
  const int E = int(c.num_experts), k = int(c.top_k), G = int(c.n_group), tg = int(c.topk_group);
  const int M = E / G;
  RefPlan r;
  r.experts.resize(T);
  r.weights.resize(T);
  r.groups.resize(T);
  r.group_scores.resize(T);
  r.scores.assign(std::size_t(T) * E, 0.0);
  r.near_tie.assign(T, 0);
  r.tokens_per_expert.assign(E, 0);
  r.score_sum.assign(E, 0.0);
  r.norm_sum.assign(E, 0.0);
  double bias_scale = 0;
  if (bias)
    for (double b : *bias) bias_scale = std::max(bias_scale, std::abs(b));
  for (int t = 0; t < T; ++t) {
    if (!keep.empty() && !keep[t]) continue;
    ++r.routed;
    const double* xt = x.data() + std::size_t(t) * E;
    const auto soft = test_support::ref_softmax_ranked(xt, E);
    r.z += soft.lse * soft.lse;
    r.entropy += soft.entropy;
    std::vector<double> s(E), sel(E);
    double row = 0;
    for (int e = 0; e < E; ++e) {
      s[e] = c.score_func == ScoreFunc::softmax ? soft.p[e] : 1.0 / (1.0 + std::exp(-xt[e]));
      sel[e] = s[e] + (bias ? (*bias)[e] : 0.0);
      r.scores[std::size_t(t) * E + e] = s[e];
      r.score_sum[e] += s[e];
      row += s[e];
    }
    for (int e = 0; e < E; ++e) r.norm_sum[e] += row > 0 ? s[e] / row : 0.0;
    std::vector<std::uint8_t> allowed(E, 1);
    const auto key = [&](int e) { return std::vector<double>{xt[e], bias ? (*bias)[e] : 0.0}; };
    if (G > 1) {
      std::vector<double> gs(G);
      std::vector<Keyed> keyed(G);
      for (int g = 0; g < G; ++g) {
        std::vector<int> members(M);
        std::iota(members.begin(), members.end(), g * M);
        std::stable_sort(members.begin(), members.end(),
                         [&](int a, int b) { return sel[a] > sel[b]; });
        const int used = bias ? std::min(M, 2) : 1;
        gs[g] = 0;
        std::vector<std::vector<double>> keys;
        for (int j = 0; j < used; ++j) {
          gs[g] += sel[members[j]];
          keys.push_back(key(members[j]));
        }
        std::sort(keys.begin(), keys.end());
        keyed[g].v = gs[g];
        for (const auto& kk : keys) keyed[g].key.insert(keyed[g].key.end(), kk.begin(), kk.end());
      }
      if (has_near_tie(keyed, tie_tol, bias_scale)) r.near_tie[t] = 1;
      std::vector<int> order(G);
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return gs[a] > gs[b]; });
      order.resize(tg);
      r.groups[t] = order;
      r.group_scores[t] = gs;
      std::fill(allowed.begin(), allowed.end(), 0);
      for (int g : order)
        for (int e = g * M; e < (g + 1) * M; ++e) allowed[e] = 1;
    }
    std::vector<int> cand;
    std::vector<Keyed> cand_sel;
    for (int e = 0; e < E; ++e) {
      if (allowed[e]) {
        cand.push_back(e);
        cand_sel.push_back({sel[e], key(e)});
      }
    }
    if (has_near_tie(cand_sel, tie_tol, bias_scale)) r.near_tie[t] = 1;
    std::stable_sort(cand.begin(), cand.end(), [&](int a, int b) { return sel[a] > sel[b]; });
    double sum = 0;
    for (int j = 0; j < k; ++j) sum += s[cand[j]];
    for (int j = 0; j < k; ++j) {
      const int e = cand[j];
      double w = s[e];
      if (c.norm_topk_prob) w = sum > 0 ? w / sum : 0.0;
      r.experts[t].push_back(e);
      r.weights[t].push_back(w * c.routed_scaling_factor);
      ++r.tokens_per_expert[e];
    }
  }
  if (r.routed > 0) {
    double s = 0;
    for (int e = 0; e < E; ++e) s += double(r.tokens_per_expert[e]) * r.norm_sum[e];
    r.aux = double(E) / (double(r.routed) * double(r.routed) * k) * s;
    r.z /= double(r.routed);
    r.entropy /= double(r.routed);
  }
  return r;
}

// Compares a plan (and its scores_out) with the reference; tokens with a near tie in the
// reference are left out of the index comparison (float may order them either way). Returns
// how many tokens were left out.
template <class T>
int check_against_ref(const moe::DispatchPlan<T>& plan, const Tensor<T>& scores, const RefPlan& ref,
                      int T_, const Config& c, double tol) {
  const int E = int(c.num_experts), k = int(c.top_k);
  REQUIRE_NOTHROW(plan.check());
  REQUIRE(plan.num_tokens == T_);
  REQUIRE(plan.num_experts == E);
  REQUIRE(plan.top_k == k);
  REQUIRE(plan.capacity == -1);
  REQUIRE(plan.dropped.empty());
  REQUIRE(plan.stats.tokens_without_expert == 0);
  REQUIRE(plan.stats.routed_tokens == ref.routed);
  REQUIRE(plan.nnz() == ref.routed * k);
  int skipped = 0;
  for (int t = 0; t < T_; ++t) {
    CAPTURE(t);
    for (int e = 0; e < E; ++e) {
      REQUIRE(close(scores(t, e), ref.scores[std::size_t(t) * E + e], tol, 1e-7));
    }
    if (ref.experts[t].empty()) {
      for (int j = 0; j < k; ++j) {
        REQUIRE(plan.choice_expert[t * k + j] == -1);
        REQUIRE(plan.choice_weight[t * k + j] == T(0));
      }
      continue;
    }
    if (ref.near_tie[t]) {
      ++skipped;
      continue;
    }
    for (int j = 0; j < k; ++j) {
      CAPTURE(j);
      REQUIRE(plan.choice_expert[t * k + j] == ref.experts[t][j]);
      REQUIRE(close(plan.choice_weight[t * k + j], ref.weights[t][j], tol, 1e-7));
    }
  }
  // Statistics: counts from the plan's own choices; the reference's when nothing was skipped.
  std::vector<std::int64_t> counts(E, 0);
  for (auto e : plan.choice_expert)
    if (e >= 0) ++counts[e];
  REQUIRE(plan.stats.tokens_per_expert == counts);
  REQUIRE(plan.stats.kept_per_expert == counts);
  for (int e = 0; e < E; ++e) {
    const double want = ref.routed ? ref.score_sum[e] / double(ref.routed) : 0.0;
    REQUIRE(close(plan.stats.mean_prob[e], want, tol, 1e-9));
  }
  if (skipped == 0) {
    REQUIRE(counts == ref.tokens_per_expert);
    REQUIRE(close(plan.stats.aux_loss, ref.aux, tol));
  }
  REQUIRE(close(plan.stats.z_loss, ref.z, tol));
  REQUIRE(close(plan.stats.entropy, ref.entropy, tol, 1e-6));
  return skipped;
}

struct Case {
  int E, k, G, tg;
};

template <class T, class Arch = simd::default_arch>
int random_case(int T_, const Case& cs, ScoreFunc sf, bool with_bias, bool norm, double scale,
                std::uint32_t seed, bool with_mask) {
  CAPTURE(T_, cs.E, cs.k, cs.G, cs.tg, int(sf), with_bias, norm, scale, seed, with_mask,
          Arch::name());
  const Config c{.num_experts = cs.E,
                 .top_k = cs.k,
                 .n_group = cs.G,
                 .topk_group = cs.tg,
                 .score_func = sf,
                 .norm_topk_prob = norm,
                 .routed_scaling_factor = scale};
  auto x = grid_logits<T>(T_, cs.E, seed);
  std::mt19937 gen(seed + 7);
  // Deliberate ties: some rows all equal, some with one value copied into every group.
  for (int t = 0; t < T_; t += 5) {
    if (t % 3 == 0) {
      for (int e = 0; e < cs.E; ++e) x(t, e) = T(0.5);
    } else {
      const int M = cs.E / cs.G;
      for (int g = 0; g < cs.G; ++g) x(t, g * M + int(gen() % M)) = T(3);
    }
  }
  std::vector<T> bias(cs.E);
  std::vector<double> bias_d(cs.E);
  for (int e = 0; e < cs.E; ++e) {
    bias[e] = T(double(int(gen() % 9) - 4) / 16.0);  // a grid of 1/16: many equal entries
    bias_d[e] = double(bias[e]);
  }
  std::vector<std::uint8_t> keep;
  if (with_mask) {
    keep.resize(T_);
    for (auto& v : keep) v = std::uint8_t(gen() % 4 != 0);
  }
  moe::GroupedTopKRouter<T, Arch> router(c);
  moe::DispatchPlan<T> plan;
  Tensor<T> scores({T_, cs.E});
  if (with_bias) {
    router.route(x.template view<2>(), bias, plan, moe::TokenMask{keep}, scores.template view<2>());
  } else {
    router.route(x.template view<2>(), plan, moe::TokenMask{keep}, scores.template view<2>());
  }
  const bool is_float = std::is_same_v<T, float>;
  const auto ref = ref_grouped(as_double(x), T_, c, with_bias ? &bias_d : nullptr, keep,
                               is_float ? 1e-5 : 1e-12);
  const int skipped = check_against_ref(plan, scores, ref, T_, c, is_float ? 2e-5 : 1e-11);
  // The allocating form and the form without scores_out give the same plan.
  const auto again = with_bias ? router.route(x.template view<2>(), bias, moe::TokenMask{keep})
                               : router.route(x.template view<2>(), moe::TokenMask{keep});
  test_support::require_same_plan(plan, again);
  return skipped;
}

/// |got - want| <= tol * max(|want|, 1e-2 * max|want|) elementwise.
void require_close_rel(const Tensor<float>& got, const Tensor<float>& want, double tol) {
  REQUIRE(got.numel() == want.numel());
  const auto g = test_support::to_double(got), w = test_support::to_double(want);
  const double err = test_support::max_rel_err(g, w, 1e-2 * test_support::max_abs(w));
  CAPTURE(err);
  REQUIRE(err <= tol);
}

}  // namespace

// ---------------------------------------------------------------- fixtures

TEST_CASE("GroupedTopKRouter: DeepSeek-V3 gate fixtures (plan, scores, MoE output)",
          "[moe][grouped]") {
  struct Fx {
    const char* file;
    std::int64_t topk_group;
    ScoreFunc sf;
    bool bias;
    double scale;
  };
  for (const Fx fx :
       {Fx{"deepseek_v3_gate_tiny_softmax.safetensors", 2, ScoreFunc::softmax, false, 1.0},
        Fx{"deepseek_v3_gate_tiny_softmax_tg1.safetensors", 1, ScoreFunc::softmax, false, 1.0},
        Fx{"deepseek_v3_gate_tiny_sigmoid_bias.safetensors", 2, ScoreFunc::sigmoid, true, 2.5}}) {
    CAPTURE(fx.file);
    auto f = open_fixture(fx.file);
    const auto x = f.tensor<float>("x"), gate_w = f.tensor<float>("gate_weight");
    const auto want_logits = f.tensor<float>("logits"), want_scores = f.tensor<float>("scores");
    const auto idx = f.tensor<std::int64_t>("indices");
    const auto weights = f.tensor<float>("weights");
    const auto allowed = f.tensor<std::int64_t>("expert_allowed");
    const int T_ = 16, E = 8, k = 2;
    const auto logits = moe::router_logits<float>(x.view<2>(), gate_w.view<2>());
    require_close_rel(logits, want_logits, 1e-5);

    // V3 renormalises exactly for sigmoid.
    moe::GroupedTopKRouter<float> router({.num_experts = E,
                                          .top_k = k,
                                          .n_group = 4,
                                          .topk_group = fx.topk_group,
                                          .score_func = fx.sf,
                                          .norm_topk_prob = fx.sf == ScoreFunc::sigmoid,
                                          .routed_scaling_factor = fx.scale});
    Tensor<float> bias_t({E});
    if (fx.bias) bias_t = f.tensor<float>("gate_bias");
    const std::span<const float> bias(bias_t.data(), std::size_t(E));
    for (const Tensor<float>* lg : {&want_logits, &logits}) {
      moe::DispatchPlan<float> plan;
      Tensor<float> scores({T_, E});
      if (fx.bias) {
        router.route(lg->view<2>(), bias, plan, {}, scores.view<2>());
      } else {
        router.route(lg->view<2>(), plan, {}, scores.view<2>());
      }
      REQUIRE_NOTHROW(plan.check());
      for (int t = 0; t < T_; ++t) {
        CAPTURE(t);
        for (int j = 0; j < k; ++j) {
          const int e = plan.choice_expert[t * k + j];
          REQUIRE(e == idx(t, j));
          REQUIRE(allowed(t, e) == 1);
          REQUIRE(close(plan.choice_weight[t * k + j], weights(t, j), 1e-6, 1e-6));
        }
        for (int e = 0; e < E; ++e) REQUIRE(close(scores(t, e), want_scores(t, e), 1e-6, 1e-6));
      }
      // The MoE layer: routed SwiGLU experts plus one ungated shared expert.
      const auto w1 = f.tensor<float>("w1"), w2 = f.tensor<float>("w2"), w3 = f.tensor<float>("w3");
      const auto s1 = f.tensor<float>("shared_w1"), s2 = f.tensor<float>("shared_w2"),
                 s3 = f.tensor<float>("shared_w3");
      const moe::MoELayer<float> layer(
          {.d_model = 8, .d_ff = 16, .num_experts = E, .num_shared_experts = 1});
      moe::MoELayerWeights<float> lw;
      lw.experts.w1 = w1.view<3>();
      lw.experts.w3 = w3.view<3>();
      lw.experts.w2 = w2.view<3>();
      lw.shared.w1 = ConstView<float, 3>(s1.data(), {1, 16, 8});  // [S = 1, d_ff, d]
      lw.shared.w3 = ConstView<float, 3>(s3.data(), {1, 16, 8});
      lw.shared.w2 = ConstView<float, 3>(s2.data(), {1, 8, 16});
      require_close_rel(layer.execute(plan, x.view<2>(), lw), f.tensor<float>("y"), 1e-5);
    }
    // The naive reference reproduces the fixture's group scores and groups (so the random
    // tests below check the router against a reference that matches the original).
    std::vector<double> bias_d(bias.begin(), bias.end());
    const auto ref = ref_grouped(as_double(want_logits), T_, router.config(),
                                 fx.bias ? &bias_d : nullptr, {}, 0.0);
    const auto gscores = f.tensor<float>("group_scores");
    const auto groups = f.tensor<std::int64_t>("selected_groups");
    for (int t = 0; t < T_; ++t) {
      for (int g = 0; g < 4; ++g) REQUIRE(close(ref.group_scores[t][g], gscores(t, g), 1e-6, 1e-6));
      for (int j = 0; j < fx.topk_group; ++j) REQUIRE(ref.groups[t][j] == groups(t, j));
      for (int j = 0; j < k; ++j) REQUIRE(ref.experts[t][j] == idx(t, j));
    }
  }
}

// ---------------------------------------------------------------- reference

TEST_CASE("GroupedTopKRouter: random logits against the naive reference", "[moe][grouped]") {
  std::uint32_t seed = 1;
  int skipped = 0, total = 0;
  const Case cases[] = {{8, 2, 4, 2},  {8, 2, 4, 1},   {16, 3, 4, 2},  {16, 4, 1, 1},
                        {12, 3, 3, 3}, {64, 8, 8, 4},  {64, 6, 8, 1},  {32, 5, 16, 3},
                        {40, 9, 5, 2}, {64, 12, 4, 3}, {6, 1, 6, 2},   {30, 8, 10, 10},
                        {48, 8, 2, 1}, {7, 7, 1, 1},   {256, 8, 8, 4}, {20, 2, 20, 5}};
  for (const auto& cs : cases) {
    for (ScoreFunc sf : {ScoreFunc::softmax, ScoreFunc::sigmoid}) {
      for (bool bias : {false, true}) {
        const bool norm = (seed % 2) == 0;
        const double scale = seed % 3 == 0 ? 2.5 : 1.0;
        for (int T_ : {1, 37, 300}) {
          skipped += random_case<float>(T_, cs, sf, bias, norm, scale, seed++, T_ == 300);
          total += T_;
        }
      }
    }
  }
  // Near ties (values closer than float can order reliably) are rare: almost every token is
  // compared exactly.
  CAPTURE(skipped, total);
  REQUIRE(skipped * 50 <= total);
}

TEST_CASE("GroupedTopKRouter: scalar arch, double, every chunk shape", "[moe][grouped]") {
  std::uint32_t seed = 1000;
  int skipped = 0, total = 0;
  for (const Case cs : {Case{8, 2, 4, 2}, Case{64, 8, 8, 4}, Case{36, 4, 6, 2}, Case{5, 5, 1, 1}}) {
    for (ScoreFunc sf : {ScoreFunc::softmax, ScoreFunc::sigmoid}) {
      for (bool bias : {false, true}) {
        skipped += random_case<float, simd::scalar>(300, cs, sf, bias, true, 2.0, seed++, true);
        skipped += random_case<double>(257, cs, sf, bias, false, 1.0, seed++, false);
        skipped += random_case<double, simd::scalar>(64, cs, sf, bias, true, 1.5, seed++, true);
        total += 300 + 257 + 64;
      }
    }
  }
  // Mostly the all-equal rows with a bias, whose group sums tie only in exact arithmetic.
  CAPTURE(skipped, total);
  REQUIRE(skipped * 50 <= total);
}

// ---------------------------------------------------------------- by hand

TEST_CASE("GroupedTopKRouter: hand-worked case (bias picks, weights stay unbiased)",
          "[moe][grouped]") {
  // E = 4 in G = 2 groups {0, 1}, {2, 3}; one group kept; k = 2; softmax; renormalised;
  // scale 2.
  // Token 0: logits ln(1, 2, 3, 4) -> p = (0.1, 0.2, 0.3, 0.4).
  //   No bias: group max (0.2, 0.4) -> group 1 -> experts 3, 2; weights 2 * (4/7, 3/7).
  //   Bias (0.5, 0, 0, 0): c = (0.6, 0.2, 0.3, 0.4); top-2 sums (0.8, 0.7) -> group 0 ->
  //   experts 0, 1; weights from p: 2 * (1/3, 2/3).
  // Token 1: logits all 0 -> p = 1/4 each. No bias: group maxima tie -> group 0 -> experts
  //   0, 1 (tie -> lower index), weights 2 * (1/2, 1/2). Bias: c = (0.75, 0.25, ...) -> same.
  // Statistics (no bias): n = (1, 1, 1, 1); P = column sums of p = (0.35, 0.45, 0.55, 0.65);
  //   aux = E / (k T^2) sum_e n_e P_e = 4 / 8 * 2 = 1; with bias n = (2, 2, 0, 0):
  //   aux = 0.5 * (0.7 + 0.9) = 0.8. z = (ln^2 10 + ln^2 4) / 2; entropy = (H(p0) + ln 4) / 2.
  Tensor<double> x({2, 4});
  for (int e = 0; e < 4; ++e) x(0, e) = std::log(double(e + 1));
  moe::GroupedTopKRouter<double> router({.num_experts = 4,
                                         .top_k = 2,
                                         .n_group = 2,
                                         .topk_group = 1,
                                         .score_func = ScoreFunc::softmax,
                                         .norm_topk_prob = true,
                                         .routed_scaling_factor = 2.0});
  Tensor<double> scores({2, 4});
  moe::DispatchPlan<double> plan;
  router.route(x.view<2>(), plan, {}, scores.view<2>());
  REQUIRE_NOTHROW(plan.check());
  REQUIRE(plan.choice_expert == std::vector<std::int32_t>{3, 2, 0, 1});
  REQUIRE(plan.choice_weight[0] == Approx(8.0 / 7).epsilon(1e-14));
  REQUIRE(plan.choice_weight[1] == Approx(6.0 / 7).epsilon(1e-14));
  REQUIRE(plan.choice_weight[2] == Approx(1.0).epsilon(1e-14));
  REQUIRE(plan.choice_weight[3] == Approx(1.0).epsilon(1e-14));
  for (int e = 0; e < 4; ++e) {
    REQUIRE(scores(0, e) == Approx(0.1 * (e + 1)).epsilon(1e-14));
    REQUIRE(scores(1, e) == Approx(0.25).epsilon(1e-14));
  }
  REQUIRE(plan.stats.tokens_per_expert == std::vector<std::int64_t>{1, 1, 1, 1});
  REQUIRE(plan.stats.mean_prob[3] == Approx(0.325).epsilon(1e-14));
  REQUIRE(plan.stats.aux_loss == Approx(1.0).epsilon(1e-14));
  const double l10 = std::log(10.0), l4 = std::log(4.0);
  REQUIRE(plan.stats.z_loss == Approx((l10 * l10 + l4 * l4) / 2).epsilon(1e-14));
  double h0 = 0;
  for (int e = 1; e <= 4; ++e) h0 -= 0.1 * e * std::log(0.1 * e);
  REQUIRE(plan.stats.entropy == Approx((h0 + l4) / 2).epsilon(1e-13));

  const std::vector<double> bias{0.5, 0, 0, 0};
  Tensor<double> scores_b({2, 4});
  router.route(x.view<2>(), bias, plan, {}, scores_b.view<2>());
  REQUIRE_NOTHROW(plan.check());
  REQUIRE(plan.choice_expert == std::vector<std::int32_t>{0, 1, 0, 1});
  REQUIRE(plan.choice_weight[0] == Approx(2.0 / 3).epsilon(1e-14));
  REQUIRE(plan.choice_weight[1] == Approx(4.0 / 3).epsilon(1e-14));
  REQUIRE(plan.expert_offsets == std::vector<std::int64_t>{0, 2, 4, 4, 4});
  REQUIRE(plan.stats.aux_loss == Approx(0.8).epsilon(1e-14));
  // The bias never reaches the scores or the score statistics.
  for (int e = 0; e < 4; ++e) REQUIRE(scores_b(0, e) == scores(0, e));
  REQUIRE(plan.stats.mean_prob[0] == Approx(0.175).epsilon(1e-14));

  // Sigmoid, no renormalisation: x = (0, ln 3, -ln 3, ln 3) -> s = (1/2, 3/4, 1/4, 3/4);
  // group maxima tie at 3/4 -> group 0 -> expert 1 (k = 1), weight 3/4 * 1.5.
  Tensor<double> xs({1, 4});
  xs(0, 1) = xs(0, 3) = std::log(3.0);
  xs(0, 2) = -std::log(3.0);
  moe::GroupedTopKRouter<double> sig({.num_experts = 4,
                                      .top_k = 1,
                                      .n_group = 2,
                                      .topk_group = 1,
                                      .score_func = ScoreFunc::sigmoid,
                                      .routed_scaling_factor = 1.5});
  const auto p = sig.route(xs.view<2>());
  REQUIRE(p.choice_expert == std::vector<std::int32_t>{1});
  REQUIRE(p.choice_weight[0] == Approx(1.125).epsilon(1e-14));
  // aux: s' = s / 2.25; f_1 = 4 / (1 * 1) * 1 -> 4 * 0.75 / 2.25 = 4/3.
  REQUIRE(p.stats.aux_loss == Approx(4.0 / 3).epsilon(1e-14));
  REQUIRE(p.stats.mean_prob[2] == Approx(0.25).epsilon(1e-14));
  // With a bias every group is scored by its top-2 sum: (1.25, 1.0) + bias (0, 0, 1, 0)
  // -> (1.25, 2.0) -> group 1 -> expert 2 (1.25 > 0.75), weight 1/4 * 1.5.
  const std::vector<double> b2{0, 0, 1, 0};
  const auto pb = sig.route(xs.view<2>(), b2);
  REQUIRE(pb.choice_expert == std::vector<std::int32_t>{2});
  REQUIRE(pb.choice_weight[0] == Approx(0.375).epsilon(1e-14));
}

TEST_CASE("GroupedTopKRouter: sigmoid of large and very negative logits", "[moe][grouped]") {
  // Rows whose max is above 20 or below -80 take the direct 1 / (1 + exp(-x)); the others
  // e / (e + exp(-m)) with the softmax term e. Both must match the reference.
  const int T_ = 40, E = 16;
  auto x = grid_logits<float>(T_, E, 21, 1.0);
  for (int t = 0; t < T_; ++t) {
    const float shift = t % 4 == 0 ? 25.0f : t % 4 == 1 ? -83.0f : t % 4 == 2 ? 19.0f : -78.0f;
    for (int e = 0; e < E; ++e) x(t, e) = std::min(x(t, e), 2.5f) + shift;
  }
  x(2, 5) = 40.0f;  // one huge logit in a moderate row
  const Config c{.num_experts = E,
                 .top_k = 3,
                 .n_group = 4,
                 .topk_group = 2,
                 .score_func = ScoreFunc::sigmoid,
                 .norm_topk_prob = true,
                 .routed_scaling_factor = 2.5};
  for (bool with_bias : {false, true}) {
    CAPTURE(with_bias);
    std::vector<float> bias(E);
    std::vector<double> bias_d(E);
    for (int e = 0; e < E; ++e) bias_d[e] = bias[e] = with_bias ? 0.125f * float(e % 3) : 0.0f;
    moe::GroupedTopKRouter<float> router(c);
    moe::DispatchPlan<float> plan;
    Tensor<float> scores({T_, E});
    if (with_bias) {
      router.route(x.view<2>(), bias, plan, {}, scores.view<2>());
    } else {
      router.route(x.view<2>(), plan, {}, scores.view<2>());
    }
    const auto ref = ref_grouped(as_double(x), T_, c, with_bias ? &bias_d : nullptr, {}, 1e-5);
    // Scores to 2e-5 relative, and to 1e-37 absolute for the tiny ones.
    for (int t = 0; t < T_; ++t)
      for (int e = 0; e < E; ++e)
        REQUIRE(close(scores(t, e), ref.scores[std::size_t(t) * E + e], 2e-5, 1e-37));
    int compared = 0;
    for (int t = 0; t < T_; ++t) {
      if (ref.near_tie[t]) continue;  // e.g. scores that are all 1.0f near x = 25
      ++compared;
      for (int j = 0; j < 3; ++j) {
        REQUIRE(plan.choice_expert[t * 3 + j] == ref.experts[t][j]);
        REQUIRE(close(plan.choice_weight[t * 3 + j], ref.weights[t][j], 2e-5));
      }
    }
    // With a bias of 0.125 the tiny and the near-1 scores vanish in float rounding, so only
    // the scores are compared there; without, the moderate rows are compared exactly.
    CAPTURE(compared);
    REQUIRE(compared >= (with_bias ? 0 : T_ / 4));
    REQUIRE(close(plan.stats.z_loss, ref.z, 1e-5));
    REQUIRE(close(plan.stats.entropy, ref.entropy, 1e-5, 1e-6));
  }
  // Every chosen sigmoid score underflows to 0: weights 0 (not the reference's NaN).
  Tensor<float> low({1, E});
  for (int e = 0; e < E; ++e) low(0, e) = -200.0f - float(e);
  const auto p = moe::GroupedTopKRouter<float>(c).route(low.view<2>());
  REQUIRE_NOTHROW(p.check());
  REQUIRE(p.choice_expert == std::vector<std::int32_t>{0, 1, 2});
  for (int j = 0; j < 3; ++j) REQUIRE(p.choice_weight[j] == 0.0f);
}

// ---------------------------------------------------------------- masks, scores_out

TEST_CASE("GroupedTopKRouter: padding mask and scores_out", "[moe][grouped]") {
  const int T_ = 600, E = 64, k = 6;
  const auto x = grid_logits<float>(T_, E, 77);
  std::vector<std::uint8_t> keep(T_);
  std::vector<int> kept;
  for (int t = 0; t < T_; ++t) {
    keep[t] = std::uint8_t(t % 3 != 1);
    if (keep[t]) kept.push_back(t);
  }
  Tensor<float> sub({std::int64_t(kept.size()), E});
  for (std::size_t i = 0; i < kept.size(); ++i)
    for (int e = 0; e < E; ++e) sub(i, e) = x(kept[i], e);
  std::vector<float> bias(E);
  for (int e = 0; e < E; ++e) bias[e] = 0.01f * float(e % 7);
  moe::GroupedTopKRouter<float> router({.num_experts = E,
                                        .top_k = k,
                                        .n_group = 8,
                                        .topk_group = 3,
                                        .score_func = ScoreFunc::sigmoid,
                                        .norm_topk_prob = true,
                                        .routed_scaling_factor = 2.5});
  Tensor<float> scores({T_, E}), sub_scores({std::int64_t(kept.size()), E});
  scores.fill(7.0f);  // masked rows must come back as 0
  moe::DispatchPlan<float> full, part;
  router.route(x.view<2>(), bias, full, moe::TokenMask{keep}, scores.view<2>());
  router.route(sub.view<2>(), bias, part, {}, sub_scores.view<2>());
  REQUIRE_NOTHROW(full.check());
  REQUIRE(full.stats.routed_tokens == std::int64_t(kept.size()));
  REQUIRE(full.stats.tokens_per_expert == part.stats.tokens_per_expert);
  for (int e = 0; e < E; ++e)
    REQUIRE(close(full.stats.mean_prob[e], part.stats.mean_prob[e], 1e-6));
  REQUIRE(close(full.stats.aux_loss, part.stats.aux_loss, 1e-6));
  REQUIRE(close(full.stats.z_loss, part.stats.z_loss, 1e-6));
  REQUIRE(close(full.stats.entropy, part.stats.entropy, 1e-6));
  for (std::size_t i = 0; i < kept.size(); ++i) {
    for (int j = 0; j < k; ++j) {
      REQUIRE(full.choice_expert[kept[i] * k + j] == part.choice_expert[i * k + j]);
      REQUIRE(full.choice_weight[kept[i] * k + j] == part.choice_weight[i * k + j]);
    }
    for (int e = 0; e < E; ++e) REQUIRE(scores(kept[i], e) == sub_scores(i, e));
  }
  for (int t = 0; t < T_; ++t) {
    if (keep[t]) continue;
    REQUIRE(full.choice_expert[t * k] == -1);
    for (int e = 0; e < E; ++e) REQUIRE(scores(t, e) == 0.0f);
  }
  // The router's aux_loss is the sequence-wise loss with the routed batch as one sequence.
  REQUIRE(close(moe::sequence_wise_balance_loss<float>(full.expert_indices(), scores.view<2>(), T_,
                                                       moe::TokenMask{keep}),
                full.stats.aux_loss, 1e-6));
  // Masked tokens may hold NaN: they are never looked at.
  Tensor<float> y = x;
  y(1, 3) = std::numeric_limits<float>::quiet_NaN();
  REQUIRE_NOTHROW(router.route(y.view<2>(), bias, moe::TokenMask{keep}));
  // All tokens masked, and T = 0: valid empty plans with zero losses.
  std::vector<std::uint8_t> none(T_, 0);
  const auto empty = router.route(x.view<2>(), bias, moe::TokenMask{none});
  REQUIRE_NOTHROW(empty.check());
  REQUIRE(empty.nnz() == 0);
  REQUIRE(empty.stats.routed_tokens == 0);
  REQUIRE(empty.stats.aux_loss == 0);
  REQUIRE(empty.stats.z_loss == 0);
  Tensor<float> zero({0, E});
  const auto p0 = router.route(zero.view<2>());
  REQUIRE_NOTHROW(p0.check());
  REQUIRE(p0.num_tokens == 0);
  // Reusing one plan for a big then a small call gives the small call's plan exactly.
  moe::DispatchPlan<float> reused;
  router.route(x.view<2>(), bias, reused);
  router.route(sub.view<2>().slice(0, 0, 9), bias, reused);
  test_support::require_same_plan(reused, router.route(sub.view<2>().slice(0, 0, 9), bias));
}

// ---------------------------------------------------------------- errors

TEST_CASE("GroupedTopKRouter: errors", "[moe][grouped]") {
  using R = moe::GroupedTopKRouter<float>;
  const auto bad_config = [](const Config& c, const char* field) {
    CAPTURE(field);
    REQUIRE_THROWS_AS(R(c), config_error);
    REQUIRE_THROWS_WITH(R(c), Contains("GroupedTopKRouter") && Contains(field));
  };
  bad_config({.num_experts = 0, .top_k = 1}, "num_experts");
  bad_config({.num_experts = 8, .top_k = 0}, "top_k");
  bad_config({.num_experts = 8, .top_k = 2, .n_group = 0}, "n_group");
  bad_config({.num_experts = 8, .top_k = 2, .n_group = 3}, "n_group");
  bad_config({.num_experts = 8, .top_k = 2, .n_group = 16}, "n_group");
  bad_config({.num_experts = 8, .top_k = 2, .n_group = 4, .topk_group = 0}, "topk_group");
  bad_config({.num_experts = 8, .top_k = 2, .n_group = 4, .topk_group = 5}, "topk_group");
  // 3 experts asked from one kept group of 2.
  bad_config({.num_experts = 8, .top_k = 3, .n_group = 4, .topk_group = 1}, "top_k");
  REQUIRE_THROWS_WITH(R({.num_experts = 8, .top_k = 3, .n_group = 4, .topk_group = 1}),
                      Contains("= 2"));
  bad_config({.num_experts = 8, .top_k = 9}, "top_k");
  bad_config({.num_experts = 8, .top_k = 2, .routed_scaling_factor = 0}, "routed_scaling_factor");
  bad_config({.num_experts = 8, .top_k = 2, .routed_scaling_factor = -1}, "routed_scaling_factor");
  bad_config({.num_experts = 8,
              .top_k = 2,
              .routed_scaling_factor = std::numeric_limits<double>::quiet_NaN()},
             "routed_scaling_factor");
  bad_config({.num_experts = 8,
              .top_k = 2,
              .routed_scaling_factor = std::numeric_limits<double>::infinity()},
             "routed_scaling_factor");
  bad_config({.num_experts = 8, .top_k = 2, .score_func = static_cast<ScoreFunc>(7)}, "score_func");
  REQUIRE_NOTHROW(R({.num_experts = 8, .top_k = 4, .n_group = 4, .topk_group = 2}));

  R router({.num_experts = 8, .top_k = 2, .n_group = 4, .topk_group = 2});
  Tensor<float> x({5, 8});
  std::vector<float> bias(8, 0.0f);
  const auto shape_err = [](auto&& call, const char* arg) {
    CAPTURE(arg);
    REQUIRE_THROWS_AS(call(), shape_error);
    REQUIRE_THROWS_WITH(call(), Contains("GroupedTopKRouter") && Contains(arg));
  };
  Tensor<float> wrong({5, 7});
  shape_err([&] { return router.route(wrong.view<2>()); }, "logits");
  Tensor<float> wide({5, 16});
  const ConstView<float, 2> strided(wide.data(), {5, 8}, {16, 2});
  shape_err([&] { return router.route(strided); }, "logits");
  std::vector<std::uint8_t> keep(4, 1);
  shape_err([&] { return router.route(x.view<2>(), moe::TokenMask{keep}); }, "mask");
  std::vector<float> short_bias(7, 0.0f);
  shape_err([&] { return router.route(x.view<2>(), short_bias); }, "bias");
  REQUIRE_THROWS_WITH(router.route(x.view<2>(), short_bias), Contains("[E=7]"));
  moe::DispatchPlan<float> plan;
  Tensor<float> out_wrong({5, 4});
  shape_err([&] { router.route(x.view<2>(), plan, {}, out_wrong.view<2>()); }, "scores_out");
  const View<float, 2> out_strided(wide.data(), {5, 8}, {16, 2});
  shape_err([&] { router.route(x.view<2>(), plan, {}, out_strided); }, "scores_out");
  shape_err([&] { router.route(x.view<2>(), plan, {}, x.view<2>()); }, "scores_out");
  REQUIRE_THROWS_WITH(router.route(x.view<2>(), plan, {}, x.view<2>()), Contains("logits"));
  // A bias of NaN or inf.
  for (float v :
       {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    bias[3] = v;
    REQUIRE_THROWS_AS(router.route(x.view<2>(), bias), config_error);
    REQUIRE_THROWS_WITH(router.route(x.view<2>(), bias),
                        Contains("GroupedTopKRouter") && Contains("bias") && Contains("entry 3"));
  }
  bias[3] = 0;
  // NaN / +inf / all -inf logits of a routed token.
  x(2, 1) = std::numeric_limits<float>::quiet_NaN();
  REQUIRE_THROWS_AS(router.route(x.view<2>()), config_error);
  REQUIRE_THROWS_WITH(router.route(x.view<2>(), bias),
                      Contains("GroupedTopKRouter") && Contains("token 2"));
  x(2, 1) = std::numeric_limits<float>::infinity();
  REQUIRE_THROWS_AS(router.route(x.view<2>()), config_error);
  x(2, 1) = 0;
  for (int e = 0; e < 8; ++e) x(4, e) = -std::numeric_limits<float>::infinity();
  REQUIRE_THROWS_WITH(router.route(x.view<2>()), Contains("token 4"));
  moe::GroupedTopKRouter<float> sig({.num_experts = 8,
                                     .top_k = 2,
                                     .n_group = 4,
                                     .topk_group = 2,
                                     .score_func = ScoreFunc::sigmoid});
  REQUIRE_THROWS_WITH(sig.route(x.view<2>()), Contains("GroupedTopKRouter") && Contains("token 4"));
  // A single -inf logit is fine: the expert's score is 0.
  x(4, 0) = 1;
  REQUIRE_NOTHROW(sig.route(x.view<2>()).check());
}

// ---------------------------------------------------------------- threads

TEST_CASE("GroupedTopKRouter: 1 and 2 threads give bit-identical plans", "[moe][grouped]") {
  // DeepSeek-V3's shape; T not a multiple of the token chunk.
  const int T_ = 4096 + 77, E = 256;
  const auto x = test_support::random_tensor<float>({T_, E}, 11);
  std::vector<float> bias(E);
  std::mt19937 gen(3);
  std::normal_distribution<float> nd(0.0f, 0.01f);
  for (auto& b : bias) b = nd(gen);
  std::vector<std::uint8_t> keep(T_);
  for (int t = 0; t < T_; ++t) keep[t] = std::uint8_t(t % 11 != 3);
  for (ScoreFunc sf : {ScoreFunc::sigmoid, ScoreFunc::softmax}) {
    moe::GroupedTopKRouter<float> router({.num_experts = E,
                                          .top_k = 8,
                                          .n_group = 8,
                                          .topk_group = 4,
                                          .score_func = sf,
                                          .norm_topk_prob = true,
                                          .routed_scaling_factor = 2.5});
    moe::DispatchPlan<float> a, b;
    Tensor<float> sa({T_, E}), sb({T_, E});
    {
      ScopedNumThreads one(1);
      router.route(x.view<2>(), bias, a, moe::TokenMask{keep}, sa.view<2>());
    }
    {
      ScopedNumThreads two(2);
      router.route(x.view<2>(), bias, b, moe::TokenMask{keep}, sb.view<2>());
    }
    test_support::require_same_plan(a, b);
    REQUIRE(std::equal(sa.begin(), sa.end(), sb.begin()));
    REQUIRE_NOTHROW(a.check());
  }
}

// ---------------------------------------------------------------- BiasBalancer

TEST_CASE("BiasBalancer: the sign rule by hand, and errors", "[moe][grouped][balancer]") {
  moe::BiasBalancer<float> bb({.num_experts = 4, .update_rate = 0.5});
  auto st = bb.initial_state();
  REQUIRE(st.bias == std::vector<float>{0, 0, 0, 0});
  // Loads (3, 1, 2, 2): mean 2 -> signs (-, +, 0, 0).
  bb.update(st, std::vector<std::int64_t>{3, 1, 2, 2});
  REQUIRE(st.bias == std::vector<float>{-0.5f, 0.5f, 0, 0});
  // Balanced (and empty) loads change nothing.
  bb.update(st, std::vector<std::int64_t>{5, 5, 5, 5});
  bb.update(st, std::vector<std::int64_t>{0, 0, 0, 0});
  REQUIRE(st.bias == std::vector<float>{-0.5f, 0.5f, 0, 0});
  // Mean 7/4 is not an integer: 2 is above it, 1 below.
  bb.update(st, std::vector<std::int64_t>{2, 2, 2, 1});
  REQUIRE(st.bias == std::vector<float>{-1.0f, 0.0f, -0.5f, 0.5f});
  // The default rate is DeepSeek-V3's 0.001; 0 freezes the bias.
  REQUIRE(moe::BiasBalancer<double>({.num_experts = 2}).config().update_rate == 0.001);
  moe::BiasBalancer<double> frozen({.num_experts = 2, .update_rate = 0});
  auto fs = frozen.initial_state();
  frozen.update(fs, std::vector<std::int64_t>{9, 1});
  REQUIRE(fs.bias == std::vector<double>{0, 0});

  using B = moe::BiasBalancer<float>;
  REQUIRE_THROWS_AS(B({.num_experts = 0}), config_error);
  REQUIRE_THROWS_WITH(B({.num_experts = 0}), Contains("BiasBalancer") && Contains("num_experts"));
  for (double g :
       {std::numeric_limits<double>::quiet_NaN(), -1e-3, std::numeric_limits<double>::infinity()}) {
    REQUIRE_THROWS_AS(B({.num_experts = 4, .update_rate = g}), config_error);
    REQUIRE_THROWS_WITH(B({.num_experts = 4, .update_rate = g}),
                        Contains("BiasBalancer") && Contains("update_rate"));
  }
  REQUIRE_THROWS_AS(bb.update(st, std::vector<std::int64_t>{1, 2, 3}), shape_error);
  REQUIRE_THROWS_WITH(bb.update(st, std::vector<std::int64_t>{1, 2, 3}),
                      Contains("BiasBalancer") && Contains("tokens_per_expert"));
  moe::BiasBalancerState<float> short_state{{0.0f, 0.0f}};
  REQUIRE_THROWS_AS(bb.update(short_state, std::vector<std::int64_t>{1, 2, 3, 4}), shape_error);
  REQUIRE_THROWS_WITH(bb.update(short_state, std::vector<std::int64_t>{1, 2, 3, 4}),
                      Contains("BiasBalancer") && Contains("bias"));
  REQUIRE_THROWS_AS(bb.update(st, std::vector<std::int64_t>{1, -2, 3, 4}), config_error);
  REQUIRE_THROWS_WITH(bb.update(st, std::vector<std::int64_t>{1, -2, 3, 4}),
                      Contains("BiasBalancer") && Contains("tokens_per_expert"));
}

TEST_CASE("BiasBalancer: route + update drives skewed loads toward uniform",
          "[moe][grouped][balancer]") {
  // Logits with a strong per-expert skew: without balancing a few experts take most tokens.
  const int T_ = 1024, E = 16, k = 2;
  auto x = test_support::random_tensor<float>({T_, E}, 5);
  for (int t = 0; t < T_; ++t)
    for (int e = 0; e < E; ++e) x(t, e) += 2.0f * float(e) / E;
  moe::GroupedTopKRouter<float> router({.num_experts = E,
                                        .top_k = k,
                                        .n_group = 4,
                                        .topk_group = 2,
                                        .score_func = ScoreFunc::sigmoid,
                                        .norm_topk_prob = true});
  moe::BiasBalancer<float> balancer({.num_experts = E, .update_rate = 1e-2});
  auto state = balancer.initial_state();
  const double mean = double(T_) * k / E;
  const auto imbalance = [&](const moe::DispatchPlan<float>& p) {
    const auto& n = p.stats.tokens_per_expert;
    return double(*std::max_element(n.begin(), n.end())) / mean;
  };
  moe::DispatchPlan<float> plan;
  router.route(x.view<2>(), state.bias, plan);
  const double before = imbalance(plan), before_aux = plan.stats.aux_loss;
  for (int step = 0; step < 300; ++step) {
    router.route(x.view<2>(), state.bias, plan);
    balancer.update(state, plan.stats.tokens_per_expert);
  }
  router.route(x.view<2>(), state.bias, plan);
  const double after = imbalance(plan);
  CAPTURE(before, after, before_aux, plan.stats.aux_loss);
  REQUIRE(before > 2.0);
  REQUIRE(after < 1.25);
  REQUIRE(plan.stats.aux_loss < before_aux);
  // Every expert is used and the most-skewed expert was pushed down.
  for (auto n : plan.stats.tokens_per_expert) REQUIRE(n > 0);
  REQUIRE(state.bias[E - 1] < 0);
  REQUIRE(state.bias[0] > 0);
}

// ---------------------------------------------------------------- sequence-wise loss

TEST_CASE("sequence_wise_balance_loss: hand-worked values and errors", "[moe][grouped][losses]") {
  // T = 4, two sequences of 2, E = 2, K = 1.
  // Seq 0: s' = (0.75, 0.25), (0.25, 0.75); both choose 0 -> f = 2/2 * (2, 0) = (2, 0),
  //   P = (0.5, 0.5) -> L = 1.
  // Seq 1: s' = (0.5, 0.5), (0.75, 0.25); both choose 0 -> f = (2, 0), P = (0.625, 0.375)
  //   -> L = 1.25. Mean: 1.125.
  Tensor<float> s({4, 2});
  const float v[] = {0.6f, 0.2f, 0.1f, 0.3f, 1.0f, 1.0f, 3.0f, 1.0f};
  std::copy(v, v + 8, s.begin());
  Tensor<std::int32_t> idx({4, 1});
  idx.fill(0);
  REQUIRE(moe::sequence_wise_balance_loss<float>(idx.view<2>(), s.view<2>(), 2) ==
          Approx(1.125).epsilon(1e-6));
  // One sequence of 4: counts (4, 0), f = 2/4 * (4, 0) = (2, 0); P_0 = (0.75 + 0.25 + 0.5 +
  // 0.75) / 4 = 0.5625 -> 1.125 as well; a -1 (unused) entry is not counted: f_0 = 1.5.
  REQUIRE(moe::sequence_wise_balance_loss<float>(idx.view<2>(), s.view<2>(), 4) ==
          Approx(1.125).epsilon(1e-6));
  idx(3, 0) = -1;
  REQUIRE(moe::sequence_wise_balance_loss<float>(idx.view<2>(), s.view<2>(), 4) ==
          Approx(1.5 * 0.5625).epsilon(1e-6));
  idx(3, 0) = 0;
  // Mask token 3: seq 1 has T_s = 1: f = 2/1 * (1, 0), P = (0.5, 0.5) -> 1; mean 1.
  std::vector<std::uint8_t> keep{1, 1, 1, 0};
  REQUIRE(moe::sequence_wise_balance_loss<float>(
              idx.view<2>(), s.view<2>(), 2, moe::TokenMask{keep}) == Approx(1.0).epsilon(1e-6));
  // A sequence with no routed token is left out of the mean.
  keep = {1, 1, 0, 0};
  REQUIRE(moe::sequence_wise_balance_loss<float>(
              idx.view<2>(), s.view<2>(), 2, moe::TokenMask{keep}) == Approx(1.0).epsilon(1e-6));
  keep = {0, 0, 0, 0};
  REQUIRE(moe::sequence_wise_balance_loss<float>(idx.view<2>(), s.view<2>(), 2,
                                                 moe::TokenMask{keep}) == 0.0);
  // Per sequence = the router's aux_loss of that sequence alone (seq_len = T: one sequence).
  const int T_ = 96, E = 16, S = 32;
  const auto x = grid_logits<float>(T_, E, 9);
  moe::GroupedTopKRouter<float> router({.num_experts = E,
                                        .top_k = 3,
                                        .n_group = 4,
                                        .topk_group = 2,
                                        .score_func = ScoreFunc::sigmoid,
                                        .norm_topk_prob = true});
  moe::DispatchPlan<float> plan;
  Tensor<float> scores({T_, E});
  router.route(x.view<2>(), plan, {}, scores.view<2>());
  double mean_aux = 0;
  for (int b = 0; b < T_ / S; ++b)
    mean_aux += router.route(x.view<2>().slice(0, b * S, (b + 1) * S)).stats.aux_loss / (T_ / S);
  REQUIRE(close(moe::sequence_wise_balance_loss<float>(plan.expert_indices(), scores.view<2>(), S),
                mean_aux, 1e-6));
  REQUIRE(close(moe::sequence_wise_balance_loss<float>(plan.expert_indices(), scores.view<2>(), T_),
                plan.stats.aux_loss, 1e-6));

  using moe::sequence_wise_balance_loss;
  REQUIRE_THROWS_AS(sequence_wise_balance_loss<float>(idx.view<2>(), s.view<2>(), 0), config_error);
  REQUIRE_THROWS_WITH(sequence_wise_balance_loss<float>(idx.view<2>(), s.view<2>(), 3),
                      Contains("sequence_wise_balance_loss") && Contains("seq_len"));
  idx(1, 0) = 2;
  REQUIRE_THROWS_AS(sequence_wise_balance_loss<float>(idx.view<2>(), s.view<2>(), 2), config_error);
  REQUIRE_THROWS_WITH(sequence_wise_balance_loss<float>(idx.view<2>(), s.view<2>(), 2),
                      Contains("expert_indices"));
  Tensor<std::int32_t> idx3({3, 1});
  idx3.fill(0);
  REQUIRE_THROWS_AS(sequence_wise_balance_loss<float>(idx3.view<2>(), s.view<2>(), 1), shape_error);
  REQUIRE_THROWS_WITH(sequence_wise_balance_loss<float>(idx3.view<2>(), s.view<2>(), 1),
                      Contains("expert_indices"));
  std::vector<std::uint8_t> short_keep{1, 1};
  idx(1, 0) = 0;
  REQUIRE_THROWS_AS(
      sequence_wise_balance_loss<float>(idx.view<2>(), s.view<2>(), 2, moe::TokenMask{short_keep}),
      shape_error);
}
