// TopKRouter: the Mixtral (renormalised) and OLMoE / shared-expert (raw) fixtures,
// a naive double-precision reference on random logits (quantised so that ties are
// exact and distinct values are well apart), masks, a hand-worked case, errors and
// thread-count independence.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "support/compare.hpp"
#include "support/fixtures.hpp"
#include "support/moe.hpp"
#include "switchyard/core/parallel_for.hpp"
#include "switchyard/core/simd/arch.hpp"
#include "switchyard/core/tensor.hpp"
#include "switchyard/moe/losses.hpp"
#include "switchyard/moe/router.hpp"
#include "switchyard/moe/router_topk.hpp"

using namespace switchyard;
using Catch::Contains;

static_assert(moe::LogitsRouter<moe::TopKRouter<float>, float>);
static_assert(moe::LogitsRouter<moe::TopKRouter<double>, double>);

namespace {
using test_support::as_double;
using test_support::close;
using test_support::grid_logits;

// ---------------------------------------------------------------- reference
struct RefPlan {
  std::vector<std::vector<int>> experts;     // per token, best first (empty if masked)
  std::vector<std::vector<double>> weights;  // matching weights
  std::vector<std::int64_t> tokens_per_expert;
  std::vector<double> prob_sum;
  std::int64_t routed = 0;
  double aux = 0, z = 0, entropy = 0;
};

// Plain loops in double: softmax, stable sort by descending probability (lower
// index first on ties), first k, optional renormalisation, Megatron aux loss.
RefPlan ref_topk(const std::vector<double>& x, int T, int E, int k, bool renorm,
                 const std::vector<std::uint8_t>& keep) {
  RefPlan r;
  r.experts.resize(T);
  r.weights.resize(T);
  r.tokens_per_expert.assign(E, 0);
  r.prob_sum.assign(E, 0.0);
  for (int t = 0; t < T; ++t) {
    if (!keep.empty() && !keep[t]) continue;
    ++r.routed;
    const auto row = test_support::ref_softmax_ranked(x.data() + t * E, E);
    const auto& p = row.p;
    const auto& order = row.order;
    r.z += row.lse * row.lse;
    r.entropy += row.entropy;
    for (int e = 0; e < E; ++e) r.prob_sum[e] += p[e];
    double ks = 0;
    for (int j = 0; j < k; ++j) ks += p[order[j]];
    for (int j = 0; j < k; ++j) {
      r.experts[t].push_back(order[j]);
      r.weights[t].push_back(renorm ? p[order[j]] / ks : p[order[j]]);
      ++r.tokens_per_expert[order[j]];
    }
  }
  if (r.routed > 0) {
    double s = 0;
    for (int e = 0; e < E; ++e) s += double(r.tokens_per_expert[e]) * r.prob_sum[e];
    r.aux = double(E) / (double(r.routed) * double(r.routed) * k) * s;
    r.z /= double(r.routed);
    r.entropy /= double(r.routed);
  }
  return r;
}

template <class T>
void check_against_ref(const moe::DispatchPlan<T>& plan, const RefPlan& ref, int T_, int E, int k,
                       double tol) {
  REQUIRE_NOTHROW(plan.check());
  REQUIRE(plan.num_tokens == T_);
  REQUIRE(plan.num_experts == E);
  REQUIRE(plan.top_k == k);
  REQUIRE(plan.capacity == -1);
  REQUIRE_FALSE(plan.capacity_clamped);
  REQUIRE(plan.dropped.empty());
  REQUIRE(plan.stats.dropped == 0);
  REQUIRE(plan.stats.tokens_without_expert == 0);
  REQUIRE(plan.stats.routed_tokens == ref.routed);
  REQUIRE(plan.nnz() == ref.routed * k);
  for (int t = 0; t < T_; ++t) {
    for (int j = 0; j < k; ++j) {
      CAPTURE(t, j);
      if (ref.experts[t].empty()) {
        REQUIRE(plan.choice_expert[t * k + j] == -1);
        REQUIRE(plan.choice_weight[t * k + j] == T(0));
      } else {
        REQUIRE(plan.choice_expert[t * k + j] == ref.experts[t][j]);
        REQUIRE(close(plan.choice_weight[t * k + j], ref.weights[t][j], tol));
      }
    }
  }
  for (int e = 0; e < E; ++e) {
    REQUIRE(plan.stats.tokens_per_expert[e] == ref.tokens_per_expert[e]);
    REQUIRE(plan.stats.kept_per_expert[e] == ref.tokens_per_expert[e]);
    REQUIRE(plan.expert_size(e) == ref.tokens_per_expert[e]);
    const double want_mean = ref.routed ? ref.prob_sum[e] / double(ref.routed) : 0.0;
    REQUIRE(close(plan.stats.mean_prob[e], want_mean, tol));
    // CSR entries: the gate equals the token-side weight of that slot.
    for (auto i = plan.expert_offsets[e]; i < plan.expert_offsets[e + 1]; ++i) {
      const auto t = plan.token_index[i], s = plan.slot[i];
      REQUIRE(ref.experts[t][s] == e);
      REQUIRE(plan.gate[i] == plan.choice_weight[t * k + s]);
    }
  }
  REQUIRE(close(plan.stats.aux_loss, ref.aux, tol));
  REQUIRE(close(plan.stats.z_loss, ref.z, tol));
  REQUIRE(close(plan.stats.entropy, ref.entropy, tol, 1e-6));
}

template <class T, class Arch = simd::default_arch>
void random_case(int T_, int E, int k, bool renorm, std::uint32_t seed, bool with_mask,
                 bool with_neg_inf = false) {
  CAPTURE(T_, E, k, renorm, seed, with_mask, with_neg_inf, Arch::name());
  auto x = grid_logits<T>(T_, E, seed);
  if (with_neg_inf) {  // experts ruled out by -inf (one logit per row stays finite)
    std::mt19937 gen(seed + 5);
    for (int t = 0; t < T_; ++t)
      for (int e = 0; e < E; ++e)
        if (e != t % E && gen() % 3 == 0) x(t, e) = -std::numeric_limits<T>::infinity();
  }
  std::vector<std::uint8_t> keep;
  if (with_mask) {
    std::mt19937 gen(seed + 99);
    keep.resize(T_);
    for (auto& v : keep) v = std::uint8_t(gen() % 4 != 0);
  }
  moe::TopKRouter<T, Arch> router({.num_experts = E, .top_k = k, .renormalize = renorm});
  const auto plan = router.route(x.template view<2>(), moe::TokenMask{keep});
  const auto ref = ref_topk(as_double(x), T_, E, k, renorm, keep);
  check_against_ref(plan, ref, T_, E, k, std::is_same_v<T, float> ? 2e-5 : 1e-11);
}

}  // namespace

