#pragma once
// ExpertChoiceRouter: experts pick tokens (Zhou et al. 2022, "Mixture-of-Experts
// with Expert Choice Routing").
//
// Semantics, with logits x [T, E] and T = routed (unmasked) tokens:
//   p[t, :] = softmax(x[t, :]) over the E experts, per token;
//   capacity c = max(floor(capacity_factor * T / E), min_capacity) (llm-baselines
//     int(cf * T / E)), clamped to T visibly (plan.requested_capacity,
//     plan.capacity_clamped). c = 0 is allowed: the plan is then empty and every
//     routed token is without expert;
//   each expert e takes the c routed tokens with the largest p[t, e] (over all T
//   tokens at once, non-causal); equal probabilities go to the lower token index;
//   gate = p[t, e] itself (not renormalised).
// A token may be taken by 0..E experts; a token no expert took outputs 0.
// Nothing is dropped (plan.dropped is empty): every expert's run holds exactly c
// tokens, sorted by token.
// Token-side views: plan.top_k = E, and row t of choice_expert / choice_weight
// lists the experts that took token t IN EXPERT ORDER (not by gate), then -1 /
// 0; the CSR slot of (t, e) is the rank of e among the experts that took t.
// (This differs from token-choice plans, whose views are best first.)
// Masked tokens (TokenMask) are never taken and count in no statistic.
// T = 0 or all tokens masked gives a valid empty plan (capacity 0).
//
// Statistics (over routed tokens): tokens_per_expert = kept_per_expert = c for
// every expert; tokens_without_expert = routed tokens no expert took; dropped = 0;
// aux_loss = 0 (expert choice is balanced by construction; the reference has no
// auxiliary loss); z_loss = mean_t logsumexp(x[t])^2; entropy and mean_prob of p.
// Reference: epfml/llm-baselines @ c8a5105, src/models/moe.py ExpertChoiceMoE.forward,
// moe_softmax_order = 'softmax_topk' (the 'topk_softmax' variant is not provided).
//
// Cost: one vectorised softmax pass (detail::softmax_scores) into a thread-local
// buffer reused across calls, a blocked transpose of the routed tokens'
// probabilities to [E, T], per expert (parallel over experts) a threshold
// selection (nth_element) and one scan in token order, and a serial pass over the
// E*c entries for the token-side views. Bit-identical for any thread count.
#include <algorithm>
#include <cstdint>
#include <functional>
#include <string_view>
#include <vector>

#include "switchyard/core/error.hpp"
#include "switchyard/core/parallel_for.hpp"
#include "switchyard/core/simd/arch.hpp"
#include "switchyard/core/view.hpp"
#include "switchyard/moe/plan.hpp"
#include "switchyard/moe/router.hpp"

