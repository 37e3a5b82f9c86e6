// TopPRouter (Huang et al. 2024 dynamic routing): a naive double-precision
// reference on random logits (on a grid, so ties are exact), masks, a hand-worked
// case, min/max experts, errors and thread-count independence. No fixture exists.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "support/compare.hpp"
#include "support/moe.hpp"
#include "switchyard/core/parallel_for.hpp"
#include "switchyard/core/simd/arch.hpp"
#include "switchyard/core/tensor.hpp"
#include "switchyard/moe/router.hpp"
#include "switchyard/moe/router_top_p.hpp"

using namespace switchyard;
using Catch::Contains;

static_assert(moe::LogitsRouter<moe::TopPRouter<float>, float>);
static_assert(moe::LogitsRouter<moe::TopPRouter<double>, double>);

namespace {
using test_support::as_double;
using test_support::close;
using test_support::grid_logits;

struct RefPlan {
  std::vector<std::vector<int>> experts;
  std::vector<std::vector<double>> weights;
  std::vector<std::int64_t> n;
  std::vector<double> prob_sum;
  std::int64_t routed = 0, assignments = 0;
  double aux = 0, z = 0, entropy = 0;
};

// Plain loops in double: softmax, stable sort by descending probability, take
// experts until the running sum reaches p, then clamp to [min, max].
RefPlan ref_top_p(const std::vector<double>& x, int T, int E, double p_thr, int mn, int mx,
                  bool renorm, const std::vector<std::uint8_t>& keep) {
  RefPlan r;
  r.experts.resize(T);
  r.weights.resize(T);
  r.n.assign(E, 0);
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
    int count = E;
    double c = 0;
    for (int j = 0; j < E; ++j) {
      c += p[order[j]];
      if (c >= p_thr) {
        count = j + 1;
        break;
      }
    }
    count = std::min(std::max(count, mn), mx);
    double chosen = 0;
    for (int j = 0; j < count; ++j) chosen += p[order[j]];
    for (int j = 0; j < count; ++j) {
      r.experts[t].push_back(order[j]);
      r.weights[t].push_back(renorm ? p[order[j]] / chosen : p[order[j]]);
      ++r.n[order[j]];
      ++r.assignments;
    }
  }
  if (r.routed > 0) {
    double s = 0;
    for (int e = 0; e < E; ++e) s += double(r.n[e]) * r.prob_sum[e];
    r.aux = double(E) / (double(r.routed) * double(r.assignments)) * s;
    r.z /= double(r.routed);
    r.entropy /= double(r.routed);
  }
  return r;
}

template <class T, class Arch = simd::default_arch>
void random_case(int T_, int E, double p_thr, int mn, int mx, bool renorm, std::uint32_t seed,
                 bool with_mask, bool with_neg_inf = false) {
  CAPTURE(T_, E, p_thr, mn, mx, renorm, seed, with_mask, with_neg_inf, Arch::name());
  auto x = grid_logits<T>(T_, E, seed);
  if (with_neg_inf) {  // experts ruled out by -inf (one logit per row stays finite)
    std::mt19937 gen(seed + 5);
    for (int t = 0; t < T_; ++t)
      for (int e = 0; e < E; ++e)
        if (e != t % E && gen() % 3 == 0) x(t, e) = -std::numeric_limits<T>::infinity();
  }
  std::vector<std::uint8_t> keep;
  if (with_mask) {
    std::mt19937 gen(seed + 7);
    keep.resize(T_);
    for (auto& v : keep) v = std::uint8_t(gen() % 3 != 0);
  }
  moe::TopPRouter<T, Arch> router({.num_experts = E,
                                   .threshold = p_thr,
                                   .min_experts = mn,
                                   .max_experts = mx,
                                   .renormalize = renorm});
  const auto plan = router.route(x.template view<2>(), moe::TokenMask{keep});
  const auto ref =
      ref_top_p(std::vector<double>(x.begin(), x.end()), T_, E, p_thr, mn, mx, renorm, keep);
  const double tol = std::is_same_v<T, float> ? 2e-5 : 1e-11;
  REQUIRE_NOTHROW(plan.check());
  REQUIRE(plan.top_k == mx);
  REQUIRE(plan.capacity == -1);
  REQUIRE(plan.dropped.empty());
  REQUIRE(plan.stats.routed_tokens == ref.routed);
  REQUIRE(plan.nnz() == ref.assignments);
  REQUIRE(plan.stats.tokens_without_expert == 0);
  for (int t = 0; t < T_; ++t) {
    const auto m = static_cast<int>(ref.experts[t].size());
    for (int j = 0; j < mx; ++j) {
      CAPTURE(t, j);
      if (j < m) {
        REQUIRE(plan.choice_expert[t * mx + j] == ref.experts[t][j]);
        REQUIRE(close(plan.choice_weight[t * mx + j], ref.weights[t][j], tol));
      } else {
        REQUIRE(plan.choice_expert[t * mx + j] == -1);
        REQUIRE(plan.choice_weight[t * mx + j] == T(0));
      }
    }
  }
  for (int e = 0; e < E; ++e) {
    REQUIRE(plan.stats.tokens_per_expert[e] == ref.n[e]);
    REQUIRE(plan.expert_size(e) == ref.n[e]);
    for (auto i = plan.expert_offsets[e]; i < plan.expert_offsets[e + 1]; ++i)
      REQUIRE(plan.gate[i] == plan.choice_weight[plan.token_index[i] * mx + plan.slot[i]]);
  }
  REQUIRE(close(plan.stats.aux_loss, ref.aux, tol));
  REQUIRE(close(plan.stats.z_loss, ref.z, tol));
  REQUIRE(close(plan.stats.entropy, ref.entropy, tol, 1e-6));
}

}  // namespace

