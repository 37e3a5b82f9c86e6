// CapacityRouter (moe/router_capacity.hpp): Megatron-LM fixtures (Switch top-1 and
// top-2 with capacity), a naive double reference on random logits, token masks,
// hand-worked cases, errors and thread-count determinism.
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
#include "switchyard/core/tensor.hpp"
#include "switchyard/moe/router_capacity.hpp"

using switchyard::ConstView;
using switchyard::Tensor;
using switchyard::moe::CapacityRouter;
using switchyard::moe::CapacityRouterConfig;
using switchyard::moe::DispatchPlan;
using switchyard::moe::DropPolicy;
using switchyard::moe::TokenMask;

static_assert(switchyard::moe::LogitsRouter<CapacityRouter<float>, float>);
static_assert(switchyard::moe::LogitsRouter<CapacityRouter<double>, double>);

namespace {

// ---------------------------------------------------------------------------
// Naive reference in double: plain loops and sorts, no library helpers.
struct Ref {
  std::int64_t capacity = 0, requested = 0;
  std::vector<std::vector<int>> chosen;   // [T][k] best first (empty if masked)
  std::vector<std::vector<double>> gate;  // [T][k] gates before capacity
  std::vector<std::vector<int>> kept;     // [T][k] 1 = kept
  std::vector<std::int64_t> tokens_per_expert, kept_per_expert;
  std::int64_t dropped = 0, without = 0, routed = 0;
  double aux = 0, z = 0;
};

Ref reference(const std::vector<double>& x, std::int64_t T, std::int64_t E, std::int64_t k,
              double cf, std::int64_t min_cap, bool pre, DropPolicy policy,
              const std::vector<std::uint8_t>& keep) {
  Ref r;
  r.chosen.assign(T, {});
  r.gate.assign(T, {});
  r.kept.assign(T, {});
  r.tokens_per_expert.assign(E, 0);
  r.kept_per_expert.assign(E, 0);
  std::vector<double> P(E, 0.0);
  double lse2 = 0;
  for (std::int64_t t = 0; t < T; ++t) {
    if (!keep.empty() && !keep[t]) continue;
    ++r.routed;
    double m = -1e300;
    for (std::int64_t e = 0; e < E; ++e) m = std::max(m, x[t * E + e]);
    double s = 0;
    for (std::int64_t e = 0; e < E; ++e) s += std::exp(x[t * E + e] - m);
    const double lse = m + std::log(s);
    lse2 += lse * lse;
    std::vector<double> p(E);
    for (std::int64_t e = 0; e < E; ++e) {
      p[e] = std::exp(x[t * E + e] - lse);
      P[e] += p[e];
    }
    std::vector<int> order(E);
    std::iota(order.begin(), order.end(), 0);
    const auto& score = pre ? p : std::vector<double>(x.begin() + t * E, x.begin() + (t + 1) * E);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return score[a] > score[b]; });
    order.resize(k);
    r.chosen[t] = order;
    if (pre) {
      for (int e : order) r.gate[t].push_back(p[e]);
    } else {
      double den = 0;
      for (int e : order) den += std::exp(x[t * E + e] - x[t * E + order[0]]);
      for (int e : order) r.gate[t].push_back(std::exp(x[t * E + e] - x[t * E + order[0]]) / den);
    }
    r.kept[t].assign(k, 1);
    for (int e : order) ++r.tokens_per_expert[e];
  }
  r.requested = std::max<std::int64_t>(
      static_cast<std::int64_t>(std::ceil(double(r.routed) * double(k) / double(E) * cf)), min_cap);
  r.capacity = std::min(r.requested, r.routed);
  for (std::int64_t e = 0; e < E; ++e) {
    struct A {
      std::int64_t t, s;
      double g;
    };
    std::vector<A> list;
    for (std::int64_t t = 0; t < T; ++t)
      for (std::size_t s = 0; s < r.chosen[t].size(); ++s)
        if (r.chosen[t][s] == e) list.push_back({t, std::int64_t(s), r.gate[t][s]});
    if (policy == DropPolicy::probs)
      std::stable_sort(list.begin(), list.end(), [](const A& a, const A& b) { return a.g > b.g; });
    for (std::size_t i = 0; i < list.size(); ++i) {
      if (std::int64_t(i) >= r.capacity) {
        r.kept[list[i].t][list[i].s] = 0;
        ++r.dropped;
      } else {
        ++r.kept_per_expert[e];
      }
    }
  }
  for (std::int64_t t = 0; t < T; ++t) {
    if (r.chosen[t].empty()) continue;
    int any = 0;
    for (int v : r.kept[t]) any |= v;
    r.without += !any;
  }
  if (r.routed > 0) {
    double s = 0;
    for (std::int64_t e = 0; e < E; ++e) s += double(r.tokens_per_expert[e]) * P[e];
    r.aux = double(E) / (double(r.routed) * double(r.routed) * double(k)) * s;
    r.z = lse2 / double(r.routed);
  }
  return r;
}

