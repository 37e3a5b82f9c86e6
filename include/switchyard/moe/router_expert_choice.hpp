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
// Token-side views: plan.top_k = K, the most experts that took any one token (at least
// 1; at most E), and row t of choice_expert / choice_weight lists the experts that took
// token t IN EXPERT ORDER (not by gate), then -1 / 0; the CSR slot of (t, e) is the rank of
// e among the experts that took t. (This differs from token-choice plans, whose views are
// best first.)
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
// >= 0, so their bit patterns (sign cleared) order like unsigned integers. Pass 1 takes, per
// expert, a provisional threshold from a fixed sample of 256 routed rows: the sampled key of
// rank about c * 256 / T plus two standard deviations (found for all experts at once by a
// bitwise search, one vectorised counting pass per key bit), so that typically about twice c
// tokens lie at or above it. Pass 2, over the rows in token order, keeps per expert every
// token at or above its threshold (64 experts compared at a time into one bit mask). Per
// expert, the same bitwise search on those candidates gives the exact c-th largest value
// thr, and the run is the tokens with p > thr plus the first (in token order) with
// p == thr, already sorted by token. The sample only prunes: an expert whose candidates are
// fewer than c (about 2 % of experts) or overflow their buffer is selected from all its
// tokens instead, so the plan is exact for any data and any ties. O(T) per expert. A serial
// pass over the E*c entries builds the token-side views. Measured (1 thread, Emerald Rapids,
// T 4096, E 256, c 128): 4.1 ms with the previous histogram select, 2.7 ms with this one.
// Each expert's run is computed on its own, so the plan is bit-identical for any thread
// count and block split.
#include <algorithm>
#include <bit>
#include <cmath>
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
  std::vector<ExpertChoiceKey<T>> lowest;       // [w] provisional threshold (pass 1)
  std::vector<std::int64_t> end;                // [w] candidates found (may pass the capacity)
  std::vector<std::int64_t> sample_rows;        // [m] element offsets of the sampled rows
  std::vector<ExpertChoiceKey<T>> sample_keys;  // [m, w] their keys
  std::vector<ExpertChoiceKey<T>> cand_keys;    // [w] scratch of the column search
  std::vector<std::uint32_t> counts;            // [w]
  struct Candidate {
    std::int32_t token;
    T value;
  };
  std::vector<Candidate> cand;  // [w, cap] tokens at or above the threshold, in token order
  std::vector<ExpertChoiceKey<T>> keys;  // one expert's sampled or candidate keys
  std::vector<Candidate> all;            // one expert's every routed token (the fallback)
};

/// Fewest experts per selection task (each streams over its columns of the probabilities;
/// narrow column slices read whole cache lines for little work).
inline constexpr std::int64_t expert_choice_min_block = 16;
/// Routed rows sampled for the provisional thresholds.
inline constexpr std::int64_t expert_choice_sample = 256;

/// The order key of a probability p >= 0: its bits with the sign cleared (so -0 == +0),
/// which order like p itself.
template <class T>
inline ExpertChoiceKey<T> expert_choice_key(T p) noexcept {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "ExpertChoiceRouter: float or double");
  using Key = ExpertChoiceKey<T>;
  return std::bit_cast<Key>(p) & (~Key{0} >> 1);
}

/// The k-th largest of keys[0..n) (1 <= k <= n), bit by bit from the top: the largest v
/// with at least k keys >= v. Each step is one branch-free counting pass (vectorised by the
/// compiler), so ties and the order of the keys cost nothing; sign bits are clear.
template <class Key>
Key kth_largest_key(const Key* keys, std::int64_t n, std::int64_t k) noexcept {
  Key v = 0;
  for (int bit = 8 * static_cast<int>(sizeof(Key)) - 2; bit >= 0; --bit) {
    const Key candidate = v | (Key{1} << bit);
    std::uint32_t count = 0;  // n < 2^31 (plan extents are int32): 32-bit lanes vectorise best
    for (std::int64_t i = 0; i < n; ++i) count += keys[i] >= candidate;
    if (std::int64_t{count} >= k) v = candidate;
  }
  return v;
}

