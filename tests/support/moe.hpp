#pragma once
// Helpers shared by the MoE router and plan tests.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#include "switchyard/core/tensor.hpp"
#include "switchyard/moe/plan.hpp"

namespace test_support {

/// Every field of two plans is equal, bit for bit (the CSR, the [T, K] views, the
/// dropped list and every statistic): same input routed twice (thread counts,
/// sampled vs explicit noise) or a serialisation round trip.
template <class T>
void require_same_plan(const switchyard::moe::DispatchPlan<T>& a,
                       const switchyard::moe::DispatchPlan<T>& b) {
  REQUIRE(a.num_tokens == b.num_tokens);
  REQUIRE(a.num_experts == b.num_experts);
  REQUIRE(a.top_k == b.top_k);
  REQUIRE(a.capacity == b.capacity);
  REQUIRE(a.requested_capacity == b.requested_capacity);
  REQUIRE(a.capacity_clamped == b.capacity_clamped);
  REQUIRE(a.expert_offsets == b.expert_offsets);
  REQUIRE(a.token_index == b.token_index);
  REQUIRE(a.slot == b.slot);
  REQUIRE(a.gate == b.gate);
  REQUIRE(a.choice_expert == b.choice_expert);
  REQUIRE(a.choice_weight == b.choice_weight);
  REQUIRE(a.choice_kept == b.choice_kept);
  REQUIRE(a.dropped.size() == b.dropped.size());
  for (std::size_t i = 0; i < a.dropped.size(); ++i) {
    REQUIRE(a.dropped[i].token == b.dropped[i].token);
    REQUIRE(a.dropped[i].slot == b.dropped[i].slot);
    REQUIRE(a.dropped[i].expert == b.dropped[i].expert);
    REQUIRE(a.dropped[i].gate == b.dropped[i].gate);
  }
  REQUIRE(a.stats.tokens_per_expert == b.stats.tokens_per_expert);
  REQUIRE(a.stats.kept_per_expert == b.stats.kept_per_expert);
  REQUIRE(a.stats.mean_prob == b.stats.mean_prob);
  REQUIRE(a.stats.routed_tokens == b.stats.routed_tokens);
  REQUIRE(a.stats.dropped == b.stats.dropped);
  REQUIRE(a.stats.tokens_without_expert == b.stats.tokens_without_expert);
  REQUIRE(a.stats.aux_loss == b.stats.aux_loss);
  REQUIRE(a.stats.aux_loss_scaled == b.stats.aux_loss_scaled);
  REQUIRE(a.stats.z_loss == b.stats.z_loss);
  REQUIRE(a.stats.entropy == b.stats.entropy);
}

/// One token's naive double-precision softmax: probabilities, log-sum-exp, entropy
/// (0 log 0 = 0), and the experts ranked by descending probability, equal ones in
/// index order (a stable sort): what the softmax-based routers must reproduce.
struct RefSoftmaxRow {
  std::vector<double> p;
  std::vector<int> order;
  double lse = 0, entropy = 0;
};

inline RefSoftmaxRow ref_softmax_ranked(const double* x, int E) {
  RefSoftmaxRow r;
  double m = -1e300;
  for (int e = 0; e < E; ++e) m = std::max(m, x[e]);
  double s = 0;
  for (int e = 0; e < E; ++e) s += std::exp(x[e] - m);
  r.p.resize(E);
  for (int e = 0; e < E; ++e) r.p[e] = std::exp(x[e] - m) / s;
  r.lse = m + std::log(s);
  for (int e = 0; e < E; ++e) {
    if (r.p[e] > 0) r.entropy -= r.p[e] * std::log(r.p[e]);
  }
  r.order.resize(E);
  std::iota(r.order.begin(), r.order.end(), 0);
  std::stable_sort(r.order.begin(), r.order.end(), [&](int a, int b) { return r.p[a] > r.p[b]; });
  return r;
}

/// Logits on a grid of 1/8: equal values are exact ties, distinct ones differ by >= 1/8.
template <class T>
switchyard::Tensor<T> grid_logits(int rows, int E, std::uint32_t seed, double sd = 1.5) {
  switchyard::Tensor<T> x({rows, E});
  std::mt19937 gen(seed);
  std::normal_distribution<double> nd(0.0, sd);
  for (auto& v : x) v = T(std::round(nd(gen) * 8.0) / 8.0);
  return x;
}

template <class T>
std::vector<double> as_double(const switchyard::Tensor<T>& t) {
  return std::vector<double>(t.begin(), t.end());
}

/// |got - want| <= rel * max(|want|, abs_floor) + abs_floor.
inline bool close(double got, double want, double rel, double abs_floor = 1e-12) {
  return std::abs(got - want) <= rel * std::max(std::abs(want), abs_floor) + abs_floor;
}

}  // namespace test_support
