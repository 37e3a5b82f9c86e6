// ReluRouter (ReMoE) and L1Controller: the remoe_relu_tiny golden fixture (single step
// and the 8-step coefficient replay), a naive double-precision reference on random
// logits, token masks, a hand-worked case, errors, and thread-count independence.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "support/compare.hpp"
#include "support/fixtures.hpp"
#include "support/moe.hpp"
#include "switchyard/core/parallel_for.hpp"
#include "switchyard/core/tensor.hpp"
#include "switchyard/moe/router_relu.hpp"

using switchyard::ConstView;
using switchyard::Tensor;
using namespace switchyard::moe;
using Catch::Contains;

static_assert(LogitsRouter<ReluRouter<float>, float>);
static_assert(LogitsRouter<ReluRouter<double>, double>);

namespace {

// ---- naive reference, double ----------------------------------------------------------------
struct RefRelu {
  std::vector<std::vector<int>> active;  // per token, best first
  std::vector<std::int64_t> n;           // [E]
  std::vector<double> gate_sum;          // [E]
  std::int64_t routed = 0, without = 0, pairs = 0;
  double aux = 0, z = 0, entropy = 0, sparsity = 1;
};

template <class T>
RefRelu ref_relu(const std::vector<T>& logits, std::int64_t tokens, std::int64_t E, std::int64_t k,
                 const std::vector<std::uint8_t>& keep) {
  RefRelu r;
  r.active.resize(tokens);
  r.n.assign(E, 0);
  r.gate_sum.assign(E, 0.0);
  for (std::int64_t t = 0; t < tokens; ++t) {
    if (!keep.empty() && !keep[t]) continue;
    ++r.routed;
    const T* x = logits.data() + t * E;
    std::vector<bool> used(E, false);
    // selection: repeatedly the largest remaining positive value, lowest index on ties
    for (;;) {
      int best = -1;
      for (int e = 0; e < E; ++e) {
        if (used[e] || !(double(x[e]) > 0.0)) continue;
        if (best < 0 || double(x[e]) > double(x[best])) best = e;
      }
      if (best < 0) break;
      used[best] = true;
      r.active[t].push_back(best);
      ++r.n[best];
      r.gate_sum[best] += double(x[best]);
      ++r.pairs;
    }
    if (r.active[t].empty()) ++r.without;
    double m = -1e300;
    for (int e = 0; e < E; ++e) m = std::max(m, double(x[e]));
    double s = 0;
    for (int e = 0; e < E; ++e) s += std::exp(double(x[e]) - m);
    const double lse = m + std::log(s);
    r.z += lse * lse;
    double h = 0;
    for (int e = 0; e < E; ++e) {
      const double p = std::exp(double(x[e]) - lse);
      if (p > 0) h -= p * std::log(p);
    }
    r.entropy += h;
  }
  if (r.routed > 0) {
    double s = 0;
    for (int e = 0; e < E; ++e) s += double(r.n[e]) * r.gate_sum[e];
    r.aux = double(E) / (double(r.routed) * double(r.routed) * double(k)) * s;
    r.z /= double(r.routed);
    r.entropy /= double(r.routed);
    r.sparsity = 1.0 - double(r.pairs) / (double(r.routed) * double(E));
  }
  return r;
}

template <class T>
std::vector<T> random_logits(std::int64_t n, std::uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> nd(0.0, 1.0);
  std::uniform_int_distribution<int> coin(0, 3);
  std::vector<T> v(n);
  for (auto& x : v) {
    // a quarter quantised to multiples of 0.25: exact zeros and ties
    const double d = nd(gen);
    x = coin(gen) == 0 ? T(std::round(d * 4) / 4) : T(d);
  }
  return v;
}

double rel(double a, double b) { return std::abs(a - b) / std::max(std::abs(b), 1e-12); }

template <class T>
void check_against_ref(const DispatchPlan<T>& plan, const RefRelu& r, const std::vector<T>& logits,
                       std::int64_t tokens, std::int64_t E) {
  REQUIRE_NOTHROW(plan.check());
  REQUIRE(plan.num_tokens == tokens);
  // K = the most active experts of one token in the reference (at least 1)
  std::int64_t K = 1;
  for (std::int64_t t = 0; t < tokens; ++t) K = std::max<std::int64_t>(K, r.active[t].size());
  REQUIRE(plan.top_k == K);
  REQUIRE(plan.capacity == -1);
  REQUIRE(plan.dropped.empty());
  for (std::int64_t t = 0; t < tokens; ++t) {
    for (std::int64_t s = 0; s < K; ++s) {
      const std::int32_t want =
          s < std::int64_t(r.active[t].size()) ? r.active[t][s] : std::int32_t(-1);
      REQUIRE(plan.choice_expert[t * K + s] == want);
      REQUIRE(plan.choice_weight[t * K + s] == (want >= 0 ? logits[t * E + want] : T(0)));
    }
  }
  for (std::int64_t e = 0; e < E; ++e) {
    std::vector<std::int32_t> want_tokens;
    for (std::int64_t t = 0; t < tokens; ++t)
      for (int a : r.active[t])
        if (a == e) want_tokens.push_back(std::int32_t(t));
    const auto got = plan.expert_tokens(e);
    REQUIRE(std::vector<std::int32_t>(got.begin(), got.end()) == want_tokens);
    for (std::int64_t i = 0; i < plan.expert_size(e); ++i) {
      const std::int32_t t = got[i];
      REQUIRE(plan.expert_gates(e)[i] == logits[t * E + e]);
      REQUIRE(r.active[t][plan.expert_slots(e)[i]] == e);
    }
    REQUIRE(plan.stats.tokens_per_expert[e] == r.n[e]);
    REQUIRE(plan.stats.kept_per_expert[e] == r.n[e]);
    REQUIRE(rel(plan.stats.mean_prob[e], r.routed ? r.gate_sum[e] / r.routed : 0.0) < 1e-12);
  }
  REQUIRE(plan.stats.routed_tokens == r.routed);
  REQUIRE(plan.stats.tokens_without_expert == r.without);
  REQUIRE(plan.stats.dropped == 0);
  REQUIRE(rel(plan.stats.aux_loss, r.aux) < 1e-12);
  REQUIRE(std::abs(plan.stats.z_loss - r.z) <= 1e-5 * std::max(1.0, r.z));
  REQUIRE(std::abs(plan.stats.entropy - r.entropy) <= 1e-5);
  REQUIRE(std::abs(ReluRouter<T>::sparsity(plan) - r.sparsity) < 1e-12);
}

}  // namespace