/// Column-wise kth_largest_key: out[j] = the k-th largest of keys[i * w + j] over i < n, for
/// every column j < w at once (the inner loops run along the rows, which vectorise).
/// `cand` and `count` are scratch of w entries.
template <class Key>
void kth_largest_key_columns(const Key* keys, std::int64_t n, std::int64_t w, std::int64_t k,
                             Key* out, Key* cand, std::uint32_t* count) noexcept {
  std::fill_n(out, w, Key{0});
  for (int bit = 8 * static_cast<int>(sizeof(Key)) - 2; bit >= 0; --bit) {
    for (std::int64_t j = 0; j < w; ++j) {
      cand[j] = out[j] | (Key{1} << bit);
      count[j] = 0;
    }
    for (std::int64_t i = 0; i < n; ++i) {
      const Key* row = keys + i * w;
      for (std::int64_t j = 0; j < w; ++j) count[j] += row[j] >= cand[j];
    }
    for (std::int64_t j = 0; j < w; ++j)
      if (std::int64_t{count[j]} >= k) out[j] = cand[j];
  }
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
  /// K = the most experts any token received (at least 1). Throws shape_error on a
  /// shape/stride/mask-length mismatch, config_error on a NaN or infinite logit of a routed token.
  void route(ConstView<T, 2> logits, DispatchPlan<T>& plan, const TokenMask& mask = {}) const {
    const std::int64_t experts = config_.num_experts;
    detail::check_logits(name, logits, experts, mask);
    const std::int64_t tokens = logits.extent(0);
    plan.reset(tokens, experts, 0);  // K is known after the selection
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

    // Token-side views and slots, experts in order; K = the most experts of one token.
    s.taken.assign(static_cast<std::size_t>(tokens), 0);
    for (std::int64_t i = 0; i < nnz; ++i) ++s.taken[plan.token_index[i]];
    std::int32_t most = 1;
    for (std::int64_t t = 0; t < tokens; ++t) most = std::max(most, s.taken[t]);
    plan.reset_choices(most);
    const std::int64_t K = most;
    std::fill(s.taken.begin(), s.taken.end(), 0);
    for (std::int64_t e = 0; e < experts; ++e) {
      for (std::int64_t i = e * c; i < (e + 1) * c; ++i) {
        const std::int64_t t = plan.token_index[i];
        const std::int32_t slot = s.taken[t]++;
        plan.slot[i] = slot;
        plan.choice_expert[t * K + slot] = static_cast<std::int32_t>(e);
        plan.choice_weight[t * K + slot] = plan.gate[i];
        plan.choice_kept[t * K + slot] = 1;  // reset_choices() zeroed the rest
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
    const std::int64_t experts = plan.num_experts;
    auto& ws = detail::expert_choice_scratch<T>();  // this thread's (not the caller's probs)

    // Pass 1: per expert, the sampled key of rank r, two standard deviations past the c-th
    // (about r / m of the rows lie at or above it; fewer than c for about 2 % of experts, which
    // then take the fallback); r >= m keeps every token (threshold 0).
    const std::int64_t m = std::min(routed, detail::expert_choice_sample);
    const double expect = double(c) * double(m) / double(routed);
    const auto r = static_cast<std::int64_t>(std::ceil(expect + 2.0 * std::sqrt(expect) + 2.0));
    ws.lowest.assign(static_cast<std::size_t>(w), Key{0});
    ws.keys.resize(static_cast<std::size_t>(m));
    if (r < m) {
      ws.sample_rows.resize(static_cast<std::size_t>(m));
      for (std::int64_t i = 0; i < m; ++i)
        ws.sample_rows[i] = std::int64_t{rows[i * routed / m]} * experts + e0;
      // The sampled rows' keys [m, w], then every expert's rank-r key at once.
      ws.sample_keys.resize(static_cast<std::size_t>(w * m));
      for (std::int64_t i = 0; i < m; ++i) {
        const T* p = probs + ws.sample_rows[i];
        for (std::int64_t j = 0; j < w; ++j)
          ws.sample_keys[i * w + j] = detail::expert_choice_key(p[j]);
      }
      ws.cand_keys.resize(static_cast<std::size_t>(w));
      ws.counts.resize(static_cast<std::size_t>(w));
      detail::kth_largest_key_columns(ws.sample_keys.data(), m, w, r, ws.lowest.data(),
                                      ws.cand_keys.data(), ws.counts.data());
    }
    // Room per expert for the expected candidates plus four standard deviations (more goes to
    // the fallback below).
    const std::int64_t cap =
        r < m
            ? std::min(routed,
                       static_cast<std::int64_t>(
                           double(routed) * (double(r) + 4.0 * std::sqrt(double(r))) / double(m)) +
                           32)
            : routed;

    // Pass 2, tokens in order: each expert keeps the tokens at or above its threshold. Groups
    // of 64 experts, one after the other, so that only 64 candidate lists are written at a
    // time (they stay in cache; 256 interleaved lists did not).
    using Candidate = typename detail::ExpertChoiceScratch<T>::Candidate;
    ws.cand.resize(static_cast<std::size_t>(w * cap));
    ws.end.assign(static_cast<std::size_t>(w), 0);
    Candidate* cand = ws.cand.data();
    const Key* lowest = ws.lowest.data();
    std::int64_t* end = ws.end.data();
    const auto keep = [&](std::int64_t j, std::int32_t token, T p) {
      if (end[j] < cap) cand[j * cap + end[j]] = {token, p};
      ++end[j];
    };
    constexpr std::int64_t group = 64;
    for (std::int64_t g0 = 0; g0 < w; g0 += group) {
      const std::int64_t gw = std::min(group, w - g0);
      for (std::int64_t i = 0; i < routed; ++i) {
        const std::int32_t token = rows[i];
        const T* p = probs + std::int64_t{token} * experts + e0 + g0;
        if (gw < group) {
          for (std::int64_t j = 0; j < gw; ++j)
            if (detail::expert_choice_key(p[j]) >= lowest[g0 + j]) keep(g0 + j, token, p[j]);
          continue;
        }
        // 64 experts at once: a 0/1 byte per expert (a fixed-length loop, which vectorises),
        // folded into one 64-bit mask (a multiply gathers the low bits of 8 bytes), whose
        // set bits are then visited: one loop per row, no branch per expert or per byte.
        alignas(64) std::uint8_t above[group];
        for (int j = 0; j < group; ++j)
          above[j] = detail::expert_choice_key(p[j]) >= lowest[g0 + j];
        std::uint64_t bits = 0;
        for (int q = 0; q < group; q += 8) {
          std::uint64_t bytes;
          std::memcpy(&bytes, above + q, 8);
          bits |= ((bytes * 0x0102040810204080ull) >> 56) << q;  // byte i -> bit i
        }
        for (; bits != 0; bits &= bits - 1) {
          const std::int64_t j = std::countr_zero(bits);
          keep(g0 + j, token, p[j]);
        }
      }
    }

    // Per expert: thr = the c-th largest candidate key; the run is every candidate above
    // thr and the first (in token order) equal to it. An expert whose candidates are too
    // few (an unlucky sample) or did not fit selects from all its routed tokens.
    for (std::int64_t j = 0; j < w; ++j) {
      const Candidate* list = cand + j * cap;
      std::int64_t n = end[j];
      if (n < c || n > cap) {
        ws.all.resize(static_cast<std::size_t>(routed));
        for (std::int64_t i = 0; i < routed; ++i)
          ws.all[i] = {rows[i], probs[std::int64_t{rows[i]} * experts + e0 + j]};
        list = ws.all.data();
        n = routed;
      }
      auto& keys = ws.keys;
      keys.resize(static_cast<std::size_t>(n));
      for (std::int64_t i = 0; i < n; ++i) keys[i] = detail::expert_choice_key(list[i].value);
      const Key thr = detail::kth_largest_key(keys.data(), n, c);
      std::int64_t above = 0;
      for (std::int64_t i = 0; i < n; ++i) above += keys[i] > thr;
      std::int64_t ties = c - above;  // of the keys equal to thr, the first `ties` are taken
      std::int32_t* out_token = plan.token_index.data() + (e0 + j) * c;
      T* out_gate = plan.gate.data() + (e0 + j) * c;
      // Branch-free: every candidate is written at `out`, which advances only when it is
      // taken (about half are, at random: a branch would mispredict).
      std::int64_t out = 0;
      for (std::int64_t i = 0; i < n && out < c; ++i) {
        const Key k = detail::expert_choice_key(list[i].value);
        const std::int64_t tie = k == thr;
        const std::int64_t take = (k > thr) | (tie & (ties > 0));
        ties -= tie & take;
        out_token[out] = list[i].token;
        out_gate[out] = list[i].value;
        out += take;
      }
    }
  }

  ExpertChoiceRouterConfig config_;
};

}  // namespace moe
}  // namespace v0
}  // namespace switchyard