// ---------------------------------------------------------------- fixtures

TEST_CASE("TopKRouter: Mixtral fixture (renormalised top-2), all losses", "[moe][topk]") {
  auto f = open_fixture("mixtral_topk_tiny.safetensors");
  const auto x = f.tensor<float>("x"), w = f.tensor<float>("router_w");
  const auto want_logits = f.tensor<float>("router_logits");
  const auto logits = moe::router_logits<float>(x.view<2>(), w.view<2>());
  REQUIRE(test_support::max_rel_err(as_double(logits), as_double(want_logits), 1e-3) < 1e-5);

  moe::TopKRouter<float> router({.num_experts = 4, .top_k = 2, .renormalize = true});
  const auto plan = router.route(want_logits.view<2>());
  REQUIRE_NOTHROW(plan.check());
  const auto idx = f.tensor<std::int64_t>("topk_idx");
  const auto weights = f.tensor<float>("topk_weights");
  const auto dispatch = f.tensor<std::int64_t>("dispatch_mask");
  const auto tpe = f.tensor<std::int64_t>("tokens_per_expert");
  std::vector<double> got_w, want_w;
  for (int t = 0; t < 16; ++t) {
    for (int j = 0; j < 2; ++j) {
      REQUIRE(plan.choice_expert[t * 2 + j] == idx(t, j));
      got_w.push_back(plan.choice_weight[t * 2 + j]);
      want_w.push_back(weights(t, j));
    }
    for (int e = 0; e < 4; ++e) {
      const bool chosen = plan.choice_expert[t * 2] == e || plan.choice_expert[t * 2 + 1] == e;
      REQUIRE(chosen == (dispatch(t, e) == 1));
    }
  }
  REQUIRE(test_support::max_rel_err(got_w, want_w, 1e-3) < 1e-5);
  for (int e = 0; e < 4; ++e) REQUIRE(plan.stats.tokens_per_expert[e] == tpe[e]);
  // Mean probabilities against the fixture's softmax.
  const auto probs = f.tensor<float>("router_probs");
  for (int e = 0; e < 4; ++e) {
    double m = 0;
    for (int t = 0; t < 16; ++t) m += probs(t, e);
    REQUIRE(close(plan.stats.mean_prob[e], m / 16, 1e-5));
  }
  const auto v = router.loss_variants(want_logits.view<2>(), plan);
  const double aux = f.scalar<float>("aux_loss_megatron");
  REQUIRE(close(plan.stats.aux_loss, aux, 1e-5));
  REQUIRE(close(v.megatron, aux, 1e-5));
  REQUIRE(close(v.hf, 2 * aux, 1e-5));
  REQUIRE(close(plan.stats.z_loss, f.scalar<float>("z_loss"), 1e-5));
  REQUIRE(close(v.z_loss, f.scalar<float>("z_loss_llmb"), 1e-5));
  REQUIRE(close(v.llmb_logspace, f.scalar<float>("aux_loss_llmb_logspace"), 1e-5));
  REQUIRE(close(v.llmb_probs, f.scalar<float>("aux_loss_llmb_probs"), 1e-5));
  REQUIRE(close(v.entropy_reg, f.scalar<float>("entropy_reg_llmb"), 1e-5));
  // The same from the free functions directly.
  std::vector<double> prob_sum(4);
  for (int e = 0; e < 4; ++e) prob_sum[e] = plan.stats.mean_prob[e] * 16;
  REQUIRE(close(moe::mean_distribution_neg_entropy(prob_sum, 16),
                f.scalar<float>("entropy_reg_llmb"), 1e-5));
  auto lm = moe::log_space_mean_prob<float>(want_logits.view<2>());
  for (auto& q : lm) q *= 16;
  REQUIRE(close(moe::fraction_load_balancing_loss(plan.stats.tokens_per_expert, lm, 16),
                f.scalar<float>("aux_loss_llmb_logspace"), 1e-5));
}