template <class T>
void check_against_reference(const DispatchPlan<T>& plan, const Ref& r, std::int64_t E,
                             std::int64_t k, double tol) {
  REQUIRE_NOTHROW(plan.check());
  const std::int64_t Tn = plan.num_tokens;
  REQUIRE(plan.top_k == k);
  REQUIRE(plan.capacity == r.capacity);
  REQUIRE(plan.requested_capacity == r.requested);
  REQUIRE(plan.capacity_clamped == (r.capacity != r.requested));
  for (std::int64_t t = 0; t < Tn; ++t) {
    for (std::int64_t s = 0; s < k; ++s) {
      const auto e = plan.choice_expert[t * k + s];
      const double w = double(plan.choice_weight[t * k + s]);
      if (r.chosen[t].empty()) {
        REQUIRE(e == -1);
        REQUIRE(w == 0.0);
        continue;
      }
      REQUIRE(e == r.chosen[t][s]);
      const double want = r.kept[t][s] ? r.gate[t][s] : 0.0;
      REQUIRE(std::abs(w - want) <= tol * std::max(1e-3, std::abs(want)));
    }
  }
  for (std::int64_t e = 0; e < E; ++e) {
    REQUIRE(plan.expert_size(e) <= plan.capacity);
    REQUIRE(plan.stats.tokens_per_expert[e] == r.tokens_per_expert[e]);
    REQUIRE(plan.stats.kept_per_expert[e] == r.kept_per_expert[e]);
    REQUIRE(plan.expert_size(e) == r.kept_per_expert[e]);
  }
  REQUIRE(plan.stats.dropped == r.dropped);
  REQUIRE(std::int64_t(plan.dropped.size()) == r.dropped);
  for (const auto& d : plan.dropped) REQUIRE(r.kept[d.token][d.slot] == 0);
  REQUIRE(plan.stats.tokens_without_expert == r.without);
  REQUIRE(plan.stats.routed_tokens == r.routed);
  REQUIRE(plan.stats.aux_loss == Approx(r.aux).epsilon(tol).margin(1e-12));
  REQUIRE(plan.stats.z_loss == Approx(r.z).epsilon(tol).margin(1e-12));
}

template <class T>
Tensor<T> random_logits(std::int64_t tokens, std::int64_t experts, std::uint32_t seed,
                        double sd = 1.5) {
  return test_support::random_tensor<T>({tokens, experts}, seed, sd);
}

std::vector<double> as_double(const Tensor<double>& t) { return {t.begin(), t.end()}; }
std::vector<double> as_double(const Tensor<float>& t) { return {t.begin(), t.end()}; }

