// NoisyTopKRouter (Shazeer et al. 2017 as davidmrau/mixture-of-experts): the noisy_topk_tiny
// golden fixture (eval and train with the recorded noise), a naive double-precision reference
// (eval on random logits, train on random x / weights / noise), token masks, the seeded noise
// stream, a hand-worked case, errors, and thread-count independence.
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
#include "switchyard/core/rng.hpp"
#include "switchyard/core/tensor.hpp"
#include "switchyard/moe/router_noisy_topk.hpp"

using switchyard::ConstView;
using switchyard::Tensor;
using namespace switchyard::moe;
using Catch::Contains;

static_assert(LogitsRouter<NoisyTopKRouter<float>, float>);
static_assert(LogitsRouter<NoisyTopKRouter<double>, double>);

namespace {

double rel(double a, double b) { return std::abs(a - b) / std::max(std::abs(b), 1e-12); }

// ---- naive reference, double ----------------------------------------------------------------
struct RefNoisy {
  std::vector<std::vector<int>> chosen;      // per token, best first
  std::vector<std::vector<double>> weights;  // per token
  std::vector<double> importance, load, mean_p;
  std::int64_t routed = 0;
  double cv2_i = 0, cv2_l = 0, loss = 0, z = 0;
};

double ref_cv2(const std::vector<double>& v) {
  if (v.size() < 2) return 0;
  double mean = 0;
  for (double x : v) mean += x;
  mean /= double(v.size());
  double var = 0;
  for (double x : v) var += (x - mean) * (x - mean);
  var /= double(v.size() - 1);
  return var / (mean * mean + 1e-10);
}

double ref_phi(double z) { return 0.5 * (1.0 + std::erf(z / std::sqrt(2.0))); }

// logits [T*E] routed on; clean/stddev only for the smooth load (smooth = true).
RefNoisy ref_noisy(const std::vector<double>& logits, const std::vector<double>& clean,
                   const std::vector<double>& stddev, bool smooth, std::int64_t T, std::int64_t E,
                   std::int64_t k, double loss_coef, const std::vector<std::uint8_t>& keep) {
  RefNoisy r;
  r.chosen.resize(T);
  r.weights.resize(T);
  r.importance.assign(E, 0);
  r.load.assign(E, 0);
  r.mean_p.assign(E, 0);
  for (std::int64_t t = 0; t < T; ++t) {
    if (!keep.empty() && !keep[t]) continue;
    ++r.routed;
    const double* x = logits.data() + t * E;
    double m = -1e300;
    for (int e = 0; e < E; ++e) m = std::max(m, x[e]);
    double s = 0;
    for (int e = 0; e < E; ++e) s += std::exp(x[e] - m);
    std::vector<double> p(E);
    for (int e = 0; e < E; ++e) p[e] = std::exp(x[e] - m) / s;
    const double lse = m + std::log(s);
    r.z += lse * lse;
    for (int e = 0; e < E; ++e) r.mean_p[e] += p[e];
    // the min(k+1, E) largest p, lowest index first on ties
    std::vector<bool> used(E, false);
    std::vector<int> top;
    for (std::int64_t j = 0; j < std::min(k + 1, E); ++j) {
      int best = -1;
      for (int e = 0; e < E; ++e)
        if (!used[e] && (best < 0 || p[e] > p[best])) best = e;
      used[best] = true;
      top.push_back(best);
    }
    double sum = 0;
    for (std::int64_t j = 0; j < k; ++j) sum += p[top[j]];
    for (std::int64_t j = 0; j < k; ++j) {
      const double g = p[top[j]] / (sum + 1e-6);
      r.chosen[t].push_back(top[j]);
      r.weights[t].push_back(g);
      r.importance[top[j]] += g;
      if (!smooth && g > 0) r.load[top[j]] += 1;
    }
    if (smooth) {
      const double thr_in = p[top[k]], thr_out = p[top[k - 1]];
      for (int e = 0; e < E; ++e) {
        const double thr = x[e] > thr_in ? thr_in : thr_out;
        r.load[e] += ref_phi((clean[t * E + e] - thr) / stddev[t * E + e]);
      }
    }
  }
  if (r.routed > 0) {
    r.z /= double(r.routed);
    for (auto& v : r.mean_p) v /= double(r.routed);
  }
  r.cv2_i = ref_cv2(r.importance);
  r.cv2_l = ref_cv2(r.load);
  r.loss = (r.cv2_i + r.cv2_l) * loss_coef;
  return r;
}

template <class T>
void check_plan(const DispatchPlan<T>& plan, const RefNoisy& r, const NoisyTopKDetails<T>& d,
                std::int64_t T_, std::int64_t E, std::int64_t k, double tol) {
  REQUIRE_NOTHROW(plan.check());
  REQUIRE(plan.top_k == k);
  REQUIRE(plan.capacity == -1);
  REQUIRE(plan.dropped.empty());
  std::vector<std::int64_t> count(E, 0);
  for (std::int64_t t = 0; t < T_; ++t) {
    for (std::int64_t s = 0; s < k; ++s) {
      if (r.chosen[t].empty()) {
        REQUIRE(plan.choice_expert[t * k + s] == -1);
        continue;
      }
      REQUIRE(plan.choice_expert[t * k + s] == r.chosen[t][s]);
      REQUIRE(std::abs(plan.choice_weight[t * k + s] - r.weights[t][s]) <= tol);
      ++count[r.chosen[t][s]];
    }
  }
  CHECK(plan.stats.tokens_per_expert == count);
  CHECK(plan.stats.kept_per_expert == count);
  CHECK(plan.stats.routed_tokens == r.routed);
  CHECK(plan.stats.tokens_without_expert == 0);
  for (std::int64_t e = 0; e < E; ++e) {
    REQUIRE(std::abs(d.importance[e] - r.importance[e]) <= tol * std::max(1.0, r.importance[e]));
    REQUIRE(std::abs(d.load[e] - r.load[e]) <= tol * std::max(1.0, r.load[e]));
    REQUIRE(std::abs(plan.stats.mean_prob[e] - r.mean_p[e]) <= tol);
  }
  CHECK(std::abs(d.cv2_importance - r.cv2_i) <= tol * std::max(1.0, r.cv2_i));
  CHECK(std::abs(d.cv2_load - r.cv2_l) <= tol * std::max(1.0, r.cv2_l));
  // aux_loss has coefficient 1 like every router; the reference's loss (times loss_coef)
  // is aux_loss_scaled.
  CHECK(std::abs(plan.stats.aux_loss_scaled - r.loss) <= tol * std::max(1.0, r.loss));
  CHECK(plan.stats.aux_loss_scaled == d.loss);
  CHECK(std::abs(plan.stats.aux_loss - (r.cv2_i + r.cv2_l)) <=
        tol * std::max(1.0, r.cv2_i + r.cv2_l));
  CHECK(std::abs(plan.stats.z_loss - r.z) <= tol * std::max(1.0, r.z));
}

// Logits on a 1/8 grid: exact ties, otherwise gaps far above float rounding.
std::vector<float> grid_logits(std::int64_t n, std::uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> nd(0.0, 1.5);
  std::vector<float> v(n);
  for (auto& x : v) x = float(std::round(nd(gen) * 8) / 8);
  return v;
}

std::vector<float> normal_vec(std::int64_t n, std::uint32_t seed, double sd = 1.0) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> nd(0.0, sd);
  std::vector<float> v(n);
  for (auto& x : v) x = float(nd(gen));
  return v;
}