TEST_CASE("TopPRouter: random logits against the naive reference", "[moe][top_p]") {
  std::uint32_t seed = 1;
  for (int T_ : {0, 1, 7, 64, 300}) {
    for (int E : {1, 2, 5, 16, 64}) {
      for (double p_thr : {0.1, 0.5, 0.9, 1.0}) {
        if (T_ == 300 && (E < 16 || p_thr == 0.1 || p_thr == 1.0)) continue;  // keep it fast
        for (auto [mn, mx] : {std::pair{1, E}, std::pair{2, E}, std::pair{1, 3}, std::pair{3, 3},
                              std::pair{1, 12}}) {
          if (mn > E || mx > E) continue;
          random_case<float>(T_, E, p_thr, mn, mx, seed % 2 == 0, seed, false);
          ++seed;
        }
      }
    }
  }
  random_case<double>(64, 40, 0.8, 1, 40, true, seed++, false);
  random_case<double>(64, 7, 0.3, 1, 7, false, seed++, false);
}

TEST_CASE("TopPRouter: many experts (ranked-prefix path) against the naive reference",
          "[moe][top_p]") {
  // E > 64: a token past its 8 best ranks only the candidates of a prefix that holds
  // the needed mass; min/max experts, threshold 1, ties, -inf, masks, double.
  std::uint32_t seed = 7000;
  for (int E : {65, 130, 256}) {
    for (double p_thr : {0.5, 0.9, 1.0}) {
      for (auto [mn, mx] : {std::pair{1, E}, std::pair{12, E}, std::pair{1, 20}}) {
        random_case<float>(40, E, p_thr, mn, mx, seed % 2 == 0, seed, seed % 3 == 0);
        ++seed;
        random_case<double>(20, E, p_thr, mn, mx, seed % 2 == 0, seed, false, seed % 3 == 0);
        ++seed;
      }
    }
  }
  random_case<float, simd::scalar>(20, 130, 0.9, 1, 130, false, seed++, false);
}

TEST_CASE("TopPRouter: scalar arch, double, and -inf logits", "[moe][top_p]") {
  std::uint32_t seed = 4000;
  for (int E : {1, 5, 16, 64}) {
    for (double p_thr : {0.3, 0.9}) {
      random_case<float, simd::scalar>(64, E, p_thr, 1, E, true, seed++, false);
      random_case<double, simd::scalar>(7, E, p_thr, 1, std::min(E, 3), false, seed++, true);
      random_case<float>(64, E, p_thr, 1, E, false, seed++, false, true);
      random_case<double>(64, E, p_thr, 1, E, true, seed++, false, true);
    }
  }
}

