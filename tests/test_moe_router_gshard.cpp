// GShardTop2Router (moe/router_gshard.hpp): the fairscale top2gating fixture, a
// naive double reference on random logits (with and without noise), Gumbel
// sampling, token masks, a hand-worked case, errors and thread determinism.
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
#include "switchyard/core/tensor.hpp"
#include "switchyard/moe/router_gshard.hpp"

using switchyard::ConstView;
using switchyard::Tensor;
using switchyard::View;
using switchyard::moe::DispatchPlan;
using switchyard::moe::GShardTop2Router;
using switchyard::moe::TokenMask;

static_assert(switchyard::moe::LogitsRouter<GShardTop2Router<float>, float>);
static_assert(switchyard::moe::LogitsRouter<GShardTop2Router<double>, double>);

namespace {

// ---------------------------------------------------------------------------
// Naive reference in double (plain loops).
struct Ref {
  std::int64_t capacity = 0, requested = 0, routed = 0;
  std::vector<int> first, second;  // [T], -1 if masked
  std::vector<std::int64_t> pos1, pos2;
  std::vector<double> w1, w2;  // normalised gates, 0 if dropped
  std::vector<std::int64_t> tokens_per_expert, kept_per_expert;
  std::int64_t dropped = 0, without = 0;
  double aux = 0, z = 0;
};

Ref reference(const std::vector<double>& x, const std::vector<double>* noise, std::int64_t T,
              std::int64_t E, double cf, std::int64_t min_cap,
              const std::vector<std::uint8_t>& keep) {
  Ref r;
  r.first.assign(T, -1);
  r.second.assign(T, -1);
  r.pos1.assign(T, -1);
  r.pos2.assign(T, -1);
  r.w1.assign(T, 0.0);
  r.w2.assign(T, 0.0);
  r.tokens_per_expert.assign(E, 0);
  r.kept_per_expert.assign(E, 0);
  std::vector<double> p(T * E, 0.0), P(E, 0.0);
  std::vector<std::int64_t> F(E, 0), S(E, 0);
  double lse2 = 0;
  for (std::int64_t t = 0; t < T; ++t) {
    if (!keep.empty() && !keep[t]) continue;
    ++r.routed;
    double m = -1e300, s = 0;
    for (std::int64_t e = 0; e < E; ++e) m = std::max(m, x[t * E + e]);
    for (std::int64_t e = 0; e < E; ++e) s += std::exp(x[t * E + e] - m);
    const double lse = m + std::log(s);
    lse2 += lse * lse;
    int a = 0;
    for (std::int64_t e = 0; e < E; ++e) {
      p[t * E + e] = std::exp(x[t * E + e] - lse);
      P[e] += p[t * E + e];
      if (p[t * E + e] > p[t * E + a]) a = int(e);
    }
    int b = -1;
    double bv = 0;
    for (std::int64_t e = 0; e < E; ++e) {
      if (e == a) continue;
      const double v = x[t * E + e] + (noise ? (*noise)[t * E + e] : 0.0);
      if (b < 0 || v > bv) b = int(e), bv = v;
    }
    r.first[t] = a;
    r.second[t] = b;
    r.pos1[t] = F[a]++;
  }
  for (std::int64_t t = 0; t < T; ++t)
    if (r.second[t] >= 0) r.pos2[t] = F[r.second[t]] + S[r.second[t]]++;
  r.requested = std::max<std::int64_t>(
      static_cast<std::int64_t>(std::floor(cf * double(r.routed) / double(E))), min_cap);
  r.capacity = std::min(r.requested, r.routed);
  for (std::int64_t t = 0; t < T; ++t) {
    if (r.first[t] < 0) continue;
    const bool k1 = r.pos1[t] < r.capacity, k2 = r.pos2[t] < r.capacity;
    const double g1 = k1 ? p[t * E + r.first[t]] : 0.0, g2 = k2 ? p[t * E + r.second[t]] : 0.0;
    const double den = std::max(g1 + g2, std::numeric_limits<double>::epsilon());
    r.w1[t] = g1 / den;
    r.w2[t] = g2 / den;
    ++r.tokens_per_expert[r.first[t]];
    ++r.tokens_per_expert[r.second[t]];
    r.kept_per_expert[r.first[t]] += k1;
    r.kept_per_expert[r.second[t]] += k2;
    r.dropped += !k1 + !k2;
    r.without += !k1 && !k2;
  }
  if (r.routed > 0) {
    double s = 0;
    for (std::int64_t e = 0; e < E; ++e)
      s += (P[e] / double(r.routed)) * (double(F[e]) / double(r.routed));
    r.aux = s / double(E);
    r.z = lse2 / double(r.routed);
  }
  return r;
}

template <class T>
void check_against_reference(const DispatchPlan<T>& plan, const Ref& r, std::int64_t E,
                             double tol) {
  REQUIRE_NOTHROW(plan.check());
  REQUIRE(plan.top_k == 2);
  REQUIRE(plan.capacity == r.capacity);
  REQUIRE(plan.requested_capacity == r.requested);
  REQUIRE(plan.capacity_clamped == (r.capacity != r.requested));
  const auto pos = GShardTop2Router<T>::buffer_positions(plan);
  for (std::int64_t t = 0; t < plan.num_tokens; ++t) {
    REQUIRE(plan.choice_expert[t * 2] == r.first[t]);
    REQUIRE(plan.choice_expert[t * 2 + 1] == r.second[t]);
    REQUIRE(pos[t * 2] == r.pos1[t]);
    REQUIRE(pos[t * 2 + 1] == r.pos2[t]);
    REQUIRE(double(plan.choice_weight[t * 2]) == Approx(r.w1[t]).epsilon(tol).margin(tol));
    REQUIRE(double(plan.choice_weight[t * 2 + 1]) == Approx(r.w2[t]).epsilon(tol).margin(tol));
  }
  for (std::int64_t e = 0; e < E; ++e) {
    REQUIRE(plan.expert_size(e) <= plan.capacity);
    REQUIRE(plan.stats.tokens_per_expert[e] == r.tokens_per_expert[e]);
    REQUIRE(plan.stats.kept_per_expert[e] == r.kept_per_expert[e]);
  }
  REQUIRE(plan.stats.dropped == r.dropped);
  REQUIRE(plan.stats.tokens_without_expert == r.without);
  REQUIRE(plan.stats.routed_tokens == r.routed);
  REQUIRE(plan.stats.aux_loss == Approx(r.aux).epsilon(tol).margin(1e-14));
  REQUIRE(plan.stats.z_loss == Approx(r.z).epsilon(tol).margin(1e-14));
}

template <class T>
std::vector<double> as_double(const Tensor<T>& t) {
  return {t.begin(), t.end()};
}

}  // namespace