TEST_CASE("ReluRouter reproduces the remoe_relu_tiny fixture", "[moe][router_relu]") {
  auto f = open_fixture("remoe_relu_tiny.safetensors");
  const Tensor<float> x = f.tensor<float>("x");
  const Tensor<float> w = f.tensor<float>("router_w");
  const Tensor<float> want_logits = f.tensor<float>("router_logits");
  const std::int64_t T = x.shape()[0], E = w.shape()[0], d = x.shape()[1];
  REQUIRE(E == 4);
  const Tensor<float> logits = router_logits<float>(x, w);
  const double logit_err = test_support::max_rel_err(test_support::to_double(logits),
                                                     test_support::to_double(want_logits), 1e-3);
  INFO("router_logits max rel err " << logit_err);
  CHECK(logit_err < 1e-5);

  const ReluRouter<float> router({.num_experts = E, .topk_for_target = 2});
  // Route the fixture's own logits, so near-zero logits sit on the same side of 0.
  const auto plan = router.route(ConstView<float, 2>(want_logits));
  REQUIRE_NOTHROW(plan.check());

  const Tensor<float> gates = f.tensor<float>("gates");
  const Tensor<std::int64_t> routing_map = f.tensor<std::int64_t>("routing_map");
  std::vector<double> dense(T * E, 0.0);
  std::vector<std::int64_t> map(T * E, 0);
  for (std::int64_t e = 0; e < E; ++e) {
    for (std::int64_t i = 0; i < plan.expert_size(e); ++i) {
      const auto t = plan.expert_tokens(e)[i];
      dense[t * E + e] = plan.expert_gates(e)[i];
      map[t * E + e] = 1;
    }
  }
  const double gate_err = test_support::max_rel_err(dense, test_support::to_double(gates), 1e-6);
  INFO("gates max rel err " << gate_err);
  CHECK(gate_err < 1e-5);
  CHECK(std::vector<std::int64_t>(routing_map.begin(), routing_map.end()) == map);
  const Tensor<std::int64_t> tpe = f.tensor<std::int64_t>("tokens_per_expert");
  CHECK(std::vector<std::int64_t>(tpe.begin(), tpe.end()) == plan.stats.tokens_per_expert);

  const double l1 = f.scalar<float>("l1_loss_unscaled");
  INFO("l1 unscaled " << plan.stats.aux_loss << " want " << l1);
  CHECK(rel(plan.stats.aux_loss, l1) < 1e-5);
  CHECK(rel(plan.stats.aux_loss, f.scalar<float>("l1_loss_coeff1_recomputed")) < 1e-5);
  CHECK(std::abs(ReluRouter<float>::sparsity(plan) - f.scalar<float>("sparsity")) < 1e-6);
  CHECK(std::abs(router.target_sparsity() - f.scalar<float>("target_sparsity")) < 1e-7);

  const L1Controller ctl(router.config());
  CHECK(ctl.target_sparsity() == 0.5);
  const auto state = ctl.initial_state();
  CHECK(rel(state.coeff, f.scalar<float>("l1_coeff")) < 1e-6);
  CHECK(rel(ctl.loss(state, plan.stats.aux_loss), f.scalar<float>("l1_loss")) < 1e-5);

  // Logits computed here route identically (no logit is within rounding of 0).
  const auto plan2 = router.route(ConstView<float, 2>(logits));
  CHECK(plan2.token_index == plan.token_index);
  CHECK(rel(plan2.stats.aux_loss, l1) < 1e-5);
  (void)d;
}