TEST_CASE("TopKRouter: OLMoE and shared-expert fixtures (raw probabilities)", "[moe][topk]") {
  for (const char* file : {"olmoe_topk_tiny.safetensors", "shared_expert_topk_tiny.safetensors"}) {
    CAPTURE(file);
    auto f = open_fixture(file);
    const auto x = f.tensor<float>("x"), w = f.tensor<float>("router_w");
    const auto want_logits = f.tensor<float>("router_logits");
    const auto logits = moe::router_logits<float>(x.view<2>(), w.view<2>());
    REQUIRE(test_support::max_rel_err(as_double(logits), as_double(want_logits), 1e-3) < 1e-5);
    moe::TopKRouter<float> router({.num_experts = 4, .top_k = 2, .renormalize = false});
    const auto plan = router.route(want_logits.view<2>());
    REQUIRE_NOTHROW(plan.check());
    const auto idx = f.tensor<std::int64_t>("topk_idx");
    const auto weights = f.tensor<float>("topk_weights");
    const auto dispatch = f.tensor<std::int64_t>("dispatch_mask");
    const auto tpe = f.tensor<std::int64_t>("tokens_per_expert");
    std::vector<double> got_w, want_w;
    for (int t = 0; t < 16; ++t) {
      for (int j = 0; j < 2; ++j) {
        REQUIRE(plan.choice_expert[t * 2 + j] == idx(t, j));
        got_w.push_back(plan.choice_weight[t * 2 + j]);
        want_w.push_back(weights(t, j));
      }
      for (int e = 0; e < 4; ++e) {
        const bool chosen = plan.choice_expert[t * 2] == e || plan.choice_expert[t * 2 + 1] == e;
        REQUIRE(chosen == (dispatch(t, e) == 1));
      }
    }
    REQUIRE(test_support::max_rel_err(got_w, want_w, 1e-3) < 1e-5);
    for (int e = 0; e < 4; ++e) REQUIRE(plan.stats.tokens_per_expert[e] == tpe[e]);
    REQUIRE(close(plan.stats.aux_loss, f.scalar<float>("aux_loss_megatron"), 1e-5));
    REQUIRE(close(plan.stats.z_loss, f.scalar<float>("z_loss"), 1e-5));
  }
}