// ---------------------------------------------------------------------------
// Fixtures.
void check_fixture(const char* file, std::int64_t k, bool pre, std::int64_t want_dropped) {
  const auto f = open_fixture(file);
  const Tensor<float> x = f.tensor<float>("x"), w = f.tensor<float>("router_w");
  const Tensor<float> logits = f.tensor<float>("router_logits");
  const std::int64_t T = logits.extent(0), E = logits.extent(1);
  const Tensor<float> mine = switchyard::moe::router_logits<float>(x, w);
  INFO("router_logits max rel err");
  REQUIRE(test_support::max_rel_err(as_double(mine), as_double(logits), 1e-2) < 1e-5);

  const CapacityRouter<float> router({.num_experts = E,
                                      .top_k = k,
                                      .capacity_factor = 1.0,
                                      .pre_softmax = pre,
                                      .drop_policy = DropPolicy::probs});
  const DispatchPlan<float> plan = router.route(logits);
  REQUIRE_NOTHROW(plan.check());
  REQUIRE(plan.capacity == f.scalar<std::int64_t>("capacity"));
  REQUIRE_FALSE(plan.capacity_clamped);

  // Before capacity: the same experts (in order), and gates from a drop-free run.
  const auto topk_idx = f.tensor<std::int64_t>("topk_idx");
  const CapacityRouter<float> roomy(
      {.num_experts = E, .top_k = k, .capacity_factor = 100.0, .pre_softmax = pre});
  const DispatchPlan<float> free_plan = roomy.route(logits);
  REQUIRE(free_plan.capacity_clamped);
  REQUIRE(free_plan.capacity == T);
  REQUIRE(free_plan.dropped.empty());
  const auto gates_before = f.tensor<float>("gates_before_capacity");
  const auto map_before = f.tensor<std::int64_t>("dispatch_mask_before_capacity");
  double max_err = 0;
  for (std::int64_t t = 0; t < T; ++t) {
    for (std::int64_t s = 0; s < k; ++s) {
      REQUIRE(plan.choice_expert[t * k + s] == topk_idx(t, s));
      REQUIRE(free_plan.choice_expert[t * k + s] == topk_idx(t, s));
    }
    for (std::int64_t e = 0; e < E; ++e) {
      double g = 0;
      std::int64_t in = 0;
      for (std::int64_t s = 0; s < k; ++s)
        if (free_plan.choice_expert[t * k + s] == e) g = free_plan.choice_weight[t * k + s], in = 1;
      REQUIRE(in == map_before(t, e));
      max_err = std::max(
          max_err, std::abs(g - gates_before(t, e)) / std::max(1e-3, double(gates_before(t, e))));
    }
  }
  // After capacity: combine weights, dispatch / drop masks, fully dropped tokens.
  const auto combine = f.tensor<float>("combine_weights");
  const auto dispatch = f.tensor<std::int64_t>("dispatch_mask");
  const auto dropped = f.tensor<std::int64_t>("dropped_mask");
  const auto fully = f.tensor<std::int64_t>("token_fully_dropped");
  std::vector<std::int64_t> got_dispatch(T * E, 0), got_dropped(T * E, 0);
  std::vector<double> got_combine(T * E, 0.0);
  for (std::int64_t e = 0; e < E; ++e) {
    for (std::int64_t i = plan.expert_offsets[e]; i < plan.expert_offsets[e + 1]; ++i) {
      got_dispatch[plan.token_index[i] * E + e] = 1;
      got_combine[plan.token_index[i] * E + e] = plan.gate[i];
    }
  }
  for (const auto& d : plan.dropped) got_dropped[d.token * E + d.expert] = 1;
  REQUIRE(std::int64_t(plan.dropped.size()) == want_dropped);
  std::int64_t fully_dropped = 0;
  for (std::int64_t t = 0; t < T; ++t) {
    std::int64_t any = 0;
    for (std::int64_t e = 0; e < E; ++e) {
      REQUIRE(got_dispatch[t * E + e] == dispatch(t, e));
      REQUIRE(got_dropped[t * E + e] == dropped(t, e));
      max_err = std::max(max_err, std::abs(got_combine[t * E + e] - combine(t, e)) /
                                      std::max(1e-3, double(combine(t, e))));
      any |= got_dispatch[t * E + e];
    }
    REQUIRE((any == 0) == (fully(t) == 1));
    fully_dropped += fully(t);
  }
  REQUIRE(plan.stats.tokens_without_expert == fully_dropped);
  const auto tpe = f.tensor<std::int64_t>("tokens_per_expert");
  for (std::int64_t e = 0; e < E; ++e) REQUIRE(plan.stats.tokens_per_expert[e] == tpe(e));
  const double aux = f.scalar<float>("aux_loss"), z = f.scalar<float>("z_loss");
  max_err = std::max(max_err, std::abs(plan.stats.aux_loss - aux) / aux);
  max_err = std::max(max_err, std::abs(plan.stats.z_loss - z) / z);
  INFO("max relative error over gates, combine weights and losses: " << max_err);
  REQUIRE(max_err < 1e-5);
  WARN(file << ": max relative error " << max_err);
}

}  // namespace

