#pragma once
// Helpers shared by the MoE router and plan tests.
#include <catch2/catch.hpp>
#include <cstddef>

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
  REQUIRE(a.dropped.size() == b.dropped.size());
  for (std::size_t i = 0; i < a.dropped.size(); ++i) {
    REQUIRE(a.dropped[i].token == b.dropped[i].token);
    REQUIRE(a.dropped[i].slot == b.dropped[i].slot);
    REQUIRE(a.dropped[i].expert == b.dropped[i].expert);
  }
  REQUIRE(a.stats.tokens_per_expert == b.stats.tokens_per_expert);
  REQUIRE(a.stats.kept_per_expert == b.stats.kept_per_expert);
  REQUIRE(a.stats.mean_prob == b.stats.mean_prob);
  REQUIRE(a.stats.routed_tokens == b.stats.routed_tokens);
  REQUIRE(a.stats.dropped == b.stats.dropped);
  REQUIRE(a.stats.tokens_without_expert == b.stats.tokens_without_expert);
  REQUIRE(a.stats.aux_loss == b.stats.aux_loss);
  REQUIRE(a.stats.z_loss == b.stats.z_loss);
  REQUIRE(a.stats.entropy == b.stats.entropy);
}

}  // namespace test_support