TEST_CASE("GShardTop2Router reproduces the fairscale top2gating fixture",
          "[moe][router][gshard][fixture]") {
  const auto f = open_fixture("gshard_top2_tiny.safetensors");
  const Tensor<float> x = f.tensor<float>("x"), w = f.tensor<float>("router_w");
  const Tensor<float> logits = f.tensor<float>("router_logits");
  const std::int64_t T = logits.extent(0), E = logits.extent(1);
  const Tensor<float> mine = switchyard::moe::router_logits<float>(x, w);
  REQUIRE(test_support::max_rel_err(as_double(mine), as_double(logits), 1e-2) < 1e-5);

  const GShardTop2Router<float> router({.num_experts = E});
  const auto plan = router.route(logits);
  REQUIRE_NOTHROW(plan.check());
  const std::int64_t C = f.scalar<std::int64_t>("capacity");
  REQUIRE(plan.capacity == C);
  const auto top1 = f.tensor<std::int64_t>("top1_idx"), top2 = f.tensor<std::int64_t>("top2_idx");
  const auto kept1 = f.tensor<std::int64_t>("kept1"), kept2 = f.tensor<std::int64_t>("kept2");
  const auto slot = f.tensor<std::int64_t>("slot");
  const auto combine = f.tensor<float>("combine_weights");
  const auto dispatch = f.tensor<std::int64_t>("dispatch_mask");
  const auto pos = GShardTop2Router<float>::buffer_positions(plan);

  // Dense [T, E, C] combine weights and [T, E] slots rebuilt from the plan.
  std::vector<double> got_combine(T * E * C, 0.0);
  std::vector<std::int64_t> got_slot(T * E, -1);
  for (std::int64_t e = 0; e < E; ++e) {
    for (std::int64_t i = plan.expert_offsets[e]; i < plan.expert_offsets[e + 1]; ++i) {
      const std::int64_t t = plan.token_index[i], s = plan.slot[i];
      const std::int64_t c = pos[t * 2 + s];
      REQUIRE(c < C);
      got_slot[t * E + e] = c;
      got_combine[(t * E + e) * C + c] = plan.gate[i];
    }
  }
  double max_err = 0;
  std::int64_t dropped2 = 0;
  for (std::int64_t t = 0; t < T; ++t) {
    REQUIRE(plan.choice_expert[t * 2] == top1(t));
    REQUIRE(plan.choice_expert[t * 2 + 1] == top2(t));
    REQUIRE((pos[t * 2] < C) == (kept1(t) == 1));
    REQUIRE((pos[t * 2 + 1] < C) == (kept2(t) == 1));
    dropped2 += kept2(t) == 0;
    for (std::int64_t e = 0; e < E; ++e) {
      REQUIRE(got_slot[t * E + e] == slot(t, e));
      for (std::int64_t c = 0; c < C; ++c) {
        const double want = combine(t, e, c);
        REQUIRE((got_combine[(t * E + e) * C + c] != 0.0) == (dispatch(t, e, c) == 1));
        max_err = std::max(
            max_err, std::abs(got_combine[(t * E + e) * C + c] - want) / std::max(1e-3, want));
      }
    }
  }
  REQUIRE(dropped2 == 3);
  REQUIRE(plan.stats.dropped == 3);
  const double l_aux = f.scalar<float>("l_aux");
  max_err = std::max(max_err, std::abs(plan.stats.aux_loss - l_aux) / l_aux);
  INFO("max relative error over combine weights and l_aux: " << max_err);
  REQUIRE(max_err < 1e-5);
  WARN("gshard_top2_tiny: max relative error " << max_err);
}