std::vector<double> dense_gates(const DispatchPlan<float>& plan) {
  const std::int64_t E = plan.num_experts;
  std::vector<double> g(plan.num_tokens * E, 0.0);
  for (std::int64_t e = 0; e < E; ++e)
    for (std::int64_t i = 0; i < plan.expert_size(e); ++i)
      g[plan.expert_tokens(e)[i] * E + e] = plan.expert_gates(e)[i];
  return g;
}

}  // namespace

TEST_CASE("NoisyTopKRouter reproduces the noisy_topk_tiny fixture (eval)",
          "[moe][router_noisy_topk]") {
  auto f = open_fixture("noisy_topk_tiny.safetensors");
  const Tensor<float> x = f.tensor<float>("x");
  const Tensor<float> wg = f.tensor<float>("w_gate"), wn = f.tensor<float>("w_noise");
  const NoisyTopKRouter<float> router(
      {.num_experts = 4, .top_k = 2, .noise_epsilon = 0.01, .loss_coef = 0.01});
  NoisyTopKDetails<float> d;
  DispatchPlan<float> plan;
  router.route(ConstView<float, 2>(x), {wg, wn}, plan, {}, NoisyMode::eval, {}, &d);
  REQUIRE_NOTHROW(plan.check());
  using test_support::max_rel_err;
  using test_support::to_double;
  const double e_clean =
      max_rel_err(to_double(d.clean_logits), to_double(f.tensor<float>("clean_logits")), 1e-3);
  const double e_gates = max_rel_err(dense_gates(plan), to_double(f.tensor<float>("gates")), 1e-6);
  const double e_imp = max_rel_err(d.importance, to_double(f.tensor<float>("importance")), 1e-6);
  const Tensor<std::int64_t> load = f.tensor<std::int64_t>("load");
  INFO("clean " << e_clean << " gates " << e_gates << " importance " << e_imp);
  CHECK(e_clean < 1e-5);
  CHECK(e_gates < 1e-5);
  CHECK(e_imp < 1e-5);
  CHECK(d.load == to_double(load));
  CHECK(!d.smooth_load);
  CHECK(rel(d.cv2_importance, f.scalar<float>("cv2_importance")) < 1e-5);
  CHECK(rel(d.cv2_load, f.scalar<float>("cv2_load")) < 1e-5);
  CHECK(rel(plan.stats.aux_loss_scaled, f.scalar<float>("loss")) < 1e-5);
  CHECK(plan.stats.aux_loss_scaled == d.loss);
  CHECK(rel(plan.stats.aux_loss, f.scalar<float>("cv2_importance") + f.scalar<float>("cv2_load")) <
        1e-5);

  // The LogitsRouter form on the fixture's clean logits gives the same routing.
  NoisyTopKDetails<float> d2;
  DispatchPlan<float> p2;
  router.route(ConstView<float, 2>(f.tensor<float>("clean_logits")), p2, {}, &d2);
  CHECK(p2.choice_expert == plan.choice_expert);
  CHECK(max_rel_err(dense_gates(p2), to_double(f.tensor<float>("gates")), 1e-6) < 1e-5);
  CHECK(d2.load == d.load);
  CHECK(rel(p2.stats.aux_loss_scaled, f.scalar<float>("loss")) < 1e-5);
  CHECK(d2.clean_logits.empty());
}