TEST_CASE("L1Controller replays the fixture's 8 training iterations", "[moe][router_relu]") {
  auto f = open_fixture("remoe_relu_tiny.safetensors");
  const Tensor<float> steps_x = f.tensor<float>("steps_x");
  const Tensor<float> w = f.tensor<float>("router_w");
  const Tensor<float> sp = f.tensor<float>("steps_sparsity");
  const Tensor<float> before = f.tensor<float>("steps_coeff_before");
  const Tensor<float> after = f.tensor<float>("steps_coeff_after");
  const Tensor<float> l1 = f.tensor<float>("steps_l1_unscaled");
  const std::int64_t steps = steps_x.shape()[0], T = steps_x.shape()[1], d = steps_x.shape()[2];
  REQUIRE(steps == 8);
  const ReluRouter<float> router({.num_experts = 4, .topk_for_target = 2});
  const L1Controller ctl(router.config(),
                         {.initial_coeff = 1e-8, .multiplier = 1.2, .target_sparsity = {}});
  auto state = ctl.initial_state();
  DispatchPlan<float> plan;
  for (std::int64_t i = 0; i < steps; ++i) {
    const ConstView<float, 2> xi(steps_x.data() + i * T * d, {T, d});
    const Tensor<float> logits = router_logits<float>(xi, w);
    router.route(logits, plan);
    const double s = ReluRouter<float>::sparsity(plan);
    INFO("step " << i << " sparsity " << s << " want " << sp.data()[i] << " l1 "
                 << plan.stats.aux_loss << " want " << l1.data()[i]);
    CHECK(std::abs(s - sp.data()[i]) < 1e-6);
    CHECK(rel(plan.stats.aux_loss, l1.data()[i]) < 1e-5);
    CHECK(rel(state.coeff, before.data()[i]) < 1e-5);
    ctl.update(state, s);
    CHECK(rel(state.coeff, after.data()[i]) < 1e-5);
  }
}