TEST_CASE("GShardTop2Router matches a naive double reference on random logits",
          "[moe][router][gshard][property]") {
  const std::int64_t token_counts[] = {0, 1, 7, 64, 300};
  const std::int64_t expert_counts[] = {2, 3, 4, 8, 16};
  const double factors[] = {2.0, 1.0, 0.5, 3.0, 100.0};
  std::uint32_t seed = 1;
  for (const std::int64_t T : token_counts) {
    for (const std::int64_t E : expert_counts) {
      for (const bool noisy : {false, true}) {
        const double cf = factors[seed % 5];
        const std::int64_t min_cap = seed % 4 == 0 ? 2 : 0;
        ++seed;
        INFO("T=" << T << " E=" << E << " noisy=" << noisy << " cf=" << cf);
        const auto logits = test_support::random_tensor<double>({T, E}, seed, 1.5);
        const auto noise = test_support::random_tensor<double>({T, E}, seed + 1000, 1.0);
        const GShardTop2Router<double> router(
            {.num_experts = E, .capacity_factor = cf, .min_capacity = min_cap});
        DispatchPlan<double> plan;
        const auto nd = as_double(noise);
        if (noisy) {
          router.route_with_noise(logits, noise, plan);
        } else {
          router.route(logits, plan);
        }
        const Ref r = reference(as_double(logits), noisy ? &nd : nullptr, T, E, cf, min_cap, {});
        check_against_reference(plan, r, E, 1e-12);
      }
    }
  }
  // float
  const std::int64_t T = 300, E = 8;
  const auto logits = test_support::random_tensor<float>({T, E}, 77, 1.5);
  const GShardTop2Router<float> router({.num_experts = E});
  const auto plan = router.route(logits);
  const Ref r = reference(as_double(logits), nullptr, T, E, 2.0, 0, {});
  REQUIRE(r.dropped > 0);
  check_against_reference(plan, r, E, 2e-5);
}