TEST_CASE("NoisyTopKRouter reproduces the noisy_topk_tiny fixture (train, recorded noise)",
          "[moe][router_noisy_topk]") {
  auto f = open_fixture("noisy_topk_tiny.safetensors");
  const Tensor<float> x = f.tensor<float>("x");
  const Tensor<float> wg = f.tensor<float>("w_gate"), wn = f.tensor<float>("w_noise");
  const Tensor<float> noise = f.tensor<float>("train_noise");
  const NoisyTopKRouter<float> router(
      {.num_experts = 4, .top_k = 2, .noise_epsilon = 0.01, .loss_coef = 0.01});
  NoisyTopKDetails<float> d;
  DispatchPlan<float> plan;
  router.route(ConstView<float, 2>(x), {wg, wn}, plan, {}, NoisyMode::train,
               {.normal = ConstView<float, 2>(noise)}, &d);
  REQUIRE_NOTHROW(plan.check());
  using test_support::max_rel_err;
  using test_support::to_double;
  const double e_sd = max_rel_err(to_double(d.noise_stddev),
                                  to_double(f.tensor<float>("train_noise_stddev")), 1e-3);
  const double e_noisy = max_rel_err(to_double(d.noisy_logits),
                                     to_double(f.tensor<float>("train_noisy_logits")), 1e-3);
  const double e_gates =
      max_rel_err(dense_gates(plan), to_double(f.tensor<float>("train_gates")), 1e-6);
  const double e_load = max_rel_err(d.load, to_double(f.tensor<float>("train_load")), 1e-6);
  INFO("stddev " << e_sd << " noisy " << e_noisy << " gates " << e_gates << " load " << e_load);
  CHECK(e_sd < 1e-5);
  CHECK(e_noisy < 1e-5);
  CHECK(e_gates < 1e-5);
  CHECK(e_load < 1e-5);
  CHECK(d.smooth_load);
  CHECK(rel(plan.stats.aux_loss_scaled, f.scalar<float>("train_loss")) < 1e-5);
}

TEST_CASE("NoisyTopKRouter eval matches a naive double reference on random logits",
          "[moe][router_noisy_topk]") {
  for (std::int64_t E : {1, 2, 5, 8, 17, 64}) {
    for (std::int64_t T : {0, 1, 7, 64, 300}) {
      for (std::int64_t k : {std::int64_t(1), std::min<std::int64_t>(2, E), E}) {
        for (std::uint32_t seed : {1u, 2u}) {
          INFO("E=" << E << " T=" << T << " k=" << k << " seed=" << seed);
          const auto logits = grid_logits(T * E, seed * 7919 + std::uint32_t(E * 31 + T + k));
          const NoisyTopKRouter<float> router({.num_experts = E, .top_k = k, .loss_coef = 0.5});
          NoisyTopKDetails<float> d;
          DispatchPlan<float> plan;
          router.route(ConstView<float, 2>(logits.data(), {T, E}), plan, {}, &d);
          const std::vector<double> ld(logits.begin(), logits.end());
          check_plan(plan, ref_noisy(ld, {}, {}, false, T, E, k, 0.5, {}), d, T, E, k, 2e-6);
        }
      }
    }
  }
}