namespace switchyard {
inline namespace v0 {
namespace moe {

struct ExpertChoiceRouterConfig {
  std::int64_t num_experts = 0;  ///< E; >= 1
  /// c = floor(capacity_factor * T / E) tokens per expert; finite, > 0.
  double capacity_factor = 1.0;
  std::int64_t min_capacity = 0;  ///< lower bound on c; >= 0
};

namespace detail {

/// Per-thread buffers of ExpertChoiceRouter, reused across calls.
template <class T>
struct ExpertChoiceScratch {
  std::vector<T> probs;
  std::vector<double> prob_sum;
  std::vector<T> columns;           // [E, R] probabilities of the routed tokens
  std::vector<std::int32_t> rows;   // [R] token id of each routed row
  std::vector<std::int32_t> taken;  // [T] experts that took each token so far
};

template <class T>
ExpertChoiceScratch<T>& expert_choice_scratch() {
  thread_local ExpertChoiceScratch<T> s;
  return s;
}

}  // namespace detail

template <class T = float, class Arch = simd::default_arch>
class ExpertChoiceRouter {
 public:
  using config_type = ExpertChoiceRouterConfig;
  static constexpr std::string_view name = "ExpertChoiceRouter";

  /// Throws config_error (naming ExpertChoiceRouter and the field) if
  /// num_experts < 1, capacity_factor is not finite or <= 0, or min_capacity < 0.
  explicit ExpertChoiceRouter(const ExpertChoiceRouterConfig& config) : config_(config) {
    detail::check_num_experts(name, config_.num_experts);
    detail::check_positive_finite(name, "capacity_factor", config_.capacity_factor);
    if (config_.min_capacity < 0) {
      switchyard::detail::fail_config(name, "config", "min_capacity", config_.min_capacity, ">= 0");
    }
  }

  const ExpertChoiceRouterConfig& config() const noexcept { return config_; }
  std::int64_t num_experts() const noexcept { return config_.num_experts; }

  /// logits: [T, E] (unit inner stride); mask: empty or [T] (True = routed).
  /// Fills plan (reusing its memory): c tokens per expert, token-side views with
  /// K = E. Throws shape_error on a shape/stride/mask-length mismatch,
  /// config_error on a NaN or infinite logit of a routed token.
  void route(ConstView<T, 2> logits, DispatchPlan<T>& plan, const TokenMask& mask = {}) const {
    const std::int64_t experts = config_.num_experts;
    detail::check_logits(name, logits, experts, mask);
    const std::int64_t tokens = logits.extent(0);
    plan.reset(tokens, experts, experts);
    auto& s = detail::expert_choice_scratch<T>();
    detail::softmax_scores<T, Arch>(name, logits, mask, s.probs, s.prob_sum, plan.stats);
    const std::int64_t routed = plan.stats.routed_tokens;
    const Capacity cap = compute_capacity(routed, 1, experts, config_.capacity_factor,
                                          CapacityRounding::floor, config_.min_capacity);
    set_capacity(plan, cap);
    const std::int64_t c = cap.value;

    // Routed rows, and their probabilities transposed to [E, R] in fixed row blocks.
    s.rows.resize(static_cast<std::size_t>(routed));
    for (std::int64_t t = 0, r = 0; t < tokens; ++t) {
      if (mask.routed(t)) s.rows[r++] = static_cast<std::int32_t>(t);
    }
    if (c > 0 && c < routed) {
      s.columns.resize(static_cast<std::size_t>(experts * routed));
      const T* probs = s.probs.data();
      T* cols = s.columns.data();
      constexpr std::int64_t block = 64;
      parallel_for(num_chunks(routed, block), [&](std::int64_t b) {
        const std::int64_t r1 = std::min(routed, (b + 1) * block);
        for (std::int64_t r = b * block; r < r1; ++r) {
          const T* p = probs + static_cast<std::int64_t>(s.rows[r]) * experts;
          for (std::int64_t e = 0; e < experts; ++e) cols[e * routed + r] = p[e];
        }
      });
    }

    // Each expert's run: its c best tokens, in token order.
    const std::int64_t nnz = experts * c;
    for (std::int64_t e = 0; e <= experts; ++e) plan.expert_offsets[e] = e * c;
    plan.token_index.resize(static_cast<std::size_t>(nnz));
    plan.slot.resize(static_cast<std::size_t>(nnz));
    plan.gate.resize(static_cast<std::size_t>(nnz));
    if (c > 0) {
      parallel_for(experts, [&](std::int64_t e) {
        std::int32_t* out_t = plan.token_index.data() + e * c;
        T* out_g = plan.gate.data() + e * c;
        if (c == routed) {  // every routed token
          for (std::int64_t r = 0; r < routed; ++r) {
            out_t[r] = s.rows[r];
            out_g[r] = s.probs[static_cast<std::int64_t>(s.rows[r]) * experts + e];
          }
          return;
        }
        const T* col = s.columns.data() + e * routed;
        std::vector<T> work(col, col + routed);
        std::nth_element(work.begin(), work.begin() + (c - 1), work.end(), std::greater<T>());
        const T thr = work[c - 1];
        std::int64_t above = 0;
        for (std::int64_t r = 0; r < routed; ++r) above += col[r] > thr;
        std::int64_t equal_quota = c - above, n = 0;
        for (std::int64_t r = 0; r < routed && n < c; ++r) {
          const T v = col[r];
          if (v > thr || (v == thr && equal_quota-- > 0)) {
            out_t[n] = s.rows[r];
            out_g[n] = v;
            ++n;
          }
        }
      });
    }

    // Token-side views and slots, experts in order.
    s.taken.assign(static_cast<std::size_t>(tokens), 0);
    for (std::int64_t e = 0; e < experts; ++e) {
      for (std::int64_t i = e * c; i < (e + 1) * c; ++i) {
        const std::int64_t t = plan.token_index[i];
        const std::int32_t slot = s.taken[t]++;
        plan.slot[i] = slot;
        plan.choice_expert[t * experts + slot] = static_cast<std::int32_t>(e);
        plan.choice_weight[t * experts + slot] = plan.gate[i];
      }
      plan.stats.tokens_per_expert[e] = c;
      plan.stats.kept_per_expert[e] = c;
    }
    std::int64_t without = 0;
    for (std::int64_t r = 0; r < routed; ++r) without += s.taken[s.rows[r]] == 0;
    plan.stats.tokens_without_expert = without;
    plan.stats.dropped = 0;
    plan.stats.aux_loss = 0;
  }

  /// Allocating convenience: a fresh plan.
  DispatchPlan<T> route(ConstView<T, 2> logits, const TokenMask& mask = {}) const {
    DispatchPlan<T> plan;
    route(logits, plan, mask);
    return plan;
  }

 private:
  ExpertChoiceRouterConfig config_;
};

}  // namespace moe
}  // namespace v0
}  // namespace switchyard