TEST_CASE("TopPRouter: padding mask", "[moe][top_p]") {
  std::uint32_t seed = 900;
  for (int T_ : {1, 7, 300}) {
    random_case<float>(T_, 16, 0.5, 1, 16, false, seed++, true);
    random_case<float>(T_, 64, 0.9, 1, 64, true, seed++, true);
  }
  // Stats equal those of the plan on the routed subset.
  const int T_ = 200, E = 32;
  const auto x = grid_logits<float>(T_, E, 3);
  std::vector<std::uint8_t> keep(T_);
  std::vector<int> kept;
  for (int t = 0; t < T_; ++t) {
    keep[t] = std::uint8_t(t % 4 != 2);
    if (keep[t]) kept.push_back(t);
  }
  Tensor<float> sub({std::int64_t(kept.size()), E});
  for (std::size_t i = 0; i < kept.size(); ++i)
    for (int e = 0; e < E; ++e) sub(i, e) = x(kept[i], e);
  moe::TopPRouter<float> router({.num_experts = E, .threshold = 0.7});
  const auto full = router.route(x.view<2>(), moe::TokenMask{keep});
  const auto part = router.route(sub.view<2>());
  // Equal up to summation order (the sums may group tokens in blocks).
  REQUIRE(full.stats.tokens_per_expert == part.stats.tokens_per_expert);
  REQUIRE(full.nnz() == part.nnz());
  REQUIRE(close(full.stats.aux_loss, part.stats.aux_loss, 1e-6));
  REQUIRE(close(full.stats.z_loss, part.stats.z_loss, 1e-6));
  REQUIRE(close(full.stats.entropy, part.stats.entropy, 1e-6));
  for (std::size_t i = 0; i < kept.size(); ++i)
    for (int j = 0; j < E; ++j)
      REQUIRE(full.choice_expert[kept[i] * E + j] == part.choice_expert[i * E + j]);
  std::vector<std::uint8_t> none(T_, 0);
  const auto empty = router.route(x.view<2>(), moe::TokenMask{none});
  REQUIRE_NOTHROW(empty.check());
  REQUIRE(empty.nnz() == 0);
  REQUIRE(empty.stats.aux_loss == 0);
  REQUIRE(empty.stats.z_loss == 0);
  Tensor<float> none_rows({0, E});
  const auto zero = router.route(none_rows.view<2>());
  REQUIRE_NOTHROW(zero.check());
  REQUIRE(zero.num_tokens == 0);
}

TEST_CASE("TopPRouter: hand-worked case", "[moe][top_p]") {
  // Token 0: logits ln(4, 3, 2, 1) -> p = (0.4, 0.3, 0.2, 0.1), ranked 0, 1, 2, 3.
  // Token 1: logits 0 -> p = 0.25 each, ranked 0, 1, 2, 3 (ties to the lower index).
  Tensor<double> x({2, 4});
  for (int e = 0; e < 4; ++e) x(0, e) = std::log(4.0 - e);
  const auto experts_of = [&](const moe::DispatchPlan<double>& plan, int t) {
    std::vector<int> out;
    for (int j = 0; j < plan.top_k; ++j)
      if (plan.choice_expert[t * plan.top_k + j] >= 0)
        out.push_back(plan.choice_expert[t * plan.top_k + j]);
    return out;
  };
  {
    // p = 0.5: token 0 sums 0.4 < 0.5, then 0.7 >= 0.5 -> {0, 1} (the crossing expert is
    // included); token 1 sums 0.25, then exactly 0.5 >= 0.5 -> {0, 1}.
    // n = (2, 2, 0, 0), P = (0.65, 0.55, 0.45, 0.35), N = 4, T = 2:
    // aux = E / (T N) sum n_e P_e = 4 / 8 * (1.3 + 1.1) = 1.2.
    moe::TopPRouter<double> r({.num_experts = 4, .threshold = 0.5});
    const auto plan = r.route(x.view<2>());
    REQUIRE_NOTHROW(plan.check());
    REQUIRE(plan.top_k == 4);
    REQUIRE(experts_of(plan, 0) == std::vector<int>{0, 1});
    REQUIRE(experts_of(plan, 1) == std::vector<int>{0, 1});
    REQUIRE(plan.choice_weight[0] == Approx(0.4).epsilon(1e-14));
    REQUIRE(plan.choice_weight[1] == Approx(0.3).epsilon(1e-14));
    REQUIRE(plan.choice_weight[2] == 0);
    REQUIRE(plan.choice_weight[4] == Approx(0.25).epsilon(1e-14));
    // Element by element: GCC 12.2 at -O2 -march=native (AVX-512) miscompiles the
    // literal std::vector<std::int64_t>{2, 2, 0, 0} here into {2, 2, 2, 2} (SLP
    // vectoriser; -fno-tree-slp-vectorize avoids it).
    const auto& n = plan.stats.tokens_per_expert;
    REQUIRE(n.size() == 4);
    CHECK(n[0] == 2);
    CHECK(n[1] == 2);
    CHECK(n[2] == 0);
    CHECK(n[3] == 0);
    REQUIRE(plan.stats.aux_loss == Approx(1.2).epsilon(1e-14));
  }
  {
    // p = 0.35: token 0 takes {0} (0.4 >= 0.35); min_experts = 2 forces {0, 1}.
    moe::TopPRouter<double> r1({.num_experts = 4, .threshold = 0.35});
    REQUIRE(experts_of(r1.route(x.view<2>()), 0) == std::vector<int>{0});
    moe::TopPRouter<double> r2({.num_experts = 4, .threshold = 0.35, .min_experts = 2});
    REQUIRE(experts_of(r2.route(x.view<2>()), 0) == std::vector<int>{0, 1});
  }
  {
    // p = 0.8: token 0 takes {0, 1, 2} (0.9); renormalised 4/9, 3/9, 2/9. Token 1 takes
    // four experts (0.25, 0.5, 0.75, 1.0). max_experts = 2 caps both at {0, 1}.
    moe::TopPRouter<double> r({.num_experts = 4, .threshold = 0.8, .renormalize = true});
    const auto plan = r.route(x.view<2>());
    REQUIRE(experts_of(plan, 0) == std::vector<int>{0, 1, 2});
    REQUIRE(experts_of(plan, 1) == std::vector<int>{0, 1, 2, 3});
    REQUIRE(plan.choice_weight[0] == Approx(4.0 / 9).epsilon(1e-14));
    REQUIRE(plan.choice_weight[2] == Approx(2.0 / 9).epsilon(1e-14));
    REQUIRE(plan.choice_weight[4] == Approx(0.25).epsilon(1e-14));
    moe::TopPRouter<double> capped({.num_experts = 4, .threshold = 0.8, .max_experts = 2});
    const auto pc = capped.route(x.view<2>());
    REQUIRE(pc.top_k == 2);
    REQUIRE(experts_of(pc, 0) == std::vector<int>{0, 1});
    REQUIRE(experts_of(pc, 1) == std::vector<int>{0, 1});
  }
  {
    // p = 1: every expert (the sums reach 1 only at the last one, or not at all).
    moe::TopPRouter<double> r({.num_experts = 4, .threshold = 1.0});
    const auto plan = r.route(x.view<2>());
    REQUIRE(plan.nnz() == 8);
  }
}