TEST_CASE("CapacityRouter reproduces the Megatron Switch top-1 capacity fixture",
          "[moe][router][capacity][fixture]") {
  check_fixture("switch_top1_capacity_tiny.safetensors", 1, true, 2);
}

TEST_CASE("CapacityRouter reproduces the Megatron top-2 capacity fixture (top-k then softmax)",
          "[moe][router][capacity][fixture]") {
  check_fixture("topk_capacity_tiny.safetensors", 2, false, 3);
}

TEST_CASE("CapacityRouter matches a naive double reference on random logits",
          "[moe][router][capacity][property]") {
  const std::int64_t token_counts[] = {0, 1, 7, 64, 300};
  const std::int64_t expert_counts[] = {1, 2, 3, 8, 16};
  const double factors[] = {0.5, 1.0, 1.25, 2.0};
  std::uint32_t seed = 1;
  for (const std::int64_t T : token_counts) {
    for (const std::int64_t E : expert_counts) {
      for (const std::int64_t k : {std::int64_t{1}, std::int64_t{2}, std::int64_t{3}, E}) {
        if (k > E) continue;
        for (const bool pre : {true, false}) {
          if (!pre && k == 1) continue;
          for (const auto policy : {DropPolicy::probs, DropPolicy::position}) {
            const double cf = factors[seed % 4];
            const std::int64_t min_cap = seed % 5 == 0 ? 3 : 0;
            ++seed;
            INFO("T=" << T << " E=" << E << " k=" << k << " pre=" << pre
                      << " policy=" << int(policy) << " cf=" << cf << " min_cap=" << min_cap);
            const auto logits = random_logits<double>(T, E, seed);
            const CapacityRouter<double> router({.num_experts = E,
                                                 .top_k = k,
                                                 .capacity_factor = cf,
                                                 .min_capacity = min_cap,
                                                 .pre_softmax = pre,
                                                 .drop_policy = policy});
            DispatchPlan<double> plan;
            router.route(logits, plan);
            const Ref r = reference(as_double(logits), T, E, k, cf, min_cap, pre, policy, {});
            check_against_reference(plan, r, E, k, 1e-12);
          }
        }
      }
    }
  }
}

TEST_CASE("CapacityRouter in float matches the double reference",
          "[moe][router][capacity][property]") {
  for (const bool pre : {true, false}) {
    for (const auto policy : {DropPolicy::probs, DropPolicy::position}) {
      const std::int64_t T = 300, E = 8, k = 2;
      const auto logits = random_logits<float>(T, E, 99 + pre);
      const CapacityRouter<float> router({.num_experts = E,
                                          .top_k = k,
                                          .capacity_factor = 1.0,
                                          .pre_softmax = pre,
                                          .drop_policy = policy});
      const auto plan = router.route(logits);
      const Ref r = reference(as_double(logits), T, E, k, 1.0, 0, pre, policy, {});
      REQUIRE(r.dropped > 0);
      check_against_reference(plan, r, E, k, 2e-5);
    }
  }
}

