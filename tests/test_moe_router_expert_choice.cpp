// ExpertChoiceRouter (moe/router_expert_choice.hpp): the llm-baselines fixture, a
// naive double reference on random logits, token masks, hand-worked cases, errors
// and thread determinism.
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
#include "switchyard/core/tensor.hpp"
#include "switchyard/moe/router_expert_choice.hpp"

using switchyard::Tensor;
using switchyard::moe::DispatchPlan;
using switchyard::moe::ExpertChoiceRouter;
using switchyard::moe::TokenMask;

static_assert(switchyard::moe::LogitsRouter<ExpertChoiceRouter<float>, float>);
static_assert(switchyard::moe::LogitsRouter<ExpertChoiceRouter<double>, double>);

namespace {

// Naive reference in double: per expert, sort the routed tokens by (p desc, token asc).
struct Ref {
  std::int64_t capacity = 0, requested = 0, routed = 0, without = 0;
  std::vector<std::vector<std::int64_t>> picked;  // [E] tokens, ascending
  std::vector<double> p;                          // [T*E]
  double z = 0;
};

Ref reference(const std::vector<double>& x, std::int64_t T, std::int64_t E, double cf,
              std::int64_t min_cap, const std::vector<std::uint8_t>& keep) {
  Ref r;
  r.p.assign(T * E, 0.0);
  std::vector<std::int64_t> rows;
  double lse2 = 0;
  for (std::int64_t t = 0; t < T; ++t) {
    if (!keep.empty() && !keep[t]) continue;
    rows.push_back(t);
    double m = -1e300, s = 0;
    for (std::int64_t e = 0; e < E; ++e) m = std::max(m, x[t * E + e]);
    for (std::int64_t e = 0; e < E; ++e) s += std::exp(x[t * E + e] - m);
    const double lse = m + std::log(s);
    lse2 += lse * lse;
    for (std::int64_t e = 0; e < E; ++e) r.p[t * E + e] = std::exp(x[t * E + e] - lse);
  }
  r.routed = std::int64_t(rows.size());
  r.requested = std::max<std::int64_t>(
      static_cast<std::int64_t>(std::floor(cf * double(r.routed) / double(E))), min_cap);
  r.capacity = std::min(r.requested, r.routed);
  r.picked.assign(E, {});
  std::vector<int> taken(T, 0);
  for (std::int64_t e = 0; e < E; ++e) {
    auto order = rows;
    std::stable_sort(order.begin(), order.end(), [&](std::int64_t a, std::int64_t b) {
      return r.p[a * E + e] > r.p[b * E + e];
    });
    order.resize(r.capacity);
    std::sort(order.begin(), order.end());
    for (auto t : order) ++taken[t];
    r.picked[e] = order;
  }
  for (auto t : rows) r.without += taken[t] == 0;
  if (r.routed > 0) r.z = lse2 / double(r.routed);
  return r;
}

template <class T>
void check_against_reference(const DispatchPlan<T>& plan, const Ref& r, std::int64_t E,
                             double tol) {
  REQUIRE_NOTHROW(plan.check());
  // K = the most experts any token received in the reference (at least 1)
  std::vector<std::int64_t> received(static_cast<std::size_t>(plan.num_tokens), 0);
  for (std::int64_t e = 0; e < E; ++e)
    for (auto t : r.picked[e]) ++received[std::size_t(t)];
  std::int64_t K = 1;
  for (const std::int64_t n : received) K = std::max(K, n);
  REQUIRE(plan.top_k == K);
  REQUIRE(plan.capacity == r.capacity);
  REQUIRE(plan.requested_capacity == r.requested);
  REQUIRE(plan.capacity_clamped == (r.capacity != r.requested));
  REQUIRE(plan.dropped.empty());
  std::vector<std::int64_t> count(plan.num_tokens, 0);
  for (std::int64_t e = 0; e < E; ++e) {
    REQUIRE(plan.expert_size(e) == r.capacity);
    REQUIRE(plan.stats.tokens_per_expert[e] == r.capacity);
    REQUIRE(plan.stats.kept_per_expert[e] == r.capacity);
    for (std::int64_t j = 0; j < plan.expert_size(e); ++j) {
      const std::int64_t i = plan.expert_offsets[e] + j, t = plan.token_index[i];
      REQUIRE(t == r.picked[e][j]);
      REQUIRE(double(plan.gate[i]) == Approx(r.p[t * E + e]).epsilon(tol).margin(1e-30));
      // slot = rank of e among the experts that took t, in expert order
      REQUIRE(plan.slot[i] == count[t]);
      REQUIRE(plan.choice_expert[t * K + count[t]] == e);
      REQUIRE(plan.choice_weight[t * K + count[t]] == plan.gate[i]);
      ++count[t];
    }
  }
  for (std::int64_t t = 0; t < plan.num_tokens; ++t)
    for (std::int64_t s = count[t]; s < K; ++s) {
      REQUIRE(plan.choice_expert[t * K + s] == -1);
      REQUIRE(plan.choice_weight[t * K + s] == T(0));
    }
  REQUIRE(plan.stats.routed_tokens == r.routed);
  REQUIRE(plan.stats.tokens_without_expert == r.without);
  REQUIRE(plan.stats.dropped == 0);
  REQUIRE(plan.stats.aux_loss == 0.0);
  REQUIRE(plan.stats.z_loss == Approx(r.z).epsilon(tol).margin(1e-14));
}

template <class T>
void require_identical(const DispatchPlan<T>& a, const DispatchPlan<T>& b) {
  REQUIRE(a.capacity == b.capacity);
  REQUIRE(a.expert_offsets == b.expert_offsets);
  REQUIRE(a.token_index == b.token_index);
  REQUIRE(a.slot == b.slot);
  REQUIRE(a.gate == b.gate);
  REQUIRE(a.choice_expert == b.choice_expert);
  REQUIRE(a.choice_weight == b.choice_weight);
  REQUIRE(a.stats.tokens_without_expert == b.stats.tokens_without_expert);
  REQUIRE(a.stats.mean_prob == b.stats.mean_prob);
  REQUIRE(a.stats.z_loss == b.stats.z_loss);
  REQUIRE(a.stats.entropy == b.stats.entropy);
}

template <class T>
std::vector<double> as_double(const Tensor<T>& t) {
  return {t.begin(), t.end()};
}

}  // namespace

