#pragma once
// BiasBalancer: DeepSeek-V3's auxiliary-loss-free load balancing (DeepSeek-V3 technical
// report, section 2.1.2; Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing Strategy for
// Mixture-of-Experts"). Each routed expert has a bias b_e that is added to its score for
// SELECTION only (GroupedTopKRouter's bias argument, e_score_correction_bias); after each
// training step the bias moves by a fixed step against the expert's load:
//   b_e += gamma * sign(mean_load - load_e),   mean_load = sum_j load_j / E, sign(0) = 0,
// so overloaded experts become less attractive and underloaded ones more. The sign is exact
// (sum_j load_j compared with E * load_e, in double: exact for counts below 2^53 / E).
//
// The state lives outside the balancer (BiasBalancerState, like ReluRouter's L1Controller),
// so the balancer is immutable and one state per MoE layer is a plain value to checkpoint.
// Use, per step and layer: router.route(logits, state.bias, plan, mask); ...; then
// balancer.update(state, plan.stats.tokens_per_expert) with the step's loads (sum the
// counts over micro-batches and data-parallel ranks first, so every replica moves alike).
// DeepSeek-V3 used gamma = 0.001 for most of training and 0 at the end (gamma = 0 freezes
// the bias).
//
// Errors: config_error naming "BiasBalancer" for num_experts < 1 or update_rate NaN,
// infinite or < 0; at update, shape_error for a bias or tokens_per_expert not of length E,
// config_error for a negative count.
#include <cmath>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "switchyard/core/error.hpp"
#include "switchyard/moe/router.hpp"

namespace switchyard {
inline namespace v0 {
namespace moe {

struct BiasBalancerConfig {
  std::int64_t num_experts = 0;  ///< E routed experts
  double update_rate = 1e-3;     ///< gamma, the bias step per update (DeepSeek-V3: 0.001)
};

/// The per-layer state: bias [E] for GroupedTopKRouter<T>::route (the router's T, so that
/// state.bias passes as its std::span<const T>); starts at 0.
template <class T = float>
struct BiasBalancerState {
  std::vector<T> bias;
};

template <class T = float>
class BiasBalancer {
 public:
  using config_type = BiasBalancerConfig;
  using state_type = BiasBalancerState<T>;
  static constexpr std::string_view name = "BiasBalancer";

  explicit BiasBalancer(const config_type& cfg) : cfg_(cfg) {
    detail::check_num_experts(name, cfg_.num_experts);
    if (!(cfg_.update_rate >= 0) || !std::isfinite(cfg_.update_rate)) {
      switchyard::detail::fail_config(name, "config", "update_rate", cfg_.update_rate,
                                      "a finite value >= 0");
    }
  }

  const config_type& config() const noexcept { return cfg_; }
  std::int64_t num_experts() const noexcept { return cfg_.num_experts; }

  /// State at the start of training: bias = 0 for every expert.
  state_type initial_state() const {
    return {std::vector<T>(static_cast<std::size_t>(cfg_.num_experts), T(0))};
  }

  /// After a step: bias_e += update_rate * sign(mean load - tokens_per_expert[e]).
  /// tokens_per_expert: [E] the step's assignments per expert (plan.stats.tokens_per_expert).
  void update(state_type& state, std::span<const std::int64_t> tokens_per_expert) const {
    const std::int64_t E = cfg_.num_experts;
    check_length("bias", state.bias.size());
    check_length("tokens_per_expert", tokens_per_expert.size());
    double total = 0;
    for (std::int64_t e = 0; e < E; ++e) {
      if (tokens_per_expert[e] < 0) {
        switchyard::detail::fail_config(name, "update", "tokens_per_expert", tokens_per_expert[e],
                                        "counts >= 0 (expert " + std::to_string(e) + ")");
      }
      total += static_cast<double>(tokens_per_expert[e]);
    }
    for (std::int64_t e = 0; e < E; ++e) {
      // sign(mean - load) = sign(total - E * load), without dividing.
      const double diff =
          total - static_cast<double>(E) * static_cast<double>(tokens_per_expert[e]);
      const double step = diff > 0 ? cfg_.update_rate : diff < 0 ? -cfg_.update_rate : 0.0;
      state.bias[e] = static_cast<T>(static_cast<double>(state.bias[e]) + step);
    }
  }

 private:
  void check_length(std::string_view arg, std::size_t n) const {
    if (static_cast<std::int64_t>(n) == cfg_.num_experts) return;
    const std::int64_t got[1] = {static_cast<std::int64_t>(n)};
    switchyard::detail::fail_shape(
        name, "update", arg, switchyard::detail::format_shape({"E"}, got),
        "[E=" + std::to_string(cfg_.num_experts) + "]", "one entry per routed expert");
  }

  config_type cfg_;
};

}  // namespace moe
}  // namespace v0
}  // namespace switchyard