TEST_CASE("NoisyTopKRouter scalar path and double instantiation match the reference",
          "[moe][router_noisy_topk]") {
  for (std::int64_t E : {1, 3, 17, 64}) {
    const std::int64_t T = 64, k = std::min<std::int64_t>(3, E);
    const auto logits = grid_logits(T * E, std::uint32_t(77 + E));
    const std::vector<double> ld(logits.begin(), logits.end());
    const NoisyTopKRouter<float, switchyard::simd::scalar> router({.num_experts = E, .top_k = k});
    NoisyTopKDetails<float> d;
    DispatchPlan<float> plan;
    router.route(ConstView<float, 2>(logits.data(), {T, E}), plan, {}, &d);
    check_plan(plan, ref_noisy(ld, {}, {}, false, T, E, k, 0.01, {}), d, T, E, k, 2e-6);
    const NoisyTopKRouter<double> rd({.num_experts = E, .top_k = k});
    NoisyTopKDetails<double> dd;
    DispatchPlan<double> pd;
    rd.route(ConstView<double, 2>(ld.data(), {T, E}), pd, {}, &dd);
    check_plan(pd, ref_noisy(ld, {}, {}, false, T, E, k, 0.01, {}), dd, T, E, k, 1e-12);
  }
}

TEST_CASE("NoisyTopKRouter train mode matches a naive double reference",
          "[moe][router_noisy_topk]") {
  for (std::int64_t E : {2, 4, 9, 16}) {
    for (std::int64_t T : {1, 7, 64}) {
      for (std::int64_t k : {std::int64_t(1), std::min<std::int64_t>(3, E - 1), E}) {
        const std::int64_t dim = 6;
        const std::uint32_t seed = std::uint32_t(E * 1000 + T * 10 + k);
        INFO("E=" << E << " T=" << T << " k=" << k);
        const auto x = normal_vec(T * dim, seed);
        const auto wg = normal_vec(dim * E, seed + 1, 0.5);
        const auto wn = normal_vec(dim * E, seed + 2, 0.5);
        const auto noise = normal_vec(T * E, seed + 3);
        const NoisyTopKRouter<float> router(
            {.num_experts = E, .top_k = k, .noise_epsilon = 0.05, .loss_coef = 0.1});
        NoisyTopKDetails<float> d;
        DispatchPlan<float> plan;
        router.route(
            ConstView<float, 2>(x.data(), {T, dim}),
            {ConstView<float, 2>(wg.data(), {dim, E}), ConstView<float, 2>(wn.data(), {dim, E})},
            plan, {}, NoisyMode::train, {.normal = ConstView<float, 2>(noise.data(), {T, E})}, &d);
        // reference in double from the same inputs
        std::vector<double> clean(T * E, 0), sd(T * E, 0), noisy(T * E, 0);
        for (std::int64_t t = 0; t < T; ++t) {
          for (std::int64_t e = 0; e < E; ++e) {
            double c = 0, r = 0;
            for (std::int64_t i = 0; i < dim; ++i) {
              c += double(x[t * dim + i]) * wg[i * E + e];
              r += double(x[t * dim + i]) * wn[i * E + e];
            }
            clean[t * E + e] = c;
            sd[t * E + e] = std::log(1 + std::exp(r)) + 0.05;
            noisy[t * E + e] = c + noise[t * E + e] * sd[t * E + e];
          }
        }
        for (std::int64_t i = 0; i < T * E; ++i) {
          REQUIRE(std::abs(d.clean_logits[i] - clean[i]) <
                  1e-5 * std::max(1.0, std::abs(clean[i])));
          REQUIRE(std::abs(d.noise_stddev[i] - sd[i]) < 1e-5 * std::max(1.0, sd[i]));
          REQUIRE(std::abs(d.noisy_logits[i] - noisy[i]) <
                  1e-5 * std::max(1.0, std::abs(noisy[i])));
        }
        const bool smooth = k < E;
        CHECK(d.smooth_load == smooth);
        check_plan(plan, ref_noisy(noisy, clean, sd, smooth, T, E, k, 0.1, {}), d, T, E, k, 2e-5);
      }
    }
  }
}

