#pragma once
// CapacityRouter: token-choice top-k routing with a per-expert capacity, as in
// Megatron-LM core (Switch Transformer top-1 when top_k = 1).
//
// Semantics, per routed token t with logits x[t, :] ([T, E]):
//   pre_softmax = true  (Switch top-1, Megatron --moe-router-pre-softmax):
//     p[t, :] = softmax(x[t, :]) over all E experts; the k experts with the
//     largest p[t, e], best first; gate = p[t, e] (the full-softmax probability,
//     not renormalised over the k).
//   pre_softmax = false (Megatron default):
//     the k experts with the largest logits, best first; gate = softmax over
//     those k logits (so the k gates sum to 1). Megatron refuses this with
//     top_k = 1 (the gate would always be 1), and so does this router.
//   Ties go to the lower expert index (core::topk's order).
// Capacity (Megatron get_capacity(T * k, E, cf, min_capacity)):
//   capacity = max(ceil(T * k / E * capacity_factor), min_capacity), T = routed
//   (unmasked) tokens; or max(config.capacity, min_capacity) when config.capacity
//   >= 0 (a capacity given as a number). An expert can hold each token once, so a capacity above T
//   is clamped to T; plan.requested_capacity keeps the formula's value and
//   plan.capacity_clamped says so (Megatron's torch.topk would fail there).
// Dropping, per expert e whose n_e chosen assignments exceed the capacity:
//   drop_policy = probs    (Megatron "probs"): keep the `capacity` assignments
//     with the largest gate (a top-c over tokens of the dense gate column);
//     equal gates go to the lower token index;
//   drop_policy = position (Megatron "position"): keep the first `capacity`
//     tokens in token order that chose e. (Megatron takes a torch.topk of the
//     0/1 routing column, whose tie order is unspecified; token order is the
//     intent and is what this router does.)
//   Dropped pairs stay in plan.choice_expert with weight 0 (choice_kept 0) and are
//   listed in plan.dropped with the gate they had; the surviving gates are NOT renormalised; a
//   token left with no expert outputs 0 (stats.tokens_without_expert counts them).
// Masked tokens (TokenMask) get no expert and count in no statistic, loss or
// capacity. T = 0 or all tokens masked gives a valid empty plan with zero losses.
//
// Statistics (coefficient 1; T = routed tokens, in double):
//   stats.tokens_per_expert = n_e, assignments chosen BEFORE dropping;
//   stats.kept_per_expert   = assignments kept (CSR run lengths);
//   stats.aux_loss = Megatron switch_load_balancing_loss = E / (T^2 k) sum_e n_e P_e,
//     P_e = sum_t softmax(x[t])[e], the FULL softmax of the logits in both
//     modes (Megatron TopKRouter.aux_loss_load_balancing passes
//     torch.softmax(logits) to the loss whatever pre_softmax is);
//   stats.z_loss = mean_t logsumexp(x[t])^2 (Megatron z_loss_func);
//   stats.entropy, stats.mean_prob[e] = P_e / T: of the full softmax.
// Reference: thu-ml/ReMoE @ 463c6af (vendored Megatron-LM core),
// megatron/core/transformer/moe/moe_utils.py topk_softmax_with_capacity
// (pad_to_capacity = false), get_capacity, switch_load_balancing_loss_func,
// z_loss_func; router.py TopKRouter.aux_loss_load_balancing (train mode).
//
// Cost: one vectorised softmax pass (detail::softmax_scores) into a
// thread-local buffer reused across calls, one top-k pass per token over fixed
// token chunks (k <= 8: kernels::topk_lanes of core/simd/topk_lanes.hpp, a
// branch-free compare-exchange list run on SIMD lanes, one token per lane;
// larger k: core selection), a counting sort
// of the assignments by expert, a threshold selection (nth_element) for each
// expert over capacity, and the CSR build. Bit-identical for any thread count.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <span>
#include <string_view>
#include <utility>
#include <vector>

#include "switchyard/core/error.hpp"
#include "switchyard/core/parallel_for.hpp"
#include "switchyard/core/simd/arch.hpp"
#include "switchyard/core/simd/topk_lanes.hpp"
#include "switchyard/core/topk.hpp"
#include "switchyard/core/view.hpp"
#include "switchyard/moe/losses.hpp"
#include "switchyard/moe/plan.hpp"
#include "switchyard/moe/router.hpp"

