// Router outputs shared by every router (scores buffer, kept flags, dropped gates, one
// meaning of aux_loss, capacity as a number) and the null-expert router (AdaMoE), each
// against naive double-precision references or values worked out by hand.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

#include "support/compare.hpp"
#include "support/moe.hpp"
#include "switchyard/core/parallel_for.hpp"
#include "switchyard/core/tensor.hpp"
#include "switchyard/moe/plan_json.hpp"
#include "switchyard/moe/router_capacity.hpp"
#include "switchyard/moe/router_expert_choice.hpp"
#include "switchyard/moe/router_gshard.hpp"
#include "switchyard/moe/router_noisy_topk.hpp"
#include "switchyard/moe/router_null_experts.hpp"
#include "switchyard/moe/router_relu.hpp"
#include "switchyard/moe/router_top_p.hpp"
#include "switchyard/moe/router_topk.hpp"

using namespace switchyard;
using namespace switchyard::moe;
using Catch::Contains;
using test_support::grid_logits;
using test_support::ref_softmax_ranked;

static_assert(LogitsRouter<NullExpertRouter<float>, float>);

namespace {

std::vector<std::uint8_t> every_third_masked(int T) {
  std::vector<std::uint8_t> keep(static_cast<std::size_t>(T), 1);
  for (int t = 0; t < T; t += 3) keep[static_cast<std::size_t>(t)] = 0;
  return keep;
}

/// scores must be softmax (or relu) of each routed row in double, 0 for masked rows.
template <class Router>
void check_scores(const Router& router, const Tensor<float>& logits, bool relu,
                  const std::vector<std::uint8_t>& keep) {
  const std::int64_t T = logits.extent(0), E = logits.extent(1);
  Tensor<float> scores({T, E});
  std::fill(scores.begin(), scores.end(), 7.0f);  // must all be overwritten
  DispatchPlan<float> plan, plain;
  const TokenMask mask{keep};
  router.route(logits, plan, mask, scores.view<2>());
  router.route(logits, plain, mask);
  test_support::require_same_plan(plan, plain);  // asking for scores changes nothing
  for (std::int64_t t = 0; t < T; ++t) {
    std::vector<double> x(static_cast<std::size_t>(E));
    for (std::int64_t e = 0; e < E; ++e) x[std::size_t(e)] = logits(t, e);
    const auto ref = ref_softmax_ranked(x.data(), int(E));
    for (std::int64_t e = 0; e < E; ++e) {
      const double want = !mask.routed(t) ? 0.0
                          : relu          ? std::max(x[std::size_t(e)], 0.0)
                                          : ref.p[std::size_t(e)];
      REQUIRE(std::abs(double(scores(t, e)) - want) <= 2e-7 * std::max(1.0, want));
    }
  }
}

// ---------------------------------------------------------------- null experts reference
struct RefNull {
  std::vector<std::vector<int>> experts;  // real experts per token, best first
  std::vector<std::vector<double>> weights;
  std::vector<std::int64_t> n;  // [E + N] picks per router output
  std::vector<double> P;        // [E + N] probability sums
  std::int64_t routed = 0, without = 0;
  double aux = 0, z = 0;
};

RefNull ref_null(const Tensor<float>& logits, int E, int N, int k, bool renorm,
                 const std::vector<std::uint8_t>& keep) {
  const int T = int(logits.extent(0)), W = E + N;
  RefNull r;
  r.experts.resize(std::size_t(T));
  r.weights.resize(std::size_t(T));
  r.n.assign(std::size_t(W), 0);
  r.P.assign(std::size_t(W), 0.0);
  for (int t = 0; t < T; ++t) {
    if (!keep.empty() && !keep[std::size_t(t)]) continue;
    ++r.routed;
    std::vector<double> x(static_cast<std::size_t>(W));
    for (int i = 0; i < W; ++i) x[static_cast<std::size_t>(i)] = logits(t, i);
    const auto s = ref_softmax_ranked(x.data(), W);
    r.z += s.lse * s.lse;
    for (int i = 0; i < W; ++i) r.P[std::size_t(i)] += s.p[std::size_t(i)];
    double sum = 0;
    for (int j = 0; j < k; ++j) sum += s.p[std::size_t(s.order[std::size_t(j)])];
    for (int j = 0; j < k; ++j) {
      const int i = s.order[std::size_t(j)];
      ++r.n[std::size_t(i)];
      if (i >= E) continue;
      r.experts[std::size_t(t)].push_back(i);
      r.weights[std::size_t(t)].push_back(renorm ? s.p[std::size_t(i)] / sum : s.p[std::size_t(i)]);
    }
    r.without += r.experts[std::size_t(t)].empty();
  }
  if (r.routed > 0) {
    double acc = 0;
    for (int e = 0; e < E; ++e) acc += double(r.n[std::size_t(e)]) * r.P[std::size_t(e)];
    if (N > 0) {
      double nbar = 0, pbar = 0;
      for (int i = E; i < W; ++i) nbar += double(r.n[std::size_t(i)]), pbar += r.P[std::size_t(i)];
      acc += N * (nbar / N) * (pbar / N);
    }
    r.aux = double(W) / (double(r.routed) * double(r.routed) * k) * acc;
    r.z /= double(r.routed);
  }
  return r;
}

}  // namespace