TEST_CASE("NoisyTopKRouter seeded noise: reproducible, position-based, mask-independent",
          "[moe][router_noisy_topk]") {
  const std::int64_t T = 50, E = 8, dim = 4;
  const auto x = normal_vec(T * dim, 1);
  const auto wg = normal_vec(dim * E, 2), wn = normal_vec(dim * E, 3);
  const NoisyTopKWeights<float> w{ConstView<float, 2>(wg.data(), {dim, E}),
                                  ConstView<float, 2>(wn.data(), {dim, E})};
  const ConstView<float, 2> xv(x.data(), {T, dim});
  const NoisyTopKRouter<float> router({.num_experts = E, .top_k = 2});
  NoisyTopKDetails<float> a, b, c;
  DispatchPlan<float> pa, pb, pc;
  const NoisyTopKNoise<float> src{.seed = 42, .stream = 7, .offset = 3};
  router.route(xv, w, pa, {}, NoisyMode::train, src, &a);
  router.route(xv, w, pb, {}, NoisyMode::train, src, &b);
  CHECK(a.noise == b.noise);
  CHECK(pa.choice_expert == pb.choice_expert);
  CHECK(pa.stats.aux_loss == pb.stats.aux_loss);
  const switchyard::Rng rng(42, 7);
  for (std::int64_t i = 0; i < T * E; i += 13) CHECK(a.noise[i] == rng.normal<float>(3 + i));
  // The same draws passed explicitly give the same plan.
  router.route(xv, w, pc, {}, NoisyMode::train,
               {.normal = ConstView<float, 2>(a.noise.data(), {T, E})}, &c);
  CHECK(pc.choice_expert == pa.choice_expert);
  CHECK(pc.choice_weight == pa.choice_weight);
  CHECK(c.load == a.load);
  // Masking tokens does not move the other tokens' noise.
  std::vector<std::uint8_t> keep(T, 1);
  for (std::int64_t t = 0; t < T; t += 3) keep[t] = 0;
  router.route(xv, w, pc, TokenMask{keep}, NoisyMode::train, src, &c);
  CHECK(c.noise == a.noise);
  for (std::int64_t t = 0; t < T; ++t)
    if (keep[t])
      for (std::int64_t s = 0; s < 2; ++s)
        CHECK(pc.choice_expert[t * 2 + s] == pa.choice_expert[t * 2 + s]);
  // A different stream gives different noise.
  router.route(xv, w, pb, {}, NoisyMode::train, {.seed = 42, .stream = 8}, &b);
  CHECK(b.noise != a.noise);
  // noisy_gating off: train == eval
  const NoisyTopKRouter<float> quiet({.num_experts = E, .top_k = 2, .noisy_gating = false});
  const auto pe = quiet.route(xv, NoisyTopKWeights<float>{w.w_gate, {}});
  const auto pt = quiet.route(xv, NoisyTopKWeights<float>{w.w_gate, {}}, {}, NoisyMode::train, src);
  CHECK(pe.choice_expert == pt.choice_expert);
  CHECK(pe.choice_weight == pt.choice_weight);
  CHECK(pe.stats.aux_loss == pt.stats.aux_loss);
}