TEST_CASE("ReluRouter matches a naive double reference on random logits", "[moe][router_relu]") {
  for (std::int64_t E : {1, 2, 5, 8, 17, 64}) {
    for (std::int64_t T : {0, 1, 7, 64, 300}) {
      for (std::uint32_t seed : {1u, 2u, 3u}) {
        for (std::int64_t k : {std::int64_t(1), E}) {
          INFO("E=" << E << " T=" << T << " seed=" << seed << " k=" << k);
          const auto logits = random_logits<float>(T * E, seed * 1000 + std::uint32_t(E * 7 + T));
          const ReluRouter<float> router({.num_experts = E, .topk_for_target = k});
          DispatchPlan<float> plan;
          router.route(ConstView<float, 2>(logits.data(), {T, E}), plan);
          check_against_ref(plan, ref_relu(logits, T, E, k, {}), logits, T, E);
        }
      }
    }
  }
  // the scalar path (no xsimd), with ties and padding tails
  for (std::int64_t E : {1, 3, 17, 64}) {
    const auto logits = random_logits<float>(64 * E, std::uint32_t(500 + E));
    const ReluRouter<float, switchyard::simd::scalar> router({.num_experts = E});
    const auto plan = router.route(ConstView<float, 2>(logits.data(), {64, E}));
    check_against_ref(plan, ref_relu(logits, 64, E, 1, {}), logits, 64, E);
  }
  // -inf logits are allowed (inactive); only NaN and +inf are errors
  {
    std::vector<float> li = {-std::numeric_limits<float>::infinity(), 1, 0.5f, -1};
    const ReluRouter<float> router({.num_experts = 4});
    const auto plan = router.route(ConstView<float, 2>(li.data(), {1, 4}));
    check_against_ref(plan, ref_relu(li, 1, 4, 1, {}), li, 1, 4);
    CHECK(std::isfinite(plan.stats.z_loss));
  }
  // double instantiation
  const auto logits = random_logits<double>(37 * 6, 99);
  const ReluRouter<double> router({.num_experts = 6, .topk_for_target = 3});
  const auto plan = router.route(ConstView<double, 2>(logits.data(), {37, 6}));
  check_against_ref(plan, ref_relu(logits, 37, 6, 3, {}), logits, 37, 6);
}

TEST_CASE("ReluRouter reuses a plan across calls of different sizes", "[moe][router_relu]") {
  const ReluRouter<float> router({.num_experts = 8, .topk_for_target = 2});
  DispatchPlan<float> plan;
  for (std::int64_t T : {300, 5, 0, 64}) {
    const auto logits = random_logits<float>(T * 8, std::uint32_t(T + 11));
    router.route(ConstView<float, 2>(logits.data(), {T, 8}), plan);
    check_against_ref(plan, ref_relu(logits, T, 8, 2, {}), logits, T, 8);
  }
}

TEST_CASE("ReluRouter token mask: masked tokens are never routed and count nowhere",
          "[moe][router_relu]") {
  const std::int64_t T = 300, E = 8;
  const auto logits = random_logits<float>(T * E, 5);
  std::vector<std::uint8_t> keep(T);
  std::mt19937 gen(3);
  for (auto& v : keep) v = std::uint8_t(gen() % 3 != 0);
  const ReluRouter<float> router({.num_experts = E, .topk_for_target = 2});
  const auto plan = router.route(ConstView<float, 2>(logits.data(), {T, E}), TokenMask{keep});
  check_against_ref(plan, ref_relu(logits, T, E, 2, keep), logits, T, E);
  for (std::int64_t t = 0; t < T; ++t)
    if (!keep[t])
      for (std::int64_t s = 0; s < plan.top_k; ++s)
        REQUIRE(plan.choice_expert[t * plan.top_k + s] == -1);

  // Same statistics as routing only the kept tokens.
  std::vector<float> sub;
  for (std::int64_t t = 0; t < T; ++t)
    if (keep[t]) sub.insert(sub.end(), logits.begin() + t * E, logits.begin() + (t + 1) * E);
  const std::int64_t Ts = std::int64_t(sub.size()) / E;
  const auto ps = router.route(ConstView<float, 2>(sub.data(), {Ts, E}));
  CHECK(plan.stats.tokens_per_expert == ps.stats.tokens_per_expert);
  CHECK(plan.stats.routed_tokens == Ts);
  CHECK(plan.nnz() == ps.nnz());
  CHECK(plan.stats.tokens_without_expert == ps.stats.tokens_without_expert);
  CHECK(rel(plan.stats.aux_loss, ps.stats.aux_loss) < 1e-12);
  CHECK(rel(plan.stats.z_loss, ps.stats.z_loss) < 1e-12);
  CHECK(std::abs(plan.stats.entropy - ps.stats.entropy) < 1e-12);
  for (std::int64_t e = 0; e < E; ++e)
    CHECK(rel(plan.stats.mean_prob[e], ps.stats.mean_prob[e]) < 1e-12);
  CHECK(ReluRouter<float>::sparsity(plan) == ReluRouter<float>::sparsity(ps));

  // All tokens masked: an empty plan, zero losses.
  std::vector<std::uint8_t> none(T, 0);
  const auto p0 = router.route(ConstView<float, 2>(logits.data(), {T, E}), TokenMask{none});
  REQUIRE_NOTHROW(p0.check());
  CHECK(p0.nnz() == 0);
  CHECK(p0.stats.routed_tokens == 0);
  CHECK(p0.stats.aux_loss == 0);
  CHECK(p0.stats.z_loss == 0);
  CHECK(p0.stats.tokens_without_expert == 0);
  CHECK(ReluRouter<float>::sparsity(p0) == 1.0);
}