TEST_CASE("GShardTop2Router: sampled Gumbel noise", "[moe][router][gshard][noise]") {
  const std::int64_t T = 512, E = 16;
  const auto logits = test_support::random_tensor<float>({T, E}, 4, 1.0);
  const GShardTop2Router<float> router({.num_experts = E});
  const switchyard::Rng rng(1234, 7);
  DispatchPlan<float> sampled, explicit_noise;
  router.route_sampled(logits, rng, sampled);
  Tensor<float> noise({T, E});
  GShardTop2Router<float>::gumbel_noise(rng, noise);
  router.route_with_noise(logits, noise, explicit_noise);
  test_support::require_same_plan(sampled, explicit_noise);
  // The documented positions: float from 24 bits of uint32(t * E + e), double from 53 of uint64.
  for (const std::int64_t i : {0, 1, 5, 4097, 8191}) {
    const float u = (float(rng.uint32(std::uint64_t(i)) >> 8) + 0.5f) * 0x1p-24f;
    REQUIRE(noise(i / E, i % E) == -std::log(-std::log(u)));
  }
  Tensor<double> noise_d({3, 5});
  GShardTop2Router<double>::gumbel_noise(rng, noise_d);
  for (std::int64_t i = 0; i < 15; ++i) {
    const double u = (double(rng.uint64(std::uint64_t(i)) >> 11) + 0.5) * 0x1p-53;
    REQUIRE(noise_d(i / 5, i % 5) == -std::log(-std::log(u)));
  }
  // Gumbel(0, 1): mean = Euler-Mascheroni 0.5772, variance pi^2 / 6.
  double mean = 0, var = 0;
  for (float v : noise) mean += v;
  mean /= double(T * E);
  for (float v : noise) var += (v - mean) * (v - mean);
  var /= double(T * E - 1);
  REQUIRE(std::isfinite(mean));
  REQUIRE(mean == Approx(0.5772156649).margin(0.03));
  REQUIRE(var == Approx(1.6449340668).margin(0.06));
  // The first choice never depends on the noise; the second often does.
  const auto clean = router.route(logits);
  std::int64_t differ = 0;
  for (std::int64_t t = 0; t < T; ++t) {
    REQUIRE(sampled.choice_expert[t * 2] == clean.choice_expert[t * 2]);
    differ += sampled.choice_expert[t * 2 + 1] != clean.choice_expert[t * 2 + 1];
  }
  REQUIRE(differ > T / 10);
  // Another seed gives other noise; the same seed the same plan.
  DispatchPlan<float> again;
  router.route_sampled(logits, rng, again);
  test_support::require_same_plan(sampled, again);
}

TEST_CASE("GShardTop2Router: masked tokens are never routed and count nowhere",
          "[moe][router][gshard][mask]") {
  const std::int64_t T = 200, E = 5;
  const auto logits = test_support::random_tensor<double>({T, E}, 9, 1.5);
  std::vector<std::uint8_t> keep(T);
  std::mt19937 gen(11);
  for (auto& v : keep) v = gen() % 4 != 0;
  const GShardTop2Router<double> router({.num_experts = E, .capacity_factor = 1.5});
  DispatchPlan<double> plan;
  router.route(logits, plan, TokenMask{keep});
  const Ref r = reference(as_double(logits), nullptr, T, E, 1.5, 0, keep);
  check_against_reference(plan, r, E, 1e-12);

  std::vector<std::int64_t> rows;
  for (std::int64_t t = 0; t < T; ++t)
    if (keep[t]) rows.push_back(t);
  const std::int64_t R = std::int64_t(rows.size());
  Tensor<double> sub({R, E});
  for (std::int64_t i = 0; i < R; ++i)
    for (std::int64_t e = 0; e < E; ++e) sub(i, e) = logits(rows[i], e);
  const auto compact = router.route(sub);
  REQUIRE(compact.capacity == plan.capacity);
  REQUIRE(compact.stats.tokens_per_expert == plan.stats.tokens_per_expert);
  REQUIRE(compact.stats.kept_per_expert == plan.stats.kept_per_expert);
  REQUIRE(compact.stats.dropped == plan.stats.dropped);
  REQUIRE(compact.stats.tokens_without_expert == plan.stats.tokens_without_expert);
  REQUIRE(compact.stats.aux_loss == Approx(plan.stats.aux_loss).epsilon(1e-12));
  REQUIRE(compact.stats.z_loss == Approx(plan.stats.z_loss).epsilon(1e-12));
  const auto pos = GShardTop2Router<double>::buffer_positions(plan);
  const auto cpos = GShardTop2Router<double>::buffer_positions(compact);
  for (std::int64_t i = 0; i < R; ++i) {
    for (std::int64_t s = 0; s < 2; ++s) {
      REQUIRE(compact.choice_expert[i * 2 + s] == plan.choice_expert[rows[i] * 2 + s]);
      REQUIRE(compact.choice_weight[i * 2 + s] == plan.choice_weight[rows[i] * 2 + s]);
      REQUIRE(cpos[i * 2 + s] == pos[rows[i] * 2 + s]);
    }
  }
  for (std::int64_t t = 0; t < T; ++t) {
    if (keep[t]) continue;
    REQUIRE(plan.choice_expert[t * 2] == -1);
    REQUIRE(pos[t * 2] == -1);
  }
  // Empty and all-masked batches.
  Tensor<double> none({0, E});
  const auto p0 = router.route(none);
  REQUIRE_NOTHROW(p0.check());
  REQUIRE(p0.nnz() == 0);
  REQUIRE(p0.stats.aux_loss == 0.0);
  const std::vector<std::uint8_t> nobody(T, 0);
  const auto p1 = router.route(logits, TokenMask{nobody});
  REQUIRE_NOTHROW(p1.check());
  REQUIRE(p1.nnz() == 0);
  REQUIRE(p1.dropped.empty());
  REQUIRE(p1.stats.z_loss == 0.0);
}