TEST_CASE("NoisyTopKRouter token mask: masked tokens are never routed and count nowhere",
          "[moe][router_noisy_topk]") {
  const std::int64_t T = 300, E = 8, k = 3;
  const auto logits = grid_logits(T * E, 9);
  std::vector<std::uint8_t> keep(T);
  std::mt19937 gen(4);
  for (auto& v : keep) v = std::uint8_t(gen() % 4 != 0);
  const NoisyTopKRouter<float> router({.num_experts = E, .top_k = k});
  NoisyTopKDetails<float> d;
  DispatchPlan<float> plan;
  router.route(ConstView<float, 2>(logits.data(), {T, E}), plan, TokenMask{keep}, &d);
  const std::vector<double> ld(logits.begin(), logits.end());
  check_plan(plan, ref_noisy(ld, {}, {}, false, T, E, k, 0.01, keep), d, T, E, k, 2e-6);

  std::vector<float> sub;
  for (std::int64_t t = 0; t < T; ++t)
    if (keep[t]) sub.insert(sub.end(), logits.begin() + t * E, logits.begin() + (t + 1) * E);
  const std::int64_t Ts = std::int64_t(sub.size()) / E;
  NoisyTopKDetails<float> ds;
  DispatchPlan<float> ps;
  router.route(ConstView<float, 2>(sub.data(), {Ts, E}), ps, {}, &ds);
  CHECK(plan.stats.tokens_per_expert == ps.stats.tokens_per_expert);
  CHECK(plan.stats.routed_tokens == Ts);
  CHECK(d.load == ds.load);
  for (std::int64_t e = 0; e < E; ++e) CHECK(rel(d.importance[e], ds.importance[e]) < 1e-12);
  CHECK(rel(plan.stats.aux_loss, ps.stats.aux_loss) < 1e-12);
  CHECK(rel(plan.stats.z_loss, ps.stats.z_loss) < 1e-12);

  // Train mode with explicit noise: equal to the kept rows routed alone.
  const std::int64_t dim = 5;
  const auto x = normal_vec(T * dim, 11);
  const auto wg = normal_vec(dim * E, 12, 0.6), wn = normal_vec(dim * E, 13, 0.6);
  const auto noise = normal_vec(T * E, 14);
  std::vector<float> xs, ns;
  for (std::int64_t t = 0; t < T; ++t) {
    if (!keep[t]) continue;
    xs.insert(xs.end(), x.begin() + t * dim, x.begin() + (t + 1) * dim);
    ns.insert(ns.end(), noise.begin() + t * E, noise.begin() + (t + 1) * E);
  }
  const NoisyTopKWeights<float> w{ConstView<float, 2>(wg.data(), {dim, E}),
                                  ConstView<float, 2>(wn.data(), {dim, E})};
  router.route(ConstView<float, 2>(x.data(), {T, dim}), w, plan, TokenMask{keep}, NoisyMode::train,
               {.normal = ConstView<float, 2>(noise.data(), {T, E})}, &d);
  router.route(ConstView<float, 2>(xs.data(), {Ts, dim}), w, ps, {}, NoisyMode::train,
               {.normal = ConstView<float, 2>(ns.data(), {Ts, E})}, &ds);
  REQUIRE_NOTHROW(plan.check());
  for (std::int64_t e = 0; e < E; ++e) {
    CHECK(rel(d.load[e], ds.load[e]) < 1e-12);
    CHECK(rel(d.importance[e], ds.importance[e]) < 1e-12);
  }
  CHECK(rel(plan.stats.aux_loss, ps.stats.aux_loss) < 1e-12);
  for (std::int64_t t = 0; t < T; ++t)
    if (!keep[t])
      for (std::int64_t s = 0; s < k; ++s) REQUIRE(plan.choice_expert[t * k + s] == -1);

  // All masked: empty plan, zero losses.
  std::vector<std::uint8_t> none(T, 0);
  router.route(ConstView<float, 2>(logits.data(), {T, E}), plan, TokenMask{none}, &d);
  REQUIRE_NOTHROW(plan.check());
  CHECK(plan.nnz() == 0);
  CHECK(plan.stats.aux_loss == 0);
  CHECK(plan.stats.z_loss == 0);
}