TEST_CASE("CapacityRouter: masked tokens are never routed and count nowhere",
          "[moe][router][capacity][mask]") {
  for (const auto policy : {DropPolicy::probs, DropPolicy::position}) {
    const std::int64_t T = 200, E = 6, k = 2;
    const auto logits = random_logits<double>(T, E, 5);
    std::vector<std::uint8_t> keep(T);
    std::mt19937 gen(3);
    for (auto& v : keep) v = gen() % 3 != 0;
    const CapacityRouter<double> router(
        {.num_experts = E, .top_k = k, .capacity_factor = 1.0, .drop_policy = policy});
    DispatchPlan<double> plan;
    router.route(logits, plan, TokenMask{keep});
    const Ref r = reference(as_double(logits), T, E, k, 1.0, 0, true, policy, keep);
    check_against_reference(plan, r, E, k, 1e-12);

    // The plan on the compacted routed tokens has the same statistics.
    std::vector<std::int64_t> rows;
    for (std::int64_t t = 0; t < T; ++t)
      if (keep[t]) rows.push_back(t);
    const std::int64_t R = std::int64_t(rows.size());
    Tensor<double> sub({R, E});
    for (std::int64_t i = 0; i < R; ++i)
      for (std::int64_t e = 0; e < E; ++e) sub(i, e) = logits(rows[i], e);
    const auto compact = router.route(sub);
    REQUIRE(compact.capacity == plan.capacity);
    REQUIRE(compact.stats.routed_tokens == plan.stats.routed_tokens);
    REQUIRE(compact.stats.tokens_per_expert == plan.stats.tokens_per_expert);
    REQUIRE(compact.stats.kept_per_expert == plan.stats.kept_per_expert);
    REQUIRE(compact.stats.dropped == plan.stats.dropped);
    REQUIRE(compact.stats.tokens_without_expert == plan.stats.tokens_without_expert);
    REQUIRE(compact.stats.aux_loss == Approx(plan.stats.aux_loss).epsilon(1e-12));
    REQUIRE(compact.stats.z_loss == Approx(plan.stats.z_loss).epsilon(1e-12));
    REQUIRE(compact.stats.entropy == Approx(plan.stats.entropy).epsilon(1e-12));
    for (std::int64_t i = 0; i < R; ++i) {
      for (std::int64_t s = 0; s < k; ++s) {
        REQUIRE(compact.choice_expert[i * k + s] == plan.choice_expert[rows[i] * k + s]);
        REQUIRE(compact.choice_weight[i * k + s] == plan.choice_weight[rows[i] * k + s]);
      }
    }
    for (std::int64_t t = 0; t < T; ++t) {
      if (keep[t]) continue;
      for (std::int64_t s = 0; s < k; ++s) REQUIRE(plan.choice_expert[t * k + s] == -1);
    }
  }
}

TEST_CASE("CapacityRouter: empty batches and all-masked batches give empty plans",
          "[moe][router][capacity]") {
  const CapacityRouter<float> router({.num_experts = 4, .top_k = 2});
  Tensor<float> none({0, 4});
  const auto p0 = router.route(none);
  REQUIRE_NOTHROW(p0.check());
  REQUIRE(p0.nnz() == 0);
  REQUIRE(p0.capacity == 0);
  REQUIRE(p0.stats.aux_loss == 0.0);
  REQUIRE(p0.stats.z_loss == 0.0);

  const auto logits = random_logits<float>(5, 4, 8);
  const std::vector<std::uint8_t> keep(5, 0);
  const auto p1 = router.route(logits, TokenMask{keep});
  REQUIRE_NOTHROW(p1.check());
  REQUIRE(p1.nnz() == 0);
  REQUIRE(p1.dropped.empty());
  REQUIRE(p1.stats.routed_tokens == 0);
  REQUIRE(p1.stats.tokens_without_expert == 0);
  REQUIRE(p1.stats.aux_loss == 0.0);
  REQUIRE(p1.stats.z_loss == 0.0);
}