TEST_CASE("GShardTop2Router: hand-worked case", "[moe][router][gshard][hand]") {
  // T = 4, E = 4, C = 2 * 4 / 4 = 2.
  //   t0 (2, 1, 0, 0): first e0, second e1     a = e^2 + e + 2
  //   t1 (2, 0, 1, 0): first e0, second e2
  //   t2 (2, 1, 0, 0): first e0, second e1
  //   t3 (0, 2, 0, 0): first e1, second e0 (tie among e0, e2, e3 -> lowest)
  // First choices: e0 gets t0 -> 0, t1 -> 1, t2 -> 2 (dropped); e1 gets t3 -> 0. F = (3, 1, 0, 0).
  // Second choices: t0 -> e1 at F_1 + 0 = 1 (kept); t1 -> e2 at 0 (kept);
  //   t2 -> e1 at 1 + 1 = 2 (dropped); t3 -> e0 at 3 + 0 = 3 (dropped).
  // Weights: t0, t1: (e^2, e) / (e^2 + e) = (e / (e + 1), 1 / (e + 1));
  //   t2: both dropped -> (0, 0), no expert; t3: (1, 0).
  // l_aux = mean_e (P_e / 4)(F_e / 4) = ((P_0 / 4)(3 / 4) + (P_1 / 4)(1 / 4)) / 4 with
  //   P_0 = 3 e^2 / a + 1 / (e^2 + 3), P_1 = (e + 1 + e) / a + e^2 / (e^2 + 3).
  Tensor<double> logits({4, 4});
  const double l[16] = {2, 1, 0, 0, 2, 0, 1, 0, 2, 1, 0, 0, 0, 2, 0, 0};
  std::copy(l, l + 16, logits.begin());
  const GShardTop2Router<double> router({.num_experts = 4});
  const auto plan = router.route(logits);
  REQUIRE_NOTHROW(plan.check());
  REQUIRE(plan.capacity == 2);
  REQUIRE(plan.choice_expert == std::vector<std::int32_t>{0, 1, 0, 2, 0, 1, 1, 0});
  REQUIRE(GShardTop2Router<double>::buffer_positions(plan) ==
          std::vector<std::int32_t>{0, 1, 1, 0, 2, 2, 0, 3});
  const double e = std::exp(1.0), a = e * e + e + 2;
  const std::vector<double> want = {e / (e + 1), 1 / (e + 1), e / (e + 1), 1 / (e + 1), 0, 0, 1, 0};
  for (int i = 0; i < 8; ++i) REQUIRE(plan.choice_weight[i] == Approx(want[i]).epsilon(1e-12));
  REQUIRE(plan.stats.tokens_per_expert == std::vector<std::int64_t>{4, 3, 1, 0});
  REQUIRE(plan.stats.kept_per_expert == std::vector<std::int64_t>{2, 2, 1, 0});
  REQUIRE(plan.stats.tokens_without_expert == 1);
  REQUIRE(plan.dropped.size() == 3);
  const double P0 = 3 * e * e / a + 1 / (e * e + 3), P1 = (2 * e + 1) / a + e * e / (e * e + 3);
  const double l_aux = ((P0 / 4) * (3.0 / 4) + (P1 / 4) * (1.0 / 4)) / 4;
  REQUIRE(plan.stats.aux_loss == Approx(l_aux).epsilon(1e-12));
  // Expert 0's CSR run is sorted by token: t0 (first, slot 0), t1 (first, slot 0).
  REQUIRE(plan.expert_tokens(0)[0] == 0);
  REQUIRE(plan.expert_tokens(0)[1] == 1);
  // Expert 1: t0 (second choice, slot 1) and t3 (first choice, slot 0).
  REQUIRE(plan.expert_tokens(1)[0] == 0);
  REQUIRE(plan.expert_slots(1)[0] == 1);
  REQUIRE(plan.expert_tokens(1)[1] == 3);
  REQUIRE(plan.expert_slots(1)[1] == 0);
}

