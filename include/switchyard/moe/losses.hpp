#pragma once
// Auxiliary losses and routing statistics, each with its formula and where it
// comes from. All take per-expert sums over the routed (unmasked) tokens, so a
// padding mask is applied once, where the sums are formed, and every loss here
// excludes padding the same way. Coefficients are 1: scale them yourself. Per-expert
// arrays of different lengths are a shape_error.
//
// Notation: T routed tokens, E experts, k choices per token, p[t,e] router
// probability, n_e assignments of expert e counted before capacity,
// P_e = sum_t p[t,e].
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "switchyard/core/error.hpp"
#include "switchyard/core/int_math.hpp"
#include "switchyard/core/view.hpp"
#include "switchyard/moe/plan.hpp"

namespace switchyard {
inline namespace v0 {
namespace moe {

namespace detail {
/// Throws shape_error "moe::fn: argument 'b' has shape [E=n]; expected [E=m]" unless the two
/// per-expert arrays have one entry per expert each.
inline void check_per_expert(std::string_view fn, std::string_view a, std::size_t na,
                             std::string_view b, std::size_t nb) {
  if (na == nb) return;
  const std::int64_t got[1] = {static_cast<std::int64_t>(nb)};
  switchyard::detail::fail_shape("moe", fn, b, switchyard::detail::format_shape({"E"}, got),
                                 "[E=" + std::to_string(na) + "]",
                                 "one entry per expert, like '" + std::string(a) + "'");
}
}  // namespace detail

/// Switch / Megatron-LM load-balancing loss (`switch_load_balancing_loss_func`):
/// E / (T^2 k) * sum_e n_e * P_e. Equals 1 for perfectly uniform routing.
/// HF `load_balancing_loss_func` gives k times this value (it does not divide by k).
inline double switch_load_balancing_loss(std::span<const std::int64_t> tokens_per_expert,
                                         std::span<const double> prob_sum, std::int64_t tokens,
                                         std::int64_t k) {
  detail::check_per_expert("switch_load_balancing_loss", "tokens_per_expert",
                           tokens_per_expert.size(), "prob_sum", prob_sum.size());
  if (tokens == 0 || k == 0) return 0.0;
  double s = 0;
  for (std::size_t e = 0; e < tokens_per_expert.size(); ++e) {
    s += static_cast<double>(tokens_per_expert[e]) * prob_sum[e];
  }
  const auto E = static_cast<double>(tokens_per_expert.size());
  const auto t = static_cast<double>(tokens);
  return E / (t * t * static_cast<double>(k)) * s;
}

/// HF transformers `load_balancing_loss_func` (Mixtral, OLMoE, Qwen-MoE), before
/// its router_aux_loss_coef: E / T^2 * sum_e n_e P_e, i.e. k times the Megatron value.
inline double hf_load_balancing_loss(std::span<const std::int64_t> tokens_per_expert,
                                     std::span<const double> prob_sum, std::int64_t tokens,
                                     std::int64_t k) {
  return static_cast<double>(k) *
         switch_load_balancing_loss(tokens_per_expert, prob_sum, tokens, k);
}

/// GShard / fairscale `l_aux`: mean_e (P_e / T) * (f_e / T) with f_e the tokens whose
/// FIRST choice is e (before capacity). No E factor: uniform routing gives 1/E^2.
inline double gshard_load_balancing_loss(std::span<const std::int64_t> first_choice_count,
                                         std::span<const double> prob_sum, std::int64_t tokens) {
  detail::check_per_expert("gshard_load_balancing_loss", "prob_sum", prob_sum.size(),
                           "first_choice_count", first_choice_count.size());
  if (tokens == 0) return 0.0;
  const auto t = static_cast<double>(tokens);
  double s = 0;
  for (std::size_t e = 0; e < prob_sum.size(); ++e) {
    s += (prob_sum[e] / t) * (static_cast<double>(first_choice_count[e]) / t);
  }
  return s / static_cast<double>(prob_sum.size());
}

/// llm-baselines `load_balancing_loss`: sum_e f_e * (P_e / T), f_e the fraction of
/// tokens with e among their choices. 1/E of the Switch (k = 1) value.
inline double fraction_load_balancing_loss(std::span<const std::int64_t> tokens_with_expert,
                                           std::span<const double> prob_sum, std::int64_t tokens) {
  detail::check_per_expert("fraction_load_balancing_loss", "prob_sum", prob_sum.size(),
                           "tokens_with_expert", tokens_with_expert.size());
  if (tokens == 0) return 0.0;
  const auto t = static_cast<double>(tokens);
  double s = 0;
  for (std::size_t e = 0; e < prob_sum.size(); ++e) {
    s += static_cast<double>(tokens_with_expert[e]) / t * (prob_sum[e] / t);
  }
  return s;
}

/// Router z-loss (ST-MoE; Megatron `z_loss_func`): mean_t logsumexp(logits[t])^2,
/// from the sum over routed tokens of lse^2.
inline double router_z_loss(double sum_lse_squared, std::int64_t tokens) noexcept {
  return tokens == 0 ? 0.0 : sum_lse_squared / static_cast<double>(tokens);
}

/// Squared coefficient of variation (Shazeer et al. 2017, davidmrau `cv_squared`):
/// unbiased variance / (mean^2 + 1e-10); 0 for fewer than two values.
inline double cv_squared(std::span<const double> v) noexcept {
  if (v.size() < 2) return 0.0;
  double mean = 0;
  for (double x : v) mean += x;
  mean /= static_cast<double>(v.size());
  double var = 0;
  for (double x : v) var += (x - mean) * (x - mean);
  var /= static_cast<double>(v.size() - 1);
  return var / (mean * mean + 1e-10);
}

/// llm-baselines `entropy_reg`: sum_e pbar_e log pbar_e with pbar_e = P_e / T, the
/// NEGATIVE entropy of the batch-mean router distribution (0 log 0 = 0).
inline double mean_distribution_neg_entropy(std::span<const double> prob_sum,
                                            std::int64_t tokens) noexcept {
  if (tokens == 0) return 0.0;
  double s = 0;
  for (double p : prob_sum) {
    const double q = p / static_cast<double>(tokens);
    if (q > 0) s += q * std::log(q);
  }
  return s;
}

/// llm-baselines' log-space mean router probability (its `load_balancing_loss`
/// takes P_e from log-softmax): logits [T, E] (unit inner stride), routed tokens
/// only; returns [E] with mean_e = exp(logsumexp_t(log_softmax(logits[t])[e]) - log T),
/// computed in double. Mathematically the plain mean of the softmax probabilities;
/// in double the two agree to rounding. T routed = 0 gives zeros. Logits are assumed
/// finite (routers check them). Use with fraction_load_balancing_loss(n, T * mean, T).
template <class T>
std::vector<double> log_space_mean_prob(ConstView<T, 2> logits, const TokenMask& mask = {}) {
  const std::int64_t tokens = logits.extent(0), experts = logits.extent(1);
  core::detail::check_shape("moe", "log_space_mean_prob", "logits", logits, {"T", "E"}, {-1, -1});
  core::detail::check_unit_inner_stride("moe", "log_space_mean_prob", "logits", logits);
  if (!mask.keep.empty() && static_cast<std::int64_t>(mask.keep.size()) != tokens) {
    const std::int64_t got[1] = {static_cast<std::int64_t>(mask.keep.size())};
    switchyard::detail::fail_shape("moe", "log_space_mean_prob", "mask",
                                   switchyard::detail::format_shape({"T"}, got),
                                   "[T=" + std::to_string(tokens) + "]", "one flag per token");
  }
  switchyard::detail::checked_size("moe", "log_space_mean_prob", "logits", {tokens, experts},
                                   sizeof(double));
  const double neg_inf = -std::numeric_limits<double>::infinity();
  std::vector<double> max_l(static_cast<std::size_t>(experts), neg_inf);
  std::vector<double> lsm(static_cast<std::size_t>(tokens * experts), neg_inf);
  for (std::int64_t t = 0; t < tokens; ++t) {
    if (!mask.routed(t)) continue;
    const T* x = logits.data() + t * logits.stride(0);
    double m = neg_inf;
    for (std::int64_t e = 0; e < experts; ++e) m = std::max(m, static_cast<double>(x[e]));
    double s = 0;
    for (std::int64_t e = 0; e < experts; ++e) s += std::exp(static_cast<double>(x[e]) - m);
    const double lse = m + std::log(s);
    for (std::int64_t e = 0; e < experts; ++e) {
      const double l = static_cast<double>(x[e]) - lse;
      lsm[t * experts + e] = l;
      max_l[e] = std::max(max_l[e], l);
    }
  }
  const std::int64_t routed = mask.count(tokens);
  std::vector<double> mean(static_cast<std::size_t>(experts), 0.0);
  if (routed == 0) return mean;
  const double log_t = std::log(static_cast<double>(routed));
  for (std::int64_t e = 0; e < experts; ++e) {
    double s = 0;
    for (std::int64_t t = 0; t < tokens; ++t) {
      if (mask.routed(t)) s += std::exp(lsm[t * experts + e] - max_l[e]);
    }
    mean[e] = std::exp(max_l[e] + std::log(s) - log_t);
  }
  return mean;
}

/// DeepSeek-V3's complementary sequence-wise balance loss (DeepSeek-V3 technical report,
/// section 2.1.2; coefficient alpha = 1). expert_indices: [T, K] chosen experts (a plan's
/// expert_indices(); -1 = unused, not counted); scores: [T, E] the router's unbiased scores
/// s[t, e] >= 0 (GroupedTopKRouter's scores_out); the T tokens are consecutive sequences of
/// seq_len tokens (a flattened [B, seq_len] batch). Per sequence, over its routed tokens
/// (mask; T_s of them):
///   s'[t, i] = s[t, i] / sum_j s[t, j]      (0 for a row summing to 0),
///   f_i = E / (K T_s) * #{(t, slot) : expert_indices[t, slot] = i},
///   P_i = (1 / T_s) sum_t s'[t, i],         L_seq = sum_i f_i P_i;
/// returns the mean of L_seq over the sequences with at least one routed token (0 if none).
/// Uniform routing gives 1. In double. With seq_len = T this is GroupedTopKRouter's
/// stats.aux_loss. Throws config_error for seq_len < 1 or not dividing T, or an expert id
/// outside [-1, E); shape_error for mismatched shapes.
template <class T>
double sequence_wise_balance_loss(ConstView<std::int32_t, 2> expert_indices, ConstView<T, 2> scores,
                                  std::int64_t seq_len, const TokenMask& mask = {}) {
  constexpr std::string_view fn = "sequence_wise_balance_loss";
  const std::int64_t tokens = scores.extent(0), experts = scores.extent(1);
  core::detail::check_shape("moe", fn, "scores", scores, {"T", "E"}, {-1, -1});
  core::detail::check_shape("moe", fn, "expert_indices", expert_indices, {"T", "K"}, {tokens, -1},
                            "one row per token of scores");
  if (!mask.keep.empty() && static_cast<std::int64_t>(mask.keep.size()) != tokens) {
    const std::int64_t got[1] = {static_cast<std::int64_t>(mask.keep.size())};
    switchyard::detail::fail_shape("moe", fn, "mask", switchyard::detail::format_shape({"T"}, got),
                                   "[T=" + std::to_string(tokens) + "]", "one flag per token");
  }
  if (seq_len < 1 || tokens % seq_len != 0) {
    switchyard::detail::fail_config(
        "moe", fn, "seq_len", seq_len,
        "a divisor >= 1 of the token count T = " + std::to_string(tokens));
  }
  const std::int64_t k = expert_indices.extent(1);
  for (std::int64_t t = 0; t < tokens; ++t) {
    for (std::int64_t j = 0; j < k; ++j) {
      const std::int32_t e = expert_indices(t, j);
      if (e < -1 || e >= experts) {
        switchyard::detail::fail_config("moe", fn, "expert_indices", e,
                                        "-1 or an expert id below E = " + std::to_string(experts));
      }
    }
  }
  if (tokens == 0 || k == 0 || experts == 0) return 0.0;
  std::vector<double> count(static_cast<std::size_t>(experts)), p(count.size());
  double total = 0;
  std::int64_t sequences = 0;
  for (std::int64_t t0 = 0; t0 < tokens; t0 += seq_len) {
    std::fill(count.begin(), count.end(), 0.0);
    std::fill(p.begin(), p.end(), 0.0);
    std::int64_t routed = 0;
    for (std::int64_t t = t0; t < t0 + seq_len; ++t) {
      if (!mask.routed(t)) continue;
      ++routed;
      for (std::int64_t j = 0; j < k; ++j) {
        const std::int32_t e = expert_indices(t, j);
        if (e >= 0) count[e] += 1;
      }
      double row = 0;
      for (std::int64_t e = 0; e < experts; ++e) row += static_cast<double>(scores(t, e));
      if (!(row > 0)) continue;
      const double inv = 1.0 / row;
      for (std::int64_t e = 0; e < experts; ++e) p[e] += static_cast<double>(scores(t, e)) * inv;
    }
    if (routed == 0) continue;
    const auto ts = static_cast<double>(routed);
    double l = 0;
    for (std::int64_t e = 0; e < experts; ++e) l += count[e] * p[e];
    total += static_cast<double>(experts) / (static_cast<double>(k) * ts * ts) * l;
    ++sequences;
  }
  return sequences == 0 ? 0.0 : total / static_cast<double>(sequences);
}

}  // namespace moe
}  // namespace v0
}  // namespace switchyard