TEST_CASE("ExpertChoiceRouter reproduces the llm-baselines expert-choice fixture",
          "[moe][router][expert_choice][fixture]") {
  const auto f = open_fixture("expert_choice_tiny.safetensors");
  const Tensor<float> x = f.tensor<float>("x"), w = f.tensor<float>("router_w");
  const Tensor<float> logits = f.tensor<float>("router_logits");
  const std::int64_t T = logits.extent(0), E = logits.extent(1);
  const Tensor<float> mine = switchyard::moe::router_logits<float>(x, w);
  REQUIRE(test_support::max_rel_err(as_double(mine), as_double(logits), 1e-2) < 1e-5);

  const ExpertChoiceRouter<float> router({.num_experts = E, .capacity_factor = 1.0});
  const auto plan = router.route(logits);
  REQUIRE_NOTHROW(plan.check());
  const std::int64_t c = f.scalar<std::int64_t>("capacity");
  REQUIRE(plan.capacity == c);
  const auto selected = f.tensor<std::int64_t>("selected_tokens");
  const auto gate_weights = f.tensor<float>("gate_weights");
  const auto dispatch = f.tensor<std::int64_t>("dispatch_mask");
  const auto combine = f.tensor<float>("combine_weights");
  const auto per_token = f.tensor<std::int64_t>("experts_per_token");
  const auto dropped = f.tensor<std::int64_t>("token_dropped");
  double max_err = 0;
  std::vector<std::int64_t> got_dispatch(T * E, 0);
  std::vector<double> got_combine(T * E, 0.0);
  for (std::int64_t e = 0; e < E; ++e) {
    // The fixture lists each expert's tokens by descending probability; the plan by token.
    std::vector<std::int64_t> want(c),
        got(plan.expert_tokens(e).begin(), plan.expert_tokens(e).end());
    for (std::int64_t j = 0; j < c; ++j) want[j] = selected(e, j);
    std::sort(want.begin(), want.end());
    REQUIRE(got == want);
    for (std::int64_t j = 0; j < c; ++j) {
      const std::int64_t t = plan.expert_tokens(e)[j];
      got_dispatch[t * E + e] = 1;
      got_combine[t * E + e] = plan.expert_gates(e)[j];
      for (std::int64_t jj = 0; jj < c; ++jj)
        if (selected(e, jj) == t)
          max_err =
              std::max(max_err, std::abs(double(plan.expert_gates(e)[j]) - gate_weights(e, jj)) /
                                    gate_weights(e, jj));
    }
  }
  std::int64_t without = 0;
  for (std::int64_t t = 0; t < T; ++t) {
    std::int64_t n = 0;
    for (std::int64_t e = 0; e < E; ++e) {
      REQUIRE(got_dispatch[t * E + e] == dispatch(t, e));
      max_err = std::max(max_err, std::abs(got_combine[t * E + e] - combine(t, e)) /
                                      std::max(1e-3, double(combine(t, e))));
    }
    for (std::int64_t s = 0; s < plan.top_k; ++s) n += plan.choice_expert[t * plan.top_k + s] >= 0;
    REQUIRE(n == per_token(t));
    without += dropped(t);
  }
  REQUIRE(without == 2);
  REQUIRE(plan.stats.tokens_without_expert == without);
  INFO("max relative error over gates: " << max_err);
  REQUIRE(max_err < 1e-5);
  WARN("expert_choice_tiny: max relative error " << max_err);
}