TEST_CASE("null experts: naive reference, masks, both gate rules", "[moe][router][null]") {
  for (const int E : {1, 4, 8}) {
    for (const int N : {0, 1, 3}) {
      for (const int k : {1, 2, 4}) {
        if (k > E + N) continue;
        for (const bool renorm : {true, false}) {
          const int T = 37;
          const auto logits = grid_logits<float>(T, E + N, std::uint32_t(E * 100 + N * 10 + k));
          const auto keep = every_third_masked(T);
          const NullExpertRouter<float> router(
              {.num_experts = E, .null_experts = N, .top_k = k, .renormalize = renorm});
          DispatchPlan<float> plan;
          router.route(logits, plan, TokenMask{keep});
          plan.check();
          const auto ref = ref_null(logits, E, N, k, renorm, keep);
          REQUIRE(plan.num_experts == E);
          REQUIRE(plan.top_k == k);
          for (int t = 0; t < T; ++t) {
            const auto& re = ref.experts[std::size_t(t)];
            for (int s = 0; s < k; ++s) {
              const bool real = s < int(re.size());
              REQUIRE(plan.expert_indices()(t, s) == (real ? re[std::size_t(s)] : -1));
              REQUIRE(plan.expert_kept()(t, s) == (real ? 1 : 0));
              const double w = real ? ref.weights[std::size_t(t)][std::size_t(s)] : 0.0;
              REQUIRE(std::abs(double(plan.expert_weights()(t, s)) - w) <= 1e-6);
            }
          }
          for (int e = 0; e < E; ++e) REQUIRE(plan.stats.tokens_per_expert[e] == ref.n[e]);
          CHECK(plan.stats.routed_tokens == ref.routed);
          CHECK(plan.stats.tokens_without_expert == ref.without);
          CHECK(plan.mean_experts_per_token() ==
                Approx(double(plan.nnz()) / double(ref.routed)).epsilon(1e-12));
          std::int64_t nulls = 0;
          for (int i = E; i < E + N; ++i) nulls += ref.n[std::size_t(i)];
          CHECK(NullExpertRouter<float>::null_choices(plan) == nulls);
          CHECK(std::abs(plan.stats.aux_loss - ref.aux) <= 1e-5 * std::max(1.0, ref.aux));
          CHECK(plan.stats.aux_loss_scaled == plan.stats.aux_loss);
          CHECK(std::abs(plan.stats.z_loss - ref.z) <= 1e-5 * std::max(1.0, ref.z));
        }
      }
    }
  }
}

TEST_CASE("null experts: hand-worked token and N = 0 equals TopKRouter", "[moe][router][null]") {
  // E = 2 real, N = 1 null, k = 2. Logits [ln 1, ln 2, ln 5]: p = [1/8, 2/8, 5/8]; top-2 =
  // null (5/8) then expert 1 (2/8); renormalised over both: expert 1 gets 2/7, and the
  // token's real gates sum to 2/7 < 1.
  Tensor<float> logits({1, 3});
  logits(0, 0) = std::log(1.0f);
  logits(0, 1) = std::log(2.0f);
  logits(0, 2) = std::log(5.0f);
  const NullExpertRouter<float> router({.num_experts = 2, .null_experts = 1, .top_k = 2});
  const auto plan = router.route(logits);
  CHECK(plan.expert_indices()(0, 0) == 1);
  CHECK(plan.expert_indices()(0, 1) == -1);
  CHECK(plan.expert_weights()(0, 0) == Approx(2.0 / 7.0).epsilon(1e-6));
  CHECK(plan.nnz() == 1);
  CHECK(plan.mean_experts_per_token() == 1.0);
  // aux = 3 / (1 * 2) * (n_0 P_0 + n_1 P_1 + 1 * n_null P_null) = 1.5 * (0 + 2/8 + 5/8).
  CHECK(plan.stats.aux_loss == Approx(1.5 * 7.0 / 8.0).epsilon(1e-6));

  const auto x = grid_logits<float>(50, 6, 77);
  const TopKRouter<float> topk({.num_experts = 6, .top_k = 2});
  const NullExpertRouter<float> none({.num_experts = 6, .null_experts = 0, .top_k = 2});
  const auto a = topk.route(x), b = none.route(x);
  CHECK(a.choice_expert == b.choice_expert);
  CHECK(a.choice_weight == b.choice_weight);
  CHECK(a.stats.aux_loss == Approx(b.stats.aux_loss).epsilon(1e-12));
}

