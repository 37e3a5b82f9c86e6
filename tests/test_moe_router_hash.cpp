// HashRouter (Roller et al. 2021 hash layers): SplitMix64 values computed by hand
// (the published first outputs of a generator seeded with 0), determinism, the
// distinct-candidates rule for top_k > 1, a loose chi-square uniformity bound,
// masks and errors.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <set>
#include <vector>

#include "switchyard/moe/router.hpp"
#include "switchyard/moe/router_hash.hpp"

using namespace switchyard;
using Catch::Contains;
using moe::HashRouter;

// Token ids, not logits: deliberately not a LogitsRouter.
static_assert(!moe::LogitsRouter<HashRouter<float>, float>);

TEST_CASE("HashRouter: SplitMix64 values", "[moe][hash]") {
  // SplitMix64 seeded with 0 (Vigna's splitmix64.c): 0xE220A8397B1DCDAF,
  // 0x6E789E6AA1B965F4, 0x06C45D188009454F.
  STATIC_REQUIRE(HashRouter<float>::splitmix64(0, 0) == 0xE220A8397B1DCDAFULL);
  STATIC_REQUIRE(HashRouter<float>::splitmix64(0, 1) == 0x6E789E6AA1B965F4ULL);
  STATIC_REQUIRE(HashRouter<float>::splitmix64(0, 2) == 0x06C45D188009454FULL);
  // Computed by hand (Python, the formulas of the header comment):
  //   id 1:  0x910A2DEC89025CC1 -> 1 of 64;   id 42: 0xBDD732262FEB6E95 -> 21 of 64;
  //   id 42, seed 7 (state 42 ^ 7 = 45): 0xF7E9F3F88CC04AD6 -> 22 of 64;
  //   id 123456789: 0x223C74D93DEB7679 -> 57 of 64.
  STATIC_REQUIRE(HashRouter<float>::splitmix64(1) == 0x910A2DEC89025CC1ULL);
  STATIC_REQUIRE(HashRouter<float>::splitmix64(42) == 0xBDD732262FEB6E95ULL);
  STATIC_REQUIRE(HashRouter<float>::splitmix64(42 ^ 7) == 0xF7E9F3F88CC04AD6ULL);
  HashRouter<float> r({.num_experts = 64});
  HashRouter<float> r7({.num_experts = 64, .seed = 7});
  const std::vector<std::int64_t> ids{0, 1, 42, 123456789};
  const auto plan = r.route(ids);
  REQUIRE_NOTHROW(plan.check());
  const std::int32_t want[4] = {47, 1, 21, 57};
  for (int t = 0; t < 4; ++t) {
    CAPTURE(t);
    REQUIRE(plan.choice_expert[t] == want[t]);
    REQUIRE(plan.choice_weight[t] == 1.0f);
    REQUIRE(r.candidate(ids[t]) == want[t]);
  }
  REQUIRE(r7.candidate(42) == 22);
}

TEST_CASE("HashRouter: top_k > 1 takes distinct candidates in draw order", "[moe][hash]") {
  // E = 10: token 0 draws 5, 0, 9, 4, 7, 0, ...; token 1 draws 5, 9, 0, 5, 1, 8, ...
  // k = 4: token 0 -> {5, 0, 9, 4}; token 1 -> {5, 9, 0, 1} (the repeated 5 is skipped).
  HashRouter<double> r({.num_experts = 10, .top_k = 4});
  const std::vector<std::int64_t> ids{0, 1};
  const auto plan = r.route(ids);
  REQUIRE_NOTHROW(plan.check());
  const std::int32_t want[8] = {5, 0, 9, 4, 5, 9, 0, 1};
  for (int i = 0; i < 8; ++i) {
    CAPTURE(i);
    REQUIRE(plan.choice_expert[i] == want[i]);
    REQUIRE(plan.choice_weight[i] == 0.25);
  }
  REQUIRE(plan.expert_size(5) == 2);
  REQUIRE(plan.stats.mean_prob[5] == 2.0 / 8);
  // k = E: every token gets every expert exactly once.
  HashRouter<float> all({.num_experts = 7, .top_k = 7});
  std::vector<std::int64_t> many(50);
  std::iota(many.begin(), many.end(), 1000);
  const auto pa = all.route(many);
  REQUIRE_NOTHROW(pa.check());
  for (int e = 0; e < 7; ++e) REQUIRE(pa.expert_size(e) == 50);
}