TEST_CASE("ReluRouter hand-worked case", "[moe][router_relu]") {
  // E = 3, k = 1.
  //   token 0: [ 1, -1,  2]  active e2 (2), e0 (1)          -> slots [2, 0]
  //   token 1: [ 0, .5, .5]  e0 = 0 is inactive; tie e1, e2 -> slots [1, 2]
  //   token 2: [-1, -2, -3]  nothing active (output 0)
  // n = [1, 1, 2]; gate sums G = [1, 0.5, 2.5]; sum_e n_e G_e = 1 + 0.5 + 5 = 6.5
  // aux = E / (T^2 k) * 6.5 = 3 / 9 * 6.5 = 2.1666...; sparsity = 1 - 4/9 = 5/9
  // mean_prob = G / 3 = [1/3, 1/6, 5/6]
  const std::vector<float> logits = {1, -1, 2, 0, 0.5f, 0.5f, -1, -2, -3};
  const ReluRouter<float> router({.num_experts = 3, .topk_for_target = 1});
  const auto plan = router.route(ConstView<float, 2>(logits.data(), {3, 3}));
  REQUIRE_NOTHROW(plan.check());
  // K = 2: no token has more than two active experts
  CHECK(plan.top_k == 2);
  CHECK(plan.choice_expert == std::vector<std::int32_t>{2, 0, 1, 2, -1, -1});
  CHECK(plan.choice_weight == std::vector<float>{2, 1, 0.5f, 0.5f, 0, 0});
  CHECK(plan.expert_offsets == std::vector<std::int64_t>{0, 1, 2, 4});
  CHECK(plan.token_index == std::vector<std::int32_t>{0, 1, 0, 1});
  CHECK(plan.slot == std::vector<std::int32_t>{1, 0, 0, 1});
  CHECK(plan.gate == std::vector<float>{1, 0.5f, 2, 0.5f});
  CHECK(plan.stats.tokens_per_expert == std::vector<std::int64_t>{1, 1, 2});
  CHECK(plan.stats.tokens_without_expert == 1);
  CHECK(plan.stats.aux_loss == Approx(6.5 / 3.0).epsilon(1e-12));
  CHECK(ReluRouter<float>::sparsity(plan) == Approx(5.0 / 9.0).epsilon(1e-12));
  CHECK(plan.stats.mean_prob[0] == Approx(1.0 / 3));
  CHECK(plan.stats.mean_prob[1] == Approx(1.0 / 6));
  CHECK(plan.stats.mean_prob[2] == Approx(5.0 / 6));
  // z: lse of each row squared, averaged
  const double l0 = std::log(std::exp(1.0) + std::exp(-1.0) + std::exp(2.0));
  const double l1 = std::log(1.0 + 2 * std::exp(0.5));
  const double l2 = std::log(std::exp(-1.0) + std::exp(-2.0) + std::exp(-3.0));
  CHECK(plan.stats.z_loss == Approx((l0 * l0 + l1 * l1 + l2 * l2) / 3).epsilon(1e-6));

  // Controller: target 0.5, lambda 1e-8, alpha 1.2.
  const L1Controller ctl({.initial_coeff = 1e-8, .multiplier = 1.2, .target_sparsity = 0.5});
  auto s = ctl.initial_state();
  CHECK(ctl.loss(s, 2.0) == 2e-8);
  ctl.update(s, 0.4);  // below target: lambda * 1.2
  CHECK(s.coeff == Approx(1.2e-8).epsilon(1e-14));
  ctl.update(s, 0.5);  // equal: not below, so lambda / 1.2
  CHECK(s.coeff == Approx(1e-8).epsilon(1e-14));
  ctl.update(s, 0.9);
  CHECK(s.coeff == Approx(1e-8 / 1.2).epsilon(1e-14));
  // Target from the router config: 1 - 3/8
  CHECK(L1Controller(ReluRouterConfig{.num_experts = 8, .topk_for_target = 3}).target_sparsity() ==
        0.625);
  // An explicit target wins over the router's
  CHECK(L1Controller(ReluRouterConfig{.num_experts = 8, .topk_for_target = 3},
                     {.target_sparsity = 0.25})
            .target_sparsity() == 0.25);
}