TEST_CASE("NoisyTopKRouter hand-worked case", "[moe][router_noisy_topk]") {
  // E = 3, k = 2, loss_coef = 0.01.
  //   token 0: logits [0, ln 2, ln 3] -> p = [1/6, 2/6, 3/6]; top-2 = e2, e1;
  //            gates = (1/2, 1/3) / (5/6 + 1e-6) ~ (0.6, 0.4)
  //   token 1: logits [ln 3, ln 3, 0] -> p = [3/7, 3/7, 1/7]; tie e0, e1 -> lower first;
  //            gates = (3/7, 3/7) / (6/7 + 1e-6) ~ (0.5, 0.5)
  // importance ~ [0.5, 0.9, 0.6]; load = [1, 2, 1]
  // cv2(load) = var [1,2,1] (unbiased: 1/3) / mean^2 (16/9) = 3/16
  // cv2(importance) ~ 0.043333 / 0.444444 ~ 0.0975; loss ~ (0.0975 + 0.1875) * 0.01
  const std::vector<float> logits = {
      0, float(std::log(2.0)), float(std::log(3.0)), float(std::log(3.0)), float(std::log(3.0)), 0};
  const NoisyTopKRouter<float> router({.num_experts = 3, .top_k = 2, .loss_coef = 0.01});
  NoisyTopKDetails<float> d;
  DispatchPlan<float> plan;
  router.route(ConstView<float, 2>(logits.data(), {2, 3}), plan, {}, &d);
  REQUIRE_NOTHROW(plan.check());
  CHECK(plan.choice_expert == std::vector<std::int32_t>{2, 1, 0, 1});
  const double g00 = 0.5 / (5.0 / 6 + 1e-6), g01 = (1.0 / 3) / (5.0 / 6 + 1e-6);
  const double g1 = (3.0 / 7) / (6.0 / 7 + 1e-6);
  CHECK(plan.choice_weight[0] == Approx(g00).epsilon(1e-6));
  CHECK(plan.choice_weight[1] == Approx(g01).epsilon(1e-6));
  CHECK(plan.choice_weight[2] == Approx(g1).epsilon(1e-6));
  CHECK(plan.choice_weight[3] == plan.choice_weight[2]);
  CHECK(d.load == std::vector<double>{1, 2, 1});
  CHECK(d.cv2_load == Approx(3.0 / 16).epsilon(1e-9));
  CHECK(d.importance[0] == Approx(g1).epsilon(1e-6));
  CHECK(d.importance[1] == Approx(g01 + g1).epsilon(1e-6));
  CHECK(d.importance[2] == Approx(g00).epsilon(1e-6));
  const double mean = (g1 + g01 + g1 + g00) / 3;
  const double var = ((g1 - mean) * (g1 - mean) + (g01 + g1 - mean) * (g01 + g1 - mean) +
                      (g00 - mean) * (g00 - mean)) /
                     2;
  const double cv2_i = var / (mean * mean + 1e-10);
  CHECK(cv2_i == Approx(0.0975).epsilon(1e-3));
  CHECK(d.cv2_importance == Approx(cv2_i).epsilon(1e-5));
  CHECK(plan.stats.aux_loss == Approx(cv2_i + 3.0 / 16).epsilon(1e-5));
  CHECK(plan.stats.aux_loss_scaled == Approx((cv2_i + 3.0 / 16) * 0.01).epsilon(1e-5));
  CHECK(plan.stats.tokens_per_expert == std::vector<std::int64_t>{1, 2, 1});
  // mean_prob = mean p = ([1/6, 2/6, 3/6] + [3/7, 3/7, 1/7]) / 2
  CHECK(plan.stats.mean_prob[0] == Approx((1.0 / 6 + 3.0 / 7) / 2).epsilon(1e-6));
  CHECK(plan.stats.mean_prob[2] == Approx((3.0 / 6 + 1.0 / 7) / 2).epsilon(1e-6));

  // One expert: cv2 is 0 by definition, the gate is 1 / (1 + 1e-6).
  const NoisyTopKRouter<float> one({.num_experts = 1, .top_k = 1});
  NoisyTopKDetails<float> d1;
  DispatchPlan<float> p1;
  one.route(ConstView<float, 2>(logits.data(), {6, 1}), p1, {}, &d1);
  CHECK(p1.stats.aux_loss == 0);
  CHECK(p1.choice_weight[0] == Approx(1.0 / (1 + 1e-6)).epsilon(1e-7));
}