TEST_CASE("ExpertChoiceRouter matches a naive double reference on random logits",
          "[moe][router][expert_choice][property]") {
  const std::int64_t token_counts[] = {0, 1, 7, 64, 300};
  const std::int64_t expert_counts[] = {1, 2, 3, 8, 16};
  const double factors[] = {1.0, 2.0, 0.5, 1.25, 4.0, 100.0};
  std::uint32_t seed = 1;
  for (const std::int64_t T : token_counts) {
    for (const std::int64_t E : expert_counts) {
      for (int rep = 0; rep < 2; ++rep) {
        const double cf = factors[seed % 6];
        const std::int64_t min_cap = seed % 5 == 0 ? 2 : 0;
        ++seed;
        INFO("T=" << T << " E=" << E << " cf=" << cf << " min_cap=" << min_cap);
        const auto logits = test_support::random_tensor<double>({T, E}, seed, 1.5);
        const ExpertChoiceRouter<double> router(
            {.num_experts = E, .capacity_factor = cf, .min_capacity = min_cap});
        DispatchPlan<double> plan;
        router.route(logits, plan);
        check_against_reference(plan, reference(as_double(logits), T, E, cf, min_cap, {}), E,
                                1e-12);
      }
    }
  }
  // Several blocks of experts, and probabilities rising with the token index (every
  // token beats the current c-th best: the candidate buffers fill and are cut back).
  {
    const std::int64_t T = 500, E = 130;
    const auto logits = test_support::random_tensor<double>({T, E}, 123, 1.5);
    const ExpertChoiceRouter<double> router({.num_experts = E, .capacity_factor = 2.0});
    check_against_reference(router.route(logits), reference(as_double(logits), T, E, 2.0, 0, {}), E,
                            1e-12);
    Tensor<double> rising({T, 3});
    for (std::int64_t t = 0; t < T; ++t)
      for (std::int64_t e = 0; e < 3; ++e) rising(t, e) = 0.01 * double(t) * double(e);
    const ExpertChoiceRouter<double> r3({.num_experts = 3, .capacity_factor = 0.3});
    check_against_reference(r3.route(rising), reference(as_double(rising), T, 3, 0.3, 0, {}), 3,
                            1e-12);
  }
  // float, and repeated (tied) probabilities: ties go to the lower token index.
  const std::int64_t T = 300, E = 8;
  auto logits = test_support::random_tensor<float>({T, E}, 55, 1.5);
  for (std::int64_t t = 100; t < 200; ++t)
    for (std::int64_t e = 0; e < E; ++e) logits(t, e) = logits(t % 7, e);
  const ExpertChoiceRouter<float> router({.num_experts = E, .capacity_factor = 2.0});
  const auto plan = router.route(logits);
  check_against_reference(plan, reference(as_double(logits), T, E, 2.0, 0, {}), E, 2e-6);
}

