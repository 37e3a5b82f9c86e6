#pragma once
// DispatchPlan: what every MoE router returns and what the MoE layer executes.
//
// For each expert e, entries [expert_offsets[e], expert_offsets[e+1]) of
// token_index / slot / gate are the (token, which of the token's choices, gate)
// triples the expert processes, sorted by token (CSR by expert, the MegaBlocks /
// torchtune "sorted" layout). Dropped (token, choice) pairs are listed apart and
// contribute nothing. Routers also fill the familiar [T, K] views of chosen
// experts and combine weights (best first for token-choice routers; expert order
// for expert choice). Where a token may have 0..E experts (expert choice, ReLU routing),
// K is the most experts any one token has (at least 1), not E.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "switchyard/core/error.hpp"
#include "switchyard/core/int_math.hpp"
#include "switchyard/core/view.hpp"

namespace switchyard {
inline namespace v0 {
namespace moe {

/// Which tokens take part in routing (padding mask, True = keep). keep[t] != 0:
/// the token is routed; 0: it is never routed, gets no expert (its layer output is
/// zero) and is left out of every statistic and loss. An empty span routes all tokens.
struct TokenMask {
  std::span<const std::uint8_t> keep;

  bool routed(std::int64_t t) const noexcept { return keep.empty() || keep[t] != 0; }
  /// Number of routed tokens among the first num_tokens.
  std::int64_t count(std::int64_t num_tokens) const noexcept {
    if (keep.empty()) return num_tokens;
    std::int64_t n = 0;
    for (std::int64_t t = 0; t < num_tokens; ++t) n += keep[t] != 0;
    return n;
  }
};

/// Routing statistics, over routed (unmasked) tokens only. Losses carry coefficient 1.
struct RouterStats {
  std::vector<std::int64_t> tokens_per_expert;  ///< [E] assignments chosen, before capacity
  std::vector<std::int64_t> kept_per_expert;    ///< [E] assignments kept (CSR run lengths)
  std::vector<double> mean_prob;   ///< [E] mean router score per expert (softmax prob, or gate)
  std::int64_t routed_tokens = 0;  ///< tokens not masked out
  std::int64_t dropped = 0;        ///< dropped (token, choice) pairs
  std::int64_t tokens_without_expert = 0;  ///< routed tokens that kept no expert (output 0)
  /// The router's load-balancing loss with coefficient 1 (formula documented per router).
  double aux_loss = 0;
  /// aux_loss times the router's own coefficient where its config has one (NoisyTopK's
  /// loss_coef); equal to aux_loss otherwise. ReLU routing's coefficient lives in the
  /// L1Controller state: L1Controller::loss(state, aux_loss).
  double aux_loss_scaled = 0;
  double z_loss = 0;   ///< mean over routed tokens of logsumexp(logits[t])^2
  double entropy = 0;  ///< mean over routed tokens of the router distribution's entropy (nats)
};

/// A (token, choice) pair that capacity removed; `expert` is the expert it had chosen and
/// `gate` the combine weight it had before it was dropped (its choice_weight is now 0).
struct DroppedChoice {
  std::int32_t token = 0;
  std::int32_t slot = 0;
  std::int32_t expert = 0;
  double gate = 0;
};

/// Largest token count, expert count and top_k a plan may have: token ids, expert ids and
/// slots are stored as int32, so a larger count could not be indexed.
inline constexpr std::int64_t max_plan_extent = std::numeric_limits<std::int32_t>::max();

template <class T>
struct DispatchPlan {
  std::int64_t num_tokens = 0;
  std::int64_t num_experts = 0;
  /// Choices per token in the [T, K] views (the maximum for variable-count routers,
  /// E for expert choice and ReLU routing); 0 means the plan has no token-side views.
  std::int64_t top_k = 0;
  /// Per-expert capacity in force; -1 when the router has none (dropless).
  std::int64_t capacity = -1;
  /// The capacity the formula asked for, before clamping to what the tokens allow.
  std::int64_t requested_capacity = -1;
  /// True when requested_capacity had to be clamped (e.g. above the routed token count).
  bool capacity_clamped = false;

  std::vector<std::int64_t> expert_offsets;  ///< [E+1]
  std::vector<std::int32_t> token_index;     ///< [nnz], ascending inside each expert
  std::vector<std::int32_t> slot;            ///< [nnz], which of the token's choices (0..K-1)
  std::vector<T> gate;                       ///< [nnz], weight applied to the expert's output

  std::vector<std::int32_t> choice_expert;  ///< [T*K] chosen expert (order: see top); -1 = unused
  std::vector<T> choice_weight;             ///< [T*K] combine weight; 0 if dropped or unused
  /// [T*K] 1 where the choice is dispatched (in the CSR), 0 where it was dropped or is
  /// unused: a weight of 0 alone cannot tell a dropped choice from a kept zero gate.
  std::vector<std::uint8_t> choice_kept;
  std::vector<DroppedChoice> dropped;  ///< in (token, slot) order

  RouterStats stats;

  std::int64_t nnz() const noexcept { return static_cast<std::int64_t>(token_index.size()); }
  /// Mean dispatched (token, expert) pairs per routed token (0 when none is routed): k for
  /// plain top-k, fewer with capacity drops or null experts, variable for ReLU / top-p.
  double mean_experts_per_token() const noexcept {
    return stats.routed_tokens > 0
               ? static_cast<double>(nnz()) / static_cast<double>(stats.routed_tokens)
               : 0.0;
  }
  std::int64_t expert_size(std::int64_t e) const noexcept {
    return expert_offsets[e + 1] - expert_offsets[e];
  }
  std::span<const std::int32_t> expert_tokens(std::int64_t e) const noexcept {
    return {token_index.data() + expert_offsets[e], static_cast<std::size_t>(expert_size(e))};
  }
  std::span<const std::int32_t> expert_slots(std::int64_t e) const noexcept {
    return {slot.data() + expert_offsets[e], static_cast<std::size_t>(expert_size(e))};
  }
  std::span<const T> expert_gates(std::int64_t e) const noexcept {
    return {gate.data() + expert_offsets[e], static_cast<std::size_t>(expert_size(e))};
  }

  /// [T, K] chosen experts, best first, -1 where unused (token-choice plans only).
  ConstView<std::int32_t, 2> expert_indices() const noexcept {
    return {choice_expert.data(), {num_tokens, top_k}};
  }
  /// [T, K] combine weights matching expert_indices(); 0 for dropped or unused choices.
  ConstView<T, 2> expert_weights() const noexcept {
    return {choice_weight.data(), {num_tokens, top_k}};
  }
  /// [T, K] kept flags matching expert_indices(): 1 = dispatched, 0 = dropped or unused.
  ConstView<std::uint8_t, 2> expert_kept() const noexcept {
    return {choice_kept.data(), {choice_kept.empty() ? 0 : num_tokens, top_k}};
  }

  /// Empties the plan for a new routing call, keeping the allocated memory.
  /// Throws config_error for a count outside [0, max_plan_extent] and shape_error when the
  /// [T, K] views would exceed core::max_buffer_bytes, before allocating anything.
  void reset(std::int64_t tokens, std::int64_t experts, std::int64_t k) {
    constexpr std::string_view layer = "DispatchPlan";
    const auto in_range = [&](std::string_view arg, std::int64_t v) {
      if (v < 0 || v > max_plan_extent) {
        switchyard::detail::fail_config(layer, "reset", arg, v,
                                        "a count in [0, 2147483647] (ids are int32)");
      }
    };
    in_range("tokens", tokens);
    in_range("experts", experts);
    in_range("k", k);
    const std::int64_t tk = switchyard::detail::checked_size(
        layer, "reset", "[tokens, k]", {tokens, k}, sizeof(std::int32_t) + sizeof(T));
    num_tokens = tokens;
    num_experts = experts;
    top_k = k;
    capacity = requested_capacity = -1;
    capacity_clamped = false;
    expert_offsets.assign(static_cast<std::size_t>(experts + 1), 0);
    token_index.clear();
    slot.clear();
    gate.clear();
    choice_expert.assign(static_cast<std::size_t>(tk), -1);
    choice_weight.assign(static_cast<std::size_t>(tk), T(0));
    choice_kept.assign(static_cast<std::size_t>(tk), 0);
    dropped.clear();
    stats.tokens_per_expert.assign(static_cast<std::size_t>(experts), 0);
    stats.kept_per_expert.assign(static_cast<std::size_t>(experts), 0);
    stats.mean_prob.assign(static_cast<std::size_t>(experts), 0.0);
    stats.routed_tokens = stats.dropped = stats.tokens_without_expert = 0;
    stats.aux_loss = stats.aux_loss_scaled = stats.z_loss = stats.entropy = 0;
  }

  /// Resizes the [T, K] token-side views to K = k (all unused: -1, weight 0, not kept), for
  /// routers that learn K only after selecting (expert choice, ReLU: the most experts any token
  /// received). Throws like reset().
  void reset_choices(std::int64_t k) {
    if (k < 0 || k > max_plan_extent)
      switchyard::detail::fail_config("DispatchPlan", "reset_choices", "k", k,
                                      "a count in [0, 2147483647] (ids are int32)");
    const std::int64_t tk =
        switchyard::detail::checked_size("DispatchPlan", "reset_choices", "[tokens, k]",
                                         {num_tokens, k}, sizeof(std::int32_t) + sizeof(T));
    top_k = k;
    choice_expert.assign(static_cast<std::size_t>(tk), -1);
    choice_weight.assign(static_cast<std::size_t>(tk), T(0));
    choice_kept.assign(static_cast<std::size_t>(tk), 0);
  }

  /// Throws switchyard::error naming the first broken invariant: sizes within
  /// [0, max_plan_extent] (E >= 1); capacity and requested_capacity -1 or >= 0; offsets
  /// monotone and sized E+1; token indices in range and strictly ascending inside each
  /// expert (so no duplicate (token, expert) pair); slots in range; finite gates; no expert
  /// over capacity; token-side views consistent with the CSR runs; statistics arrays empty
  /// (absent) or of length E. Safe on any field values: the sizes are checked before they
  /// index or multiply anything, and nothing is allocated.
  void check() const {
    const auto fail = [](const std::string& what) {
      throw switchyard::error("DispatchPlan::check: " + what);
    };
    const auto count_in_range = [&](const char* name, std::int64_t v, std::int64_t lo) {
      if (v < lo || v > max_plan_extent) {
        fail("bad sizes: " + std::string(name) + " = " + std::to_string(v) + "; expected [" +
             std::to_string(lo) + ", " + std::to_string(max_plan_extent) + "] (ids are int32)");
      }
    };
    count_in_range("num_tokens", num_tokens, 0);
    count_in_range("num_experts", num_experts, 1);
    count_in_range("top_k", top_k, 0);
    if (capacity < -1 || requested_capacity < -1) {
      fail("capacity = " + std::to_string(capacity) + ", requested_capacity = " +
           std::to_string(requested_capacity) + "; each must be -1 (none) or >= 0");
    }
    // Monotone from 0 to nnz, so every offset lies in [0, nnz] and every difference
    // below is a valid, non-overflowing run length.
    if (static_cast<std::int64_t>(expert_offsets.size()) != num_experts + 1 ||
        expert_offsets.front() != 0 || expert_offsets.back() != nnz()) {
      fail("expert_offsets must have E+1 entries from 0 to nnz");
    }
    for (std::int64_t e = 0; e < num_experts; ++e) {
      if (expert_offsets[e + 1] < expert_offsets[e])
        fail("expert_offsets decrease at expert " + std::to_string(e));
    }
    if (slot.size() != token_index.size() || gate.size() != token_index.size()) {
      fail("token_index, slot and gate differ in length");
    }
    const bool token_choice = top_k > 0;
    // T and K are at most 2^31 - 1 here, so T * K cannot overflow int64.
    if (token_choice && (static_cast<std::int64_t>(choice_expert.size()) != num_tokens * top_k ||
                         choice_weight.size() != choice_expert.size())) {
      fail("choice views must be [T, K]");
    }
    const auto per_expert = [&](const char* name, std::size_t n) {
      if (n != 0 && static_cast<std::int64_t>(n) != num_experts) {
        fail("stats." + std::string(name) + " has " + std::to_string(n) +
             " entries; expected 0 (absent) or E=" + std::to_string(num_experts));
      }
    };
    per_expert("tokens_per_expert", stats.tokens_per_expert.size());
    per_expert("kept_per_expert", stats.kept_per_expert.size());
    per_expert("mean_prob", stats.mean_prob.size());
    for (std::int64_t e = 0; e < num_experts; ++e) {
      const std::int64_t b = expert_offsets[e], n = expert_offsets[e + 1] - b;
      if (capacity >= 0 && n > capacity) {
        fail("expert " + std::to_string(e) + " holds " + std::to_string(n) +
             " tokens, over capacity " + std::to_string(capacity));
      }
      for (std::int64_t i = b; i < b + n; ++i) {
        const std::int64_t t = token_index[i];
        if (t < 0 || t >= num_tokens)
          fail("token index out of range in expert " + std::to_string(e));
        if (i > b && token_index[i - 1] >= t) {
          fail("tokens of expert " + std::to_string(e) + " not strictly ascending (duplicate?)");
        }
        if (!std::isfinite(static_cast<double>(gate[i]))) fail("non-finite gate");
        if (slot[i] < 0 || (token_choice && slot[i] >= top_k)) fail("slot out of range");
        if (token_choice && choice_expert[t * top_k + slot[i]] != e) {
          fail("choice_expert disagrees with the CSR run of expert " + std::to_string(e));
        }
      }
    }
    for (const auto& d : dropped) {
      if (d.token < 0 || d.token >= num_tokens || d.expert < 0 || d.expert >= num_experts ||
          d.slot < 0 || (token_choice && d.slot >= top_k)) {
        fail("dropped entry out of range");
      }
    }
    if (token_choice) {
      std::int64_t chosen = 0;
      for (auto e : choice_expert) chosen += e >= 0;
      if (chosen != nnz() + static_cast<std::int64_t>(dropped.size())) {
        fail("chosen pairs != kept + dropped");
      }
    }
    // Kept flags (optional: a hand-built plan may leave them empty) must mark exactly the
    // CSR entries; each (token, slot) names one expert, so count + membership suffice.
    if (!choice_kept.empty()) {
      if (!token_choice || choice_kept.size() != choice_expert.size())
        fail("choice_kept must be empty or [T, K]");
      std::int64_t kept = 0;
      for (auto f : choice_kept) {
        if (f > 1) fail("choice_kept holds a value other than 0 or 1");
        kept += f;
      }
      if (kept != nnz())
        fail("choice_kept marks " + std::to_string(kept) +
             " choices, nnz = " + std::to_string(nnz()));
      for (std::int64_t i = 0; i < nnz(); ++i) {
        if (!choice_kept[token_index[i] * top_k + slot[i]])
          fail("choice_kept is 0 for a dispatched (token, slot)");
      }
    }
  }
};

namespace detail {

/// Sets plan.choice_kept from the CSR runs: 1 for each dispatched (token, slot), else 0.
/// Call after the runs are final; plans without token-side views (top_k = 0) get none.
template <class T>
void fill_choice_kept(DispatchPlan<T>& plan) {
  plan.choice_kept.assign(plan.choice_expert.size(), 0);
  if (plan.top_k <= 0) return;
  for (std::int64_t i = 0; i < plan.nnz(); ++i)
    plan.choice_kept[static_cast<std::size_t>(plan.token_index[i] * plan.top_k + plan.slot[i])] = 1;
}

/// Fills the CSR runs of a token-choice plan from its [T, K] choice_expert /
/// choice_weight views. keep[t*K + s] == 0 marks a chosen pair dropped by
/// capacity (pass an empty span when nothing is dropped); dropped pairs get
/// choice_weight 0 and go to plan.dropped. Entries come out sorted by token
/// inside each expert. Also sets kept_per_expert, dropped and tokens_without_expert
/// (routed tokens only: a token with no chosen expert at all is taken as masked) and the
/// kept flags; each dropped pair keeps its gate in plan.dropped.
template <class T>
void build_csr_from_choices(DispatchPlan<T>& plan, std::span<const std::uint8_t> keep = {}) {
  const std::int64_t tokens = plan.num_tokens, experts = plan.num_experts, k = plan.top_k;
  auto& offsets = plan.expert_offsets;
  std::fill(offsets.begin(), offsets.end(), 0);
  plan.dropped.clear();
  std::int64_t without = 0;
  for (std::int64_t t = 0; t < tokens; ++t) {
    bool any_chosen = false, any_kept = false;
    for (std::int64_t s = 0; s < k; ++s) {
      const std::int64_t i = t * k + s;
      const std::int32_t e = plan.choice_expert[i];
      if (e < 0) continue;
      any_chosen = true;
      if (keep.empty() || keep[i]) {
        ++offsets[e + 1];
        any_kept = true;
      } else {
        plan.dropped.push_back({static_cast<std::int32_t>(t), static_cast<std::int32_t>(s), e,
                                static_cast<double>(plan.choice_weight[i])});
        plan.choice_weight[i] = T(0);
      }
    }
    without += any_chosen && !any_kept;
  }
  for (std::int64_t e = 0; e < experts; ++e) {
    plan.stats.kept_per_expert[e] = offsets[e + 1];
    offsets[e + 1] += offsets[e];
  }
  const auto nnz = static_cast<std::size_t>(offsets[experts]);
  plan.token_index.resize(nnz);
  plan.slot.resize(nnz);
  plan.gate.resize(nnz);
  std::vector<std::int64_t> cursor(offsets.begin(), offsets.end() - 1);
  for (std::int64_t t = 0; t < tokens; ++t) {
    for (std::int64_t s = 0; s < k; ++s) {
      const std::int64_t i = t * k + s;
      const std::int32_t e = plan.choice_expert[i];
      if (e < 0 || !(keep.empty() || keep[i])) continue;
      const std::int64_t p = cursor[e]++;
      plan.token_index[p] = static_cast<std::int32_t>(t);
      plan.slot[p] = static_cast<std::int32_t>(s);
      plan.gate[p] = plan.choice_weight[i];
    }
  }
  plan.stats.dropped = static_cast<std::int64_t>(plan.dropped.size());
  plan.stats.tokens_without_expert = without;
  fill_choice_kept(plan);
}

}  // namespace detail

/// A token-choice plan from explicit choices, for users who route elsewhere and for
/// tests. experts: [T, K] expert ids (-1 = unused), weights: [T, K] combine weights, finite
/// where the expert is used (the weight of an unused slot is ignored and stored as 0).
/// Nothing is dropped. Throws config_error for E outside [1, max_plan_extent], an id
/// outside [-1, E), a repeated expert in a row or a non-finite weight, and shape_error for
/// mismatched shapes or a [T, K] too large to allocate (checked before allocating).
template <class T, class Index>
DispatchPlan<T> make_token_choice_plan(std::int64_t num_experts, ConstView<Index, 2> experts,
                                       ConstView<T, 2> weights) {
  static_assert(std::is_integral_v<Index> && !std::is_same_v<Index, bool>,
                "make_token_choice_plan: expert ids must be integers");
  constexpr std::string_view layer = "DispatchPlan", fn = "make_token_choice_plan";
  if (num_experts < 1 || num_experts > max_plan_extent) {
    switchyard::detail::fail_config(layer, fn, "num_experts", num_experts,
                                    "in [1, 2147483647] (expert ids are int32)");
  }
  const std::int64_t tokens = experts.extent(0), k = experts.extent(1);
  // Sizes first (the views may be stride-0 and claim any extent): the plan's [T, K] views
  // must be allocatable and indexable by int32 before anything is read or allocated.
  switchyard::detail::checked_size(layer, fn, "experts", {tokens, k},
                                   sizeof(std::int32_t) + sizeof(T));
  if (tokens > max_plan_extent || k > max_plan_extent) {
    switchyard::detail::fail_shape(layer, fn, "experts",
                                   switchyard::detail::format_shape({"T", "K"}, experts.shape()),
                                   "T, K <= 2147483647", "token ids and slots are int32");
  }
  core::detail::check_shape(layer, fn, "weights", weights, {"T", "K"}, {tokens, k},
                            "must match experts");
  DispatchPlan<T> plan;
  plan.reset(tokens, num_experts, k);
  for (std::int64_t t = 0; t < tokens; ++t) {
    for (std::int64_t s = 0; s < k; ++s) {
      // std::cmp_* compare across signedness, so an unsigned 2^64 - 1 is out of range
      // rather than wrapping to the "unused" marker -1.
      const Index raw = experts(t, s);
      if (std::cmp_less(raw, -1) || std::cmp_greater_equal(raw, num_experts)) {
        switchyard::detail::fail_config(layer, fn, "experts", +raw,
                                        "-1 or an expert id below " + std::to_string(num_experts));
      }
      const auto e = static_cast<std::int64_t>(raw);
      for (std::int64_t r = 0; r < s && e >= 0; ++r) {
        if (experts(t, r) == experts(t, s)) {
          switchyard::detail::fail_config(layer, fn, "experts", e,
                                          "each expert at most once per token");
        }
      }
      const T w = weights(t, s);
      if (e >= 0 && !std::isfinite(static_cast<double>(w))) {
        switchyard::detail::fail_config(
            layer, fn, "weights", static_cast<double>(w),
            "finite weights (token " + std::to_string(t) + ", slot " + std::to_string(s) + ")");
      }
      plan.choice_expert[t * k + s] = static_cast<std::int32_t>(e);
      plan.choice_weight[t * k + s] = e >= 0 ? w : T(0);
      if (e >= 0) ++plan.stats.tokens_per_expert[e];
    }
  }
  plan.stats.routed_tokens = tokens;
  detail::build_csr_from_choices(plan);
  return plan;
}

}  // namespace moe
}  // namespace v0
}  // namespace switchyard