TEST_CASE("TopPRouter: errors", "[moe][top_p]") {
  using moe::TopPRouter;
  const auto bad = [](moe::TopPRouterConfig c) { TopPRouter<float> r(c); };
  for (double p : {0.0, -0.1, 1.5, std::numeric_limits<double>::quiet_NaN()}) {
    CAPTURE(p);
    REQUIRE_THROWS_AS(bad({.num_experts = 4, .threshold = p}), config_error);
    REQUIRE_THROWS_WITH(bad({.num_experts = 4, .threshold = p}),
                        Contains("TopPRouter") && Contains("threshold"));
  }
  REQUIRE_THROWS_WITH(bad({.num_experts = 0}), Contains("TopPRouter") && Contains("num_experts"));
  REQUIRE_THROWS_WITH(bad({.num_experts = 4, .min_experts = 0}),
                      Contains("TopPRouter") && Contains("min_experts"));
  REQUIRE_THROWS_WITH(bad({.num_experts = 4, .min_experts = 5}),
                      Contains("TopPRouter") && Contains("min_experts"));
  REQUIRE_THROWS_AS(bad({.num_experts = 4, .min_experts = 3, .max_experts = 2}), config_error);
  REQUIRE_THROWS_WITH(bad({.num_experts = 4, .min_experts = 3, .max_experts = 2}),
                      Contains("TopPRouter") && Contains("max_experts"));
  REQUIRE_THROWS_WITH(bad({.num_experts = 4, .max_experts = 5}),
                      Contains("TopPRouter") && Contains("max_experts"));
  REQUIRE_THROWS_WITH(bad({.num_experts = 4, .max_experts = -1}), Contains("max_experts"));
  REQUIRE(TopPRouter<float>({.num_experts = 6}).config().max_experts == 6);

  TopPRouter<float> router({.num_experts = 4});
  Tensor<float> wrong({3, 5});
  REQUIRE_THROWS_AS(router.route(wrong.view<2>()), shape_error);
  REQUIRE_THROWS_WITH(router.route(wrong.view<2>()), Contains("TopPRouter") && Contains("logits"));
  Tensor<float> x({3, 4});
  std::vector<std::uint8_t> keep(2, 1);
  REQUIRE_THROWS_AS(router.route(x.view<2>(), moe::TokenMask{keep}), shape_error);
  REQUIRE_THROWS_WITH(router.route(x.view<2>(), moe::TokenMask{keep}), Contains("mask"));
  x(1, 2) = std::numeric_limits<float>::quiet_NaN();
  REQUIRE_THROWS_AS(router.route(x.view<2>()), config_error);
  REQUIRE_THROWS_WITH(router.route(x.view<2>()), Contains("TopPRouter") && Contains("token 1"));
}

TEST_CASE("TopPRouter: 1 and 2 threads give bit-identical plans", "[moe][top_p]") {
  const auto x = test_support::random_tensor<float>({4096, 64}, 21);
  for (double p_thr : {0.4, 0.9}) {
    moe::TopPRouter<float> router({.num_experts = 64, .threshold = p_thr});
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
}