TEST_CASE("null experts: errors and thread-count invariance", "[moe][router][null]") {
  CHECK_THROWS_WITH(NullExpertRouter<float>({.num_experts = 4, .null_experts = -1}),
                    Contains("NullExpertRouter") && Contains("null_experts"));
  CHECK_THROWS_WITH(NullExpertRouter<float>({.num_experts = 2, .null_experts = 1, .top_k = 4}),
                    Contains("NullExpertRouter") && Contains("top_k") && Contains("= 3"));
  CHECK_THROWS_AS(NullExpertRouter<float>({.num_experts = 0, .null_experts = 2}), config_error);
  CHECK_THROWS_AS(
      NullExpertRouter<float>({.num_experts = 2, .null_experts = std::int64_t(1) << 31}),
      config_error);
  const NullExpertRouter<float> router({.num_experts = 4, .null_experts = 2, .top_k = 2});
  const auto narrow = grid_logits<float>(5, 4, 1);  // E wide, not E + N
  CHECK_THROWS_WITH(router.route(narrow), Contains("NullExpertRouter") && Contains("logits"));
  auto bad = grid_logits<float>(5, 6, 2);
  bad(3, 5) = std::nanf("");
  CHECK_THROWS_AS(router.route(bad), config_error);

  const auto x = grid_logits<float>(1000, 6, 3);
  const int saved = num_threads();
  set_num_threads(1);
  const auto p1 = router.route(x);
  set_num_threads(2);
  const auto p2 = router.route(x);
  set_num_threads(saved);
  test_support::require_same_plan(p1, p2);
}

TEST_CASE("every logits router writes its scores when asked, and only then",
          "[moe][router][scores]") {
  const int T = 29, E = 6;
  const auto logits = grid_logits<float>(T, E, 11);
  const auto keep = every_third_masked(T);
  check_scores(TopKRouter<float>({.num_experts = E, .top_k = 2}), logits, false, keep);
  check_scores(TopPRouter<float>({.num_experts = E}), logits, false, keep);
  check_scores(CapacityRouter<float>({.num_experts = E, .top_k = 2, .pre_softmax = false}), logits,
               false, keep);
  check_scores(ExpertChoiceRouter<float>({.num_experts = E}), logits, false, keep);
  check_scores(GShardTop2Router<float>({.num_experts = E}), logits, false, keep);
  check_scores(NoisyTopKRouter<float>({.num_experts = E, .top_k = 2}), logits, false, keep);
  check_scores(ReluRouter<float>({.num_experts = E, .topk_for_target = 2}), logits, true, keep);
  const auto wide = grid_logits<float>(T, E + 2, 12);
  check_scores(NullExpertRouter<float>({.num_experts = E, .null_experts = 2}), wide, false, keep);

  const TopKRouter<float> router({.num_experts = E, .top_k = 2});
  DispatchPlan<float> plan;
  Tensor<float> small({T, E - 1});
  CHECK_THROWS_WITH(router.route(logits, plan, {}, small.view<2>()),
                    Contains("TopKRouter") && Contains("scores") && Contains("[T=29, E=5]"));
  auto aliased = grid_logits<float>(T, E, 11);
  CHECK_THROWS_WITH(router.route(aliased, plan, {}, aliased.view<2>()),
                    Contains("TopKRouter") && Contains("scores"));
}