// ---------------------------------------------------------------- reference

TEST_CASE("TopKRouter: random logits against the naive reference", "[moe][topk]") {
  std::uint32_t seed = 1;
  for (int T_ : {0, 1, 7, 64, 300}) {
    for (int E : {1, 2, 5, 16, 64}) {
      for (int k : {1, 2, 3, 8, 9, 16}) {
        if (k > E) continue;
        for (bool renorm : {true, false}) {
          random_case<float>(T_, E, k, renorm, seed++, false);
        }
      }
    }
  }
  for (int E : {3, 33}) random_case<double>(64, E, std::min(E, 3), true, seed++, false);
  random_case<float>(300, 64, 64, true, seed++, false);
}

TEST_CASE("TopKRouter: scalar arch, double, and -inf logits", "[moe][topk]") {
  std::uint32_t seed = 300;
  for (int E : {1, 5, 16, 64}) {
    for (int k : {1, 2, 8}) {
      if (k > E) continue;
      random_case<float, simd::scalar>(64, E, k, true, seed++, false);
      random_case<double, simd::scalar>(7, E, k, false, seed++, true);
      random_case<double>(64, E, k, true, seed++, false);
      random_case<float>(64, E, k, k % 2 == 0, seed++, false, true);
      random_case<float, simd::scalar>(64, E, k, true, seed++, false, true);
    }
  }
  // (-inf, 0, -inf), k = 2: expert 1 (p = 1) then expert 0 (p = 0, the lower index among
  // the ruled-out), weights (1, 0); entropy 0, not NaN.
  Tensor<float> x({1, 3});
  x(0, 0) = x(0, 2) = -std::numeric_limits<float>::infinity();
  moe::TopKRouter<float> router({.num_experts = 3, .top_k = 2});
  const auto plan = router.route(x.view<2>());
  REQUIRE_NOTHROW(plan.check());
  REQUIRE(plan.choice_expert[0] == 1);
  REQUIRE(plan.choice_expert[1] == 0);
  REQUIRE(plan.choice_weight[0] == 1.0f);
  REQUIRE(plan.choice_weight[1] == 0.0f);
  REQUIRE(plan.stats.entropy == 0.0);
  REQUIRE(plan.stats.z_loss == 0.0);
}

TEST_CASE("TopKRouter: padding mask routes nothing and stats match the subset", "[moe][topk]") {
  std::uint32_t seed = 500;
  for (int T_ : {1, 7, 300}) {
    for (int k : {1, 2, 8}) random_case<float>(T_, 16, k, k != 1, seed++, true);
  }
  // Masked plan vs the plan of the routed tokens alone.
  const int T_ = 300, E = 16, k = 2;
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
  moe::TopKRouter<float> router({.num_experts = E, .top_k = k});
  const auto full = router.route(x.view<2>(), moe::TokenMask{keep});
  const auto part = router.route(sub.view<2>());
  REQUIRE(full.stats.routed_tokens == std::int64_t(kept.size()));
  // Equal up to summation order (the sums may group tokens in blocks).
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
  }
  for (int t = 0; t < T_; ++t) {
    if (!keep[t]) REQUIRE(full.choice_expert[t * k] == -1);
  }
  // All tokens masked: a valid empty plan.
  std::vector<std::uint8_t> none(T_, 0);
  const auto empty = router.route(x.view<2>(), moe::TokenMask{none});
  REQUIRE_NOTHROW(empty.check());
  REQUIRE(empty.nnz() == 0);
  REQUIRE(empty.stats.routed_tokens == 0);
  REQUIRE(empty.stats.aux_loss == 0);
  REQUIRE(empty.stats.z_loss == 0);
  REQUIRE(empty.stats.entropy == 0);
  REQUIRE(empty.stats.tokens_without_expert == 0);
  // Masked tokens may hold NaN: they are never looked at.
  Tensor<float> y = x;
  y(1, 3) = std::numeric_limits<float>::quiet_NaN();
  REQUIRE_NOTHROW(router.route(y.view<2>(), moe::TokenMask{keep}));
}

