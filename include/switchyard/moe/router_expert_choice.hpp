#pragma once
// ExpertChoiceRouter: experts pick tokens (Zhou et al. 2022, "Mixture-of-Experts
// with Expert Choice Routing").
//
// Semantics, with logits x [T, E] and T = routed (unmasked) tokens:
//   p[t, :] = softmax(x[t, :]) over the E experts, per token;
//   capacity c = max(floor(capacity_factor * T / E), min_capacity) (llm-baselines
//     int(cf * T / E)), or max(config.capacity, min_capacity) when config.capacity
//     >= 0, clamped to T visibly (plan.requested_capacity,
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
// buffer reused across calls; then, in one block of experts per thread (at least
// 16 experts each; parallel over blocks), a threshold select instead of a sort. Probabilities are
// >= 0, so their bit patterns (sign cleared) order like unsigned integers: pass 1 over the routed
// rows builds per expert a histogram of the top 11 key bits and finds the bin that
// holds the c-th largest; pass 2, in token order, keeps every token at or above
// that bin (c plus the bin's few extra); nth_element on the bin's keys gives the
// exact c-th value thr; the run is then the tokens with p > thr plus the first
// (in token order) with p == thr, already sorted by token. O(T) per expert for
// any c and any ties. A serial pass over the E*c entries builds the token-side
// views. Each expert's run is computed on its own, so the plan is bit-identical
// for any thread count and block split.
#include <algorithm>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string_view>
#include <type_traits>
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
  /// Capacity as a number: >= 0 uses this many tokens per expert instead of the
  /// capacity_factor formula (still at least min_capacity, clamped to the routed tokens);
  /// -1 (default) uses the formula.
  std::int64_t capacity = -1;
};

namespace detail {

/// Unsigned integer with the width of T: the selection key of a probability.
template <class T>
using ExpertChoiceKey = std::conditional_t<sizeof(T) == 4, std::uint32_t, std::uint64_t>;

/// Per-thread buffers of ExpertChoiceRouter, reused across calls.
template <class T>
struct ExpertChoiceScratch {
  std::vector<T> probs;
  std::vector<double> prob_sum;
  std::vector<std::int32_t> rows;   // [R] token id of each routed row
  std::vector<std::int32_t> taken;  // [T] experts that took each token so far
  // Selection of one block of experts (per thread: blocks may run in parallel).
  std::vector<std::uint32_t> hist;           // [w, bins] key histograms (padded rows)
  std::vector<std::uint32_t> bound;          // [w] boundary bin
  std::vector<std::int64_t> need;            // [w] tokens still wanted from it
  std::vector<ExpertChoiceKey<T>> lowest;    // [w] smallest key of the boundary bin
  std::vector<std::int64_t> begin, end;      // [w + 1], [w] candidate ranges
  std::vector<std::int32_t> cand_token;      // per expert: tokens at or above the bin
  std::vector<T> cand_value;                 // ... and their probabilities
  std::vector<ExpertChoiceKey<T>> bin_keys;  // keys of one expert's boundary bin
};

/// Fewest experts per selection task (each streams twice over its columns of the
/// probabilities; narrow column slices read whole cache lines for little work).
inline constexpr std::int64_t expert_choice_min_block = 16;
/// Histogram bins per expert (top 11 bits of the key: 16 bins per octave). 8 KiB per
/// expert, but softmax outputs span few octaves, so only a few hundred bytes of each
/// are hot; 9 or 10 bits measured no faster.
inline constexpr int expert_choice_bin_bits = 11;

/// The order key of a probability p >= 0: its bits with the sign cleared (so -0 == +0),
/// which order like p itself.
template <class T>
inline ExpertChoiceKey<T> expert_choice_key(T p) noexcept {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "ExpertChoiceRouter: float or double");
  using Key = ExpertChoiceKey<T>;
  return std::bit_cast<Key>(p) & (~Key{0} >> 1);
}