TEST_CASE("HashRouter: determinism, seed, plan fields and statistics", "[moe][hash]") {
  std::vector<std::int64_t> ids(300);
  std::mt19937_64 gen(3);
  for (auto& id : ids) id = static_cast<std::int64_t>(gen() % 50000);
  for (std::int64_t k : {1, 2, 3}) {
    HashRouter<float> r({.num_experts = 16, .top_k = k});
    const auto a = r.route(ids), b = r.route(ids);
    REQUIRE(a.choice_expert == b.choice_expert);
    REQUIRE(a.token_index == b.token_index);
    REQUIRE_NOTHROW(a.check());
    REQUIRE(a.top_k == k);
    REQUIRE(a.capacity == -1);
    REQUIRE(a.nnz() == 300 * k);
    REQUIRE(a.stats.routed_tokens == 300);
    REQUIRE(a.stats.aux_loss == 0);
    REQUIRE(a.stats.z_loss == 0);
    REQUIRE(a.stats.entropy == 0);
    double total = 0;
    for (int e = 0; e < 16; ++e) {
      REQUIRE(a.stats.tokens_per_expert[e] == a.expert_size(e));
      REQUIRE(a.stats.mean_prob[e] == Approx(double(a.expert_size(e)) / (300.0 * k)));
      total += a.stats.mean_prob[e];
    }
    REQUIRE(total == Approx(1.0));
    // The same id always lands on the same experts.
    for (int t = 0; t < 300; ++t)
      for (int u = 0; u < t; ++u)
        if (ids[t] == ids[u])
          for (int j = 0; j < k; ++j)
            REQUIRE(a.choice_expert[t * k + j] == a.choice_expert[u * k + j]);
    // Another seed gives another assignment.
    HashRouter<float> s({.num_experts = 16, .top_k = k, .seed = 12345});
    REQUIRE(s.route(ids).choice_expert != a.choice_expert);
  }
}

TEST_CASE("HashRouter: uniform over experts (chi-square, 100k ids)", "[moe][hash]") {
  for (std::int64_t E : {16, 61}) {
    CAPTURE(E);
    HashRouter<float> r({.num_experts = E});
    std::vector<std::int64_t> ids(100000);
    std::iota(ids.begin(), ids.end(), 0);  // consecutive ids: the worst case for a weak hash
    moe::DispatchPlan<float> plan;
    r.route_ids(ids, plan);
    const double expect = 100000.0 / double(E);
    double chi2 = 0;
    for (std::int64_t e = 0; e < E; ++e) {
      const double d = double(plan.expert_size(e)) - expect;
      chi2 += d * d / expect;
    }
    // df = E - 1 (mean E - 1, sd sqrt(2(E - 1))); a loose bound far in the tail.
    REQUIRE(chi2 < double(E - 1) + 8 * std::sqrt(2.0 * double(E - 1)));
  }
}

TEST_CASE("HashRouter: mask, T = 0 and errors", "[moe][hash]") {
  HashRouter<float> r({.num_experts = 8, .top_k = 2});
  const std::vector<std::int64_t> ids{5, -100, 7, 9};
  const std::vector<std::uint8_t> keep{1, 0, 1, 1};
  const auto plan = r.route(ids, moe::TokenMask{keep});  // the masked -100 is never hashed
  REQUIRE_NOTHROW(plan.check());
  REQUIRE(plan.stats.routed_tokens == 3);
  REQUIRE(plan.nnz() == 6);
  REQUIRE(plan.choice_expert[2] == -1);
  REQUIRE(plan.choice_expert[3] == -1);
  const std::vector<std::int64_t> sub{5, 7, 9};
  const auto ps = r.route(sub);
  REQUIRE(ps.stats.tokens_per_expert == plan.stats.tokens_per_expert);
  REQUIRE(ps.stats.mean_prob == plan.stats.mean_prob);
  const auto empty = r.route(std::span<const std::int64_t>{});
  REQUIRE_NOTHROW(empty.check());
  REQUIRE(empty.num_tokens == 0);
  REQUIRE(empty.stats.routed_tokens == 0);

  REQUIRE_THROWS_AS(r.route(ids), config_error);
  REQUIRE_THROWS_WITH(r.route(ids), Contains("HashRouter") && Contains("token_ids"));
  const std::vector<std::uint8_t> short_keep{1, 1};
  REQUIRE_THROWS_AS(r.route(sub, moe::TokenMask{short_keep}), shape_error);
  REQUIRE_THROWS_WITH(r.route(sub, moe::TokenMask{short_keep}),
                      Contains("HashRouter") && Contains("mask"));
  REQUIRE_THROWS_AS(HashRouter<float>({.num_experts = 0}), config_error);
  REQUIRE_THROWS_WITH(HashRouter<float>({.num_experts = 0}),
                      Contains("HashRouter") && Contains("num_experts"));
  REQUIRE_THROWS_WITH(HashRouter<float>({.num_experts = 4, .top_k = 5}),
                      Contains("HashRouter") && Contains("top_k"));
  REQUIRE_THROWS_WITH(HashRouter<float>({.num_experts = 4, .top_k = 0}),
                      Contains("HashRouter") && Contains("top_k"));
}