TEST_CASE("CapacityRouter: hand-worked Switch top-1 case", "[moe][router][capacity][hand]") {
  // T = 4, E = 2, k = 1, cf = 1: capacity = ceil(4 * 1 / 2 * 1) = 2.
  //   t0 logits (ln 3, 0): p = (0.75, 0.25) -> e0, gate 0.75
  //   t1 logits (0, 0):    p = (0.5, 0.5)   -> e0 (tie -> lower index), gate 0.5
  //   t2 logits (ln 4, 0): p = (0.8, 0.2)   -> e0, gate 0.8
  //   t3 logits (0, ln 9): p = (0.1, 0.9)   -> e1, gate 0.9
  // e0 has 3 assignments > 2. probs keeps t2 (0.8), t0 (0.75), drops t1;
  // position keeps t0, t1 and drops t2.
  // n = (3, 1), P = (0.75 + 0.5 + 0.8 + 0.1, 0.25 + 0.5 + 0.2 + 0.9) = (2.15, 1.85)
  // aux = E / (T^2 k) * (3 * 2.15 + 1 * 1.85) = 2 / 16 * 8.3 = 1.0375.
  // z = mean(ln(4)^2, ln(2)^2, ln(5)^2, ln(10)^2).
  Tensor<double> logits({4, 2});
  const double l[8] = {std::log(3.0), 0, 0, 0, std::log(4.0), 0, 0, std::log(9.0)};
  std::copy(l, l + 8, logits.begin());
  const double z = (std::pow(std::log(4.0), 2) + std::pow(std::log(2.0), 2) +
                    std::pow(std::log(5.0), 2) + std::pow(std::log(10.0), 2)) /
                   4;
  {
    const CapacityRouter<double> router({.num_experts = 2});
    const auto plan = router.route(logits);
    REQUIRE_NOTHROW(plan.check());
    REQUIRE(plan.capacity == 2);
    REQUIRE(plan.expert_tokens(0).size() == 2);
    REQUIRE(plan.expert_tokens(0)[0] == 0);
    REQUIRE(plan.expert_tokens(0)[1] == 2);
    REQUIRE(plan.expert_gates(0)[0] == Approx(0.75));
    REQUIRE(plan.expert_gates(0)[1] == Approx(0.8));
    REQUIRE(plan.expert_tokens(1)[0] == 3);
    REQUIRE(plan.expert_gates(1)[0] == Approx(0.9));
    REQUIRE(plan.dropped.size() == 1);
    REQUIRE(plan.dropped[0].token == 1);
    REQUIRE(plan.dropped[0].expert == 0);
    REQUIRE(plan.choice_expert[1] == 0);
    REQUIRE(plan.choice_weight[1] == 0.0);
    REQUIRE(plan.stats.tokens_per_expert == std::vector<std::int64_t>{3, 1});
    REQUIRE(plan.stats.kept_per_expert == std::vector<std::int64_t>{2, 1});
    REQUIRE(plan.stats.tokens_without_expert == 1);
    REQUIRE(plan.stats.aux_loss == Approx(1.0375).epsilon(1e-12));
    REQUIRE(plan.stats.z_loss == Approx(z).epsilon(1e-12));
  }
  {
    const CapacityRouter<double> router({.num_experts = 2, .drop_policy = DropPolicy::position});
    const auto plan = router.route(logits);
    REQUIRE(plan.expert_tokens(0)[0] == 0);
    REQUIRE(plan.expert_tokens(0)[1] == 1);
    REQUIRE(plan.expert_gates(0)[1] == Approx(0.5));
    REQUIRE(plan.dropped.size() == 1);
    REQUIRE(plan.dropped[0].token == 2);
    REQUIRE(plan.stats.aux_loss == Approx(1.0375).epsilon(1e-12));
  }
  {
    // Equal gates compete: four tokens with p = (0.5, 0.5) all pick e0 (lower
    // index); capacity ceil(4/2 * 0.5) = 1 keeps the lowest token index.
    Tensor<double> flat({4, 2});
    std::fill(flat.begin(), flat.end(), 0.0);
    const CapacityRouter<double> router({.num_experts = 2, .capacity_factor = 0.5});
    const auto plan = router.route(flat);
    REQUIRE(plan.capacity == 1);
    REQUIRE(plan.expert_tokens(0).size() == 1);
    REQUIRE(plan.expert_tokens(0)[0] == 0);
    REQUIRE(plan.expert_size(1) == 0);
    REQUIRE(plan.stats.tokens_without_expert == 3);
  }
}