/// Histogram bin of a key: skips the sign bit and the top exponent bit (0 for p < 2),
/// then takes 11 bits; anything larger is clamped into the top bin (never for p <= 1).
template <class T>
inline std::uint32_t expert_choice_bin(ExpertChoiceKey<T> key) noexcept {
  constexpr int shift = 8 * static_cast<int>(sizeof(T)) - 2 - expert_choice_bin_bits;
  constexpr ExpertChoiceKey<T> top = (ExpertChoiceKey<T>{1} << expert_choice_bin_bits) - 1;
  return static_cast<std::uint32_t>(std::min(key >> shift, top));
}

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
  /// num_experts < 1, capacity_factor is not finite or <= 0, min_capacity < 0 or
  /// capacity < -1.
  explicit ExpertChoiceRouter(const ExpertChoiceRouterConfig& config) : config_(config) {
    detail::check_num_experts(name, config_.num_experts);
    detail::check_capacity_settings(name, config_.capacity_factor, config_.min_capacity,
                                    config_.capacity);
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
    const Capacity cap =
        compute_capacity(routed, 1, experts, config_.capacity_factor, CapacityRounding::floor,
                         config_.min_capacity, config_.capacity);
    set_capacity(plan, cap);
    const std::int64_t c = cap.value;

    // Routed rows.
    s.rows.resize(static_cast<std::size_t>(routed));
    for (std::int64_t t = 0, r = 0; t < tokens; ++t) {
      if (mask.routed(t)) s.rows[r++] = static_cast<std::int32_t>(t);
    }

    // Each expert's run: its c best tokens, in token order, (value, token) ranked
    // by value descending, then token ascending.
    const std::int64_t nnz = experts * c;
    for (std::int64_t e = 0; e <= experts; ++e) plan.expert_offsets[e] = e * c;
    plan.token_index.resize(static_cast<std::size_t>(nnz));
    plan.slot.resize(static_cast<std::size_t>(nnz));
    plan.gate.resize(static_cast<std::size_t>(nnz));
    if (c > 0) {
      const T* probs = s.probs.data();
      const std::int32_t* rows = s.rows.data();
      // Each expert's run depends on nothing else, so the split over threads cannot
      // change the plan; whole rows stream best, so one block per thread.
      const std::int64_t tasks = std::clamp<std::int64_t>(
          num_threads(), 1, num_chunks(experts, detail::expert_choice_min_block));
      const std::int64_t width = num_chunks(experts, tasks);
      parallel_for(num_chunks(experts, width), [&](std::int64_t b) {
        const std::int64_t e0 = b * width;
        const std::int64_t w = std::min(experts, e0 + width) - e0;
        if (c == routed) {  // every routed token
          for (std::int64_t j = 0; j < w; ++j) {
            for (std::int64_t r = 0; r < routed; ++r) {
              plan.token_index[(e0 + j) * c + r] = rows[r];
              plan.gate[(e0 + j) * c + r] = probs[std::int64_t{rows[r]} * experts + e0 + j];
            }
          }
          return;
        }
        select_block(probs, rows, routed, e0, w, c, plan);
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
        plan.choice_kept[t * experts + slot] = 1;  // reset() zeroed the rest
      }
      plan.stats.tokens_per_expert[e] = c;
      plan.stats.kept_per_expert[e] = c;
    }
    std::int64_t without = 0;
    for (std::int64_t r = 0; r < routed; ++r) without += s.taken[s.rows[r]] == 0;
    plan.stats.tokens_without_expert = without;
    plan.stats.dropped = 0;
    plan.stats.aux_loss = plan.stats.aux_loss_scaled = 0;
  }

  /// route(logits, plan, mask) that also writes the routing scores [T, E] into `scores`
  /// (softmax(logits) over the experts, the scores experts choose tokens by; rows of masked tokens
  /// 0). Throws shape_error for a scores buffer that is not [T, E] with unit inner stride or that
  /// overlaps logits, before routing.
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
  /// Runs of experts [e0, e0 + w), 0 < c < routed: the threshold select described
  /// at the top of this file, into plan.token_index / plan.gate.
  static void select_block(const T* probs, const std::int32_t* rows, std::int64_t routed,
                           std::int64_t e0, std::int64_t w, std::int64_t c, DispatchPlan<T>& plan) {
    using Key = detail::ExpertChoiceKey<T>;
    constexpr std::int64_t bins = std::int64_t{1} << detail::expert_choice_bin_bits;
    // One cache line of padding per histogram: at 8 KiB apart the experts' hot bins
    // would all fall into the same cache sets.
    constexpr std::int64_t stride = bins + 64 / sizeof(std::uint32_t);
    const std::int64_t experts = plan.num_experts;
    auto& ws = detail::expert_choice_scratch<T>();  // this thread's (not the caller's probs)

    // Pass 1: per expert, a histogram of the key bins over the routed tokens.
    ws.hist.assign(static_cast<std::size_t>(w * stride), 0);
    std::uint32_t* hist = ws.hist.data();
    for (std::int64_t r = 0; r < routed; ++r) {
      const T* p = probs + std::int64_t{rows[r]} * experts + e0;
      for (std::int64_t j = 0; j < w; ++j) {
        ++hist[j * stride + detail::expert_choice_bin<T>(detail::expert_choice_key(p[j]))];
      }
    }

    // Per expert the boundary bin: the one holding the c-th largest key. Tokens in
    // higher bins are all taken; `need` more come from the boundary bin.
    ws.bound.resize(static_cast<std::size_t>(w));
    ws.need.resize(static_cast<std::size_t>(w));
    ws.lowest.resize(static_cast<std::size_t>(w));
    ws.begin.resize(static_cast<std::size_t>(w + 1));
    ws.end.resize(static_cast<std::size_t>(w));
    ws.begin[0] = 0;
    for (std::int64_t j = 0; j < w; ++j) {
      const std::uint32_t* h = hist + j * stride;
      std::int64_t above = 0, b = bins - 1;
      while (above + h[b] < c) above += h[b--];  // ends: the bins sum to routed >= c
      ws.bound[j] = static_cast<std::uint32_t>(b);
      ws.lowest[j] = Key(b) << (8 * sizeof(T) - 2 - detail::expert_choice_bin_bits);
      ws.need[j] = c - above;
      ws.begin[j + 1] = ws.begin[j] + above + h[b];  // every token at or above the bin
    }

    // Pass 2, tokens in order: each expert keeps the tokens at or above its
    // boundary bin; most tokens are below it.
    ws.cand_token.resize(static_cast<std::size_t>(ws.begin[w]));
    ws.cand_value.resize(static_cast<std::size_t>(ws.begin[w]));
    std::int32_t* cand_token = ws.cand_token.data();
    T* cand_value = ws.cand_value.data();
    const Key* lowest = ws.lowest.data();
    std::int64_t* end = ws.end.data();
    std::copy(ws.begin.begin(), ws.begin.begin() + w, end);
    for (std::int64_t r = 0; r < routed; ++r) {
      const std::int32_t token = rows[r];
      const T* p = probs + std::int64_t{token} * experts + e0;
      std::int64_t j0 = 0;
      for (; j0 + 64 <= w; j0 += 64) {
        // 64 experts at once: a 0/1 byte per expert (a fixed-length loop, which
        // vectorises), then only the set bytes, 8 at a time, are visited.
        alignas(64) std::uint8_t above[64];
        for (int j = 0; j < 64; ++j) {
          above[j] = detail::expert_choice_key(p[j0 + j]) >= lowest[j0 + j];
        }
        for (int q = 0; q < 64; q += 8) {
          std::uint64_t bytes;
          std::memcpy(&bytes, above + q, 8);
          for (; bytes != 0; bytes &= bytes - 1) {  // each set byte holds just bit 0
            const std::int64_t j = j0 + q + std::countr_zero(bytes) / 8;
            cand_token[end[j]] = token;
            cand_value[end[j]] = p[j];
            ++end[j];
          }
        }
      }
      for (std::int64_t j = j0; j < w; ++j) {
        if (detail::expert_choice_key(p[j]) >= lowest[j]) {
          cand_token[end[j]] = token;
          cand_value[end[j]] = p[j];
          ++end[j];
        }
      }
    }

    // Per expert: thr = the need-th largest key of the boundary bin; the run is
    // every candidate above thr and the first (in token order) equal to it.
    for (std::int64_t j = 0; j < w; ++j) {
      auto& keys = ws.bin_keys;
      keys.clear();
      for (std::int64_t i = ws.begin[j]; i < end[j]; ++i) {
        const Key k = detail::expert_choice_key(cand_value[i]);
        if (detail::expert_choice_bin<T>(k) == ws.bound[j]) keys.push_back(k);
      }
      const auto nth = keys.begin() + (ws.need[j] - 1);
      std::nth_element(keys.begin(), nth, keys.end(), std::greater<Key>());
      const Key thr = *nth;
      // Keys before nth are >= thr, after it <= thr: all those above thr are before it.
      std::int64_t ties =
          ws.need[j] - std::count_if(keys.begin(), nth, [&](Key k) { return k > thr; });
      std::int32_t* out_token = plan.token_index.data() + (e0 + j) * c;
      T* out_gate = plan.gate.data() + (e0 + j) * c;
      std::int64_t n = 0;
      for (std::int64_t i = ws.begin[j]; i < end[j]; ++i) {
        const Key k = detail::expert_choice_key(cand_value[i]);
        if (k > thr || (k == thr && ties-- > 0)) {
          out_token[n] = cand_token[i];
          out_gate[n] = cand_value[i];
          ++n;
        }
      }
    }
  }

  ExpertChoiceRouterConfig config_;
};

}  // namespace moe
}  // namespace v0
}  // namespace switchyard