TEST_CASE("ReluRouter and L1Controller errors", "[moe][router_relu]") {
  using switchyard::config_error;
  using switchyard::shape_error;
  REQUIRE_THROWS_AS(ReluRouter<float>({.num_experts = 0}), config_error);
  REQUIRE_THROWS_WITH(ReluRouter<float>({.num_experts = 0}),
                      Contains("ReluRouter") && Contains("num_experts"));
  REQUIRE_THROWS_AS(ReluRouter<float>({.num_experts = 4, .topk_for_target = 0}), config_error);
  REQUIRE_THROWS_WITH(ReluRouter<float>({.num_experts = 4, .topk_for_target = 5}),
                      Contains("ReluRouter") && Contains("topk_for_target"));
  const ReluRouter<float> router({.num_experts = 4, .topk_for_target = 2});
  std::vector<float> logits(5 * 4, 0.5f);
  REQUIRE_THROWS_AS(router.route(ConstView<float, 2>(logits.data(), {4, 5})), shape_error);
  REQUIRE_THROWS_WITH(router.route(ConstView<float, 2>(logits.data(), {4, 5})),
                      Contains("ReluRouter") && Contains("logits"));
  std::vector<std::uint8_t> keep(4, 1);
  REQUIRE_THROWS_AS(router.route(ConstView<float, 2>(logits.data(), {5, 4}), TokenMask{keep}),
                    shape_error);
  REQUIRE_THROWS_WITH(router.route(ConstView<float, 2>(logits.data(), {5, 4}), TokenMask{keep}),
                      Contains("ReluRouter") && Contains("mask"));
  logits[9] = std::numeric_limits<float>::quiet_NaN();
  REQUIRE_THROWS_AS(router.route(ConstView<float, 2>(logits.data(), {5, 4})), config_error);
  REQUIRE_THROWS_WITH(router.route(ConstView<float, 2>(logits.data(), {5, 4})),
                      Contains("ReluRouter") && Contains("token 2"));
  logits[9] = std::numeric_limits<float>::infinity();
  REQUIRE_THROWS_AS(router.route(ConstView<float, 2>(logits.data(), {5, 4})), config_error);
  // A NaN in a masked token is never looked at.
  std::vector<std::uint8_t> keep5 = {1, 1, 0, 1, 1};
  REQUIRE_NOTHROW(router.route(ConstView<float, 2>(logits.data(), {5, 4}), TokenMask{keep5}));

  REQUIRE_THROWS_AS(L1Controller(L1ControllerConfig{}), config_error);  // no target
  REQUIRE_THROWS_WITH(L1Controller(L1ControllerConfig{}),
                      Contains("L1Controller") && Contains("target_sparsity"));
  REQUIRE_THROWS_WITH(L1Controller({.initial_coeff = 0, .target_sparsity = 0.5}),
                      Contains("L1Controller") && Contains("initial_coeff"));
  REQUIRE_THROWS_WITH(L1Controller({.multiplier = std::nan(""), .target_sparsity = 0.5}),
                      Contains("L1Controller") && Contains("multiplier"));
  REQUIRE_THROWS_AS(L1Controller({.target_sparsity = 1.5}), config_error);
  REQUIRE_THROWS_AS(L1Controller(ReluRouterConfig{.num_experts = 2, .topk_for_target = 3}),
                    config_error);
  const L1Controller ctl({.target_sparsity = 0.5});
  auto s = ctl.initial_state();
  REQUIRE_THROWS_AS(ctl.update(s, std::nan("")), config_error);
}

TEST_CASE("ReluRouter is bit-identical for 1 and 2 threads", "[moe][router_relu]") {
  const std::int64_t T = 4096, E = 64;
  const auto logits = random_logits<float>(T * E, 17);
  const ReluRouter<float> router({.num_experts = E, .topk_for_target = 8});
  DispatchPlan<float> a, b;
  {
    switchyard::ScopedNumThreads one(1);
    router.route(ConstView<float, 2>(logits.data(), {T, E}), a);
  }
  {
    switchyard::ScopedNumThreads two(2);
    router.route(ConstView<float, 2>(logits.data(), {T, E}), b);
  }
  REQUIRE_NOTHROW(a.check());
  test_support::require_same_plan(a, b);
}
