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
// buffer reused across calls; then, in fixed blocks of 64 experts (parallel over
// blocks), one scan of the routed tokens in index order keeping per expert a
// buffer of 2c candidates (a compare against the c-th best so far rejects most
// tokens; a full buffer is cut back to its c best by nth_element, so the worst
// case, increasing probabilities, is O(T) per expert); and a
// serial pass over the E*c entries for the token-side views. Bit-identical for
// any thread count.
#include <algorithm>
#include <cstdint>
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
  std::vector<std::int32_t> rows;   // [R] token id of each routed row
  std::vector<std::int32_t> taken;  // [T] experts that took each token so far
};

/// A candidate of an expert's top-c: its probability and token.
template <class T>
struct ScoredToken {
  T value;
  std::int32_t token;
};

/// Experts per selection task: each task streams once over its columns of the probabilities.
inline constexpr std::int64_t expert_choice_block = 64;

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

    // Routed rows.
    s.rows.resize(static_cast<std::size_t>(routed));
    for (std::int64_t t = 0, r = 0; t < tokens; ++t) {
      if (mask.routed(t)) s.rows[r++] = static_cast<std::int32_t>(t);
    }

    // Each expert's run: its c best tokens, in token order. Experts go in fixed
    // blocks of 64 (one pass over the probabilities for E <= 64); tokens come
    // in index order and (value, token) pairs are ranked by value descending, then
    // token ascending.
    const std::int64_t nnz = experts * c;
    for (std::int64_t e = 0; e <= experts; ++e) plan.expert_offsets[e] = e * c;
    plan.token_index.resize(static_cast<std::size_t>(nnz));
    plan.slot.resize(static_cast<std::size_t>(nnz));
    plan.gate.resize(static_cast<std::size_t>(nnz));
    if (c > 0) {
      const T* probs = s.probs.data();
      const std::int32_t* rows = s.rows.data();
      parallel_for(num_chunks(experts, detail::expert_choice_block), [&](std::int64_t b) {
        const std::int64_t e0 = b * detail::expert_choice_block;
        const std::int64_t w = std::min(experts, e0 + detail::expert_choice_block) - e0;
        if (c == routed) {  // every routed token
          for (std::int64_t j = 0; j < w; ++j) {
            for (std::int64_t r = 0; r < routed; ++r) {
              plan.token_index[(e0 + j) * c + r] = rows[r];
              plan.gate[(e0 + j) * c + r] = probs[std::int64_t{rows[r]} * experts + e0 + j];
            }
          }
          return;
        }
        using Entry = detail::ScoredToken<T>;
        const auto better = [](const Entry& a, const Entry& b) {
          return a.value > b.value || (a.value == b.value && a.token < b.token);
        };
        // Per expert a buffer of 2c candidates; the first c routed tokens fill it,
        // `worst` is the value of the c-th best kept so far. When the buffer is
        // full, nth_element keeps the c best and raises `worst`.
        const std::int64_t cap2 = 2 * c;
        std::vector<Entry> buffers(static_cast<std::size_t>(w * cap2));
        std::int64_t size[detail::expert_choice_block];
        T worst[detail::expert_choice_block];
        for (std::int64_t j = 0; j < w; ++j) {
          size[j] = c;
          worst[j] = probs[std::int64_t{rows[0]} * experts + e0 + j];
        }
        for (std::int64_t r = 0; r < c; ++r) {
          const T* p = probs + std::int64_t{rows[r]} * experts + e0;
          for (std::int64_t j = 0; j < w; ++j) {
            buffers[j * cap2 + r] = {p[j], rows[r]};
            worst[j] = std::min(worst[j], p[j]);
          }
        }
        for (std::int64_t r = c; r < routed; ++r) {
          const T* p = probs + std::int64_t{rows[r]} * experts + e0;
          for (std::int64_t j = 0; j < w; ++j) {
            // A later token equal to the worst kept value loses (higher index).
            if (!(p[j] > worst[j])) continue;
            Entry* buf = buffers.data() + j * cap2;
            buf[size[j]++] = {p[j], rows[r]};
            if (size[j] == cap2) {
              std::nth_element(buf, buf + (c - 1), buf + cap2, better);
              size[j] = c;
              worst[j] = buf[c - 1].value;
            }
          }
        }
        for (std::int64_t j = 0; j < w; ++j) {
          Entry* buf = buffers.data() + j * cap2;
          if (size[j] > c) std::nth_element(buf, buf + (c - 1), buf + size[j], better);
          std::sort(buf, buf + c, [](const Entry& a, const Entry& x) { return a.token < x.token; });
          for (std::int64_t i = 0; i < c; ++i) {
            plan.token_index[(e0 + j) * c + i] = buf[i].token;
            plan.gate[(e0 + j) * c + i] = buf[i].value;
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