TEST_CASE("CapacityRouter: hand-worked top-2 with softmax after top-k",
          "[moe][router][capacity][hand]") {
  // t0 logits (0, ln 3, -5): top-2 = e1 (ln 3), e0 (0); gates = softmax(ln 3, 0) = (0.75, 0.25).
  // t1 logits (1, 1, 1): ties -> e0, e1; gates (0.5, 0.5).
  // capacity = ceil(2 * 2 / 3 * 1.5) = 2: nothing dropped.
  Tensor<double> logits({2, 3});
  const double l[6] = {0, std::log(3.0), -5, 1, 1, 1};
  std::copy(l, l + 6, logits.begin());
  const CapacityRouter<double> router(
      {.num_experts = 3, .top_k = 2, .capacity_factor = 1.5, .pre_softmax = false});
  const auto plan = router.route(logits);
  REQUIRE_NOTHROW(plan.check());
  REQUIRE(plan.capacity == 2);
  REQUIRE(plan.choice_expert == std::vector<std::int32_t>{1, 0, 0, 1});
  REQUIRE(plan.choice_weight[0] == Approx(0.75));
  REQUIRE(plan.choice_weight[1] == Approx(0.25));
  REQUIRE(plan.choice_weight[2] == Approx(0.5));
  REQUIRE(plan.choice_weight[3] == Approx(0.5));
  REQUIRE(plan.dropped.empty());

  // -inf logits are valid (an expert ruled out): (-inf, 0, -inf) picks e1 then e0
  // (the lower index among the -inf), gates softmax(0, -inf) = (1, 0).
  Tensor<float> with_inf({1, 3});
  const float inf = std::numeric_limits<float>::infinity();
  with_inf(0, 0) = -inf;
  with_inf(0, 1) = 0;
  with_inf(0, 2) = -inf;
  for (const bool pre : {true, false}) {
    const CapacityRouter<float> r2({.num_experts = 3, .top_k = 2, .pre_softmax = pre});
    const auto p2 = r2.route(with_inf);
    REQUIRE_NOTHROW(p2.check());
    REQUIRE(p2.choice_expert == std::vector<std::int32_t>{1, 0});
    REQUIRE(p2.choice_weight == std::vector<float>{1.0f, 0.0f});
  }
}