// ---------------------------------------------------------------- by hand

TEST_CASE("TopKRouter: hand-worked case", "[moe][topk]") {
  // Token 0: logits (0, ln 2, ln 5) -> p = (1/8, 2/8, 5/8); top-2 = experts 2, 1.
  //   renormalised weights 5/7, 2/7; raw 0.625, 0.25.
  // Token 1: logits (0, 0, 0) -> p = 1/3 each; ties go to the lower index: experts 0, 1,
  //   weights 1/2, 1/2 (raw 1/3, 1/3).
  // n = (1, 2, 1); P = (1/8 + 1/3, 1/4 + 1/3, 5/8 + 1/3) = (11, 14, 23) / 24.
  // aux = E / (T^2 k) sum n_e P_e = 3 / 8 * (11 + 28 + 23) / 24 = 0.96875.
  // z = (ln(8)^2 + ln(3)^2) / 2; entropy = (H(1/8, 1/4, 5/8) + ln 3) / 2.
  Tensor<double> x({2, 3});
  x(0, 0) = 0;
  x(0, 1) = std::log(2.0);
  x(0, 2) = std::log(5.0);
  moe::TopKRouter<double> router({.num_experts = 3, .top_k = 2, .renormalize = true});
  const auto plan = router.route(x.view<2>());
  REQUIRE_NOTHROW(plan.check());
  REQUIRE(plan.choice_expert == std::vector<std::int32_t>{2, 1, 0, 1});
  REQUIRE(plan.choice_weight[0] == Approx(5.0 / 7).epsilon(1e-14));
  REQUIRE(plan.choice_weight[1] == Approx(2.0 / 7).epsilon(1e-14));
  REQUIRE(plan.choice_weight[2] == Approx(0.5).epsilon(1e-14));
  REQUIRE(plan.choice_weight[3] == Approx(0.5).epsilon(1e-14));
  REQUIRE(plan.expert_offsets == std::vector<std::int64_t>{0, 1, 3, 4});
  REQUIRE(plan.token_index == std::vector<std::int32_t>{1, 0, 1, 0});
  REQUIRE(plan.slot == std::vector<std::int32_t>{0, 1, 1, 0});
  REQUIRE(plan.gate[1] == Approx(2.0 / 7).epsilon(1e-14));
  REQUIRE(plan.stats.tokens_per_expert == std::vector<std::int64_t>{1, 2, 1});
  REQUIRE(plan.stats.mean_prob[0] == Approx(11.0 / 48).epsilon(1e-14));
  REQUIRE(plan.stats.mean_prob[2] == Approx(23.0 / 48).epsilon(1e-14));
  REQUIRE(plan.stats.aux_loss == Approx(0.96875).epsilon(1e-14));
  const double l8 = std::log(8.0), l3 = std::log(3.0);
  REQUIRE(plan.stats.z_loss == Approx((l8 * l8 + l3 * l3) / 2).epsilon(1e-14));
  const double h0 = -(0.125 * std::log(0.125) + 0.25 * std::log(0.25) + 0.625 * std::log(0.625));
  REQUIRE(plan.stats.entropy == Approx((h0 + l3) / 2).epsilon(1e-13));
  const auto v = router.loss_variants(x.view<2>(), plan);
  REQUIRE(v.hf == Approx(2 * 0.96875).epsilon(1e-14));
  REQUIRE(v.llmb_probs == Approx(0.96875 * 2 / 3).epsilon(1e-14));
  REQUIRE(v.llmb_logspace == Approx(0.96875 * 2 / 3).epsilon(1e-13));

  moe::TopKRouter<double> raw({.num_experts = 3, .top_k = 2, .renormalize = false});
  const auto p2 = raw.route(x.view<2>());
  REQUIRE(p2.choice_weight[0] == Approx(0.625).epsilon(1e-14));
  REQUIRE(p2.choice_weight[1] == Approx(0.25).epsilon(1e-14));
  REQUIRE(p2.choice_weight[2] == Approx(1.0 / 3).epsilon(1e-14));
  REQUIRE(p2.stats.aux_loss == plan.stats.aux_loss);
}