TEST_CASE("capacity routers: kept flags, the gates of dropped pairs, capacity as a number",
          "[moe][router][capacity]") {
  const int T = 40, E = 4;
  const auto logits = grid_logits<float>(T, E, 21);
  SECTION("CapacityRouter") {
    // Gates do not depend on capacity (pre_softmax): an uncapped plan has every gate.
    const CapacityRouter<float> tight({.num_experts = E, .top_k = 2, .capacity = 5});
    const CapacityRouter<float> open({.num_experts = E, .top_k = 2, .capacity = T});
    const auto p = tight.route(logits), all = open.route(logits);
    p.check();
    CHECK(p.capacity == 5);
    CHECK(p.requested_capacity == 5);
    REQUIRE(!p.dropped.empty());
    CHECK(all.dropped.empty());
    for (const auto& d : p.dropped) {
      const auto i = std::size_t(d.token * 2 + d.slot);
      CHECK(p.choice_kept[i] == 0);
      CHECK(p.choice_weight[i] == 0.0f);
      CHECK(all.choice_expert[i] == d.expert);
      CHECK(d.gate == double(all.choice_weight[i]));
      CHECK(d.gate > 0);
    }
    std::int64_t kept = 0;
    for (auto f : p.choice_kept) kept += f;
    CHECK(kept == p.nnz());
    for (std::int64_t e = 0; e < E; ++e) CHECK(p.expert_size(e) <= 5);
    // The number is still bounded below by min_capacity and clamped to the tokens.
    CHECK(CapacityRouter<float>({.num_experts = E, .top_k = 2, .min_capacity = 7, .capacity = 5})
              .route(logits)
              .capacity == 7);
    const auto clamped =
        CapacityRouter<float>({.num_experts = E, .top_k = 2, .capacity = 1000}).route(logits);
    CHECK(clamped.capacity == T);
    CHECK(clamped.capacity_clamped);
    CHECK_THROWS_WITH(CapacityRouter<float>({.num_experts = E, .top_k = 2, .capacity = -2}),
                      Contains("CapacityRouter") && Contains("capacity"));
  }
  SECTION("GShardTop2Router") {
    const GShardTop2Router<float> tight({.num_experts = E, .capacity = 3});
    const auto p = tight.route(logits);
    p.check();
    CHECK(p.capacity == 3);
    REQUIRE(!p.dropped.empty());
    // A dropped choice's gate is what it had with nothing dropped: p / (p1 + p2) of the
    // same choices in an uncapped plan.
    const auto all = GShardTop2Router<float>({.num_experts = E, .capacity = T}).route(logits);
    CHECK(all.dropped.empty());
    for (const auto& d : p.dropped) {
      const auto i = std::size_t(d.token * 2 + d.slot);
      CHECK(p.choice_kept[i] == 0);
      CHECK(all.choice_expert[i] == d.expert);
      CHECK(d.gate == Approx(double(all.choice_weight[i])).epsilon(1e-6));
    }
    CHECK_THROWS_AS(GShardTop2Router<float>({.num_experts = E, .capacity = -5}), config_error);
  }
  SECTION("ExpertChoiceRouter") {
    const ExpertChoiceRouter<float> ec({.num_experts = E, .capacity = 3});
    const auto p = ec.route(logits);
    p.check();
    CHECK(p.capacity == 3);
    for (std::int64_t e = 0; e < E; ++e) CHECK(p.expert_size(e) == 3);
    std::int64_t kept = 0;
    for (auto f : p.choice_kept) kept += f;
    CHECK(kept == 3 * E);
  }
}

TEST_CASE("plan JSON carries dropped gates and the scaled loss, and rebuilds kept flags",
          "[moe][plan][json]") {
  const auto logits = grid_logits<float>(24, 4, 31);
  const auto p = CapacityRouter<float>({.num_experts = 4, .top_k = 2, .capacity = 3}).route(logits);
  REQUIRE(!p.dropped.empty());
  const auto back = plan_from_json<float>(to_json_string(p));
  test_support::require_same_plan(p, back);
  // A document from before the fields existed still reads: gate 0, scaled = aux_loss.
  auto doc = to_json(p);
  for (auto& d : doc["dropped"]) d.erase("gate");
  doc["stats"].erase("aux_loss_scaled");
  const auto old = plan_from_json<float>(doc.dump());
  CHECK(old.dropped.front().gate == 0.0);
  CHECK(old.stats.aux_loss_scaled == p.stats.aux_loss);
  CHECK(old.choice_kept == p.choice_kept);
  // check() rejects kept flags that disagree with the runs.
  auto broken = p;
  broken.choice_kept[std::size_t(broken.dropped.front().token * 2 + broken.dropped.front().slot)] =
      1;
  CHECK_THROWS_WITH(broken.check(), Contains("choice_kept"));
}

TEST_CASE("aux_loss has coefficient 1 in every router; the scaled value is apart",
          "[moe][router][loss]") {
  const auto logits = grid_logits<float>(64, 8, 41);
  const auto a =
      NoisyTopKRouter<float>({.num_experts = 8, .top_k = 2, .loss_coef = 0.25}).route(logits);
  const auto b =
      NoisyTopKRouter<float>({.num_experts = 8, .top_k = 2, .loss_coef = 1.0}).route(logits);
  CHECK(a.stats.aux_loss == b.stats.aux_loss);  // the coefficient does not enter aux_loss
  CHECK(a.stats.aux_loss_scaled == Approx(0.25 * a.stats.aux_loss).epsilon(1e-12));
  CHECK(a.stats.aux_loss > 0);
  const auto t = TopKRouter<float>({.num_experts = 8, .top_k = 2}).route(logits);
  CHECK(t.stats.aux_loss_scaled == t.stats.aux_loss);
  const auto r = ReluRouter<float>({.num_experts = 8, .topk_for_target = 2}).route(logits);
  CHECK(r.stats.aux_loss_scaled == r.stats.aux_loss);
}
