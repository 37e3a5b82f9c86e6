#pragma once
// GShardTop2Router: GShard top-2 gating with expert capacity, as in fairscale
// top2gating (after lingvo's Top2GatingOnLogits).
//
// Semantics, per routed token t with logits x[t, :] ([T, E], E >= 2):
//   p[t, :] = softmax(x[t, :]) over all E experts;
//   first  = argmax_e p[t, e];
//   second = argmax over e != first of x[t, e] + noise[t, e]. route() uses no
//     noise (deterministic; what the `gshard_top2_tiny` fixture pins, with
//     fairscale's gumbel_rsample patched to zeros); route_with_noise() takes the
//     caller's noise [T, E]; route_sampled() draws Gumbel(0, 1) noise from a
//     core::Rng (fairscale's training-time second_expert_policy "sampling").
//   Ties go to the lower expert index.
// Capacity: C = max(floor(capacity_factor * T / E), min_capacity), T = routed
//   (unmasked) tokens, or max(config.capacity, min_capacity) when config.capacity >= 0;
//   the default capacity_factor = 2 gives fairscale's
//   2 * T // E (fairscale also asserts T % E == 0; this router does not, and a
//   C of 0 drops every assignment). C above T is clamped to T, visibly
//   (plan.requested_capacity, plan.capacity_clamped).
// Buffer positions (fairscale locations1 / locations2): slots of expert e are
//   filled in token order, all first choices before any second choice: the
//   first choice of token t gets position #{t' < t routed : first(t') = e},
//   the second choice F_e + #{t' < t routed : second(t') = e}, with F_e the
//   number of first choices of e (counted before capacity). An assignment is
//   kept iff its position < C. buffer_positions() returns these positions.
// Gates: g1 = p[t, first] if kept else 0, g2 = p[t, second] if kept else 0,
//   both divided by max(g1 + g2, epsilon of T) (fairscale clamps to float32
//   eps; in float this is the same). So a token whose first choice is dropped
//   but second kept puts weight 1 on the second expert; a token with both
//   dropped outputs 0 (stats.tokens_without_expert).
// Plan: top_k = 2, choice_expert[t, 0] = first, [t, 1] = second (dropped ones
//   stay with weight 0 and choice_kept 0, and are listed in plan.dropped with the gate
//   they had with nothing dropped, p / (p1 + p2)); the CSR slot is 0 for a
//   first choice and 1 for a second. The CSR runs are sorted by token, which is
//   buffer order only among first choices: use buffer_positions() for the
//   fixture's `slot` / fairscale's [T, E, C] layout.
// Masked tokens (TokenMask) get no expert, take no buffer position and count in
// no statistic, loss or capacity. T = 0 or all tokens masked gives a valid empty
// plan with zero losses.
//
// Statistics (coefficient 1; T = routed tokens, in double):
//   stats.tokens_per_expert = first + second choices per expert, before capacity;
//   stats.kept_per_expert = assignments kept;
//   stats.aux_loss = fairscale l_aux = gshard_load_balancing_loss =
//     mean_e (P_e / T) * (F_e / T), P_e = sum_t p[t, e], F_e = FIRST choices of
//     e before capacity (no E factor: uniform routing gives 1/E^2);
//   stats.z_loss = mean_t logsumexp(x[t])^2; stats.entropy, stats.mean_prob of p.
// Reference: facebookresearch/fairscale @ 146f160, fairscale/nn/moe/top2gate.py
// top2gating / Top2Gate.
//
// Cost: one vectorised softmax pass (detail::softmax_scores) into a thread-local
// buffer reused across calls, one argmax pair per token over fixed token chunks,
// one serial pass for the buffer positions, and the CSR build. Bit-identical for
// any thread count.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "switchyard/core/error.hpp"
#include "switchyard/core/parallel_for.hpp"
#include "switchyard/core/rng.hpp"
#include "switchyard/core/simd/arch.hpp"
#include "switchyard/core/simd/vector_ops.hpp"
#include "switchyard/core/topk.hpp"
#include "switchyard/core/view.hpp"
#include "switchyard/moe/losses.hpp"
#include "switchyard/moe/plan.hpp"
#include "switchyard/moe/router.hpp"