namespace switchyard {
inline namespace v0 {
namespace moe {

/// Which assignments an expert over capacity keeps.
enum class DropPolicy {
  probs,     ///< the largest gates (ties: lower token index); Megatron "probs"
  position,  ///< the first tokens in token order; Megatron "position"
};

struct CapacityRouterConfig {
  std::int64_t num_experts = 0;   ///< E (Megatron num_moe_experts); >= 1
  std::int64_t top_k = 1;         ///< K experts per token (Megatron moe_router_topk); 1..E
  double capacity_factor = 1.0;   ///< Megatron moe_expert_capacity_factor; finite, > 0
  std::int64_t min_capacity = 0;  ///< lower bound on the capacity; >= 0
  /// Capacity as a number: >= 0 uses this many tokens per expert instead of the
  /// capacity_factor formula (still at least min_capacity, clamped to the routed tokens);
  /// -1 (default) uses the formula.
  std::int64_t capacity = -1;
  /// true: softmax over all experts, then top-k, gate = full probability;
  /// false: top-k of the logits, gate = softmax over the k (needs top_k >= 2).
  bool pre_softmax = true;
  DropPolicy drop_policy = DropPolicy::probs;  ///< Megatron moe_token_drop_policy
};

namespace detail {

/// Per-thread buffers of CapacityRouter, reused across calls.
template <class T>
struct CapacityScratch {
  std::vector<T> probs;
  std::vector<double> prob_sum;
  std::vector<std::uint8_t> keep;
  std::vector<std::int64_t> offsets;
  std::vector<std::int32_t> bucket;
  std::vector<T> gates;
};

template <class T>
CapacityScratch<T>& capacity_scratch() {
  thread_local CapacityScratch<T> s;
  return s;
}

/// Marks keep[entries[j]] = 0 for all but the `cap` entries with the largest
/// gate[entries[j]]; among equal gates the earlier entry (lower token) wins.
/// `entries` is in token order. `work` is scratch.
template <class T>
void keep_top_gates(const std::int32_t* entries, std::int64_t n, std::int64_t cap, const T* gate,
                    std::uint8_t* keep, std::vector<T>& work) {
  if (cap >= n) return;
  if (cap <= 0) {
    for (std::int64_t j = 0; j < n; ++j) keep[entries[j]] = 0;
    return;
  }
  work.resize(static_cast<std::size_t>(n));
  for (std::int64_t j = 0; j < n; ++j) work[j] = gate[entries[j]];
  std::nth_element(work.begin(), work.begin() + (cap - 1), work.end(), std::greater<T>());
  const T thr = work[cap - 1];
  std::int64_t above = 0;
  for (std::int64_t j = 0; j < n; ++j) above += gate[entries[j]] > thr;
  std::int64_t equal_quota = cap - above;  // >= 1: thr itself is among the top cap
  for (std::int64_t j = 0; j < n; ++j) {
    const T g = gate[entries[j]];
    if (g > thr) continue;
    if (g == thr && equal_quota > 0) {
      --equal_quota;
      continue;
    }
    keep[entries[j]] = 0;
  }
}

}  // namespace detail

template <class T = float, class Arch = simd::default_arch>
class CapacityRouter {
 public:
  using config_type = CapacityRouterConfig;
  static constexpr std::string_view name = "CapacityRouter";

  /// Throws config_error (naming CapacityRouter and the field) if num_experts < 1,
  /// top_k outside 1..num_experts, capacity_factor not finite or <= 0,
  /// min_capacity < 0, capacity < -1, or pre_softmax = false with top_k = 1.
  explicit CapacityRouter(const CapacityRouterConfig& config) : config_(config) {
    detail::check_num_experts(name, config_.num_experts);
    detail::check_top_k(name, config_.top_k, config_.num_experts);
    detail::check_capacity_settings(name, config_.capacity_factor, config_.min_capacity,
                                    config_.capacity);
    if (!config_.pre_softmax && config_.top_k == 1) {
      switchyard::detail::fail_config(name, "config", "pre_softmax", "false",
                                      "true when top_k = 1 (a softmax over one selected logit "
                                      "is always 1; Megatron refuses it too)");
    }
  }

  const CapacityRouterConfig& config() const noexcept { return config_; }
  std::int64_t num_experts() const noexcept { return config_.num_experts; }
  std::int64_t top_k() const noexcept { return config_.top_k; }

  /// logits: [T, E] (unit inner stride); mask: empty or [T] (True = routed).
  /// Fills plan (reusing its memory): K = top_k choices per routed token,
  /// plan.capacity as in the file comment, dropped pairs in plan.dropped.
  /// Throws shape_error on a shape/stride/mask-length mismatch, config_error on
  /// a NaN or infinite logit of a routed token.
  void route(ConstView<T, 2> logits, DispatchPlan<T>& plan, const TokenMask& mask = {}) const {
    const std::int64_t experts = config_.num_experts, k = config_.top_k;
    detail::check_logits(name, logits, experts, mask);
    const std::int64_t tokens = logits.extent(0);
    plan.reset(tokens, experts, k);
    auto& s = detail::capacity_scratch<T>();
    detail::softmax_scores<T, Arch>(name, logits, mask, s.probs, s.prob_sum, plan.stats);
    const std::int64_t routed = plan.stats.routed_tokens;

    // 1. Top-k per token into the [T, K] views (gates before capacity).
    const T* probs = s.probs.data();
    std::int32_t* choice = plan.choice_expert.data();
    T* weight = plan.choice_weight.data();
    const bool pre = config_.pre_softmax;
    const T* src = pre ? probs : logits.data();
    const std::int64_t row_stride = pre ? experts : logits.stride(0);
    parallel_for(num_chunks(tokens, detail::router_chunk), [&](std::int64_t c) {
      const std::int64_t t0 = c * detail::router_chunk;
      // Masked rows read as 0 (their logits may hold NaN) and are not visited.
      kernels::topk_rows_lanes<T, Arch>(
          src, row_stride, t0, std::min(tokens, t0 + detail::router_chunk), experts, k,
          [&](std::int64_t t) { return mask.routed(t); },
          [&](std::int64_t t, auto&& index_of, auto&& value_of) {
            std::int32_t* ce = choice + t * k;
            T* cw = weight + t * k;
            for (std::int64_t j = 0; j < k; ++j) ce[j] = static_cast<std::int32_t>(index_of(j));
            if (pre) {
              for (std::int64_t j = 0; j < k; ++j) cw[j] = value_of(j);
            } else {  // softmax over the k selected logits; value_of(0) is their maximum
              const T top = value_of(0);
              T sum(0);
              for (std::int64_t j = 0; j < k; ++j) {
                cw[j] = std::exp(value_of(j) - top);
                sum += cw[j];
              }
              for (std::int64_t j = 0; j < k; ++j) cw[j] /= sum;
            }
          });
    });

    // 2. Counts before capacity, and the capacity.
    auto& n_e = plan.stats.tokens_per_expert;
    for (std::int64_t i = 0; i < tokens * k; ++i) {
      if (choice[i] >= 0) ++n_e[choice[i]];
    }
    const Capacity cap =
        compute_capacity(routed, k, experts, config_.capacity_factor, CapacityRounding::ceil,
                         config_.min_capacity, config_.capacity);
    set_capacity(plan, cap);

    // 3. Drop what exceeds capacity: assignments bucketed by expert in token order.
    s.keep.assign(static_cast<std::size_t>(tokens * k), 1);
    bool any_over = false;
    for (std::int64_t e = 0; e < experts; ++e) any_over |= n_e[e] > cap.value;
    if (any_over) {
      s.offsets.assign(static_cast<std::size_t>(experts + 1), 0);
      for (std::int64_t e = 0; e < experts; ++e) s.offsets[e + 1] = s.offsets[e] + n_e[e];
      s.bucket.resize(static_cast<std::size_t>(s.offsets[experts]));
      std::vector<std::int64_t>& cursor = s.offsets;  // advanced to the run ends, then restored
      for (std::int64_t i = 0; i < tokens * k; ++i) {
        if (choice[i] >= 0) s.bucket[cursor[choice[i]]++] = static_cast<std::int32_t>(i);
      }
      for (std::int64_t e = experts; e > 0; --e) cursor[e] = cursor[e - 1];
      cursor[0] = 0;
      for (std::int64_t e = 0; e < experts; ++e) {
        if (n_e[e] <= cap.value) continue;
        const std::int32_t* entries = s.bucket.data() + s.offsets[e];
        if (config_.drop_policy == DropPolicy::position) {
          for (std::int64_t j = cap.value; j < n_e[e]; ++j) s.keep[entries[j]] = 0;
        } else {
          detail::keep_top_gates(entries, n_e[e], cap.value, weight, s.keep.data(), s.gates);
        }
      }
    }
    detail::build_csr_from_choices(
        plan, any_over ? std::span<const std::uint8_t>(s.keep) : std::span<const std::uint8_t>());
    plan.stats.aux_loss = switch_load_balancing_loss(n_e, s.prob_sum, routed, k);
    plan.stats.aux_loss_scaled = plan.stats.aux_loss;
  }

  /// route(logits, plan, mask) that also writes the routing scores [T, E] into `scores`
  /// (softmax(logits) over all E, also when pre_softmax = false; rows of masked tokens 0). Throws
  /// shape_error for a scores buffer that is not [T, E] with unit inner stride or that overlaps
  /// logits, before routing.
  void route(ConstView<T, 2> logits, DispatchPlan<T>& plan, const TokenMask& mask,
             View<T, 2> scores) const {
    detail::check_scores_out(name, logits, scores);
    route(logits, plan, mask);
    detail::write_scores<T, Arch>(logits, mask, detail::ScoreKind::softmax, scores);
  }

  /// Allocating convenience: a fresh plan.
  DispatchPlan<T> route(ConstView<T, 2> logits, const TokenMask& mask = {}) const {
    DispatchPlan<T> plan;
    route(logits, plan, mask);
    return plan;
  }

 private:
  CapacityRouterConfig config_;
};

}  // namespace moe
}  // namespace v0
}  // namespace switchyard