TEST_CASE("ExpertChoiceRouter: large capacities with many ties match the naive reference",
          "[moe][router][expert_choice][property][ties]") {
  // Every row is a copy of one of 6 random rows, so each expert's probabilities
  // take 6 values and the c-th largest is tied with many tokens; c is set through
  // min_capacity (cf tiny): T/2, T - 1, T and, with a mask, all routed tokens.
  const std::int64_t T = 420, E = 70;
  for (int precision = 0; precision < 2; ++precision) {
    const auto base = test_support::random_tensor<double>({6, E}, 77, 1.5);
    Tensor<double> logits({T, E});
    std::mt19937 gen(5);
    for (std::int64_t t = 0; t < T; ++t) {
      const std::int64_t b = gen() % 6;
      for (std::int64_t e = 0; e < E; ++e) logits(t, e) = base(b, e);
    }
    std::vector<std::uint8_t> keep(T);
    for (auto& v : keep) v = gen() % 4 != 0;
    const std::int64_t kept = std::count(keep.begin(), keep.end(), std::uint8_t{1});
    for (const std::int64_t c : {T / 2, T - 1, T, kept}) {
      const bool masked = c == kept;
      const std::vector<std::uint8_t> m = masked ? keep : std::vector<std::uint8_t>{};
      INFO("precision=" << precision << " c=" << c << " masked=" << masked);
      const auto ref = reference(as_double(logits), T, E, 1e-9, c, m);
      REQUIRE(ref.capacity == c);
      if (precision == 0) {
        const ExpertChoiceRouter<double> router(
            {.num_experts = E, .capacity_factor = 1e-9, .min_capacity = c});
        check_against_reference(router.route(logits, TokenMask{m}), ref, E, 1e-12);
      } else {
        Tensor<float> lf({T, E});
        std::copy(logits.begin(), logits.end(), lf.begin());
        const ExpertChoiceRouter<float> router(
            {.num_experts = E, .capacity_factor = 1e-9, .min_capacity = c});
        DispatchPlan<float> one, two;
        {
          switchyard::ScopedNumThreads threads(1);
          router.route(lf, one, TokenMask{m});
        }
        {
          switchyard::ScopedNumThreads threads(2);
          router.route(lf, two, TokenMask{m});
        }
        check_against_reference(one, reference(as_double(lf), T, E, 1e-9, c, m), E, 2e-6);
        require_identical(one, two);
      }
    }
  }
}