TEST_CASE("TopKRouter: T = 0 and plan reuse", "[moe][topk]") {
  moe::TopKRouter<float> router({.num_experts = 8, .top_k = 2});
  Tensor<float> none({0, 8});
  const auto plan = router.route(none.view<2>());
  REQUIRE_NOTHROW(plan.check());
  REQUIRE(plan.num_tokens == 0);
  REQUIRE(plan.nnz() == 0);
  REQUIRE(plan.stats.aux_loss == 0);
  // Reusing one plan for a big then a small call gives the small call's plan exactly.
  moe::DispatchPlan<float> reused;
  const auto big = grid_logits<float>(300, 8, 5), small = grid_logits<float>(9, 8, 6);
  router.route(big.view<2>(), reused);
  router.route(small.view<2>(), reused);
  const auto fresh = router.route(small.view<2>());
  REQUIRE(reused.choice_expert == fresh.choice_expert);
  REQUIRE(reused.choice_weight == fresh.choice_weight);
  REQUIRE(reused.token_index == fresh.token_index);
  REQUIRE(reused.stats.aux_loss == fresh.stats.aux_loss);
  REQUIRE_NOTHROW(reused.check());
}

// ---------------------------------------------------------------- errors

TEST_CASE("TopKRouter: errors", "[moe][topk]") {
  using moe::TopKRouter;
  REQUIRE_THROWS_AS(TopKRouter<float>({.num_experts = 4, .top_k = 5}), config_error);
  REQUIRE_THROWS_WITH(TopKRouter<float>({.num_experts = 4, .top_k = 5}),
                      Contains("TopKRouter") && Contains("top_k"));
  REQUIRE_THROWS_AS(TopKRouter<float>({.num_experts = 4, .top_k = 0}), config_error);
  REQUIRE_THROWS_WITH(TopKRouter<float>({.num_experts = 4, .top_k = 0}), Contains("TopKRouter"));
  REQUIRE_THROWS_AS(TopKRouter<float>({.num_experts = 0, .top_k = 1}), config_error);
  REQUIRE_THROWS_WITH(TopKRouter<float>({.num_experts = 0, .top_k = 1}),
                      Contains("TopKRouter") && Contains("num_experts"));

  TopKRouter<float> router({.num_experts = 4, .top_k = 2});
  Tensor<float> wrong({5, 3});
  REQUIRE_THROWS_AS(router.route(wrong.view<2>()), shape_error);
  REQUIRE_THROWS_WITH(router.route(wrong.view<2>()), Contains("TopKRouter") && Contains("logits"));
  Tensor<float> x({5, 4});
  std::vector<std::uint8_t> keep(4, 1);
  REQUIRE_THROWS_AS(router.route(x.view<2>(), moe::TokenMask{keep}), shape_error);
  REQUIRE_THROWS_WITH(router.route(x.view<2>(), moe::TokenMask{keep}),
                      Contains("TopKRouter") && Contains("mask"));
  x(2, 1) = std::numeric_limits<float>::quiet_NaN();
  REQUIRE_THROWS_AS(router.route(x.view<2>()), config_error);
  REQUIRE_THROWS_WITH(router.route(x.view<2>()), Contains("TopKRouter") && Contains("token 2"));
  x(2, 1) = std::numeric_limits<float>::infinity();
  REQUIRE_THROWS_AS(router.route(x.view<2>()), config_error);
  // A strided (non-unit inner stride) view is rejected.
  Tensor<float> wide({5, 8});
  ConstView<float, 2> strided(wide.data(), {5, 4}, {8, 2});
  REQUIRE_THROWS_AS(router.route(strided), shape_error);
}

// ---------------------------------------------------------------- threads

TEST_CASE("TopKRouter: 1 and 2 threads give bit-identical plans", "[moe][topk]") {
  const auto x = test_support::random_tensor<float>({4096, 64}, 11);
  moe::TopKRouter<float> router({.num_experts = 64, .top_k = 8});
  moe::DispatchPlan<float> a, b;
  {
    ScopedNumThreads one(1);
    router.route(x.view<2>(), a);
  }
  {
    ScopedNumThreads two(2);
    router.route(x.view<2>(), b);
  }
  test_support::require_same_plan(a, b);
  REQUIRE_NOTHROW(a.check());
}