namespace switchyard {
inline namespace v0 {
namespace moe {

struct GShardTop2RouterConfig {
  std::int64_t num_experts = 0;  ///< E; >= 2 (two distinct experts per token)
  /// C = floor(capacity_factor * T / E); 2 gives fairscale's 2T/E. Finite, > 0.
  double capacity_factor = 2.0;
  std::int64_t min_capacity = 0;  ///< lower bound on C; >= 0
  /// Capacity as a number: >= 0 uses this many tokens per expert instead of the
  /// capacity_factor formula (still at least min_capacity, clamped to the routed tokens);
  /// -1 (default) uses the formula.
  std::int64_t capacity = -1;
};

namespace detail {

/// Per-thread buffers of GShardTop2Router, reused across calls.
template <class T>
struct GShardScratch {
  std::vector<T> probs;
  std::vector<double> prob_sum;
  std::vector<T> noise;
  std::vector<std::uint8_t> keep;
  std::vector<std::int64_t> counts;
  std::vector<std::int64_t> bad;
};

template <class T>
GShardScratch<T>& gshard_scratch() {
  thread_local GShardScratch<T> s;
  return s;
}

}  // namespace detail

template <class T = float, class Arch = simd::default_arch>
class GShardTop2Router {
 public:
  using config_type = GShardTop2RouterConfig;
  static constexpr std::string_view name = "GShardTop2Router";

  /// Throws config_error (naming GShardTop2Router and the field) if num_experts < 2,
  /// capacity_factor is not finite or <= 0, min_capacity < 0 or capacity < -1.
  explicit GShardTop2Router(const GShardTop2RouterConfig& config) : config_(config) {
    if (config_.num_experts < 2) {
      switchyard::detail::fail_config(name, "config", "num_experts", config_.num_experts,
                                      ">= 2 (top-2 needs two distinct experts)");
    }
    detail::check_capacity_settings(name, config_.capacity_factor, config_.min_capacity,
                                    config_.capacity);
  }

  const GShardTop2RouterConfig& config() const noexcept { return config_; }
  std::int64_t num_experts() const noexcept { return config_.num_experts; }
  static constexpr std::int64_t top_k() noexcept { return 2; }

  /// logits: [T, E] (unit inner stride); mask: empty or [T] (True = routed).
  /// Deterministic second choice (no noise). Throws shape_error on a
  /// shape/stride/mask-length mismatch, config_error on a NaN or infinite logit.
  void route(ConstView<T, 2> logits, DispatchPlan<T>& plan, const TokenMask& mask = {}) const {
    route_impl(logits, nullptr, plan, mask);
  }

  /// route(logits, plan, mask) that also writes the routing scores [T, E] into `scores`
  /// (softmax(logits), the gates before top-2 and capacity; rows of masked tokens 0). Throws
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

  /// As route(), with the second choice = argmax over e != first of
  /// logits[t, e] + second_choice_noise[t, e] (fairscale's logits_w_noise).
  /// second_choice_noise: [T, E], any strides. Throws shape_error if its shape
  /// differs, config_error if a routed token's noise is NaN or infinite.
  void route_with_noise(ConstView<T, 2> logits, ConstView<T, 2> second_choice_noise,
                        DispatchPlan<T>& plan, const TokenMask& mask = {}) const {
    core::detail::check_shape(name, "route_with_noise", "second_choice_noise", second_choice_noise,
                              {"T", "E"}, {logits.extent(0), config_.num_experts},
                              "one noise value per logit");
    route_impl(logits, &second_choice_noise, plan, mask);
  }

  /// Training mode: route_with_noise with Gumbel(0, 1) noise from gumbel_noise(rng, .).
  void route_sampled(ConstView<T, 2> logits, const core::Rng& rng, DispatchPlan<T>& plan,
                     const TokenMask& mask = {}) const {
    detail::check_logits(name, logits, config_.num_experts, mask);
    auto& s = detail::gshard_scratch<T>();
    const std::int64_t tokens = logits.extent(0), experts = config_.num_experts;
    s.noise.resize(static_cast<std::size_t>(tokens * experts));
    View<T, 2> noise(s.noise.data(), {tokens, experts});
    gumbel_noise(rng, noise);
    const ConstView<T, 2> cnoise = noise;
    route_impl(logits, &cnoise, plan, mask);  // route_impl leaves s.noise alone
  }

  /// noise[t, e] = -log(-log(u)), u in (0, 1) from position i = t * E + e of rng:
  /// float: u = ((rng.uint32(i) >> 8) + 1/2) * 2^-24, logs in float;
  /// double: u = ((rng.uint64(i) >> 11) + 1/2) * 2^-53, logs in double.
  /// u never reaches 0 or 1, so the noise is finite. Deterministic for any
  /// thread count (each row's values depend only on the positions).
  static void gumbel_noise(const core::Rng& rng, View<T, 2> noise) {
    const std::int64_t rows = noise.extent(0), cols = noise.extent(1);
    parallel_for(num_chunks(rows, detail::router_chunk), [&](std::int64_t c) {
      std::uint64_t cached = ~std::uint64_t{0};
      std::array<std::uint32_t, 4> words{};
      for (std::int64_t t = c * detail::router_chunk;
           t < std::min(rows, (c + 1) * detail::router_chunk); ++t) {
        for (std::int64_t e = 0; e < cols; ++e) {
          const auto pos = static_cast<std::uint64_t>(t * cols + e);
          if constexpr (std::is_same_v<T, float>) {
            if (pos / 4 != cached) {
              cached = pos / 4;
              words = rng.block(cached);
            }
            const float u = (static_cast<float>(words[pos % 4] >> 8) + 0.5f) * 0x1p-24f;
            noise(t, e) = -std::log(-std::log(u));
          } else {
            if (pos / 2 != cached) {
              cached = pos / 2;
              words = rng.block(cached);
            }
            const double u =
                (static_cast<double>(core::Rng::pair64(words, pos % 2) >> 11) + 0.5) * 0x1p-53;
            noise(t, e) = static_cast<T>(-std::log(-std::log(u)));
          }
        }
      }
    });
  }

  /// Buffer position of every choice of a plan this router produced: [T * 2],
  /// positions[t * 2 + s] for choice s (0 = first, 1 = second); < plan.capacity
  /// iff kept, -1 for masked tokens. Throws config_error if plan.top_k != 2.
  static void buffer_positions(const DispatchPlan<T>& plan, std::vector<std::int32_t>& positions) {
    if (plan.top_k != 2) {
      switchyard::detail::fail_config(name, "buffer_positions", "plan.top_k", plan.top_k,
                                      "2 (a plan from GShardTop2Router)");
    }
    const std::int64_t tokens = plan.num_tokens, experts = plan.num_experts;
    positions.assign(static_cast<std::size_t>(tokens * 2), -1);
    std::vector<std::int64_t> first(static_cast<std::size_t>(experts), 0);
    std::vector<std::int64_t> second(static_cast<std::size_t>(experts), 0);
    for (std::int64_t t = 0; t < tokens; ++t) {
      const std::int32_t e = plan.choice_expert[t * 2];
      if (e >= 0) positions[t * 2] = static_cast<std::int32_t>(first[e]++);
    }
    for (std::int64_t t = 0; t < tokens; ++t) {
      const std::int32_t e = plan.choice_expert[t * 2 + 1];
      if (e >= 0) positions[t * 2 + 1] = static_cast<std::int32_t>(first[e] + second[e]++);
    }
  }

  static std::vector<std::int32_t> buffer_positions(const DispatchPlan<T>& plan) {
    std::vector<std::int32_t> positions;
    buffer_positions(plan, positions);
    return positions;
  }

 private:
  void route_impl(ConstView<T, 2> logits, const ConstView<T, 2>* noise, DispatchPlan<T>& plan,
                  const TokenMask& mask) const {
    const std::int64_t experts = config_.num_experts;
    detail::check_logits(name, logits, experts, mask);
    const std::int64_t tokens = logits.extent(0);
    plan.reset(tokens, experts, 2);
    auto& s = detail::gshard_scratch<T>();
    detail::softmax_scores<T, Arch>(name, logits, mask, s.probs, s.prob_sum, plan.stats);
    const std::int64_t routed = plan.stats.routed_tokens;

    // 1. First and second choice per token.
    const T* probs = s.probs.data();
    std::int32_t* choice = plan.choice_expert.data();
    const std::int64_t chunks = num_chunks(tokens, detail::router_chunk);
    s.bad.assign(static_cast<std::size_t>(chunks), -1);
    parallel_for(chunks, [&](std::int64_t c) {
      for (std::int64_t t = c * detail::router_chunk;
           t < std::min(tokens, (c + 1) * detail::router_chunk); ++t) {
        if (!mask.routed(t)) continue;
        const std::int64_t first = kernels::argmax_first(Arch{}, probs + t * experts, experts);
        const T* x = logits.data() + t * logits.stride(0);
        if (!noise) {  // the first maximum of the logits without the first choice
          choice[t * 2] = static_cast<std::int32_t>(first);
          choice[t * 2 + 1] =
              static_cast<std::int32_t>(kernels::argmax_first(Arch{}, x, experts, first));
          continue;
        }
        std::int64_t second = -1;
        T best = T(0);
        for (std::int64_t e = 0; e < experts; ++e) {
          if (e == first) continue;
          const T n = (*noise)(t, e);
          if (!std::isfinite(n)) {
            if (s.bad[c] < 0) s.bad[c] = t;
            continue;
          }
          const T v = x[e] + n;
          if (second < 0 || v > best) {  // strict: ties keep the lower index
            best = v;
            second = e;
          }
        }
        choice[t * 2] = static_cast<std::int32_t>(first);
        choice[t * 2 + 1] = static_cast<std::int32_t>(second < 0 ? (first == 0 ? 1 : 0) : second);
      }
    });
    for (std::int64_t c = 0; c < chunks; ++c) {
      if (s.bad[c] >= 0) {
        switchyard::detail::fail_config(
            name, "route_with_noise", "second_choice_noise", "NaN or inf",
            "finite noise (token " + std::to_string(s.bad[c]) + " has a non-finite value)");
      }
    }

    // 2. Capacity and buffer positions: all first choices, then all second choices.
    const Capacity cap =
        compute_capacity(routed, 1, experts, config_.capacity_factor, CapacityRounding::floor,
                         config_.min_capacity, config_.capacity);
    set_capacity(plan, cap);
    auto& n_e = plan.stats.tokens_per_expert;
    s.counts.assign(static_cast<std::size_t>(experts), 0);  // first choices per expert
    s.keep.assign(static_cast<std::size_t>(tokens * 2), 1);
    for (std::int64_t t = 0; t < tokens; ++t) {
      const std::int32_t e = choice[t * 2];
      if (e < 0) continue;
      s.keep[t * 2] = s.counts[e]++ < cap.value;
    }
    for (std::int64_t e = 0; e < experts; ++e) n_e[e] = s.counts[e];
    for (std::int64_t t = 0; t < tokens; ++t) {
      const std::int32_t e = choice[t * 2 + 1];
      if (e < 0) continue;
      s.keep[t * 2 + 1] = n_e[e]++ < cap.value;  // n_e[e] = F_e + seconds so far
    }

    // 3. Gates: kept probabilities over their sum (at least epsilon). A dropped choice
    // gets the gate it had with nothing dropped, which build_csr_from_choices records in
    // plan.dropped before zeroing it.
    T* weight = plan.choice_weight.data();
    for (std::int64_t t = 0; t < tokens; ++t) {
      const std::int32_t e1 = choice[t * 2];
      if (e1 < 0) continue;
      const std::int32_t e2 = choice[t * 2 + 1];
      const T p1 = probs[t * experts + e1], p2 = probs[t * experts + e2];
      const bool k1 = s.keep[t * 2], k2 = s.keep[t * 2 + 1];
      const T denom =
          std::max((k1 ? p1 : T(0)) + (k2 ? p2 : T(0)), std::numeric_limits<T>::epsilon());
      const T undropped = std::max(p1 + p2, std::numeric_limits<T>::epsilon());
      weight[t * 2] = p1 / (k1 ? denom : undropped);
      weight[t * 2 + 1] = p2 / (k2 ? denom : undropped);
    }
    detail::build_csr_from_choices(plan, std::span<const std::uint8_t>(s.keep));
    plan.stats.aux_loss = gshard_load_balancing_loss(s.counts, s.prob_sum, routed);
    plan.stats.aux_loss_scaled = plan.stats.aux_loss;
  }

  GShardTop2RouterConfig config_;
};

}  // namespace moe
}  // namespace v0
}  // namespace switchyard