TEST_CASE("NoisyTopKRouter errors", "[moe][router_noisy_topk]") {
  using switchyard::config_error;
  using switchyard::shape_error;
  REQUIRE_THROWS_AS(NoisyTopKRouter<float>({.num_experts = 0}), config_error);
  REQUIRE_THROWS_WITH(NoisyTopKRouter<float>({.num_experts = 4, .top_k = 0}),
                      Contains("NoisyTopKRouter") && Contains("top_k"));
  REQUIRE_THROWS_WITH(NoisyTopKRouter<float>({.num_experts = 4, .top_k = 5}),
                      Contains("NoisyTopKRouter") && Contains("top_k"));
  REQUIRE_THROWS_WITH(NoisyTopKRouter<float>({.num_experts = 4, .top_k = 2, .noise_epsilon = -1}),
                      Contains("NoisyTopKRouter") && Contains("noise_epsilon"));
  REQUIRE_THROWS_AS(
      NoisyTopKRouter<float>({.num_experts = 4, .top_k = 2, .noise_epsilon = std::nan("")}),
      config_error);
  REQUIRE_THROWS_WITH(
      NoisyTopKRouter<float>({.num_experts = 4, .top_k = 2, .loss_coef = std::nan("")}),
      Contains("NoisyTopKRouter") && Contains("loss_coef"));

  const std::int64_t T = 5, E = 4, dim = 6;
  const NoisyTopKRouter<float> router({.num_experts = E, .top_k = 2});
  std::vector<float> logits(T * (E + 1), 0.5f);
  REQUIRE_THROWS_AS(router.route(ConstView<float, 2>(logits.data(), {T, E + 1})), shape_error);
  REQUIRE_THROWS_WITH(router.route(ConstView<float, 2>(logits.data(), {T, E + 1})),
                      Contains("NoisyTopKRouter") && Contains("logits"));
  std::vector<std::uint8_t> keep(T + 1, 1);
  REQUIRE_THROWS_WITH(router.route(ConstView<float, 2>(logits.data(), {T, E}), TokenMask{keep}),
                      Contains("NoisyTopKRouter") && Contains("mask"));
  logits[6] = std::numeric_limits<float>::quiet_NaN();
  REQUIRE_THROWS_AS(router.route(ConstView<float, 2>(logits.data(), {T, E})), config_error);
  REQUIRE_THROWS_WITH(router.route(ConstView<float, 2>(logits.data(), {T, E})),
                      Contains("NoisyTopKRouter") && Contains("token 1"));

  const auto x = normal_vec(T * dim, 1);
  const auto w = normal_vec(dim * E, 2);
  const ConstView<float, 2> xv(x.data(), {T, dim});
  const ConstView<float, 2> good(w.data(), {dim, E}), transposed(w.data(), {E, dim});
  REQUIRE_NOTHROW(router.route(xv, {good, good}));
  REQUIRE_THROWS_AS(router.route(xv, {transposed, good}), shape_error);
  REQUIRE_THROWS_WITH(router.route(xv, {transposed, good}),
                      Contains("NoisyTopKRouter") && Contains("w_gate") && Contains("[d=4, E=6]"));
  REQUIRE_NOTHROW(router.route(xv, {good, transposed}));  // eval never reads w_noise
  REQUIRE_THROWS_WITH(router.route(xv, {good, transposed}, {}, NoisyMode::train),
                      Contains("NoisyTopKRouter") && Contains("w_noise"));
  const auto n_bad = normal_vec(T * (E + 1), 3);
  REQUIRE_THROWS_WITH(router.route(xv, {good, good}, {}, NoisyMode::train,
                                   {.normal = ConstView<float, 2>(n_bad.data(), {T, E + 1})}),
                      Contains("NoisyTopKRouter") && Contains("noise"));
  REQUIRE_THROWS_WITH(router.route(xv, {good, good}, TokenMask{keep}),
                      Contains("NoisyTopKRouter") && Contains("mask"));
  std::vector<float> xn = x;
  xn[dim * 3] = std::numeric_limits<float>::infinity();
  REQUIRE_THROWS_AS(router.route(ConstView<float, 2>(xn.data(), {T, dim}), {good, good}),
                    config_error);
  REQUIRE_THROWS_AS(
      router.route(ConstView<float, 2>(xn.data(), {T, dim}), {good, good}, {}, NoisyMode::train),
      config_error);
}

TEST_CASE("NoisyTopKRouter is bit-identical for 1 and 2 threads", "[moe][router_noisy_topk]") {
  const std::int64_t T = 4096, E = 64, k = 8, dim = 16;
  const auto logits = normal_vec(T * E, 21);
  const auto x = normal_vec(T * dim, 22);
  const auto wg = normal_vec(dim * E, 23, 0.3), wn = normal_vec(dim * E, 24, 0.3);
  const NoisyTopKWeights<float> w{ConstView<float, 2>(wg.data(), {dim, E}),
                                  ConstView<float, 2>(wn.data(), {dim, E})};
  const NoisyTopKRouter<float> router({.num_experts = E, .top_k = k});
  DispatchPlan<float> a, b, c, e;
  NoisyTopKDetails<float> dc, de;
  {
    switchyard::ScopedNumThreads one(1);
    router.route(ConstView<float, 2>(logits.data(), {T, E}), a);
    router.route(ConstView<float, 2>(x.data(), {T, dim}), w, c, {}, NoisyMode::train, {.seed = 5},
                 &dc);
  }
  {
    switchyard::ScopedNumThreads two(2);
    router.route(ConstView<float, 2>(logits.data(), {T, E}), b);
    router.route(ConstView<float, 2>(x.data(), {T, dim}), w, e, {}, NoisyMode::train, {.seed = 5},
                 &de);
  }
  REQUIRE_NOTHROW(a.check());
  test_support::require_same_plan(a, b);
  test_support::require_same_plan(c, e);
  CHECK(dc.load == de.load);
  CHECK(dc.importance == de.importance);
}