TEST_CASE("GShardTop2Router: documented errors", "[moe][router][gshard][errors]") {
  using Catch::Contains;
  using switchyard::config_error;
  using switchyard::shape_error;
  using R = GShardTop2Router<float>;
  REQUIRE_THROWS_WITH(R({.num_experts = 1}),
                      Contains("GShardTop2Router") && Contains("num_experts"));
  REQUIRE_THROWS_AS(R({.num_experts = 0}), config_error);
  REQUIRE_THROWS_AS(R({.num_experts = 4, .capacity_factor = 0.0}), config_error);
  REQUIRE_THROWS_AS(R({.num_experts = 4, .capacity_factor = -2.0}), config_error);
  REQUIRE_THROWS_WITH(R({.num_experts = 4, .capacity_factor = std::nan("")}),
                      Contains("GShardTop2Router") && Contains("capacity_factor"));
  REQUIRE_THROWS_AS(
      R({.num_experts = 4, .capacity_factor = std::numeric_limits<double>::infinity()}),
      config_error);
  REQUIRE_THROWS_WITH(R({.num_experts = 4, .min_capacity = -1}),
                      Contains("GShardTop2Router") && Contains("min_capacity"));

  const R router({.num_experts = 4});
  Tensor<float> wrong({3, 3});
  REQUIRE_THROWS_AS(router.route(wrong), shape_error);
  REQUIRE_THROWS_WITH(router.route(wrong), Contains("GShardTop2Router") && Contains("logits"));
  auto logits = test_support::random_tensor<float>({3, 4}, 1);
  const std::vector<std::uint8_t> keep(4, 1);
  REQUIRE_THROWS_AS(router.route(logits, TokenMask{keep}), shape_error);
  REQUIRE_THROWS_WITH(router.route(logits, TokenMask{keep}),
                      Contains("GShardTop2Router") && Contains("mask"));
  DispatchPlan<float> plan;
  Tensor<float> bad_noise({3, 5});
  REQUIRE_THROWS_AS(router.route_with_noise(logits, bad_noise, plan), shape_error);
  REQUIRE_THROWS_WITH(router.route_with_noise(logits, bad_noise, plan),
                      Contains("GShardTop2Router") && Contains("second_choice_noise"));
  Tensor<float> noise({3, 4});
  std::fill(noise.begin(), noise.end(), 0.0f);
  noise(2, 1) = std::numeric_limits<float>::infinity();
  REQUIRE_THROWS_WITH(router.route_with_noise(logits, noise, plan),
                      Contains("GShardTop2Router") && Contains("token 2"));
  logits(0, 3) = std::numeric_limits<float>::quiet_NaN();
  REQUIRE_THROWS_AS(router.route(logits), config_error);
  REQUIRE_THROWS_WITH(router.route(logits), Contains("GShardTop2Router") && Contains("token 0"));
  DispatchPlan<float> other;
  other.reset(3, 4, 1);
  REQUIRE_THROWS_AS(R::buffer_positions(other), config_error);
}

TEST_CASE("GShardTop2Router: 1 and 2 threads give bit-identical plans",
          "[moe][router][gshard][threads]") {
  const std::int64_t T = 4096, E = 64;
  const auto logits = test_support::random_tensor<float>({T, E}, 31, 1.5);
  const GShardTop2Router<float> router({.num_experts = E});
  const switchyard::Rng rng(5);
  DispatchPlan<float> one, two, one_s, two_s;
  {
    switchyard::ScopedNumThreads threads(1);
    router.route(logits, one);
    router.route_sampled(logits, rng, one_s);
  }
  {
    switchyard::ScopedNumThreads threads(2);
    router.route(logits, two);
    router.route_sampled(logits, rng, two_s);
  }
  REQUIRE_NOTHROW(one.check());
  REQUIRE(one.stats.dropped > 0);
  test_support::require_same_plan(one, two);
  test_support::require_same_plan(one_s, two_s);
}