TEST_CASE("ExpertChoiceRouter: masked tokens are never taken and count nowhere",
          "[moe][router][expert_choice][mask]") {
  const std::int64_t T = 200, E = 6;
  const auto logits = test_support::random_tensor<double>({T, E}, 13, 1.5);
  std::vector<std::uint8_t> keep(T);
  std::mt19937 gen(17);
  for (auto& v : keep) v = gen() % 3 != 0;
  const ExpertChoiceRouter<double> router({.num_experts = E, .capacity_factor = 1.5});
  DispatchPlan<double> plan;
  router.route(logits, plan, TokenMask{keep});
  check_against_reference(plan, reference(as_double(logits), T, E, 1.5, 0, keep), E, 1e-12);

  std::vector<std::int64_t> rows;
  for (std::int64_t t = 0; t < T; ++t)
    if (keep[t]) rows.push_back(t);
  const std::int64_t R = std::int64_t(rows.size());
  Tensor<double> sub({R, E});
  for (std::int64_t i = 0; i < R; ++i)
    for (std::int64_t e = 0; e < E; ++e) sub(i, e) = logits(rows[i], e);
  const auto compact = router.route(sub);
  REQUIRE(compact.capacity == plan.capacity);
  REQUIRE(compact.stats.tokens_without_expert == plan.stats.tokens_without_expert);
  REQUIRE(compact.stats.z_loss == Approx(plan.stats.z_loss).epsilon(1e-12));
  REQUIRE(compact.stats.entropy == Approx(plan.stats.entropy).epsilon(1e-12));
  for (std::int64_t e = 0; e < E; ++e) {
    REQUIRE(compact.stats.mean_prob[e] == Approx(plan.stats.mean_prob[e]).epsilon(1e-12));
    for (std::int64_t j = 0; j < compact.expert_size(e); ++j) {
      REQUIRE(rows[compact.expert_tokens(e)[j]] == plan.expert_tokens(e)[j]);
      REQUIRE(compact.expert_gates(e)[j] == plan.expert_gates(e)[j]);
    }
  }
  for (std::int64_t t = 0; t < T; ++t)
    if (!keep[t]) REQUIRE(plan.choice_expert[t * plan.top_k] == -1);

  Tensor<double> none({0, E});
  const auto p0 = router.route(none);
  REQUIRE_NOTHROW(p0.check());
  REQUIRE(p0.nnz() == 0);
  REQUIRE(p0.capacity == 0);
  const std::vector<std::uint8_t> nobody(T, 0);
  const auto p1 = router.route(logits, TokenMask{nobody});
  REQUIRE_NOTHROW(p1.check());
  REQUIRE(p1.nnz() == 0);
  REQUIRE(p1.stats.tokens_without_expert == 0);
  REQUIRE(p1.stats.z_loss == 0.0);
}