TEST_CASE("CapacityRouter: documented errors", "[moe][router][capacity][errors]") {
  using Catch::Contains;
  using switchyard::config_error;
  using switchyard::shape_error;
  using R = CapacityRouter<float>;
  REQUIRE_THROWS_AS(R({.num_experts = 0}), config_error);
  REQUIRE_THROWS_AS(R({.num_experts = 4, .top_k = 5}), config_error);
  REQUIRE_THROWS_WITH(R({.num_experts = 4, .top_k = 5}),
                      Contains("CapacityRouter") && Contains("top_k"));
  REQUIRE_THROWS_AS(R({.num_experts = 4, .top_k = 0}), config_error);
  REQUIRE_THROWS_AS(R({.num_experts = 4, .capacity_factor = 0.0}), config_error);
  REQUIRE_THROWS_AS(R({.num_experts = 4, .capacity_factor = -1.0}), config_error);
  REQUIRE_THROWS_WITH(R({.num_experts = 4, .capacity_factor = std::nan("")}),
                      Contains("CapacityRouter") && Contains("capacity_factor"));
  REQUIRE_THROWS_AS(
      R({.num_experts = 4, .capacity_factor = std::numeric_limits<double>::infinity()}),
      config_error);
  REQUIRE_THROWS_WITH(R({.num_experts = 4, .min_capacity = -1}),
                      Contains("CapacityRouter") && Contains("min_capacity"));
  REQUIRE_THROWS_WITH(R({.num_experts = 4, .top_k = 1, .pre_softmax = false}),
                      Contains("CapacityRouter") && Contains("pre_softmax"));

  const R router({.num_experts = 4, .top_k = 2});
  Tensor<float> wrong({3, 5});
  REQUIRE_THROWS_AS(router.route(wrong), shape_error);
  REQUIRE_THROWS_WITH(router.route(wrong), Contains("CapacityRouter") && Contains("logits"));
  auto logits = random_logits<float>(3, 4, 1);
  const std::vector<std::uint8_t> keep(2, 1);
  REQUIRE_THROWS_AS(router.route(logits, TokenMask{keep}), shape_error);
  REQUIRE_THROWS_WITH(router.route(logits, TokenMask{keep}),
                      Contains("CapacityRouter") && Contains("mask"));
  logits(1, 2) = std::numeric_limits<float>::quiet_NaN();
  REQUIRE_THROWS_AS(router.route(logits), config_error);
  REQUIRE_THROWS_WITH(router.route(logits), Contains("CapacityRouter") && Contains("token 1"));
  // A NaN in a masked-out token is never looked at.
  const std::vector<std::uint8_t> skip_nan = {1, 0, 1};
  REQUIRE_NOTHROW(router.route(logits, TokenMask{skip_nan}));
}

TEST_CASE("CapacityRouter: 1 and 2 threads give bit-identical plans",
          "[moe][router][capacity][threads]") {
  const std::int64_t T = 4096, E = 64, k = 8;
  const auto logits = random_logits<float>(T, E, 21);
  for (const bool pre : {true, false}) {
    for (const auto policy : {DropPolicy::probs, DropPolicy::position}) {
      const CapacityRouter<float> router({.num_experts = E,
                                          .top_k = k,
                                          .capacity_factor = 1.0,
                                          .pre_softmax = pre,
                                          .drop_policy = policy});
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
      REQUIRE(one.stats.dropped > 0);
      test_support::require_same_plan(one, two);
      // Reusing a plan gives the same result as a fresh one.
      router.route(logits, two);
      test_support::require_same_plan(one, two);
    }
  }
}

TEST_CASE("CapacityRouter: the scalar path selects like the SIMD path",
          "[moe][router][capacity][scalar]") {
  const std::int64_t T = 300, E = 12;
  const auto logits = random_logits<double>(T, E, 61);
  for (const std::int64_t k : {1, 3, 8, 10}) {
    for (const bool pre : {true, false}) {
      if (!pre && k == 1) continue;
      const CapacityRouterConfig cfg{
          .num_experts = E, .top_k = k, .capacity_factor = 1.0, .pre_softmax = pre};
      const auto simd_plan = CapacityRouter<double>(cfg).route(logits);
      const auto scalar_plan = CapacityRouter<double, switchyard::simd::scalar>(cfg).route(logits);
      REQUIRE_NOTHROW(scalar_plan.check());
      REQUIRE(scalar_plan.choice_expert == simd_plan.choice_expert);
      REQUIRE(scalar_plan.token_index == simd_plan.token_index);
      for (std::size_t i = 0; i < simd_plan.choice_weight.size(); ++i)
        REQUIRE(scalar_plan.choice_weight[i] == Approx(simd_plan.choice_weight[i]).epsilon(1e-12));
      const Ref r = reference(as_double(logits), T, E, k, 1.0, 0, pre, DropPolicy::probs, {});
      check_against_reference(scalar_plan, r, E, k, 1e-12);
    }
  }
}