TEST_CASE("ExpertChoiceRouter: hand-worked cases", "[moe][router][expert_choice][hand]") {
  // T = 4, E = 2, cf = 1: c = floor(1 * 4 / 2) = 2.
  //   t0 (ln 3, 0): p = (0.75, 0.25);  t1 (0, 0): p = (0.5, 0.5)
  //   t2 (ln 4, 0): p = (0.8, 0.2);    t3 (0, ln 9): p = (0.1, 0.9)
  // e0 takes the two largest of (0.75, 0.5, 0.8, 0.1): t2, t0 -> run [t0, t2].
  // e1 takes the two largest of (0.25, 0.5, 0.2, 0.9): t3, t1 -> run [t1, t3].
  Tensor<double> logits({4, 2});
  const double l[8] = {std::log(3.0), 0, 0, 0, std::log(4.0), 0, 0, std::log(9.0)};
  std::copy(l, l + 8, logits.begin());
  {
    const ExpertChoiceRouter<double> router({.num_experts = 2});
    const auto plan = router.route(logits);
    REQUIRE_NOTHROW(plan.check());
    REQUIRE(plan.capacity == 2);
    REQUIRE(plan.token_index == std::vector<std::int32_t>{0, 2, 1, 3});
    REQUIRE(plan.gate[0] == Approx(0.75));
    REQUIRE(plan.gate[1] == Approx(0.8));
    REQUIRE(plan.gate[2] == Approx(0.5));
    REQUIRE(plan.gate[3] == Approx(0.9));
    REQUIRE(plan.slot == std::vector<std::int32_t>{0, 0, 0, 0});
    // K = 1: each token was taken by one expert
    REQUIRE(plan.top_k == 1);
    REQUIRE(plan.choice_expert == std::vector<std::int32_t>{0, 1, 0, 1});
    REQUIRE(plan.stats.tokens_without_expert == 0);
    REQUIRE(plan.stats.aux_loss == 0.0);
  }
  {
    // cf = 0.5: c = 1. e0 takes t2 (0.8); e1 takes t3 (0.9); t0, t1 are left out.
    const ExpertChoiceRouter<double> router({.num_experts = 2, .capacity_factor = 0.5});
    const auto plan = router.route(logits);
    REQUIRE(plan.token_index == std::vector<std::int32_t>{2, 3});
    REQUIRE(plan.stats.tokens_without_expert == 2);
  }
  {
    // All probabilities equal, c = 1: both experts take token 0 (lowest index), which
    // then lists e0 in slot 0 and e1 in slot 1.
    Tensor<double> flat({4, 2});
    std::fill(flat.begin(), flat.end(), 0.0);
    const ExpertChoiceRouter<double> router({.num_experts = 2, .capacity_factor = 0.5});
    const auto plan = router.route(flat);
    REQUIRE(plan.token_index == std::vector<std::int32_t>{0, 0});
    REQUIRE(plan.slot == std::vector<std::int32_t>{0, 1});
    REQUIRE(plan.choice_expert[0] == 0);
    REQUIRE(plan.choice_expert[1] == 1);
    REQUIRE(plan.choice_weight[1] == Approx(0.5));
    REQUIRE(plan.stats.tokens_without_expert == 3);
  }
  {
    // c = floor(0.25 * 4 / 2) = 0: a valid empty plan, every token without expert.
    const ExpertChoiceRouter<double> router({.num_experts = 2, .capacity_factor = 0.25});
    const auto plan = router.route(logits);
    REQUIRE_NOTHROW(plan.check());
    REQUIRE(plan.capacity == 0);
    REQUIRE(plan.nnz() == 0);
    REQUIRE(plan.stats.tokens_without_expert == 4);
  }
  {
    // One expert, cf = 2: c = 8 is clamped (visibly) to the 4 tokens.
    Tensor<double> one({4, 1});
    std::fill(one.begin(), one.end(), 1.0);
    const ExpertChoiceRouter<double> router({.num_experts = 1, .capacity_factor = 2.0});
    const auto plan = router.route(one);
    REQUIRE(plan.capacity == 4);
    REQUIRE(plan.requested_capacity == 8);
    REQUIRE(plan.capacity_clamped);
    REQUIRE(plan.token_index == std::vector<std::int32_t>{0, 1, 2, 3});
    REQUIRE(plan.gate[3] == 1.0);
  }
}

TEST_CASE("ExpertChoiceRouter: documented errors", "[moe][router][expert_choice][errors]") {
  using Catch::Contains;
  using switchyard::config_error;
  using switchyard::shape_error;
  using R = ExpertChoiceRouter<float>;
  REQUIRE_THROWS_WITH(R({.num_experts = 0}),
                      Contains("ExpertChoiceRouter") && Contains("num_experts"));
  REQUIRE_THROWS_AS(R({.num_experts = 4, .capacity_factor = 0.0}), config_error);
  REQUIRE_THROWS_AS(R({.num_experts = 4, .capacity_factor = -1.0}), config_error);
  REQUIRE_THROWS_WITH(R({.num_experts = 4, .capacity_factor = std::nan("")}),
                      Contains("ExpertChoiceRouter") && Contains("capacity_factor"));
  REQUIRE_THROWS_AS(
      R({.num_experts = 4, .capacity_factor = std::numeric_limits<double>::infinity()}),
      config_error);
  REQUIRE_THROWS_WITH(R({.num_experts = 4, .min_capacity = -3}),
                      Contains("ExpertChoiceRouter") && Contains("min_capacity"));
  const R router({.num_experts = 4});
  Tensor<float> wrong({3, 2});
  REQUIRE_THROWS_AS(router.route(wrong), shape_error);
  REQUIRE_THROWS_WITH(router.route(wrong), Contains("ExpertChoiceRouter") && Contains("logits"));
  auto logits = test_support::random_tensor<float>({3, 4}, 2);
  const std::vector<std::uint8_t> keep(5, 1);
  REQUIRE_THROWS_AS(router.route(logits, TokenMask{keep}), shape_error);
  REQUIRE_THROWS_WITH(router.route(logits, TokenMask{keep}),
                      Contains("ExpertChoiceRouter") && Contains("mask"));
  logits(2, 0) = std::numeric_limits<float>::infinity();
  REQUIRE_THROWS_AS(router.route(logits), config_error);
  logits(2, 0) = std::numeric_limits<float>::quiet_NaN();
  REQUIRE_THROWS_WITH(router.route(logits), Contains("ExpertChoiceRouter") && Contains("token 2"));
}

TEST_CASE("ExpertChoiceRouter: 1 and 2 threads give bit-identical plans",
          "[moe][router][expert_choice][threads]") {
  const std::int64_t T = 4096, E = 64;
  const auto logits = test_support::random_tensor<float>({T, E}, 41, 1.5);
  const ExpertChoiceRouter<float> router({.num_experts = E});
  DispatchPlan<float> one, two;
  {
    switchyard::ScopedNumThreads threads(1);
    router.route(logits, one);
  }
  {
    switchyard::ScopedNumThreads threads(2);
    router.route(logits, two);
  }
  REQUIRE_NOTHROW(one.check());
  REQUIRE(one.capacity == 64);
  require_identical(one, two);
  router.route(logits, two);
  require_identical(one, two);
}

TEST_CASE("ExpertChoiceRouter: sampled thresholds that mislead fall back to an exact selection",
          "[moe][router][expert_choice]") {
  // T = 1024 routed rows, of which the threshold sample reads 256 (rows 4i). Two cases the
  // sample gets wrong, each checked against the naive reference:
  const std::int64_t T = 1024, E = 2;
  std::vector<double> x(static_cast<std::size_t>(T * E), 0.0);
  // 1. Too few candidates: expert 0 is strongest on the sampled rows (p = 0.99), clearly
  //    weaker elsewhere, and c = 300 > the 256 sampled-row tokens above the threshold.
  for (std::int64_t t = 0; t < T; ++t) {
    x[std::size_t(t * E)] = t % 4 == 0 ? std::log(99.0) : 0.1 + 1e-3 * double(t % 97);
    x[std::size_t(t * E + 1)] = 0.0;
  }
  const double cf = 600.0 / 1024.0;  // c = floor(cf * T / E) = 300
  for (const bool as_float : {false, true}) {
    CAPTURE(as_float);
    const Ref r = reference(x, T, E, cf, 0, {});
    REQUIRE(r.capacity == 300);
    if (as_float) {
      Tensor<float> logits({T, E});
      std::copy(x.begin(), x.end(), logits.begin());
      const auto plan =
          ExpertChoiceRouter<float>({.num_experts = E, .capacity_factor = cf}).route(logits);
      check_against_reference(plan, r, E, 1e-6);
    } else {
      Tensor<double> logits({T, E});
      std::copy(x.begin(), x.end(), logits.begin());
      const auto plan =
          ExpertChoiceRouter<double>({.num_experts = E, .capacity_factor = cf}).route(logits);
      check_against_reference(plan, r, E, 1e-12);
    }
  }
  // 2. Too many candidates: all logits equal, so every token ties at the threshold (more
  //    than the candidate buffer holds); ties go to the lowest tokens, 0..255 for both.
  std::fill(x.begin(), x.end(), 0.0);
  Tensor<double> flat({T, E});
  std::fill(flat.begin(), flat.end(), 0.0);
  const auto plan =
      ExpertChoiceRouter<double>({.num_experts = E, .capacity_factor = 0.5}).route(flat);
  check_against_reference(plan, reference(x, T, E, 0.5, 0, {}), E, 1e-12);
  REQUIRE(plan.expert_tokens(1).back() == 255);
  REQUIRE(plan.top_k == 2);
}
